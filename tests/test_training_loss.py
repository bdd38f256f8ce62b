"""Training internals: negative sampling and its log-Q correction, the training and
serving activations, the scorer's starting point, the unquantized warm-up, the validation
split, and the accuracy runner end to end on tiny synthetic data."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparcode.bench import accuracy
from sparcode.training import data as datasets
from sparcode.training.data import CSR
from sparcode.training.models import Scorer, SparCode
from sparcode.training.train import NegativeSampler, TrainConfig, fit, full_scores, tensors


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="sampling: expected one of uniform, popularity, in-batch"):
        TrainConfig(sampling="hard")
    with pytest.raises(ValueError, match="negatives: expected >= 1"):
        TrainConfig(negatives=0)
    with pytest.raises(ValueError, match="batch_size: expected >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="commitment: expected a weight >= 0"):
        TrainConfig(commitment=-0.5)
    with pytest.raises(ValueError, match="valid_users"):
        TrainConfig(valid_users=0)
    with pytest.raises(ValueError, match="l2: expected a weight >= 0, got -1"):
        TrainConfig(l2=-1)
    with pytest.raises(ValueError, match="lr: expected a rate > 0, got 0"):
        TrainConfig(lr=0)
    TrainConfig(sampling="in-batch", negatives=0)  # in-batch needs no sampled negatives


def test_popularity_sampling_follows_training_frequency():
    train = CSR.from_lists([np.array([0] * 8 + [1] * 2)])  # item 0: 8 + 1, item 1: 2 + 1, item 2: 0 + 1 (add-one)
    sampler = NegativeSampler(TrainConfig(negatives=60_000, sampling="popularity"), train, 3)
    torch.manual_seed(0)
    counts = torch.bincount(sampler.candidates(torch.tensor([0])), minlength=3).double() / 60_000
    torch.testing.assert_close(counts, torch.tensor([9 / 13, 3 / 13, 1 / 13], dtype=torch.float64), atol=0.01, rtol=0)
    assert torch.equal(NegativeSampler(TrainConfig(sampling="in-batch"), train, 3).candidates(torch.tensor([2, 0])),
                       torch.tensor([2, 0]))


@pytest.mark.parametrize("sampling", ["uniform", "popularity", "in-batch"])
def test_loss_is_softmax_with_log_q_and_own_positive_masked(sampling):
    train = CSR.from_lists([np.array([0, 0, 0, 1])])
    sampler = NegativeSampler(TrainConfig(sampling=sampling), train, 3)
    q = torch.tensor([4 / 7, 2 / 7, 1 / 7])
    pos = torch.tensor([0, 2])
    neg = torch.tensor([0, 1, 2])  # holds both positives: each is masked for its own row
    pos_scores = torch.tensor([1.0, 2.0])
    neg_scores = torch.tensor([[5.0, 0.5, -1.0], [0.3, 0.2, 9.0]])
    got = sampler.loss(pos_scores, neg_scores, pos, neg)
    shift = torch.zeros(3) if sampling == "uniform" else q.log()
    want = 0.0
    for r in range(2):
        logits = [float(pos_scores[r] - shift[pos[r]])]
        logits += [float(neg_scores[r, j] - shift[neg[j]]) for j in range(3) if neg[j] != pos[r]]
        want += -logits[0] + math.log(sum(math.exp(v) for v in logits))
    assert got.item() == pytest.approx(want / 2, rel=1e-5)


def test_sparcode_trains_with_softplus_and_serves_with_relu():
    torch.manual_seed(0)
    data = datasets.synthetic(40, 30, per_user=8, seed=0)
    model = SparCode(data, n_words=4, hidden=(16,), quantize=False)
    tokens, items = torch.randn(3, 4, 64), torch.randn(5, 64)
    with torch.no_grad():
        raw = model.scorer(tokens, items)
        model.train()
        torch.testing.assert_close(model.score(tokens, items), F.softplus(raw).sum(1))
        model.eval()
        torch.testing.assert_close(model.score(tokens, items), torch.relu(raw).sum(1))


def test_scorer_starts_as_a_scaled_dot_product():
    torch.manual_seed(0)
    tokens, items = torch.randn(2, 3, 8), torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(Scorer(8, (16, 16))(tokens, items), tokens @ items.T / math.sqrt(8))
        # shared items and the same items given per query score alike
        scorer = Scorer(8, (16,))
        torch.nn.init.normal_(scorer.rest[-1].weight)
        torch.testing.assert_close(scorer(tokens, items), scorer(tokens, items.expand(2, 5, 8)))


@pytest.mark.parametrize("n_items, side", [(5, "items"), (9, "tokens")])
def test_scorer_folded_first_layer_matches_the_product_path(n_items, side):
    """Shared items fold the first layer over the side with fewer rows (6 token rows
    here); the same items given per query take the explicit product: scores and
    gradients (tokens, items, weights) agree."""
    torch.manual_seed(0)
    scorer = Scorer(8, (4, 4)).double()
    torch.nn.init.normal_(scorer.rest[-1].weight)
    tokens, items = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(n_items, 8, dtype=torch.float64)
    assert scorer.fold_side(tokens, items) == side and scorer.fold_side(tokens, items.expand(3, n_items, 8)) is None
    grads = []
    for given in (items, items.expand(3, n_items, 8)):
        t, i = tokens.clone().requires_grad_(), given.clone().requires_grad_()
        out = scorer(t, i)
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((out.detach(), t.grad, i.grad.sum(0) if i.dim() == 3 else i.grad,
                      scorer.product_in.weight.grad.clone(), scorer.item_in.weight.grad.clone(),
                      scorer.token_in.weight.grad.clone(), scorer.token_in.bias.grad.clone()))
        scorer.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_scorer_with_precomputed_halves_folds_over_the_tokens():
    """Export passes the first layer's code and item halves: the token fold adds them
    and scores as the scorer alone does, for one code row or many against the items."""
    torch.manual_seed(0)
    scorer = Scorer(8, (4,)).double()
    torch.nn.init.normal_(scorer.rest[-1].weight)
    codes, items = torch.randn(7, 1, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    with torch.no_grad():
        token_part, item_part = scorer.token_in(codes), scorer.item_in(items)
        assert scorer.fold_side(codes, items, given=True) == "tokens"
        want = scorer(codes, items.expand(7, 5, 8))
        torch.testing.assert_close(scorer(codes, items, token_part, item_part), want)
        torch.testing.assert_close(scorer(codes[:1], items, token_part[:1], item_part), want[:1])


@pytest.mark.parametrize("quantize", [True, False])
def test_full_scores_equal_the_model_user_by_user(quantize):
    """Validation's catalogue scores, whatever the chunking (a quantized model scores
    each distinct code once and adds it to the users holding it; AllToAll runs users in
    chunks), equal scoring each user's tokens against all items."""
    torch.manual_seed(0)
    data = datasets.synthetic(60, 40, per_user=8, seed=0)
    model = SparCode(data, n_words=3, hidden=(16,), quantize=quantize)
    torch.nn.init.normal_(model.scorer.rest[-1].weight)
    cfg = TrainConfig(progress=False)
    t = tensors(data, cfg)
    model.train()
    with torch.no_grad():
        model.tokens(t["history"], t["user_features"])  # codebooks from the users' tokens, running statistics
    model.eval()
    users = np.array([5, 0, 17, 5, 42, 33, 8])
    with torch.no_grad():
        tokens, _ = model.tokens(t["history"][users], t["user_features"][users])
        want = torch.cat([model.score(tokens[r : r + 1], model.items(torch.arange(40), t["item_features"]))
                          for r in range(len(users))])
    if quantize:
        codes = model.encoder.encode(t["history"][users], t["user_features"][users])
        assert len(torch.unique(codes)) < codes.numel()  # at most 9 codes (C = 3, P = 2) for 28 tokens
    for budget in (None, 1, 40 * 80 * 12 * 5):  # everything at once, one token row per call, five
        torch.testing.assert_close(full_scores(model, data, cfg, users, t, budget), want)


