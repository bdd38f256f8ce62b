"""Training side: loaders, metrics, quantizer, export, and the demo end to end."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparcode.engine.encoder import PerTokenQuantizer, ProductQuantizer, ResidualQuantizer, make_quantizer
from sparcode.training import data as datasets
from sparcode.training.codebooks import CodebookTrainer, EMACodebooks
from sparcode.training.data import CSR
from sparcode.training.defaults import EMBEDDING_STD
from sparcode.training.export import ExportRule, export_index, export_indexes
from sparcode.training.metrics import ranking_metrics
from sparcode.training.models import SparCode, TwoTower

DATA = Path(os.environ.get("SPARCODE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))  # the datasets, if any


def test_bars_loader_and_malformed_line(tmp_path):
    (tmp_path / "train.txt").write_text("0 6 2 5 1 4 3\n1 0 2\n")
    (tmp_path / "test.txt").write_text("0 7\n1 3\n")
    data = datasets.load_bars(tmp_path)
    assert data.n_users == 2 and data.n_items == 8 and data.test_by == "time"  # NGCF's split: each user's latest 20%
    assert data.test.row(0).tolist() == [7]
    assert data.train.row(0).tolist() == [i for i in [6, 2, 5, 1, 4, 3] if i in data.train.row(0)]  # the file's order
    assert sorted(data.train.row(0).tolist() + data.valid.row(0).tolist()) == [1, 2, 3, 4, 5, 6]
    from_str = datasets.load_bars(str(tmp_path))  # a str path, as from a notebook
    assert from_str.name == tmp_path.name and np.array_equal(from_str.test.items, data.test.items)
    (tmp_path / "test.txt").write_text("0 7\n1 x3\n")
    with pytest.raises(ValueError, match=r"test.txt:2: expected integers"):
        datasets.load_bars(tmp_path)


def test_ml100k_loader_splits_by_time(tmp_path):
    rows = [(1, 10, 5, 100), (1, 11, 4, 300), (1, 12, 3, 200), (1, 13, 3, 400), (1, 14, 1, 500), (2, 10, 2, 50), (2, 12, 2, 60)]
    (tmp_path / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    (tmp_path / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    genres = "|".join(["0"] * 19)
    (tmp_path / "u.item").write_text("".join(f"{i}|Movie {i}|01-Jan-1995||http://x|{genres}\n" for i in range(10, 15)))
    data = datasets.load_ml100k(tmp_path)
    assert data.n_users == 2 and data.n_items == 5
    assert data.test.row(0).tolist() == [4] and data.test_by == "time"  # item 14, the latest of user 1
    assert data.train.row(0).tolist() == [0, 2, 1, 3]  # items 10, 12, 11, 13: in time order
    assert data.user_features.shape == (2, 3) and data.item_features.shape == (5, 2)
    (tmp_path / "u.data").write_text("1\t10\t5\n")
    with pytest.raises(ValueError, match=r"u.data:1: expected 4 tab-separated fields"):
        datasets.load_ml100k(tmp_path)


def test_ml1m_loader(tmp_path):
    pairs = [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (2, 1), (2, 3)]
    (tmp_path / "interactions.tsv").write_text("user_id\tmovie_id\n" + "".join(f"{u}\t{m}\n" for u, m in pairs))
    (tmp_path / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (tmp_path / "movies.dat").write_text("".join(f"{m}::Movie {m} (1995)::Comedy|Drama\n" for m in range(1, 6)))
    data = datasets.load_ml1m(tmp_path, seed=3)
    assert data.n_users == 2 and data.n_items == 5
    assert len(data.test.row(0)) == 1 and len(data.test.row(1)) == 1
    assert data.user_cardinalities == (2, 2, 2) and data.test_by == "random"
    assert np.array_equal(datasets.load_ml1m(str(tmp_path), seed=3).test.items, data.test.items)  # a str path
    (tmp_path / "movies.dat").unlink()
    with pytest.raises(ValueError, match=r"path: .*movies.dat is missing"):
        datasets.load_ml1m(tmp_path)
    with pytest.raises(ValueError, match=r"path: .*train.txt is missing"):
        datasets.load_bars(str(tmp_path))


def test_synthetic_names_a_size_it_cannot_draw():
    assert datasets.synthetic(50, 40).test_by == "random"
    with pytest.raises(ValueError, match=r"n_items: expected at least per_user \(30\) items, got 20"):
        datasets.synthetic(50, 20)
    with pytest.raises(ValueError, match="n_users: expected a positive integer, got 0"):
        datasets.synthetic(0, 100)


def test_synthetic_is_deterministic():
    a, b = datasets.synthetic(50, 40, per_user=10, seed=1), datasets.synthetic(50, 40, per_user=10, seed=1)
    assert np.array_equal(a.train.items, b.train.items) and np.array_equal(a.test.items, b.test.items)


def test_synthetic_users_draw_from_their_segments_liked_categories():
    data, table = datasets.synthetic(400, 300, per_user=10, seed=2), datasets.affinity_table(2)
    assert table.shape == (256, 256) and (table.sum(1) == 16).all()
    assert not np.array_equal(table[0], table[1])  # segments differ: a cross, not a popularity ranking
    segment = data.user_features @ [16, 1]
    category = data.item_features @ [16, 1]
    users = np.repeat(np.arange(data.n_users), data.train.lengths)
    liked = table[segment[users], category[data.train.items]].mean()
    base = table[segment][:, category].mean()  # share of liked items among all (user, item) pairs
    assert base < 0.1 and liked > 0.5  # logit +4 for a liked category: most draws are liked


def test_metrics_against_hand_computed_cases():
    test = CSR.from_lists([np.array([1, 2]), np.array([5]), np.array([], dtype=np.int64)])
    ranked = np.array([[1, 9, 2, 8], [7, 6, 4, 3], [1, 2, 3, 4]])
    m = ranking_metrics(ranked, test, np.array([0, 1, 2]), ks=(1, 3))
    assert m["users"] == 2  # user 2 has no test item
    assert m["recall@3"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["precision@1"] == pytest.approx(0.5)
    assert m["hitrate@3"] == pytest.approx(0.5)
    ideal = 1 + 1 / np.log2(3)
    assert m["ndcg@3"] == pytest.approx(((1 + 1 / np.log2(4)) / ideal) / 2)


def test_quantizer_ema_moves_codewords_toward_assigned_vectors():
    torch.manual_seed(0)
    pq = ProductQuantizer(8, n_sub=2, n_words=4)
    ema = EMACodebooks(pq)
    ema.initialized.fill_(True)
    ema.train()
    target = torch.full((64, 1, 8), 3.0)
    before = pq.codebooks.clone()
    words = pq.assign(target.reshape(-1, 8))[0]
    for _ in range(20):
        ema(target)
    for p in range(2):
        moved = (pq.codebooks[p, words[p]] - 3.0).abs().mean()
        assert moved < (before[p, words[p]] - 3.0).abs().mean()


@pytest.mark.parametrize("kind", [ProductQuantizer, ResidualQuantizer])
def test_quantizer_straight_through_and_codes(kind):
    torch.manual_seed(0)
    pq = kind(8, n_sub=2, n_words=4)
    z = torch.randn(5, 3, 8, requires_grad=True)
    quantized, codes, commit = EMACodebooks(pq).eval()(z)
    quantized.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through: identity gradient
    assert codes.shape == (5, 3) and int(codes.max()) < 16
    assert torch.allclose(pq.code_vectors()[codes], quantized.detach())
    words = pq.assign(z.detach())
    assert torch.equal(pq.codes(z.detach()), words[..., 0] * 4 + words[..., 1])


def test_residual_quantizer_sums_codewords_and_quantizes_what_the_first_stage_left():
    rq = ResidualQuantizer(4, n_sub=2, n_words=3).eval()
    rq.codebooks.copy_(torch.tensor([[[0.0, 0, 0, 0], [10, 0, 0, 0], [0, 10, 0, 0]],
                                     [[0.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]]]))
    z = torch.tensor([[10.5, 0.8, 0.0, 0.0], [0.2, 9.0, 1.2, 0.9], [0.1, 0.0, 0.1, 0.0]])
    words = rq.assign(z)
    assert words.tolist() == [[1, 1], [2, 2], [0, 0]]  # stage 2 sees z - the stage-1 codeword
    torch.testing.assert_close(rq.lookup(words), torch.tensor([[11.0, 1, 0, 0], [0, 10, 1, 1], [0, 0, 0, 0]]))


def test_residual_quantizer_leaves_less_error_than_product_on_correlated_dimensions():
    """Tokens along one direction through every dimension: the product quantizer's
    halves move together, so of its 16 codes only ~4 lie on the line; the residual
    quantizer's second stage refines the first, 16 levels along it."""
    torch.manual_seed(0)
    direction = torch.ones(8) / 8**0.5
    z = torch.rand(2000, 1) * 2 - 1
    z = z * direction + 0.01 * torch.randn(2000, 8)
    errors = {}
    for kind in (ProductQuantizer, ResidualQuantizer):
        q = kind(8, n_sub=2, n_words=4)
        CodebookTrainer(q).initialize(z, iters=20)
        errors[kind] = float((q.lookup(q.assign(z)) - z).pow(2).sum(1).mean())
    assert errors[ResidualQuantizer] < 0.25 * errors[ProductQuantizer]


