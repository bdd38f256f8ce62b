"""Warm start from a trained TwoTower, sparse embedding updates, history pooling and
history dropout."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparcode.bench import warm_loss
from sparcode.cli import main
from sparcode.engine.encoder import Tokenizer
from sparcode.training import defaults
from sparcode.training.data import synthetic
from sparcode.training.export import ExportRule
from sparcode.training.train import TrainConfig, fit, full_scores, make_model, make_optimizers, tensors, validator
from sparcode.training.warm import model_kwargs, warm_start


@pytest.fixture(scope="module")
def ids_only():
    """Synthetic interactions without features, and a TwoTower trained on them."""
    data = dataclasses.replace(synthetic(1000, 800, seed=0), item_features=None, item_cardinalities=(),
                               user_features=None, user_cardinalities=())
    torch.manual_seed(0)
    two_tower = make_model("two_tower", data)
    fit(two_tower, data, TrainConfig(epochs=2, progress=False, valid_users=200), lambda m, u, t: {"recall@20": 0.0})
    return data, two_tower.eval()


def top_items(model, data, k: int = 10) -> np.ndarray:
    cfg = TrainConfig()
    users = np.arange(data.n_users)
    return torch.topk(full_scores(model, data, cfg, users, tensors(data, cfg)), k, dim=1).indices.numpy()


def warm(kind: str, data, two_tower, **kwargs):
    model = make_model(kind, data, **{**model_kwargs(two_tower), **kwargs})
    t = tensors(data, TrainConfig())
    warm_start(model, two_tower, t["history"], t["user_features"])
    return model.eval()


@pytest.mark.parametrize("n_tokens", [4, 1])  # the two-tower's 4 heads mean-pool into one user vector
def test_warm_all_to_all_ranks_as_the_two_tower(ids_only, n_tokens):
    data, two_tower = ids_only
    model = warm("all_to_all", data, two_tower, n_tokens=n_tokens)
    cfg = TrainConfig()
    users = np.arange(data.n_users)
    t = tensors(data, cfg)
    mine, theirs = full_scores(model, data, cfg, users, t), full_scores(two_tower, data, cfg, users, t)
    factor = mine.max(1).values / theirs.max(1).values  # one positive factor per user
    assert bool((factor > 0).all())
    # the scale makes a typical user's scores the two-tower's logits, whatever T is
    assert 0.8 < float(factor.median()) < 1.25, float(factor.median())
    expected = factor.unsqueeze(1) * theirs.clamp(min=0)  # the activation cuts at 0
    assert (mine - expected).abs().max() < 1e-4 * mine.max()
    assert (top_items(model, data) == top_items(two_tower, data)).mean() > 0.95  # only near-ties reorder


def test_warm_sparcode_starts_near_the_two_tower_with_distinct_codebooks(ids_only):
    data, two_tower = ids_only
    model = warm("sparcode", data, two_tower)
    parts = model.encoder.quantizer.parts
    assert all(bool(stage.initialized) for stage in model.codebook_trainer.stages)
    assert not torch.equal(parts[0].codebooks, parts[1].codebooks)  # one k-means seed per position
    evaluate = validator(data, TrainConfig())
    users = np.nonzero(data.valid.lengths)[0]
    ours, theirs = evaluate(model, users, data.valid)["recall@20"], evaluate(two_tower, users, data.valid)["recall@20"]
    cold = make_model("sparcode", data).eval()
    assert ours > 0.7 * theirs and ours > 2 * evaluate(cold, users, data.valid)["recall@20"]


@pytest.mark.gpu
def test_warm_start_moves_the_model_to_the_two_towers_device(ids_only):
    """A SparCode made on the CPU warm-starts from a TwoTower trained on CUDA (the accuracy
    bench's path): it moves to the TwoTower's device and starts from its item table."""
    import copy

    data, two_tower = ids_only
    source = copy.deepcopy(two_tower).cuda()
    model = make_model("sparcode", data, **model_kwargs(source))
    t = tensors(data, TrainConfig(device="cuda"))
    warm_start(model, source, t["history"], t["user_features"])
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert all(bool(stage.initialized) for stage in model.codebook_trainer.stages)
    torch.testing.assert_close(F.normalize(model.items.ids.weight, dim=-1), F.normalize(source.items.ids.weight, dim=-1))


def test_warm_start_refuses_what_does_not_fit(ids_only):
    data, two_tower = ids_only
    t = tensors(data, TrainConfig())
    with pytest.raises(ValueError, match="--init-from: the two-tower's tokenizer dim is 128, this model's 32"):
        warm_start(make_model("sparcode", data, dim=32, tokenizer_hidden=(), normalize_tokens=False), two_tower,
                   t["history"], None)
    with pytest.raises(ValueError, match="--init-from: the model normalises its tokens"):
        warm_start(make_model("sparcode", data, dim=two_tower.tokenizer.dim, tokenizer_hidden=()), two_tower,
                   t["history"], None)
    with pytest.raises(ValueError, match="--init-from: expected a two_tower checkpoint, got a SparCode"):
        warm_start(make_model("sparcode", data, normalize_tokens=False), make_model("sparcode", data), t["history"], None)


def test_train_init_from_command(tmp_path, capsys):
    """sparcode train --init-from: the checkpoint records the source and the starting
    validation, reloads, and wrong sources are named."""
    assert main(["train", "--model", "two_tower", "--out", str(tmp_path / "tt"), "--epochs", "1", "--no-progress"]) == 0
    assert main(["train", "--model", "sparcode", "--init-from", str(tmp_path / "tt"), "--out", str(tmp_path / "sc"),
                 "--epochs", "1", "--no-progress"]) == 0
    config = json.loads((tmp_path / "sc" / "config.json").read_text())
    assert config["result"]["init_from"] == str((tmp_path / "tt").resolve())
    assert [h["epoch"] for h in config["result"]["history"]] == [0, 1] and config["result"]["epochs"] == 1
    assert config["model"]["kwargs"]["normalize_tokens"] is False and config["model"]["kwargs"]["tokenizer_hidden"] == []
    assert config["model"]["kwargs"]["dim"] == json.loads((tmp_path / "tt" / "config.json").read_text())["model"][
        "kwargs"]["dim"] == defaults.TWO_TOWER_DIM  # the two-tower's size, not SparCode's default
    assert main(["evaluate", str(tmp_path / "tt")]) == 0  # the tied two-tower checkpoint reloads
    capsys.readouterr()
    for model, source, extra, message in (
            ("two_tower", "tt", [], "starts a sparcode or all_to_all model"),
            ("all_to_all", "sc", [], "holds a SparCode, not a two_tower"),
            ("sparcode", "tt", ["--dim", "32"], f"--dim: 32, but the two-tower in --init-from has dim {defaults.TWO_TOWER_DIM}")):
        assert main(["train", "--model", model, "--init-from", str(tmp_path / source), "--out", str(tmp_path / "x"),
                     "--epochs", "1", "--no-progress", *extra]) == 2
        assert message in capsys.readouterr().err


def test_epochs_zero_converts_the_two_tower_without_training(tmp_path, capsys):
    """--epochs 0 with --init-from: the checkpoint is the warm start itself, in the paper's
    code space on a CPU too, its best validation the start's; without a two-tower to
    convert it is refused."""
    from sparcode.training.checkpoint import load_checkpoint

    assert main(["train", "--model", "two_tower", "--out", str(tmp_path / "tt"), "--epochs", "1", "--no-progress"]) == 0
    assert main(["train", "--model", "sparcode", "--init-from", str(tmp_path / "tt"), "--out", str(tmp_path / "sc"),
                 "--epochs", "0", "--error-feedback", "--no-progress"]) == 0
    result = json.loads((tmp_path / "sc" / "config.json").read_text())["result"]
    assert result["epochs"] == 0 and [h["epoch"] for h in result["history"]] == [0]
    assert result["best_valid_recall@20"] == result["history"][0]["valid_recall@20"] > 0
    converted, data, _ = load_checkpoint(tmp_path / "sc")
    source, _, _ = load_checkpoint(tmp_path / "tt")
    torch.manual_seed(0)
    assert converted.encoder.quantizer.codebooks.shape[-2] == defaults.GPU_CODEWORDS != defaults.CPU_CODEWORDS
    expected = make_model("sparcode", data, feedback=True, n_words=defaults.GPU_CODEWORDS, **model_kwargs(source))
    t = tensors(data, TrainConfig())
    warm_start(expected, source, t["history"], t["user_features"])
    for name, value in expected.state_dict().items():
        assert torch.allclose(converted.state_dict()[name].float(), value.float(), atol=1e-6), name
    capsys.readouterr()
    assert main(["train", "--model", "sparcode", "--out", str(tmp_path / "x"), "--epochs", "0", "--no-progress"]) == 2
    assert "--epochs: 0 trains nothing; it takes a two-tower to convert (--init-from)" in capsys.readouterr().err


def test_accuracy_bench_converts_the_two_tower_with_warm_epochs_zero(tmp_path, capsys):
    from sparcode.bench import accuracy

    argv = ["--dataset", "synthetic", "--synthetic-size", "300", "100", "--out", str(tmp_path), "--epochs", "1",
            "--models", "two_tower", "sparcode_warm", "--warm-epochs", "0", "--no-progress"]
    assert accuracy.main(argv) == 0
    report = json.loads((tmp_path / "accuracy-synthetic.json").read_text())
    warm = report["models"]["sparcode_warm"]
    assert warm["epochs"] == 0 and [h["epoch"] for h in warm["valid_history"]] == [0] and warm["recall@20"] > 0
    assert report["config"]["train_warm"]["epochs"] == 0 and report["config"]["train"]["epochs"] == 1
    for flags, message in ((["--epochs", "0"], "--epochs: expected >= 1, got 0"),
                           (["--models", "two_tower"], "--warm-epochs: expected >= 0 epochs of sparcode_warm")):
        with pytest.raises(SystemExit) as exit_:
            accuracy.main(argv + flags)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_history_pooling_is_the_masked_mean_and_its_gradient_sparse():
    tokenizer = Tokenizer(50, [], dim=8, n_tokens=2, hidden=(16,))
    history = torch.tensor([[1, 2, -1], [-1, -1, -1], [3, 3, 4]])
    mask = (history >= 0).unsqueeze(-1).float()
    expected = (tokenizer.item_embedding(history.clamp(min=0)) * mask).sum(1) / mask.sum(1).clamp(min=1)
    assert torch.allclose(tokenizer.pool(history), expected, atol=1e-6)
    tokenizer.item_embedding.sparse = True
    tokenizer.pool(history).sum().backward()
    grad = tokenizer.item_embedding.weight.grad
    assert grad.is_sparse and torch.equal(grad._indices()[0], torch.tensor([1, 2, 3, 4]))  # each history item once


@pytest.mark.parametrize("shape", [(64, 12), (3, 1), (0, 5)])
def test_weighted_bag_gradient_is_embedding_bags_with_one_row_per_used_item(shape):
    """The pooled vectors and the table's gradient equal ``F.embedding_bag``'s (the
    reference, computed on a dense copy of the table), with duplicates in a row, rows of
    padding only and dropped (weight-0) slots; the gradient holds each used item once."""
    from sparcode.engine.encoder import WeightedBag

    torch.manual_seed(1)
    ids = torch.randint(0, 20, shape)
    weights = torch.rand(shape) * (torch.rand(shape) > 0.3)
    if shape[0] > 1:
        ids[0, : shape[1] // 2] = 7  # one item several times in a row
        weights[1] = 0  # a row of padding only
    table = torch.randn(20, 6, requires_grad=True)
    dense = table.detach().clone().requires_grad_(True)
    upstream = torch.randn(shape[0], 6)
    pooled = WeightedBag.apply(ids, weights, table)
    expected = F.embedding_bag(ids, dense, mode="sum", per_sample_weights=weights)
    torch.testing.assert_close(pooled, expected)
    (pooled * upstream).sum().backward()
    (expected * upstream).sum().backward()
    grad = table.grad
    assert grad.is_sparse
    used = torch.unique(ids[weights != 0])
    assert torch.equal(grad._indices()[0], used)  # each used item once, sorted; unused and weight-0 items absent
    torch.testing.assert_close(grad.to_dense(), dense.grad)


def test_history_dropout_only_in_training():
    torch.manual_seed(0)
    tokenizer = Tokenizer(500, [], dim=8, n_tokens=1, hidden=(), normalize=False, history_dropout=0.5)
    history = torch.arange(400).view(4, 100)
    tokenizer.eval()
    assert torch.equal(tokenizer(history, None), tokenizer(history, None))
    whole = tokenizer.pool(history)
    tokenizer.train()
    dropped = tokenizer.pool(history)
    assert not torch.allclose(dropped, whole)
    with pytest.raises(ValueError, match="history_dropout: expected a probability in"):
        Tokenizer(5, [], dim=8, n_tokens=1, history_dropout=1.0)


def test_embedding_tables_get_lazy_adam_and_untouched_rows_stay():
    data = synthetic(200, 100, seed=0)
    model = make_model("two_tower", data)
    optimizers = make_optimizers(model, 1e-2)
    assert [type(o).__name__ for o in optimizers] == ["SparseAdam", "Adam"]
    assert model.items.ids is model.tokenizer.item_embedding  # one table, stepped once
    before = model.items.ids.weight.detach().clone()
    model.train()
    t = tensors(data, TrainConfig())
    users = model.user_vectors(t["history"][:4], t["user_features"][:4])
    items = model.item_vectors(model.items(torch.tensor([7, 8]), t["item_features"]))
    (users @ items.T).sum().backward()
    for optimizer in optimizers:
        optimizer.step()
    touched = set(t["history"][:4].flatten().clamp(min=0).tolist()) | {0, 7, 8}
    changed = set((model.items.ids.weight != before).any(1).nonzero().flatten().tolist())
    assert {7, 8} <= changed <= touched


def test_warm_loss_bench_splits_quantization_from_the_index(ids_only, tmp_path, capsys):
    """Unquantized, the warm model ranks as the two-tower; a cap of every item is the
    quantized model; the command writes its report and names a bad --space."""
    data, two_tower = ids_only
    t = tensors(data, TrainConfig())
    users = np.nonzero(data.valid.lengths)[0]
    mine = validator(data, TrainConfig())(two_tower, users, data.valid)["recall@20"]
    row = warm_loss.measure(two_tower, data, t, users, 2, 8, ExportRule.top(1.0, data.n_items))
    assert abs(row["unquantized"] - mine) < 0.02 and row["codes"] == 2 * 8**2
    assert row["index"] == pytest.approx(row["quantized"], abs=0.02)  # softplus lists rank as the ReLU sum, near ties aside
    few = warm_loss.measure(two_tower, data, t, users, 2, 8, ExportRule.top(0.01, data.n_items))
    assert few["candidates_per_user"] <= 2 * 8 and few["index"] < row["index"]
    assert main(["train", "--model", "two_tower", "--out", str(tmp_path / "tt"), "--epochs", "1", "--no-progress"]) == 0
    assert warm_loss.main(["--checkpoint", str(tmp_path / "tt"), "--space", "2x4", "--no-error-feedback",
                           "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "warm-loss-synthetic.json").read_text())
    assert [(r["tokens"], r["codewords"], r["feedback"]) for r in report["spaces"]] == [(2, 4, False)]
    assert report["error_feedback"] is False and 0 <= report["two_tower"] <= 1
    with pytest.raises(SystemExit):
        warm_loss.main(["--checkpoint", str(tmp_path / "tt"), "--space", "4by64", "--out", str(tmp_path)])
    assert "expected TOKENSxCODEWORDS such as 4x64" in capsys.readouterr().err