def test_validation_takes_items_of_at_most_max_users():
    lists = [np.arange(10) + u for u in range(50)]
    kept, valid = datasets.split_validation(lists, 0.3, seed=0, max_users=7)
    assert sum(len(v) > 0 for v in valid) <= 7
    for original, k, v in zip(lists, kept, valid):
        assert sorted(np.concatenate([k, v]).tolist()) == original.tolist() and len(k) > 0


def test_accuracy_runner_tiny(tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--out", str(tmp_path), "--epochs", "1", "--hidden", "16", "--negatives", "8",
            "--synthetic-size", "200", "150", "--codewords", "4", "--density", "0.2", "--densities", "1", "0.05",
            "--cap-densities", "0.02", "--all-to-all-sample", "50", "--valid-users", "30", "--l2", "1e-5", "--no-progress"]
    assert accuracy.main(argv) == 0
    report = json.loads((tmp_path / "accuracy-synthetic.json").read_text())
    assert report["command"].startswith("python -m sparcode.bench.accuracy --dataset synthetic")
    assert set(report["models"]) == {"two_tower", "sparcode", "all_to_all"}
    sparcode = report["models"]["sparcode"]
    assert sparcode["density"] == pytest.approx(0.2, rel=0.05) and sparcode["index_bytes"] > 0
    assert sparcode["export_rules_in_pass"] == 4  # the headline index and the curve's three from one pass
    assert sparcode["rule"] == "bias" and sparcode["cap"] is None and sparcode["target_density"] == 0.2
    assert report["models"]["all_to_all"]["sample_users"] == 50
    assert report["config"]["train"]["valid_users"] == 30 and report["config"]["train"]["l2"] == 1e-5
    assert report["config"]["train"]["sampling"] == "popularity"  # the defaults: SparCode and AllToAll
    assert report["config"]["train_two_tower"]["sampling"] == "in-batch"  # and TwoTower
    assert report["config"]["model"]["temperature"] == 0.1
    for m in report["models"].values():
        assert 0 <= m["recall@20"] <= 1 and m["epochs"] == 1
    curve = report["sparsity_curve"]
    assert [(p["rule"], p["target_density"]) for p in curve] == [("bias", 1.0), ("bias", 0.05), ("cap", 0.02)]
    assert curve[0]["density"] == 1.0 and curve[0]["index_bytes"] > curve[1]["index_bytes"]
    assert curve[2]["cap"] == 3 and curve[2]["density"] == pytest.approx(3 / 150)  # 3 of 150 items for every code
    assert "two_tower" in capsys.readouterr().out


