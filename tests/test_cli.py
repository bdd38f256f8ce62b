"""The ``sparcode`` CLI: info and search, and one-line errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import quantized_index

import sparcode.engine
from sparcode.cli import main
from sparcode.engine import Engine


@pytest.fixture
def index_dir(tmp_path):
    index = quantized_index(16, 40, 5, seed=1, n_tokens=3)
    index.save(tmp_path / "ix")
    return tmp_path / "ix", index


def test_info_prints_manifest_and_stats(index_dir, capsys):
    path, index = index_dir
    assert main(["info", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["manifest"]["n_codes"] == 16 and out["stats"]["nnz"] == index.nnz


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_search_writes_parquet_equal_to_the_api(index_dir, tmp_path, fmt, capsys):
    path, index = index_dir
    codes = np.random.default_rng(0).integers(0, 16, size=(7, 3))
    if fmt == "npy":
        np.save(tmp_path / "codes.npy", codes)
        users = np.arange(7)
    else:
        users = np.arange(100, 107)
        pq.write_table(pa.table({"user_id": users, "codes": list(codes)}), tmp_path / "codes.parquet")
    out = tmp_path / "res.parquet"
    assert main(["search", str(path), "--codes", str(tmp_path / f"codes.{fmt}"), "--k", "5", "--out", str(out)]) == 0
    table = pq.read_table(out).to_pydict()
    ref_scores, ref_ids = Engine(index, backend="torch").search(torch.tensor(codes), k=5)
    assert table["user_id"] == users.tolist()
    assert table["item_ids"] == ref_ids.tolist()
    for backend in ("numba", "torch"):
        assert main(["search", str(path), "--codes", str(tmp_path / f"codes.{fmt}"), "--k", "5", "--out", str(out),
                     "--backend", backend, "--device", "cpu"]) == 0
        assert pq.read_table(out).to_pydict()["item_ids"] == ref_ids.tolist()
    np.testing.assert_array_equal(np.array(table["scores"], dtype=np.float32), ref_scores.numpy())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "/no/such/dir"], "not an index directory"),
        (["search", "IX", "--codes", "/no/file.npy", "--out", "o.parquet"], "--codes: /no/file.npy is not a file"),
        (["search", "IX", "--codes", "BADNPY", "--out", "o.parquet"], "--codes:"),
        (["search", "IX", "--codes", "CODES", "--k", "0", "--out", "o.parquet"], "--k: expected an integer >= 1"),
        (["search", "IX", "--codes", "CODES", "--k", "x", "--out", "o.parquet"], "argument --k: invalid int value"),
        (["search", "IX", "--codes", "WRONGT", "--out", "o.parquet"], "batch: expected T = 3 codes"),
        (["frobnicate"], "invalid choice"),
        ([], "the following arguments are required: command"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(index_dir, tmp_path, capsys, argv, message):
    path, _ = index_dir
    np.save(tmp_path / "codes.npy", np.zeros((2, 3), dtype=np.int64))
    np.save(tmp_path / "wrongt.npy", np.zeros((2, 4), dtype=np.int64))
    (tmp_path / "bad.npy").write_bytes(b"not a numpy file")
    subs = {"IX": str(path), "CODES": str(tmp_path / "codes.npy"), "BADNPY": str(tmp_path / "bad.npy"),
            "WRONGT": str(tmp_path / "wrongt.npy")}
    argv = [subs.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparcode: error:") and message in err


def test_console_script_runs_as_module(index_dir):
    path, _ = index_dir
    proc = subprocess.run([sys.executable, "-m", "sparcode.cli", "info", str(path) + "-missing"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_engine_never_imports_training_or_bench():
    # a serving deployment ships sparcode.engine and sparcode.kernels alone
    code = ("import sys, sparcode.engine, sparcode.engine.recommend, sparcode.engine.engine; "
            "import sparcode.engine.numba_backend, sparcode.engine.triton_backend; "
            "print(sorted(m for m in sys.modules if m.startswith(('sparcode.training', 'sparcode.bench', 'sparcode.cli'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
    engine_dir = Path(sparcode.engine.__file__).parent
    for source in engine_dir.glob("*.py"):
        text = source.read_text()
        for name in ("sparcode.training", "sparcode.bench", "sparcode.cli"):
            assert name not in text, f"{source.name} names {name}"


def test_serving_commands_load_no_training_code():
    # the parser reads the training commands' options and their defaults, never training code
    code = ("import sys, sparcode.cli.app as cli; cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith('sparcode.training')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "['sparcode.training', 'sparcode.training.commands', 'sparcode.training.defaults']"


def test_engine_has_no_import_cycle():
    # relative imports between engine modules, lazy ones inside functions included
    engine_dir = Path(sparcode.engine.__file__).parent
    graph = {}
    for source in engine_dir.glob("*.py"):
        lines = [line.strip() for line in source.read_text().splitlines()]
        graph[source.stem] = {line.split()[1][1:] for line in lines
                              if line.startswith("from .") and " import " in line and line.split()[1] != "."}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in graph.get(module, ()):
            assert state.get(other) != 1, f"import cycle: {' -> '.join([*path, module, other])}"
            if other not in state:
                visit(other, [*path, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