def test_per_token_quantizer_gives_each_position_its_own_codebooks_and_codes():
    torch.manual_seed(0)
    q = PerTokenQuantizer("residual", 3, 8, n_sub=2, n_words=4, feedback=False)
    assert q.n_codes == 3 * 16 and q.codebooks.shape == (3, 2, 4, 8)
    centres = torch.tensor([5.0, -5.0, 0.0])  # each position's tokens lie around its own centre
    z = torch.randn(200, 3, 8) * 0.1 + centres.view(1, 3, 1)
    trainer = CodebookTrainer(q)
    trainer.initialize(z)
    for t in range(3):  # each position's first-stage codewords were fitted to its own tokens
        assert (q.parts[t].codebooks[0] - centres[t]).abs().max() < 1
    x = z[:7].clone().requires_grad_(True)
    quantized, codes, _ = trainer.eval()(x)
    quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through
    for t in range(3):
        assert torch.equal(codes[:, t], t * 16 + q.parts[t].codes(x.detach()[:, t]))
    words = q.assign(x.detach())
    assert words.shape == (7, 3, 3) and torch.equal(words[..., 0], torch.arange(3).expand(7, 3))
    assert torch.equal(q.words_to_codes(words), codes) and torch.equal(q.codes(x.detach()), codes)
    torch.testing.assert_close(q.lookup(words), quantized.detach())
    torch.testing.assert_close(q.code_vectors()[codes], quantized.detach())
    with pytest.raises(ValueError, match=r"z: expected \(\.\.\., 3 tokens, 8\)"):
        q.codes(torch.randn(5, 4, 8))