def test_accuracy_runner_headline_by_the_per_code_rule(tmp_path):
    argv = ["--dataset", "synthetic", "--out", str(tmp_path), "--models", "sparcode", "--epochs", "1", "--hidden", "16",
            "--negatives", "8", "--synthetic-size", "200", "150", "--codewords", "4", "--cap-density", "0.02",
            "--densities", "0.02", "--valid-users", "30", "--no-progress"]
    assert accuracy.main(argv) == 0
    report = json.loads((tmp_path / "accuracy-synthetic.json").read_text())
    sparcode = report["models"]["sparcode"]
    assert sparcode["rule"] == "cap" and sparcode["cap"] == 3 and sparcode["target_density"] == 0.02
    assert sparcode["density"] == pytest.approx(3 / 150)  # every code keeps its top 3 of 150 items
    assert [(p["rule"], p["cap"]) for p in report["sparsity_curve"]] == [("bias", None)]  # one bias, for comparison
    assert "cap density 2.00%" in accuracy.table(report)


def test_accuracy_export_falls_back_to_one_pass_per_rule(monkeypatch):
    from sparcode.training.export import ExportRule

    calls = []

    def export_indexes(model, item_features, n_items, rules, **kwargs):
        calls.append(len(rules))
        if len(rules) > 1 or rules[0].density == 0.5:
            raise RuntimeError("CUDA out of memory")
        return [(f"index {rules[0].density}", {})]

    monkeypatch.setattr(accuracy, "export_indexes", export_indexes)
    out = accuracy.export_all(None, None, 10, [ExportRule(1), ExportRule(0.5), ExportRule(0.1)], seed=0, progress=False)
    assert calls == [3, 1, 1, 1]
    assert out[0] == ("index 1", {}) and out[2] == ("index 0.1", {})
    assert isinstance(out[1][0], RuntimeError)  # the rule that fails alone: its curve point records the error
    with pytest.raises(RuntimeError, match="out of memory"):  # a single rule (the headline alone) raises
        accuracy.export_all(None, None, 10, [ExportRule(0.5)], seed=0, progress=False)


