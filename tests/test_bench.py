"""``sparcode bench --quick`` runs and writes JSON that holds what it promises."""

import json
import shlex
from pathlib import Path

import pytest

from sparcode.cli import main

REQUIRED = {"method", "qps_median", "qps_min", "qps_max", "repeats", "queries_per_run", "peak_memory_bytes"}


@pytest.mark.slow
def test_quick_bench_writes_valid_json_and_plot(tmp_path, capsys):
    assert main(["bench", "--quick", "--scale", "4", "--out", str(tmp_path)]) == 0
    files = sorted(tmp_path.glob("*-R1-*.json"))
    assert len(files) == 1 and len(list(tmp_path.glob("*.png"))) == 1
    report = json.loads(files[0].read_text())
    assert report["regime"] == "R1" and report["device"] == "cpu" and report["device_name"]
    assert report["versions"]["torch"] and report["config"]["k"] == 100
    methods = {m["method"]: m for m in report["methods"]}
    assert {"sparcode-torch", "two-tower-bruteforce", "faiss-flat", "faiss-ivfpq", "all-to-all-bruteforce"} <= set(methods)
    for m in methods.values():
        assert REQUIRED <= set(m), m["method"]
        assert 0 < m["qps_min"] <= m["qps_median"] <= m["qps_max"]
        assert m["repeats"] >= 5
    assert methods["sparcode-torch"]["postings_per_s"] > 0
    assert methods["faiss-ivfpq"]["recall_at_k_vs_flat"] >= 0.9
    assert methods["all-to-all-bruteforce"]["queries_per_run"] == 1
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("R1")  # the table is printed last


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "--scale", "0", "--quick"]) == 2
    assert "--scale must be > 0" in capsys.readouterr().err


RECORDS = sorted((Path(__file__).resolve().parents[1] / "bench" / "results").rglob("accuracy-*.json"))


@pytest.mark.parametrize("record", RECORDS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_each_accuracy_record_is_reproduced_by_its_command(record):
    """A record's command, parsed by today's bench, trains with the settings the record
    holds: a changed default would otherwise make the command reproduce something else."""
    from dataclasses import asdict

    from sparcode.bench.accuracy import model_config, parse_args, train_configs

    report = json.loads(record.read_text())
    prefix = "python -m sparcode.bench.accuracy "
    assert report["command"].startswith(prefix)
    args = parse_args(shlex.split(report["command"][len(prefix):]))
    device = report["config"]["train"]["device"]
    cfg, two_tower, warm = train_configs(args, device)
    assert asdict(cfg) == report["config"]["train"]
    assert asdict(two_tower) == report["config"].get("train_two_tower", report["config"]["train"])
    assert asdict(warm) == report["config"].get("train_warm", report["config"]["train"])
    derived = json.loads(json.dumps(model_config(args, device)))
    recorded = report["config"]["model"]  # older records lack settings added since; each they hold must match
    assert {k: derived[k] for k in recorded} == recorded


def test_item_codes_regime_and_its_baselines_agree_with_the_engine():
    """R4's generated data has the promised shape, and the scipy and dense EASE baselines
    return the engine's top k (scores are continuous: no ties to order differently);
    dense scoring ranks items in no list at 0, so it is compared on positive scores."""
    import numpy as np
    import torch

    from sparcode.bench import baselines
    from sparcode.bench.harness import bench_item_codes
    from sparcode.bench.regimes import ItemCodesRegime, build_item_codes
    from sparcode.engine import Engine

    regime = ItemCodesRegime("R4", 400, 20, 6, 60, 64, 10)
    index, batches = build_item_codes(regime, "cpu", n_batches=2)
    assert index.n_codes == index.n_items == 400 and int(index.lengths.max()) == 20 and index.lengths.float().mean() > 19
    assert bool((index.scores < 0).any()) and bool((index.scores > 0).all() == torch.tensor(False))
    codes, offsets = batches[0]
    lengths = offsets.diff()
    assert int(lengths.max()) == 60 and int(lengths.min()) >= 1 and offsets.numel() == 65
    for q in range(64):  # distinct, sorted history items
        bag = codes[int(offsets[q]) : int(offsets[q + 1])]
        assert bool((bag[1:] > bag[:-1]).all())
    want = Engine(index, backend="torch").search(codes, k=10, offsets=offsets, exclude=(offsets, codes))
    got = baselines.scipy_item_codes(index)(codes, offsets, 10)
    dense = baselines.dense_item_codes(index, block=16)(codes, offsets, 10)
    for q in range(64):
        row = want.ids[q][want.ids[q] >= 0].numpy()
        assert np.array_equal(got[q], row)
        positive = want.ids[q][want.scores[q] > 0].numpy()
        assert np.array_equal(dense[q][: positive.size].numpy(), positive)
    report = bench_item_codes(regime, "cpu", repeats=1)
    names = {m["method"] for m in report["methods"]}
    assert {"sparcode-numba", "scipy-csr-matmul", "dense-ease", "two-tower-bruteforce"} <= names
    assert report["history_lengths"]["max"] == 60 and set(report["ratios"]) == {
        "sparcode_vs_scipy-csr-matmul", "sparcode_vs_dense-ease", "sparcode_vs_two-tower-bruteforce"}


def test_train_step_bench_times_both_poolings_on_the_same_training(tmp_path):
    """One epoch with each pooling from one seed: the same model quality (the gradients
    agree up to summation order), both times recorded, and the record written."""
    from unittest import mock

    from sparcode.bench import train_step
    from sparcode.engine.encoder import WeightedBag

    with mock.patch.object(WeightedBag, "apply", wraps=WeightedBag.apply) as weighted, \
            mock.patch.object(train_step, "embedding_bag_pooling", wraps=train_step.embedding_bag_pooling) as reference:
        report = train_step.main(["--out", str(tmp_path / "steps.json")])
    assert weighted.call_count > 0 and reference.call_count > 0  # each epoch pooled through its own path
    assert json.loads((tmp_path / "steps.json").read_text()) == json.loads(json.dumps(report))
    assert report["weighted_bag"]["valid_recall@20"] == pytest.approx(report["embedding_bag"]["valid_recall@20"], abs=0.01)
    assert report["weighted_bag"]["train_seconds"] > 0 and report["embedding_bag"]["train_seconds"] > 0
    assert report["speedup"] == report["embedding_bag"]["train_seconds"] / report["weighted_bag"]["train_seconds"]