def test_error_feedback_quantizes_each_token_plus_the_error_before_it():
    """Position t quantizes its token plus what positions 0..t-1 left (their inputs minus
    their codewords), in serving (``assign``), in training (the trainer's forward, same
    codes) and in the k-means start; on copies of one vector (a warm start) the sum of
    the quantized tokens is then nearer the sum of the tokens than without feedback."""
    torch.manual_seed(0)
    z = torch.randn(3000, 1, 8).expand(3000, 4, 8).contiguous()
    errors = {}
    for feedback in (False, True):
        q = PerTokenQuantizer("residual", 4, 8, n_sub=2, n_words=8, feedback=feedback)
        trainer = CodebookTrainer(q)
        trainer.initialize(z, seeds=range(4))
        words = q.assign(z)
        carry = torch.zeros(3000, 8)
        for t, part in enumerate(q.parts):  # the reference: one position at a time, by hand
            x = z[:, t] + carry if feedback else z[:, t]
            assert torch.equal(words[:, t, 1:], part.assign(x))
            assert torch.allclose(x, z[:, t]) == (t == 0 or not feedback)  # the carry moves positions 1.. only
            carry = x - part.lookup(part.assign(x))
        quantized, codes, _ = trainer.eval()(z)
        assert torch.equal(codes, q.codes(z))
        torch.testing.assert_close(quantized, q.lookup(words))
        errors[feedback] = float((quantized.sum(1) - z.sum(1)).pow(2).sum(1).mean())
    assert errors[True] < 0.7 * errors[False]
    with pytest.raises(ValueError, match="quantizer: error feedback .* needs per-token codebooks"):
        make_quantizer("residual", 8, 2, 8, feedback=True)


@pytest.mark.parametrize("kind", [ProductQuantizer, ResidualQuantizer])
def test_ema_updates_shrink_the_quantization_error(kind):
    torch.manual_seed(0)
    q = kind(8, n_sub=2, n_words=4)
    ema = EMACodebooks(q)
    ema.initialized.fill_(True)
    ema.train()
    target = torch.randn(4, 8) * 3
    batch = target.repeat(64, 1).unsqueeze(1)
    before = float((q.lookup(q.assign(target)) - target).pow(2).sum())
    for _ in range(100):
        ema(batch)
    after = float((q.lookup(q.assign(target)) - target).pow(2).sum())
    assert after < 0.1 * before


def test_dead_codewords_restart():
    torch.manual_seed(0)
    pq = ProductQuantizer(4, n_sub=1, n_words=8)
    ema = EMACodebooks(pq)
    ema.initialized.fill_(True)
    pq.codebooks.fill_(100.0)
    pq.codebooks[0, 0] = 0.0
    ema.embed_sum.copy_(pq.codebooks)
    ema.train()
    for _ in range(30):
        ema(torch.randn(256, 1, 4))
    assert (pq.codebooks[0].abs().sum(1) < 50).all()  # codewords far from all data were moved in