def test_accuracy_runner_names_a_bad_two_tower_option(tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--out", str(tmp_path), "--synthetic-size", "50", "40", "--two-tower-sampling", "uniform",
            "--two-tower-negatives", "0"]
    with pytest.raises(SystemExit) as exit_:
        accuracy.main(argv)
    assert exit_.value.code == 2
    assert "--two-tower-sampling / --two-tower-negatives: negatives: expected >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "accuracy-synthetic.json").exists()
    with pytest.raises(SystemExit) as exit_:
        accuracy.main(argv[:-2] + ["--two-tower-temperature", "0"])
    assert exit_.value.code == 2 and "--two-tower-temperature: expected a positive number" in capsys.readouterr().err
    for flags, message in ((["--cap-density", "0"], "--cap-density: expected fractions in (0, 1], got 0"),
                           (["--densities", "1", "1.5"], "--densities: expected fractions in (0, 1], got 1.5"),
                           (["--density", "0.1", "--cap-density", "0.1"], "not allowed with argument"),
                           (["--two-tower-dim", "0"], "--two-tower-dim: expected a positive integer, got 0"),
                           (["--dim", "-3"], "--dim: expected a positive integer, got -3"),
                           (["--hidden", "64", "0"], "--hidden: expected a positive integer, got 0"),
                           (["--tokens", "0"], "--tokens: expected a positive integer, got 0"),
                           (["--codewords", "0"], "--codewords: expected a positive integer, got 0"),
                           (["--two-tower-lr", "-1"], "--two-tower-lr: expected a positive number, got -1"),
                           (["--lr", "0"], "--lr: expected a positive number, got 0"),
                           (["--embedding-std", "0"], "--embedding-std: expected a positive number, got 0"),
                           (["--synthetic-size", "50", "20"], "--synthetic-size: expected at least 30 items")):
        with pytest.raises(SystemExit) as exit_:
            accuracy.main(argv[:-2] + flags)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_warmup_trains_unquantized_then_starts_codebooks_from_learned_tokens(monkeypatch):
    torch.manual_seed(0)
    data = datasets.synthetic(60, 40, per_user=8, seed=0)
    model = SparCode(data, n_words=4, hidden=(16,))
    seen: list[bool] = []  # quantize flag at each scorer call in training
    original = model.score
    monkeypatch.setattr(model, "score", lambda tokens, items: (seen.append(model.quantize), original(tokens, items))[1])
    initialized_from: list[int] = []
    init = model.codebook_trainer.initialize
    monkeypatch.setattr(model.codebook_trainer, "initialize", lambda z: (initialized_from.append(z.numel()), init(z))[1])
    cfg = TrainConfig(epochs=3, warmup=2, batch_size=32, negatives=5, progress=False, patience=1)
    calls_per_epoch = 2 * -(-len(data.train.items) // 32)  # positives and negatives per step
    validated, states = [], []

    def evaluate(m, users, truth):  # warm-up epochs score higher: they must still not become the best state
        validated.append(m.quantize)
        states.append({name: value.clone() for name, value in m.state_dict().items()})
        return {"recall@20": 0.1 if m.quantize else 0.9}

    info = fit(model, data, cfg, evaluate)
    assert seen[: 2 * calls_per_epoch] == [False] * (2 * calls_per_epoch)
    assert seen[2 * calls_per_epoch:] == [True] * calls_per_epoch and model.quantize
    assert initialized_from == [data.n_users * 4 * 64]  # every user's 4 tokens, once, at the switch
    assert [h.get("warmup", False) for h in info["history"]] == [True, True, False]
    assert "distinct_codes" not in info["history"][0]  # unquantized: no codes yet
    assert 1 <= info["history"][2]["distinct_codes"] <= 4 * 16  # C = 4, P = 2, one quantizer per token: 4 x 16 codes
    assert validated == [False, False, True]  # patience 1 did not stop the run in the warm-up
    assert info["best_valid_recall@20"] == 0.1  # not the warm-up's 0.9
    restored = model.state_dict()
    assert all(torch.equal(restored[name], states[2][name]) for name in restored)  # the quantized epoch's state
    assert not all(torch.equal(restored[name], states[1][name]) for name in restored)


def test_warmup_must_leave_quantized_epochs():
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(epochs=3, warmup=3)
    torch.manual_seed(0)
    data = datasets.synthetic(60, 40, per_user=8, seed=0)
    model = SparCode(data, n_words=4, hidden=(16,))
    cfg = TrainConfig(epochs=5, warmup=4, batch_size=64, negatives=5, progress=False, time_budget=1e-9)
    info = fit(model, data, cfg, lambda m, users, truth: {"recall@20": 0.0})
    # half the budget was spent before the first epoch: quantized from the start, then out of time
    assert info["epochs"] == 1 and "warmup" not in info["history"][0] and model.quantize


def test_density_training_moves_the_bias_to_the_target_quantile():
    """With ``density`` the bias follows the score quantile of the (token, negative)
    pairs, so about that fraction of them is above zero after the bias, and the bias is
    part of the state that checkpoints keep."""
    with pytest.raises(ValueError, match="density: expected a fraction in"):
        TrainConfig(density=1.0)
    torch.manual_seed(0)
    data = datasets.synthetic(80, 60, per_user=8, seed=0)
    model = SparCode(data, n_words=4, hidden=(16,), quantizer="product", per_token=False)
    cfg = TrainConfig(epochs=4, batch_size=32, negatives=30, progress=False, density=0.1)
    better = iter(range(100))  # every epoch improves: the last state is kept
    fit(model, data, cfg, lambda m, users, truth: {"recall@20": next(better)})
    assert float(model.bias) != 0.0 and "bias" in model.state_dict()
    model.eval()
    t = tensors(data, cfg)
    with torch.no_grad():
        tokens, _ = model.tokens(t["history"], t["user_features"])
        raw = model.raw(tokens, model.items(torch.arange(60), t["item_features"]))
    assert float((raw + model.bias > 0).float().mean()) == pytest.approx(0.1, abs=0.03)
    all_to_all = SparCode(data, n_words=4, hidden=(16,), quantize=False)
    fit(all_to_all, data, TrainConfig(epochs=1, batch_size=64, negatives=5, progress=False, density=0.1),
        lambda m, users, truth: {"recall@20": 0.0})
    assert float(all_to_all.bias) == 0.0  # the upper bound stays unsparsified
    with pytest.raises(ValueError, match="density: the bias follows uniform negatives"):
        fit(model, data, TrainConfig(epochs=1, progress=False, density=0.1, sampling="popularity"), None)
