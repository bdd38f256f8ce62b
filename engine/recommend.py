"""The offline recommendation job: queries from a file -> top-k per user in Parquet parts.

Parts are fixed row ranges of the query file (part i = rows [i x B, (i+1) x B)), so a
part means the same rows in every run, on every rank. Each part is written to a
temporary name, fsynced and renamed, then recorded in its rank's journal
(``journal.rank<r>.jsonl``, one fsynced line per part). A rerun with the same
arguments skips recorded parts; a part renamed but not yet recorded is simply written
again, with the same rows. ``job.json`` fingerprints the arguments that decide the rows
(index, query file, exclusions, k, B) and a rerun with other ones is refused. At the end
the journals are merged into ``manifest.json``. SIGINT and SIGTERM stop after the
current part.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write, atomic_write_text
from .engine import Engine
from .index import CodeIndex
from .queries import ExcludeTable, ItemIds, QueryFile, QueryRows, id_array, read_item_ids
from .sharding import item_range, merge_topk, slice_items, to_internal
from .storage import MANIFEST, read_manifest

JOB = "job.json"
COMPRESSIONS = ("none", "snappy", "zstd", "lz4", "gzip")
# Test hook: seconds to sleep before writing each part, so that kill tests can land
# signals at chosen points of a job that is otherwise too fast to interrupt.
_PART_DELAY = float(os.environ.get("SPARCODE_PART_DELAY", "0"))


@dataclass
class Summary:
    queries: int
    parts_written: int
    parts_total: int
    parts_skipped: int
    seconds: float  # the parts loop: reading, searching, writing
    stopped: bool
    setup_seconds: float = 0.0  # loading, validating, compiling, derived layouts

    @property
    def queries_per_s(self) -> float:
        return self.queries / self.seconds if self.seconds else 0.0


class Stop:
    """Turns SIGINT/SIGTERM into a flag checked between parts."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run_job(
    index_path: Path, queries_path: Path, out: Path, *, k: int, exclude_path: Path | None = None,
    batch_size: int = 8192, device: str | None = None, backend: str = "auto",
    shard: str | None = None, progress: bool = True, compression: str = "none", item_ids_path: Path | None = None,
) -> Summary:
    """Run (or resume) the job; see the module docstring. ``shard``: None, "queries" or
    "items" (needs ``torch.distributed`` initialised, e.g. by torchrun). ``item_ids_path``:
    an item-ids file (text ids, row i naming item i) for an index without ids of its
    own; the parts and the exclusions then speak those ids. ``compression``:
    Parquet codec of the parts; none by default, which keeps the job search-bound on CPU
    (encoding a part of 8,192 x 100 costs 20 ms uncompressed, 36 ms with snappy)."""
    if k < 1:
        raise ValueError(f"--k: expected an integer >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"--batch-size: expected an integer >= 1, got {batch_size}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"--compression: expected one of {COMPRESSIONS}, got {compression!r}")
    setup_start = time.perf_counter()
    rank, world = _dist_rank_world(shard)
    queries = QueryFile(queries_path)
    exclude = ExcludeTable(exclude_path) if exclude_path is not None else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{rank % torch.cuda.device_count()}"
    index = CodeIndex.load(index_path, device="cpu")
    names = None
    if item_ids_path is not None:
        if index.item_ids is not None:
            raise ValueError(f"--item-ids: the index {index_path} has item ids of its own")
        names = ItemIds(read_item_ids(item_ids_path, index.n_items))
    external = None  # with item shards: the external ids, applied after the merge
    if shard == "items":
        external = index.item_ids
        index = slice_items(index, *item_range(index.n_items, rank, world))
    engine = Engine(index.to(device), backend=backend)
    del index

    fingerprint = {
        "index": read_manifest(index_path)["files"],
        "queries": _file_fingerprint(queries_path),
        "exclude": _file_fingerprint(exclude_path) if exclude_path else None,
        **({"item_ids": _file_fingerprint(item_ids_path)} if item_ids_path else {}),
        "k": k, "batch_size": batch_size,
    }
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _claim(out, fingerprint)
    _barrier(world)
    if rank != 0:
        _claim(out, fingerprint)

    n_parts = -(-queries.rows // batch_size)
    done = _recorded_parts(out)
    _barrier(world)  # every rank has read the journals before rank 0 appends to them
    mine = [p for p in range(n_parts) if p not in done and (shard != "queries" or p % world == rank)]
    writer = rank == 0 or shard == "queries"
    if mine and queries.rows:  # compile and build derived layouts before the clock starts
        _search(engine, queries.read(0, 1), k, None, device)
    setup = time.perf_counter() - setup_start
    bar = _progress(len(mine) * batch_size if writer and progress else None)
    start = time.perf_counter()
    written = n_queries = 0
    stopped = False
    parts = PartWriter(out, rank, compression)
    with Stop() as stop, parts:
        for part in mine:
            lo, hi = part * batch_size, min(queries.rows, (part + 1) * batch_size)
            rows = queries.read(lo, hi)
            users = rows.users
            lists = exclude.lists_for(users) if exclude is not None else None
            if lists is not None and names is not None:
                lists = names.positions(lists)
            elif lists is not None and exclude.text_items:
                raise ValueError("--exclude: holds text item ids; they need the item-ids file (--item-ids)")
            if lists is not None and external is not None:
                lists = to_internal(lists, external)
            scores, ids = _search(engine, rows, k, lists, device)
            if shard == "items":
                scores, ids = (t.cpu() for t in _gather_merge(scores, ids, k, world, rank))
                if external is not None:
                    ids = torch.where(ids >= 0, external[ids.clamp(min=0)], ids)
            if writer:
                if _PART_DELAY:
                    time.sleep(_PART_DELAY)
                ids = ids.cpu().numpy()
                parts.submit(part, users, ids if names is None else names.names(ids), scores.cpu().numpy())
                written += 1
                n_queries += hi - lo
                if bar is not None:
                    bar.update(hi - lo)
            if _any_stop(stop.requested, shard, world):
                stopped = part != mine[-1]
                break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    _barrier(world)
    if rank == 0 and not stopped:
        _write_manifest(out, n_parts)
    return Summary(n_queries, written, n_parts, n_parts - len(mine), seconds, stopped, setup)


def _search(engine: Engine, rows: QueryRows, k: int, exclude: list[np.ndarray] | None,
            device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One part's bags through ``engine.search``."""
    args = {name: None if a is None else torch.from_numpy(a).to(device) for name, a in rows.batch().items()}
    return engine.search(k=k, exclude=exclude, **args)


class PartWriter:
    """Writes parts on one background thread, so Parquet encoding overlaps the next
    search; parts are written and recorded in submission order. Leaving the context
    waits for every submitted part (a complete result is never dropped on Ctrl-C);
    an error in the thread is raised in the caller."""

    def __init__(self, out: Path, rank: int, compression: str, depth: int = 2) -> None:
        self.out, self.rank, self.compression = out, rank, compression
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="sparcode-part-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    _write_part(self.out, *job, rank=self.rank, compression=self.compression)
                except BaseException as exc:  # re-raised in the submitting thread
                    self._error = exc

    def submit(self, part: int, users: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
        self._raise()
        self._queue.put((part, users, ids, scores))

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc[0] is None:
            self._raise()


def _write_part(
    out: Path, part: int, users: np.ndarray, ids: np.ndarray, scores: np.ndarray, *, rank: int, compression: str
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, k = ids.shape
    offsets = pa.array(np.arange(0, (rows + 1) * k, k, dtype=np.int32))
    table = pa.table({
        "user_id": id_array(users),
        "item_ids": pa.ListArray.from_arrays(offsets, id_array(ids.reshape(-1))),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(scores.reshape(-1), type=pa.float32())),
    })
    name = f"part-{part:06d}.parquet"
    # no dictionary encoding: item ids barely repeat within a part, and trying costs 5x
    atomic_write(out / name, lambda tmp: pq.write_table(table, tmp, compression=compression, use_dictionary=False,
                                                        write_statistics=False))
    line = json.dumps({"part": part, "file": name, "rows": rows, "first_user": users[0].item() if rows and users.dtype != object
                       else users[0] if rows else None})
    with open(out / f"journal.rank{rank}.jsonl", "ab+") as fh:
        end = fh.seek(0, os.SEEK_END)
        torn = end > 0 and fh.seek(end - 1) >= 0 and fh.read(1) != b"\n"  # a crash cut the last line
        fh.write((("\n" if torn else "") + line + "\n").encode())  # so that line never swallows this record
        fh.flush()
        os.fsync(fh.fileno())


def _journal_records(out: Path) -> dict[int, dict]:
    """Every part on record in the ranks' journals (a torn last line is ignored)."""
    records: dict[int, dict] = {}
    for journal in sorted(out.glob("journal.rank*.jsonl")):
        for line in journal.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[int(record["part"])] = record
    return records


def _recorded_parts(out: Path) -> set[int]:
    """Parts on record whose file exists."""
    return {part for part, record in _journal_records(out).items() if (out / record["file"]).is_file()}


def _write_manifest(out: Path, n_parts: int) -> None:
    """Merge the journals into manifest.json once every part is on record."""
    records = _journal_records(out)
    if len(records) < n_parts:
        return
    manifest = {"parts": [records[p] for p in range(n_parts)], "rows": sum(records[p]["rows"] for p in range(n_parts)),
                "job": json.loads((out / JOB).read_text())}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))


def _claim(out: Path, fingerprint: dict) -> None:
    """Record this job's fingerprint, or refuse to mix with a different earlier job."""
    job = out / JOB
    if job.is_file():
        old = json.loads(job.read_text())
        if old != fingerprint:
            diff = [key for key in fingerprint if old.get(key) != fingerprint[key]]
            raise ValueError(f"--out: {out} holds results of a different job (differs in: {', '.join(diff)}); "
                             f"use another --out directory or remove this one")
        return
    if any(out.glob("part-*.parquet")):
        raise ValueError(f"--out: {out} holds parts but no {JOB}; refusing to mix with them")
    atomic_write_text(job, json.dumps(fingerprint, indent=2, sort_keys=True))


def _file_fingerprint(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _progress(total: int | None):
    if total is None:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="q", unit_scale=True, desc="recommend", smoothing=0.1)


def _dist_rank_world(shard: str | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    if shard not in ("queries", "items"):
        raise ValueError(f"shard: expected 'queries' or 'items', got {shard!r}")
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError(f"--shard-{shard}: needs torch.distributed; launch with torchrun")
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _any_stop(requested: bool, shard: str | None, world: int) -> bool:
    """Item shards must stop together (every part needs every rank)."""
    if shard != "items" or world == 1:
        return requested
    import torch.distributed as dist

    flag = torch.tensor([int(requested)])
    dist.all_reduce(flag)
    return bool(flag.item())


def _gather_merge(scores: torch.Tensor, ids: torch.Tensor, k: int, world: int, rank: int):
    """All ranks' top k of their item shard -> the exact global top k (on every rank)."""
    import torch.distributed as dist

    parts_s = [torch.empty_like(scores) for _ in range(world)]
    parts_i = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(parts_s, scores.contiguous())
    dist.all_gather(parts_i, ids.contiguous())
    return merge_topk(torch.cat(parts_s, dim=1), torch.cat(parts_i, dim=1), k)