@pytest.mark.parametrize("quantizer, per_token", [("product", False), ("residual", False), ("residual", True)])
@pytest.mark.parametrize("mlp", ["trained", "zero output"])
def test_export_scores_match_the_model_and_density_rule(quantizer, per_token, mlp):
    torch.manual_seed(0)
    data = datasets.synthetic(60, 80, per_user=10, seed=0)
    model = SparCode(data, n_words=8, hidden=(32, 32), bias=-0.02, quantizer=quantizer, per_token=per_token).eval()
    out = model.scorer.rest[-1]
    with torch.no_grad():  # a trained MLP takes the full scorer; a zero one the dot product plus its output bias
        out.bias.fill_(0.01)
        if mlp == "trained":
            out.weight.normal_(0, 0.1)
    assert model.scorer.mlp_is_constant() == (mlp == "zero output")
    feats = torch.from_numpy(data.item_features)
    index, report = export_index(model, feats, data.n_items)
    assert index.n_codes == 64 * (4 if per_token else 1) and index.codebooks.dim() == (4 if per_token else 3)
    codes_vec = model.encoder.quantizer.code_vectors()
    vectors = model.items(torch.arange(data.n_items), feats)
    rng = np.random.default_rng(0)
    for code in rng.choice(index.n_codes, size=10, replace=False):
        with torch.no_grad():
            want = torch.relu(model.scorer(codes_vec[code][None, None], vectors) + model.bias).reshape(-1)
        lo, hi = int(index.indptr[code]), int(index.indptr[code + 1])
        got = torch.zeros(data.n_items)
        got[index.items[lo:hi].long()] = index.scores[lo:hi].float()
        torch.testing.assert_close(got, want.to(torch.float16).float(), rtol=2e-3, atol=1e-5)  # fp16 storage
    dense, rep = export_index(model, feats, data.n_items, density=1)  # unsparsified: the training activation
    assert rep["density"] == 1.0 and rep["bias"] is None
    code = 5
    with torch.no_grad():
        want = F.softplus(model.scorer(codes_vec[code][None, None], vectors) + model.bias).reshape(-1)
    lo, hi = int(dense.indptr[code]), int(dense.indptr[code + 1])
    assert torch.equal(dense.items[lo:hi].long(), torch.arange(data.n_items))
    torch.testing.assert_close(dense.scores[lo:hi].float(), want.to(torch.float16).float(), rtol=2e-3, atol=1e-5)
    for target in (0.1, 0.01):
        sparse, rep = export_index(model, feats, data.n_items, density=target)
        assert abs(rep["density"] - target) <= 0.05 * target + 1 / (index.n_codes * data.n_items)


def test_sparcode_names_an_unknown_quantizer():
    data = datasets.synthetic(20, 30, per_user=5, seed=0)
    with pytest.raises(ValueError, match="quantizer: expected one of"):
        SparCode(data, quantizer="lattice")


def test_export_cap_keeps_each_codes_highest_scores():
    torch.manual_seed(0)
    data = datasets.synthetic(60, 80, per_user=10, seed=0)
    model = SparCode(data, n_words=8, hidden=(32, 32)).eval()
    feats = torch.from_numpy(data.item_features)
    full, _ = export_index(model, feats, data.n_items, density=0.5)
    capped, rep = export_index(model, feats, data.n_items, density=0.5, cap=7)
    lengths = capped.indptr[1:] - capped.indptr[:-1]
    assert rep["longest_list"] == int(lengths.max()) == 7 and capped.nnz < full.nnz
    for code in range(0, capped.n_codes, 5):
        lo, hi = int(full.indptr[code]), int(full.indptr[code + 1])
        scores, items = full.scores[lo:hi].float(), full.items[lo:hi]
        want = set(items[torch.topk(scores, min(7, hi - lo)).indices].tolist())
        clo, chi = int(capped.indptr[code]), int(capped.indptr[code + 1])
        got = capped.items[clo:chi].tolist()
        assert got == sorted(got) and len(got) == min(7, hi - lo)
        kth = torch.topk(scores, len(got)).values[-1] if got else None
        assert all(i in want or float(scores[items == i]) == float(kth) for i in got)  # ties at the cut may swap
    with pytest.raises(ValueError, match="cap: expected a positive int"):
        export_index(model, feats, data.n_items, cap=0)


def test_export_indexes_one_pass_equals_one_export_per_rule():
    torch.manual_seed(0)
    data = datasets.synthetic(60, 80, per_user=10, seed=0)
    model = SparCode(data, n_words=8, hidden=(32, 32), bias=-0.02).eval()
    feats = torch.from_numpy(data.item_features)
    rules = [ExportRule(), ExportRule(density=1), ExportRule(density=0.1), ExportRule(density=0.01),
             ExportRule(density=1, cap=5), ExportRule(density=1)]  # a cap after and before one bias's full rule
    together = export_indexes(model, feats, data.n_items, rules, budget_bytes=2**16)  # several chunks
    assert len(together) == len(rules)
    for rule, (index, report) in zip(rules, together):
        alone, want = export_index(model, feats, data.n_items, density=rule.density, cap=rule.cap, budget_bytes=2**16)
        for name in ("indptr", "items", "scores"):
            assert torch.equal(getattr(index, name), getattr(alone, name)), (rule, name)
        assert report["bias"] == want["bias"] and report["nnz"] == want["nnz"] and report["rules_in_pass"] == len(rules)
    assert together[2][1]["nnz"] > together[3][1]["nnz"] > 0  # the densities differ: not one index shared
    with pytest.raises(ValueError, match="rules: expected at least one"):
        export_indexes(model, feats, data.n_items, [])
    with pytest.raises(ValueError, match="density: expected a fraction"):
        ExportRule(density=1.5)
    assert ExportRule.top(0.01, 40981) == ExportRule(1, cap=410) and ExportRule.top(1e-9, 50).cap == 1
    with pytest.raises(ValueError, match="fraction: expected a fraction in"):
        ExportRule.top(0, 50)


