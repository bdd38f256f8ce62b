"""The offline job: same rows as engine.search, resumable after SIGKILL, no mixing,
exclusions, and both torch.distributed sharding modes (2 gloo processes)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import quantized_index

from sparcode.engine import Engine
from sparcode.engine.recommend import run_job
from sparcode.engine.synthetic import random_codes

V, N, T, K = 64, 500, 3, 10


@pytest.fixture
def job(tmp_path):
    index = quantized_index(V, N, 20, seed=5, item_ids=torch.randperm(N) * 7 + 3)
    index.save(tmp_path / "ix")
    codes = random_codes(1000, T, V, seed=6).numpy()
    np.save(tmp_path / "codes.npy", codes)
    rng = np.random.default_rng(0)
    users = np.arange(0, 1000, 3)
    excl = [rng.choice(index.item_ids.numpy(), size=15, replace=False) for _ in users]
    pq.write_table(pa.table({"user_id": users, "item_ids": excl}), tmp_path / "exclude.parquet")
    return tmp_path, index, codes, dict(zip(users.tolist(), excl))


def read_rows(out):
    table = pq.read_table(sorted(out.glob("part-*.parquet"))).to_pydict()
    return table["user_id"], table["item_ids"], table["scores"]


def expected(index, codes, exclude=None):
    lists = [exclude.get(u, np.zeros(0, np.int64)) for u in range(len(codes))] if exclude else None
    return Engine(index, backend="torch").search(torch.from_numpy(codes), k=K, exclude=lists)


def test_rows_equal_engine_search_with_exclusions(job):
    path, index, codes, exclude = job
    summary = run_job(path / "ix", path / "codes.npy", path / "out", k=K, exclude_path=path / "exclude.parquet",
                      batch_size=128, progress=False)
    assert summary.queries == 1000 and summary.parts_written == 8 and not summary.stopped
    users, ids, scores = read_rows(path / "out")
    want = expected(index, codes, exclude)
    assert users == list(range(1000))
    assert ids == want.ids.tolist()
    np.testing.assert_array_equal(np.array(scores, dtype=np.float32), want.scores.numpy())
    for u, items in exclude.items():
        assert not set(ids[u]) & set(items.tolist())
    manifest = json.loads((path / "out" / "manifest.json").read_text())
    assert manifest["rows"] == 1000 and [p["part"] for p in manifest["parts"]] == list(range(8))


def test_parquet_queries_keep_user_ids(job):
    path, index, codes, _ = job
    users = np.arange(1000) * 11 + 5
    pq.write_table(pa.table({"user_id": users, "codes": list(codes)}), path / "q.parquet", row_group_size=300)
    run_job(path / "ix", path / "q.parquet", path / "out", k=K, batch_size=128, progress=False)
    got_users, ids, _ = read_rows(path / "out")
    assert got_users == users.tolist() and ids == expected(index, codes).ids.tolist()


def test_rerun_with_other_arguments_is_refused(job):
    path, *_ = job
    run_job(path / "ix", path / "codes.npy", path / "out", k=K, batch_size=500, progress=False)
    with pytest.raises(ValueError, match="different job .*differs in: k"):
        run_job(path / "ix", path / "codes.npy", path / "out", k=K + 1, batch_size=500, progress=False)
    np.save(path / "codes2.npy", random_codes(1000, T, V, seed=99).numpy())
    with pytest.raises(ValueError, match="differs in: queries"):
        run_job(path / "ix", path / "codes2.npy", path / "out", k=K, batch_size=500, progress=False)
    again = run_job(path / "ix", path / "codes.npy", path / "out", k=K, batch_size=500, progress=False)
    assert again.parts_skipped == 2 and again.parts_written == 0


def cli(path, *extra):
    return [sys.executable, "-m", "sparcode.cli", "recommend", str(path / "ix"), "--queries", str(path / "codes.npy"),
            "--k", str(K), "--out", str(path / "out"), "--exclude", str(path / "exclude.parquet"), "--no-progress", *extra]


def journal_lines(out):
    return sum(len(p.read_text().splitlines()) for p in out.glob("journal.rank*.jsonl")) if out.exists() else 0


@pytest.mark.slow
def test_resume_after_sigkill_at_random_points(job):
    path, index, codes, exclude = job
    rng = random.Random(1234)
    env = {**os.environ, "SPARCODE_PART_DELAY": "0.02"}
    for _ in range(5):  # five SIGKILLs, each after a random number of further parts
        before = journal_lines(path / "out")
        proc = subprocess.Popen(cli(path, "--batch-size", "10"), env=env, stderr=subprocess.DEVNULL)
        target = before + rng.randint(1, 12)
        deadline = time.time() + 60
        while journal_lines(path / "out") < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    recorded = [line for j in (path / "out").glob("journal.rank*.jsonl") for line in j.read_text().splitlines()]
    files = [json.loads(line)["file"] for line in recorded if line.endswith("}")]  # a torn last line is not a record
    on_record = len(files)
    assert on_record < 100, "the job finished before the last kill; the test proves nothing"
    before = {name: ((path / "out" / name).stat().st_ino, (path / "out" / name).stat().st_mtime_ns) for name in files}
    final = subprocess.run(cli(path, "--batch-size", "10"), stderr=subprocess.PIPE, text=True)
    assert final.returncode == 0
    # the parts on record were skipped, not recomputed: the rerun says so and leaves their files alone
    assert f"in {100 - on_record} parts ({on_record} of 100 already on record)" in final.stderr, final.stderr
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (path / "out").glob("part-*.parquet")}
    assert len(before) == on_record and all(after[name] == stamp for name, stamp in before.items())
    users, ids, scores = read_rows(path / "out")
    want = expected(index, codes, exclude)
    assert users == list(range(1000))  # no duplicate, no missing user
    assert ids == want.ids.tolist()
    np.testing.assert_array_equal(np.array(scores, dtype=np.float32), want.scores.numpy())


@pytest.mark.slow
def test_sigterm_stops_after_the_current_part_and_resumes(job):
    path, index, codes, exclude = job
    env = {**os.environ, "SPARCODE_PART_DELAY": "0.02"}
    proc = subprocess.Popen(cli(path, "--batch-size", "10"), env=env, stderr=subprocess.PIPE, text=True)
    while journal_lines(path / "out") < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "rerun the same command to resume" in err
    assert not list((path / "out").glob(".part-*"))  # no temporary left behind
    assert subprocess.run(cli(path, "--batch-size", "10"), stderr=subprocess.DEVNULL).returncode == 0
    assert read_rows(path / "out")[1] == expected(index, codes, exclude).ids.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["--shard-queries", "--shard-items"])
def test_two_gloo_processes_match_one(job, mode):
    path, index, codes, exclude = job
    command = cli(path, "--batch-size", "128", mode)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(29500 + (mode == "--shard-items")),
                "-m", "sparcode.cli", *command[3:]]
    proc = subprocess.run(launcher, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    users, ids, scores = read_rows(path / "out")
    want = expected(index, codes, exclude)
    assert users == list(range(1000)) and ids == want.ids.tolist()
    np.testing.assert_array_equal(np.array(scores, dtype=np.float32), want.scores.numpy())
    assert json.loads((path / "out" / "manifest.json").read_text())["rows"] == 1000


def test_ragged_weighted_bags_from_parquet(tmp_path):
    from sparcode.engine.queries import QueryFile, write_bags

    index = quantized_index(V, N, 20, seed=5)
    index.save(tmp_path / "ix")
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 9, size=300)
    lengths[:3] = [0, 1, 8]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    codes = rng.integers(0, V, size=int(offsets[-1]))
    weights = rng.choice(np.array([-1.0, 0.5, 1.0, 2.0], dtype=np.float32), size=codes.size)
    users = np.arange(300) * 11 + 5
    write_bags(tmp_path / "bags.parquet", users, codes, offsets, weights, row_group=64)
    summary = run_job(tmp_path / "ix", tmp_path / "bags.parquet", tmp_path / "out", k=K, batch_size=100, progress=False)
    assert summary.queries == 300
    got_users, got_ids, got_scores = read_rows(tmp_path / "out")
    want = Engine(index, backend="torch").search(torch.from_numpy(codes), k=K, offsets=torch.from_numpy(offsets),
                                                 weights=torch.from_numpy(weights))
    assert got_users == users.tolist()
    assert got_ids == want.ids.tolist() and np.array_equal(np.array(got_scores, np.float32), want.scores.numpy())
    part = QueryFile(tmp_path / "bags.parquet").read(50, 170)  # crosses row groups
    assert part.users.tolist() == users[50:170].tolist() and part.offsets[0] == 0
    assert part.codes.tolist() == codes[offsets[50] : offsets[170]].tolist()


def test_bad_bag_files_name_the_file_and_row(tmp_path):
    from sparcode.engine.queries import QueryFile

    def written(name, **columns):
        pq.write_table(pa.table(columns), tmp_path / name)
        return QueryFile(tmp_path / name)

    bad = written("w.parquet", codes=[[1, 2], [3]], weights=[[1.0, 1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match=r"w.parquet: row 1: 'weights' must hold one weight per code"):
        bad.read(0, 2)
    bad = written("n.parquet", codes=[[1, 2], None, [3]])
    with pytest.raises(ValueError, match=r"n.parquet: row 1: 'codes' is null"):
        bad.read(0, 3)
    bad = written("f.parquet", codes=[[1.5]])
    with pytest.raises(ValueError, match=r"column 'codes' must hold integers"):
        bad.read(0, 1)
    bad = written("s.parquet", codes=["a"])
    with pytest.raises(ValueError, match=r"column 'codes' must be a list"):
        bad.read(0, 1)
    with pytest.raises(ValueError, match="needs a 'codes' list column"):
        written("c.parquet", user_id=[1])


def test_a_torn_journal_line_is_not_a_record(job):
    """A crash mid-append leaves a torn last line: the rerun ignores it, redoes only the
    part it named, and completes."""
    path, index, codes, _ = job
    out = path / "out"
    run_job(path / "ix", path / "codes.npy", out, k=K, batch_size=400, progress=False)
    journal = next(out.glob("journal.rank*.jsonl"))
    lines = journal.read_text().splitlines()
    (out / "manifest.json").unlink()
    (out / json.loads(lines[-1])["file"]).unlink()  # the last part's record is torn before it was complete
    journal.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    summary = run_job(path / "ix", path / "codes.npy", out, k=K, batch_size=400, progress=False)
    assert summary.parts_written == 1 and summary.parts_skipped == 2 and not summary.stopped
    users, ids, _ = read_rows(out)
    assert users == list(range(1000)) and ids == expected(index, codes).ids.tolist()
    assert json.loads((out / "manifest.json").read_text())["rows"] == 1000
