"""``sparcode bench --quick`` runs and writes JSON that holds what it promises."""

import json

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