@pytest.mark.parametrize("block_pairs", [1, 7, 10_000])
def test_postings_blocks_give_the_csr_of_the_kept_pairs(block_pairs, monkeypatch):
    """Pairs copied into blocks (filled across chunk edges, the last one part-full, a chunk
    with nothing kept) give the CSR of the whole mask, in code then item order."""
    from sparcode.training.export import Postings

    monkeypatch.setattr(Postings, "BLOCK_PAIRS", block_pairs)
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(11, 13, generator=gen).to(torch.float16)
    keep = scores > 0.6
    keep[4:6] = False  # a whole chunk of empty lists
    post = Postings(torch.device("cpu"), 11, 11 * 13)
    for rows in (slice(0, 3), slice(3, 4), slice(4, 6), slice(6, 11)):
        post.append(scores[rows], keep[rows])
    index = post.build(13, None, None)
    codes, items = torch.nonzero(keep, as_tuple=True)
    assert torch.equal(index.items, items.to(torch.int32)) and torch.equal(index.scores, scores[codes, items])
    assert torch.equal(index.indptr[1:], keep.sum(1).cumsum(0)) and index.indptr[0] == 0
    assert not post.items and not post.scores  # each block freed once copied
    empty = Postings(torch.device("cpu"), 2, 2 * 13)
    empty.append(scores[:2], torch.zeros(2, 13, dtype=torch.bool))
    assert empty.build(13, None, None).nnz == 0


