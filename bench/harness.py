"""``sparcode bench``: SparCode against two-tower brute force, faiss and brute-force
all-to-all scoring, on the regimes of DESIGN.md, measured interleaved in one run.

Every method runs once per round, rounds repeat (median of at least 5 after a warm-up
round), and query batches rotate so that no method times a cached repeat. Writes one
JSON per regime (``<device>-<regime>-<date>.json``), a PNG plot and a table printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch

from sparcode.engine import CodeIndex, Engine
from sparcode.engine.atomic import atomic_write, atomic_write_text
from sparcode.engine.bags import Bags
from sparcode.engine.dense import available_bytes
from sparcode.engine.dense import fits as fits_rows

from . import baselines
from .options import build_parser
from .regimes import ITEM_CODES, REGIMES, ItemCodesRegime, Regime, build, build_item_codes
from .timing import cpu_name, current_rss_bytes, peak_rss_bytes, reset_peak_rss

CPU_SCALE = (10, 4)  # DESIGN.md: CPU runs divide N by 10 and B by 4
N_BATCHES = 3
VECTOR_SPREAD = 1.0  # per-dimension noise around standard-normal cluster centers


class Method:
    """One timed method: ``run(i)`` searches rotation batch i; ``queries`` per run."""

    def __init__(self, name: str, run: Callable[[int], object], queries: int, extra: dict | None = None) -> None:
        self.name, self.run, self.queries = name, run, queries
        self.extra = extra or {}
        self.times: list[float] = []
        self.peak = 0
        self.added = 0


def device_label(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def measure(methods: list[Method], device: str, repeats: int) -> None:
    """Warm-up round, then ``repeats`` interleaved rounds. Memory per method: the peak
    during its runs (CUDA: max allocated; CPU: process RSS, which includes every
    method's data) and what its runs added on top of what was resident before."""
    cuda = device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for m in methods:
        m.run(0)
    for r in range(repeats):
        for m in methods:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                reset_peak_rss()
            base = 0 if cuda else current_rss_bytes()
            sync()
            start = time.perf_counter()
            m.run(r + 1)
            sync()
            m.times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
            m.peak = max(m.peak, peak)
            m.added = max(m.added, peak - base)


def copy_bandwidth(device: str) -> float | None:
    if device != "cuda":
        return None
    src = torch.rand(2**28, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times[2:])


def bench_regime(regime: Regime, device: str, *, repeats: int, all_to_all_queries: int, seed: int = 0,
                 faiss_methods: bool = True, triton_side_by_side: bool = False) -> dict:
    """Measure every method on one regime; ``all_to_all_queries`` = 0 leaves that out;
    ``triton_side_by_side`` adds the Triton backend forced into each regime (the GPU check)."""
    index, batches = build(regime, device, seed=seed, n_batches=N_BATCHES)
    postings = float(np.mean([int(index.lengths[b].sum()) for b in batches])) / regime.batch
    k = regime.k
    methods: list[Method] = []
    backends = ["triton", "torch"] if device == "cuda" else ["numba", "torch"]
    if device == "cpu" and triton_side_by_side and os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")  # the GPU check's dry run exercises the Triton path too
    for backend in backends:
        try:
            engine = Engine(index, backend=backend, workspace_bytes=8 * 2**30 if device == "cuda" else None)
        except (ValueError, ImportError):
            continue
        # the torch reference is slow on big GPU batches: time a slice, report per query
        rows = min(regime.batch, 256) if (device == "cuda" and backend == "torch") else regime.batch
        methods.append(Method(f"sparcode-{backend}", lambda i, e=engine, r=rows: e.search(batches[i % N_BATCHES][:r], k=k),
                              rows, {"postings_per_query": postings}))
        if backend == "triton" and triton_side_by_side:
            methods += triton_regimes(index, [Bags.dense(b) for b in batches], k, postings, device)

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(16, regime.n_items // 100), baselines.DIM)).astype(np.float32)
    items = baselines.clustered_vectors(regime.n_items, centers=centers, spread=VECTOR_SPREAD, rng=rng)
    queries = [baselines.clustered_vectors(regime.batch, centers=centers, spread=VECTOR_SPREAD, rng=rng)
               for _ in range(N_BATCHES)]
    item_t = torch.from_numpy(items).to(device)
    query_t = [torch.from_numpy(q).to(device) for q in queries]
    tower = baselines.two_tower(item_t, budget_bytes=4 * 2**30 if device == "cuda" else 256 * 2**20)
    methods.append(Method("two-tower-bruteforce", lambda i: tower(query_t[i % N_BATCHES], k), regime.batch))

    notes: dict = {}
    if faiss_methods and _has_faiss():
        flat = baselines.faiss_flat(items)
        methods.append(Method("faiss-flat", lambda i: flat.search(queries[i % N_BATCHES], k), regime.batch))
        nlist = 1 << max(4, int(round(np.log2(4 * np.sqrt(regime.n_items)))))
        ivf = baselines.faiss_ivfpq(items, nlist, m=32)
        sample = queries[0][: min(256, regime.batch)]
        nprobe, recall = baselines.tune_nprobe(ivf, sample, flat.search(sample, k)[1], k)
        ivf.nprobe = nprobe
        methods.append(Method("faiss-ivfpq", lambda i: ivf.search(queries[i % N_BATCHES], k), regime.batch,
                              {"factory": f"IVF{nlist},PQ32", "nprobe": nprobe, "recall_at_k_vs_flat": recall,
                               "faiss_device": "cpu"}))
        notes["faiss_threads"] = _faiss_threads()

    if all_to_all_queries:
        scorer = baselines.all_to_all(regime.n_items, device)
        tokens = [torch.randn(all_to_all_queries, regime.n_tokens, baselines.DIM, device=device) for _ in range(N_BATCHES)]
        methods.append(Method("all-to-all-bruteforce", lambda i: scorer(tokens[i % N_BATCHES]), all_to_all_queries,
                              {"note": "scorer MLP [256, 256, 256] over [token; item; token*item] for every (token, item), "
                               "random weights"}))

    measure(methods, device, repeats)
    copy_bw = copy_bandwidth(device)
    entries = method_entries(methods, device, copy_bw, 4 + index.scores.element_size())
    return {"regime": regime.name, "config": regime.as_dict(), "postings_per_query": postings,
            "index": {k2: v for k2, v in index.stats().items() if k2 != "device"},
            "copy_bandwidth_bytes_per_s": copy_bw, "methods": entries,
            "vectors": {"dim": baselines.DIM, "clusters": int(centers.shape[0]), "spread": VECTOR_SPREAD,
                        "note": "two-tower and faiss item/query vectors: Gaussian mixture, standard-normal centers"},
            **notes}


def method_entries(methods: list[Method], device: str, copy_bw: float | None, posting_bytes: int) -> list[dict]:
    """Each measured method as its report entry: queries/s (median, min, max), memory,
    postings/s and the share of the copy bandwidth where it gathers postings."""
    entries = []
    for m in methods:
        med = statistics.median(m.times)
        entry = {"method": m.name, "qps_median": m.queries / med, "qps_min": m.queries / max(m.times),
                 "qps_max": m.queries / min(m.times), "repeats": len(m.times), "queries_per_run": m.queries,
                 "peak_memory_bytes": m.peak, "added_memory_bytes": m.added,
                 "peak_memory_kind": "cuda-max-allocated" if device == "cuda" else "process-rss"}
        if "postings_per_query" in m.extra:
            entry["postings_per_s"] = m.extra["postings_per_query"] * entry["qps_median"]
            if copy_bw:
                entry["bandwidth_fraction_of_copy"] = entry["postings_per_s"] * posting_bytes / copy_bw
        entry.update({k2: v for k2, v in m.extra.items() if k2 != "postings_per_query"})
        entries.append(entry)
    return entries


def bench_item_codes(regime: ItemCodesRegime, device: str, *, repeats: int, seed: int = 0,
                     triton_side_by_side: bool = False) -> dict:
    """R4: SparCode over item codes (ragged history bags, history excluded) against what an
    item-to-item user runs (scipy CSR @ CSR + partial sort; dense EASE scoring where the
    N x N matrix fits) and two-tower brute force over the same N, interleaved."""
    index, batches = build_item_codes(regime, device, seed=seed, n_batches=N_BATCHES)
    k = regime.k
    lengths = [b[1].diff().float() for b in batches]
    postings = float(np.mean([int(index.lengths[c].sum()) for c, _ in batches])) / regime.batch
    methods: list[Method] = []
    backends = ["triton"] if device == "cuda" else ["numba", "torch"]
    if device == "cpu" and triton_side_by_side and os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")  # the GPU check's dry run exercises the Triton path too
    for backend in backends:
        engine = Engine(index, backend=backend, workspace_bytes=8 * 2**30 if device == "cuda" else None)
        methods.append(Method(f"sparcode-{backend}", lambda i, e=engine: e.search(
            batches[i % N_BATCHES][0], k=k, offsets=batches[i % N_BATCHES][1],
            exclude=(batches[i % N_BATCHES][1], batches[i % N_BATCHES][0])), regime.batch,
            {"postings_per_query": postings}))
        if backend == "triton" and triton_side_by_side:
            methods += triton_regimes(index, [Bags(c, o) for c, o in batches], k, postings, device, exclude=True)
    if device == "cpu":
        scipy_search = baselines.scipy_item_codes(index)
        methods.append(Method("scipy-csr-matmul", lambda i: scipy_search(*batches[i % N_BATCHES], k), regime.batch))
        if 4 * regime.n_items**2 <= available_bytes(index.device) // 2:
            dense = baselines.dense_item_codes(index)
            methods.append(Method("dense-ease", lambda i: dense(*batches[i % N_BATCHES], k), regime.batch))
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(16, regime.n_items // 100), baselines.DIM)).astype(np.float32)
    item_t = torch.from_numpy(baselines.clustered_vectors(regime.n_items, centers=centers, spread=VECTOR_SPREAD,
                                                          rng=rng)).to(device)
    query_t = [torch.from_numpy(baselines.clustered_vectors(regime.batch, centers=centers, spread=VECTOR_SPREAD,
                                                            rng=rng)).to(device) for _ in range(N_BATCHES)]
    tower = baselines.two_tower(item_t, budget_bytes=4 * 2**30 if device == "cuda" else 256 * 2**20)
    methods.append(Method("two-tower-bruteforce", lambda i: tower(query_t[i % N_BATCHES], k), regime.batch))
    measure(methods, device, repeats)
    copy_bw = copy_bandwidth(device)
    entries = method_entries(methods, device, copy_bw, 4 + index.scores.element_size())
    best = max((e for e in entries if e["method"].startswith("sparcode-")), key=lambda e: e["qps_median"])
    ratios = {f"sparcode_vs_{e['method']}": best["qps_median"] / e["qps_median"] for e in entries
              if not e["method"].startswith("sparcode-")}
    return {"regime": regime.name, "config": regime.as_dict(), "postings_per_query": postings,
            "history_lengths": {"mean": float(torch.cat(lengths).mean()), "p50": float(torch.cat(lengths).median()),
                                "p99": float(torch.cat(lengths).quantile(0.99)), "max": float(torch.cat(lengths).max())},
            "index": {k2: v for k2, v in index.stats().items() if k2 != "device"}, "methods": entries, "ratios": ratios,
            "copy_bandwidth_bytes_per_s": copy_bw,
            "note": "item-codes index generated without files: Zipf item popularity (exponent 0.8), cap postings per "
                    "code, lognormal |scores| with a share negated; every query's history excluded"}


def triton_regimes(index: CodeIndex, batches: list[Bags], k: int, postings: float, device: str,
                   exclude: bool = False) -> list[Method]:
    """The Triton backend forced into each regime that fits, v3 beside v2: table (K1)
    and candidate always, dense (K2) and dense-packed when the rows fit the budget, tiled when queries touch a
    tenth of the items or more (below that it is hopeless and would take minutes). Each
    carries its breakdown of one search (the table regime's over the queries it takes).
    With ``exclude`` each query's own codes are excluded (item codes: the history)."""
    from sparcode.engine.triton_backend import TritonBackend, table_size  # triton is imported only here
    from sparcode.kernels.table_search import fits

    from .breakdown import breakdown

    out = []
    tile = 1024 if device == "cuda" else 64
    n_items = index.n_items
    for name in ("table", "candidate", "tiled", "dense", "dense-packed"):
        backend = TritonBackend(regime=name, tile_items=tile)
        if name.startswith("dense") and not fits_rows(index, index.scores.dtype, None):
            continue
        if name == "tiled" and postings < n_items / 10:
            continue
        engine = Engine(index, backend="triton", workspace_bytes=8 * 2**30 if device == "cuda" else None)
        engine.backend = backend
        first = batches[0]
        if name == "table":
            per_query = first.postings(index.lengths)
            first = first.take(torch.nonzero(fits(per_query, table_size(per_query))).squeeze(1))
        split = breakdown(index, first, k, name, tile_items=tile)
        out.append(Method(f"sparcode-triton-{name}", lambda i, e=engine: _search_bags(e, batches[i % N_BATCHES], k,
                                                                                         exclude),
                          batches[0].n_queries, {"postings_per_query": postings, "breakdown_seconds": split,
                                                 "version": "v3" if name in ("table", "dense") else "v2"}))
    return out


def _search_bags(engine: Engine, bags: Bags, k: int, exclude: bool) -> object:
    return engine.search(bags.codes, k=k, offsets=bags.offsets, weights=bags.weights,
                         exclude=(bags.offsets, bags.codes) if exclude else None)


def scaling(device: str, *, quick: bool, repeats: int) -> dict:
    """queries/s and memory of SparCode (best backend) and two-tower as N and as B grow."""
    base = REGIMES["R1"].scaled(*CPU_SCALE) if device == "cpu" else REGIMES["R1"]
    top_n = 10**6 if device == "cpu" else 10**7
    sizes = (10**4, 3 * 10**4, 10**5, 3 * 10**5, 10**6, 3 * 10**6, 10**7)
    n_values = [10**4, 10**5] if quick else [n for n in sizes if n <= top_n]
    b_values = [1, 64, 1024] if quick else [1, 16, 256, 1024, 4096, 16384]
    curves: dict = {"by_n_items": [], "by_batch": []}
    density = base.mean_postings / base.n_items
    for n in n_values:
        regime = Regime(base.name, base.n_codes, base.n_tokens, n, max(1, round(density * n)), base.batch, base.k)
        curves["by_n_items"].append(_point(regime, device, repeats))
    for b in b_values:
        regime = Regime(base.name, base.n_codes, base.n_tokens, base.n_items, base.mean_postings, b, base.k)
        curves["by_batch"].append(_point(regime, device, repeats))
    return curves


def _point(regime: Regime, device: str, repeats: int) -> dict:
    res = bench_regime(regime, device, repeats=repeats, all_to_all_queries=0, faiss_methods=False)
    keep = [m for m in res["methods"] if m["method"] != "sparcode-torch"]
    return {"n_items": regime.n_items, "batch": regime.batch,
            "methods": {m["method"]: {"qps_median": m["qps_median"], "added_memory_bytes": m["added_memory_bytes"]}
                        for m in keep}}


def plot(reports: list[dict], device_name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({m["method"] for r in reports for m in r["methods"]})
    fig, ax = plt.subplots(figsize=(2 + 2.2 * len(reports), 4.5))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs, ys = [], []
        for i, r in enumerate(reports):
            for m in r["methods"]:
                if m["method"] == name:
                    xs.append(i + j * width)
                    ys.append(m["qps_median"])
        ax.bar(xs, ys, width, label=name)
    ax.set_yscale("log")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(reports))])
    ax.set_xticklabels([f"{r['regime']}\nN={r['config']['n_items']:,} B={r['config']['batch']:,} k={r['config']['k']}"
                        for r in reports])
    ax.set_ylabel("queries/s (log)")
    ax.set_title(f"sparcode bench on {device_name}, {date.today().isoformat()}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot_scaling(curves: dict, device_name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, axis in ((axes[0], "by_n_items", "n_items"), (axes[1], "by_batch", "batch")):
        points = curves[key]
        for name in sorted({n for p in points for n in p["methods"]}):
            xs = [p[axis] for p in points if name in p["methods"]]
            ax.plot(xs, [p["methods"][name]["qps_median"] for p in points if name in p["methods"]], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (items)" if axis == "n_items" else "B (queries per batch)")
        ax.set_ylabel("queries/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"R1 shape, scaling on {device_name}, {date.today().isoformat()}")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def table(reports: list[dict], device_name: str) -> str:
    lines = [f"sparcode bench on {device_name}",
             f"{'regime':<7}{'method':<24}{'q/s median':>13}{'min':>11}{'max':>11}{'+MB':>8}  notes"]
    for r in reports:
        for m in r["methods"]:
            notes = []
            if "nprobe" in m:
                notes.append(f"nprobe {m['nprobe']}, recall@{r['config']['k']} {m['recall_at_k_vs_flat']:.3f}")
            if "bandwidth_fraction_of_copy" in m:
                notes.append(f"{m['bandwidth_fraction_of_copy']:.0%} of copy bw")
            lines.append(f"{r['regime']:<7}{m['method']:<24}{m['qps_median']:>13,.1f}{m['qps_min']:>11,.1f}"
                         f"{m['qps_max']:>11,.1f}{m['added_memory_bytes'] / 2**20:>8,.0f}  {'; '.join(notes)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argparse.ArgumentParser(prog="sparcode bench", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but no CUDA device is available")
    if args.scale <= 0 or args.repeats < 1:
        raise ValueError("--scale must be > 0 and --repeats >= 1")
    names = [*REGIMES, "R4"] if args.regime == "all" else [args.regime]
    items_by, batch_by = CPU_SCALE if args.device == "cpu" else (1, 1)
    scale = args.scale * (10 if args.quick else 1)
    device_name = device_label(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    reports = []
    today = date.today().isoformat()
    for name in names:
        if name == "R4":
            regime = ITEM_CODES[args.device].scaled(scale)
            print(f"[bench] {name} on {device_name}: {regime}", flush=True)
            report = bench_item_codes(regime, args.device, repeats=args.repeats)
        else:
            regime = REGIMES[name].scaled(items_by * scale, batch_by * scale)
            print(f"[bench] {name} on {device_name}: {regime}", flush=True)
            report = bench_regime(regime, args.device, repeats=args.repeats, all_to_all_queries=1 if args.quick else 2)
        report.update(_environment(args, device_name, today))
        atomic_write_text(args.out / f"{slug(device_name)}-{name}-{today}.json", json.dumps(report, indent=2) + "\n")
        reports.append(report)
    if args.scaling:
        curves = scaling(args.device, quick=args.quick, repeats=args.repeats)
        atomic_write_text(args.out / f"{slug(device_name)}-scaling-{today}.json",
            json.dumps({**curves, **_environment(args, device_name, today)}, indent=2) + "\n")
        plot_scaling(curves, device_name, args.out / f"{slug(device_name)}-scaling-{today}.png")
    plot(reports, device_name, args.out / f"{slug(device_name)}-{today}.png")
    print(table(reports, device_name))
    return 0


def _environment(args: argparse.Namespace, device_name: str, today: str) -> dict:
    return {"device": args.device, "device_name": device_name, "cpu": cpu_name(), "date": today,
            "command": "sparcode bench " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                    if k not in ("func", "run") and v not in (False, None)),
            "versions": {"torch": torch.__version__, "python": platform.python_version(), **optional_versions()},
            "torch_threads": torch.get_num_threads()}


def optional_versions() -> dict:
    out = {}
    for module in ("faiss", "numba", "triton", "numpy"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            pass
    return out


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_threads() -> int:
    import faiss

    return faiss.omp_get_max_threads()