def test_export_in_small_blocks_equals_one_block(monkeypatch):
    from sparcode.training.export import Postings

    torch.manual_seed(0)
    data = datasets.synthetic(60, 80, per_user=10, seed=0)
    model = SparCode(data, n_words=8, hidden=(16,), bias=-0.02).eval()
    feats = torch.from_numpy(data.item_features)
    rules = [ExportRule(density=1), ExportRule(density=0.1), ExportRule(density=1, cap=5)]
    whole = export_indexes(model, feats, data.n_items, rules, budget_bytes=2**16)
    monkeypatch.setattr(Postings, "BLOCK_PAIRS", 999)  # blocks end inside chunks
    for (a, _), (b, _) in zip(whole, export_indexes(model, feats, data.n_items, rules, budget_bytes=2**16)):
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("indptr", "items", "scores"))


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path, capsys):
    import pyarrow.parquet as pq

    from sparcode.cli import main
    from sparcode.engine import Engine
    from sparcode.training.data import synthetic
    from sparcode.training.feature_codes import feature_codes

    assert main(["demo", "--size", "tiny", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "two_tower" in out
    assert (tmp_path / "demo" / "recommendations" / "manifest.json").is_file()
    report = json.loads((tmp_path / "demo" / "demo.json").read_text())
    sparcode, two_tower = report["models"]
    assert sparcode["recall@20"] > 0 and two_tower["model"] == "two_tower"
    assert sparcode["cap"] in (3, 9, 30, 90)  # 1%, 3%, 10% or 30% of the 300 items, chosen on validation
    joined = sparcode["features"]["weight"] > 0  # the synthetic users' features join on validation's word
    assert sparcode["codes"] == ("graph filter + features" if joined else "graph filter")
    assert f"sparcode ({sparcode['codes']})" in out
    assert sparcode["features"]["added"] in (3, 9, 30, 90)
    n_codes = Engine.load(tmp_path / "demo" / "index").index.n_codes
    assert n_codes == 300 + joined * feature_codes(synthetic(600, 300).user_features)[1]
    bags = pq.read_table(tmp_path / "demo" / "queries.parquet")
    assert ("weights" in bags.column_names) == joined


@pytest.mark.skipif(not (DATA / "gowalla_m1").is_dir(), reason="no Gowalla dataset (SPARCODE_DATA)")
def test_real_gowalla_loads():
    data = datasets.load_bars(DATA / "gowalla_m1")
    assert data.n_users == 29858 and data.n_items == 40981
    assert len(data.test.items) == 217242
    assert len(data.train.items) + len(data.valid.items) == 810128


@pytest.mark.slow
def test_train_export_evaluate_commands(tmp_path, capsys):
    """train -> export -> evaluate through the CLI, under a minute on 2 cores."""
    import json

    from safetensors.torch import load_file

    from sparcode.cli import main
    from sparcode.engine import CodeIndex

    ckpt, index = tmp_path / "ckpt", tmp_path / "index"
    assert main(["train", "--model", "sparcode", "--epochs", "1", "--codewords", "8", "--hidden", "32", "32",
                 "--negatives", "10", "--density", "0.3", "--commitment", "0.25", "--embedding-std", "0.05",
                 "--quantizer", "residual", "--tokens", "2", "--per-token-codebooks",
                 "--out", str(ckpt), "--no-progress"]) == 0
    config = json.loads((ckpt / "config.json").read_text())
    assert (ckpt / "model.safetensors").is_file() and config["model"]["kind"] == "sparcode"
    assert config["train"]["commitment"] == 0.25 and config["model"]["kwargs"]["embedding_std"] == 0.05
    assert config["model"]["kwargs"]["quantizer"] == "residual" and config["model"]["kwargs"]["per_token"]
    assert float(load_file(str(ckpt / "model.safetensors"))["bias"]) < 0  # trained for 30%: the bias was kept
    assert main(["export", str(ckpt), "--out", str(index), "--cap", "100"]) == 0  # the trained bias, capped
    capped = CodeIndex.load(index)
    assert int((capped.indptr[1:] - capped.indptr[:-1]).max()) == 100 and 0.05 < capped.nnz / (128 * 800) <= 100 / 800
    assert main(["export", str(ckpt), "--out", str(index), "--density", "0.2"]) == 0
    loaded = CodeIndex.load(index)  # 2 tokens x 8**2 codes each
    assert loaded.n_codes == 128 and loaded.n_tokens == 2 and abs(loaded.nnz / (128 * 800) - 0.2) < 0.01
    assert loaded.codebooks.shape == (2, 2, 8, 64)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "top"), "--cap-density", "0.05", "--no-progress"]) == 0
    top = CodeIndex.load(tmp_path / "top")
    assert bool((top.indptr[1:] - top.indptr[:-1] == 40).all())  # every code keeps its top 5% of 800 items
    capsys.readouterr()
    for flags, message in ((["--cap-density", "0.05", "--cap", "3"], "not with --density or --cap"),
                           (["--cap-density", "1.5"], "--cap-density: expected a fraction in (0, 1], got 1.5")):
        assert main(["export", str(ckpt), "--out", str(tmp_path / "bad")] + flags) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()
    encoder = json.loads((index / "manifest.json").read_text())["encoder"]
    assert encoder["quantizer"] == "residual" and encoder["per_token"]
    capsys.readouterr()
    assert main(["evaluate", str(ckpt), "--index", str(index), "--out", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert 0 <= metrics["recall@20"] <= 1 and metrics["users"] > 0
    assert main(["evaluate", str(ckpt)]) == 2  # SparCode is evaluated through its index
    assert "--index" in capsys.readouterr().err


def test_train_command_defaults_by_device_and_options(tmp_path, capsys, monkeypatch):
    """The defaults are the Gowalla recipe: residual per-token codebooks, popularity
    negatives (in-batch for TwoTower, uniform for a density), l2 1e-5, patience 10; on a
    CPU the scorer is (64, 64), C = 64 and training has a time budget unless told
    otherwise; --l2, --patience and --dim reach the config; a bad budget fails before any
    data loads."""
    import json

    from sparcode.cli import main
    from sparcode.training import defaults, train

    seen = []

    def fit(model, data, cfg, validate, measure_start=False):  # the plumbing, not the training
        seen.append((model, cfg))
        return {"epochs": 0, "best_valid_recall@20": 0.0, "train_seconds": 0.0, "history": []}

    monkeypatch.setattr(train, "fit", fit)
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--model", "sparcode", "--out", str(ckpt), "--device", "cpu", "--no-progress"]) == 0
    config = json.loads((ckpt / "config.json").read_text())
    kwargs = config["model"]["kwargs"]
    assert kwargs["hidden"] == list(defaults.CPU_HIDDEN) == [64, 64] and kwargs["n_words"] == defaults.CPU_CODEWORDS == 64
    assert kwargs["quantizer"] == "residual" and kwargs["per_token"] and seen[-1][0].encoder.quantizer.n_codes == 4 * 64**2
    assert config["train"]["time_budget"] == defaults.CPU_TIME_BUDGET and config["train"]["sampling"] == "popularity"
    assert config["train"]["l2"] == 1e-5 and config["train"]["patience"] == 10
    assert ("popularity negatives, scorer hidden 64 64, 64 codewords, time budget 1,800 s "
            "(the defaults for sparcode on cpu") in capsys.readouterr().err
    assert main(["train", "--model", "sparcode", "--out", str(ckpt), "--device", "cpu", "--hidden", "8",
                 "--time-budget", "0", "--codewords", "8", "--sampling", "uniform", "--no-per-token-codebooks",
                 "--l2", "1e-6", "--patience", "7", "--dim", "16", "--no-progress"]) == 0  # budget 0: none
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model"]["kwargs"]["hidden"] == [8] and config["train"]["time_budget"] is None
    assert config["model"]["kwargs"]["dim"] == 16 and seen[-1][0].scorer.token_in.in_features == 16
    assert not config["model"]["kwargs"]["per_token"] and seen[-1][0].encoder.quantizer.n_codes == 8**2
    assert config["train"]["l2"] == 1e-6 and config["train"]["patience"] == 7
    assert "defaults" not in capsys.readouterr().err
    assert main(["train", "--model", "two_tower", "--out", str(ckpt), "--device", "cpu", "--no-progress"]) == 0
    assert seen[-1][1].sampling == "in-batch" and "in-batch negatives, time budget" in capsys.readouterr().err
    assert main(["train", "--model", "sparcode", "--out", str(ckpt), "--device", "cpu", "--density", "0.1",
                 "--no-progress"]) == 0  # a density's bias follows uniform negatives
    assert seen[-1][1].sampling == "uniform"
    assert defaults.hidden("cuda") == (256, 256, 256)  # the paper's scorer on a GPU
    assert defaults.codewords("cuda") == 128  # 4 x 128**2 = 65,536 codes, the paper's V
    assert defaults.codewords("cpu") == 64 and defaults.codewords("cpu", trains=False) == 128  # a conversion's export is cheap
    monkeypatch.setattr("sparcode.training.checkpoint.load_data", lambda *a: pytest.fail("data loaded"))
    assert main(["train", "--out", str(ckpt), "--time-budget", "-5", "--no-progress"]) == 2
    assert "time_budget: expected seconds > 0" in capsys.readouterr().err
    for flag, value in (("--codewords", "0"), ("--tokens", "0"), ("--dim", "-1"), ("--hidden", "0")):
        assert main(["train", "--out", str(ckpt), flag, value, "--no-progress"]) == 2
        assert f"{flag}: expected a positive integer, got {value}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="n_words: expected a positive int, got 0"):
        ProductQuantizer(8, n_words=0)


@pytest.mark.parametrize("use_faiss", [True, False])
def test_kmeans_finds_separated_clusters(use_faiss, monkeypatch, capfd):
    import sys

    from sparcode.training.codebooks import kmeans

    if use_faiss:
        pytest.importorskip("faiss")
    else:
        monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    torch.manual_seed(0)
    truth = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0], [0.0, -10.0]])
    x = (truth.repeat(100, 1) + 0.1 * torch.randn(400, 2))[torch.randperm(400)]
    found = kmeans(x, 4, iters=20)
    assert found.shape == (4, 2) and found.dtype == x.dtype
    assert (torch.cdist(truth, found).min(1).values < 0.5).all()
    kmeans(x[:40], 4)  # 10 points per centre, as a codebook started from one batch has: no faiss warning
    assert "WARNING" not in capfd.readouterr().err


def test_checkpoint_records_an_absolute_data_path(tmp_path, monkeypatch):
    """A checkpoint trained with a relative --path loads from any working directory."""
    from sparcode.training.checkpoint import checkpoint_config
    from sparcode.training.train import TrainConfig

    monkeypatch.chdir(tmp_path)
    config = checkpoint_config("sparcode", {}, "ml-1m", Path("data/ml-1m"), 0, (1, 1), TrainConfig(), {})
    assert config["data"]["path"] == str(tmp_path / "data" / "ml-1m")


def test_embeddings_start_small_unless_told_otherwise():
    torch.manual_seed(0)
    data = datasets.synthetic(200, 300, per_user=4, seed=0)
    for model, std in ((SparCode(data, hidden=(8,)), EMBEDDING_STD), (TwoTower(data), EMBEDDING_STD),
                       (SparCode(data, hidden=(8,), embedding_std=0.5), 0.5), (TwoTower(data, embedding_std=1.0), 1.0)):
        tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        item_tables = 1 if isinstance(model, TwoTower) else 2  # TwoTower's history shares the item table
        assert len(tables) == item_tables + len(data.user_cardinalities) + len(data.item_cardinalities)
        for w in tables:
            assert float(w.detach().std()) == pytest.approx(std, rel=0.15)


def test_two_tower_scores_cosine_over_its_temperature():
    torch.manual_seed(0)
    data = datasets.synthetic(50, 40, per_user=4, seed=0)
    history = torch.randint(-1, 40, (6, 5))
    user_features = torch.from_numpy(data.user_features[:6])
    model = TwoTower(data, temperature=0.25).eval()
    items = torch.randn(9, model.tokenizer.dim)
    pooled = model.tokenizer(history, user_features).mean(1)
    scores = model.user_vectors(history, user_features) @ model.item_vectors(items).T
    items_out = model.item_mlp(items)  # synthetic items have features
    torch.testing.assert_close(scores, F.cosine_similarity(pooled.unsqueeze(1), items_out.unsqueeze(0), dim=-1) / 0.25)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            TwoTower(data, temperature=bad)


def test_two_tower_crosses_item_features_in_an_mlp_and_takes_a_bare_id_as_it_is():
    with_features = datasets.synthetic(50, 40, per_user=4, seed=0)
    assert with_features.item_cardinalities and isinstance(TwoTower(with_features).item_mlp, torch.nn.Sequential)
    ids_only = datasets.InteractionData("ids", with_features.n_users, with_features.n_items, with_features.train,
                                        with_features.valid, with_features.test)
    model = TwoTower(ids_only)
    vectors = torch.randn(5, model.tokenizer.dim)
    assert isinstance(model.item_mlp, torch.nn.Identity)
    torch.testing.assert_close(model.item_vectors(vectors), torch.nn.functional.normalize(vectors, dim=-1))


def test_checkpoint_of_another_model_shape_is_refused_by_name(tmp_path):
    from sparcode.training.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
    from sparcode.training.train import TrainConfig

    data = datasets.synthetic(60, 40, seed=0)
    config = checkpoint_config("two_tower", {"n_tokens": 2}, "synthetic", None, 0, (60, 40), TrainConfig(), {})
    save_checkpoint(tmp_path / "ck", TwoTower(data, n_tokens=4), config)  # weights of 4 token heads, config says 2
    with pytest.raises(ValueError, match="model.safetensors: does not fit the two_tower model"):
        load_checkpoint(tmp_path / "ck")


def test_every_entry_point_takes_its_defaults_from_one_place():
    """TrainConfig, the model constructors, sparcode train and the accuracy bench agree
    with sparcode.training.defaults."""
    import argparse
    import inspect

    from sparcode.bench.accuracy import parse_args
    from sparcode.training import defaults
    from sparcode.training.commands import add_commands
    from sparcode.training.train import TrainConfig

    cfg = TrainConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.negatives, cfg.l2, cfg.patience, cfg.valid_users, cfg.history,
            cfg.commitment) == (defaults.EPOCHS, defaults.BATCH_SIZE, defaults.LR, defaults.NEGATIVES, defaults.L2,
                                defaults.PATIENCE, defaults.VALID_USERS, defaults.HISTORY, defaults.COMMITMENT)
    sparcode = inspect.signature(SparCode).parameters
    assert (sparcode["dim"].default, sparcode["n_tokens"].default, sparcode["n_words"].default, sparcode["hidden"].default,
            sparcode["quantizer"].default, sparcode["per_token"].default, sparcode["embedding_std"].default) == (
        defaults.DIM, defaults.TOKENS, defaults.CPU_CODEWORDS, defaults.CPU_HIDDEN, defaults.QUANTIZER, defaults.PER_TOKEN,
        defaults.EMBEDDING_STD)
    assert sparcode["tokenizer_hidden"].default == defaults.TOKENIZER_HIDDEN
    two_tower = inspect.signature(TwoTower).parameters
    assert two_tower["dim"].default == defaults.TWO_TOWER_DIM == defaults.dim("two_tower")
    assert (defaults.dim("sparcode"), defaults.lr("two_tower"), defaults.lr("all_to_all")) == (
        defaults.DIM, defaults.TWO_TOWER_LR, defaults.LR)
    assert (two_tower["temperature"].default, two_tower["tokenizer_hidden"].default,
            two_tower["history_dropout"].default) == (defaults.TEMPERATURE, defaults.TWO_TOWER_TOKENIZER_HIDDEN,
                                                      defaults.TWO_TOWER_HISTORY_DROPOUT)
    sub = argparse.ArgumentParser().add_subparsers()
    add_commands(sub)
    train_cmd = sub.choices["train"].parse_args(["--out", "x"])
    bench = parse_args(["--dataset", "synthetic", "--out", "x"])
    assert (bench.cap_density, bench.density) == (defaults.INDEX_DENSITY, None)  # the headline index: the rule to use
    assert (bench.lr, bench.dim, bench.two_tower_lr, bench.two_tower_dim) == (
        defaults.LR, defaults.DIM, defaults.TWO_TOWER_LR, defaults.TWO_TOWER_DIM)
    assert (train_cmd.lr, train_cmd.dim) == (None, None)  # defaults.lr / defaults.dim of the model chosen
    for args in (train_cmd, bench):
        assert (args.epochs, args.batch_size, args.negatives, args.l2, args.patience, args.tokens,
                args.quantizer, args.per_token_codebooks, args.embedding_std, args.sampling, args.codewords, args.hidden,
                args.time_budget) == (defaults.EPOCHS, defaults.BATCH_SIZE, defaults.NEGATIVES, defaults.L2,
                                      defaults.PATIENCE, defaults.TOKENS, defaults.QUANTIZER,
                                      defaults.PER_TOKEN, defaults.EMBEDDING_STD, None, None, None, None)
