"""The Triton backend: the search kernels of ``sparcode.kernels`` with a regime choice.

On CUDA it is the default. On CPU it runs only under the Triton interpreter
(``TRITON_INTERPRET=1``), which is what the tests do with tiny shapes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sparcode.kernels.candidate_search import SKIP_SHIFT, SkipTable, candidate_search, skip_table
from sparcode.kernels.dense_packed import dense_packed_search
from sparcode.kernels.dense_search import dense_search, scratch_bytes
from sparcode.kernels.table_search import LOAD, MAX_K, table_search
from sparcode.kernels.tiled_search import tiled_search

from .bags import Bags, take_rows
from .dense import dense_rows, fits
from .index import CodeIndex
from .plan import Plan
from .selection import Exclusion, score_floor

TILE_ITEMS = 1024
REGIMES = ("auto", "table", "candidate", "tiled", "dense", "dense-packed")  # dense-packed: the GPU check's comparison
TABLE_RANGE = (1024, 1 << 22)  # slots of a per-query table (8 bytes each)
L2_TABLE_BYTES = 32 * 2**20  # the tables in flight together: within an H100/H200's 50 MB L2
TABLE_BYTES = 2**30  # at most this much for the tables of one launch (long queries' tables spill to HBM)
SECTOR_BYTES = 32  # one L2 sector: what a scattered load costs in traffic
SURVIVOR_BYTES = 32  # a dense-regime survivor: its key and owner, and their grouped copies
# choose_regime's per-query time model, fitted to the H200 kernels side by side on R1-R4
# (bench/results/nvidia-h200-gpu-bench-2026-12-04.json; docs/performance.md)
CANDIDATE_STEP_NS = 0.0028  # one binary-search step or key write of the candidate kernel
TILED_SECTOR_NS = 0.017  # one counted sector of the tiled kernel
DENSE_BYTE_NS = 0.0032  # one byte of the dense score rows a query reads (fitted to dense-packed; K2 is counted to take less)
TABLE_STEP_NS = 0.12  # one table update or slot pass of the table kernel
QUERY_NS = 1400.0  # a query's selection and its share of the launches


def choose_regime(n_items: int, n_tokens: float, mean_postings: float, searches: float, longest: int,
                  tile_items: int = TILE_ITEMS, dense_fits: bool = False, score_bytes: int = 2,
                  table_slots: int | None = None) -> str:
    """Pick the regime of least predicted time per query (nanoseconds), a model whose
    constants are fitted to the H200's side-by-side kernel times on R1-R4.

    candidate: every posting binary-searches its superblock segment in each list of its
    query (``searches``: the batch's mean of postings x bag length; log2 of the longest
    segment, ``longest``, steps each) and is written once as a key. tiled: every posting
    is a read-modify-write of the scratch row, every item slot costs an init, a
    read-back and its share of the on-chip sort, and every (code, item block) two
    binary searches of the code's whole list. dense (only when the rows fit their
    budget): T coalesced rows of N scores. table (when ``table_slots`` is given: k fits
    and the mean query fits a table of that size): per posting a compare-and-swap and a
    read-modify-write of its slot and per query a clearing and a selecting pass over its
    table. T is the batch's mean bag length (``n_tokens``); every regime but table (which
    selects inside its kernel) adds ``QUERY_NS`` of selection.
    """
    steps = max(1, longest.bit_length())
    costs = {"candidate": CANDIDATE_STEP_NS * (searches * steps + 2 * mean_postings) + QUERY_NS,
             "tiled": TILED_SECTOR_NS * (mean_postings * 3 + n_items * (3 + math.log2(tile_items) / 2)
                                         + n_tokens * -(-n_items // tile_items) * 2 * steps) + QUERY_NS}
    if dense_fits:
        costs["dense"] = DENSE_BYTE_NS * n_tokens * n_items * score_bytes + QUERY_NS
    if table_slots is not None and mean_postings <= table_slots * LOAD:
        costs["table"] = TABLE_STEP_NS * (mean_postings * 3 + table_slots / 2)
    return min(costs, key=costs.get)


def query_tables(postings: torch.Tensor) -> torch.Tensor:
    """(B,) int64 slots of each query's own table: room for its postings at the table's
    load, a power of two within ``TABLE_RANGE`` (queries over the range get its top, and
    do not fit)."""
    need = torch.ceil(postings.double().clamp(min=1) / LOAD)
    slots = torch.exp2(torch.ceil(torch.log2(need))).to(torch.int64)
    return slots.clamp(TABLE_RANGE[0], TABLE_RANGE[1])


def table_size(postings: torch.Tensor) -> int:
    """Slots of the per-query tables for a batch: room for its 99th-percentile query at
    the table's load (longer ones go to another regime), within ``TABLE_RANGE``."""
    if postings.numel() == 0:
        return TABLE_RANGE[0]
    p99 = float(torch.quantile(postings.double(), 0.99)) if postings.numel() > 1 else float(postings[0])
    return int(min(TABLE_RANGE[1], max(TABLE_RANGE[0], 1 << max(0, math.ceil(math.log2(max(1.0, p99 / LOAD)))))))


def _skip(index: CodeIndex) -> SkipTable:
    """The index's skip table for candidate searches (derived once, ~16 MB at R1)."""
    return index.derived(("skip_table", SKIP_SHIFT), lambda ix: skip_table(ix.indptr, ix.items, ix.n_items))


class TritonBackend:
    """Gather-and-sum in Triton, then ``torch.topk`` over packed keys."""

    name = "triton"

    def __init__(self, regime: str = "auto", tile_items: int = TILE_ITEMS, dense_bytes: int | None = None,
                 workspace_bytes: int | None = None, table_slots: int | None = None,
                 table_programs: int | None = None) -> None:
        """``workspace_bytes`` bounds the dense regime's survivors per launch (None: no bound);
        ``Engine`` passes its own. ``table_slots`` (a power of two) fixes the table regime's
        per-query tables (None: sized per batch, ``table_size``) and ``table_programs`` the
        tables in flight (None: ``L2_TABLE_BYTES`` worth, at least one per SM)."""
        if regime not in REGIMES:
            raise ValueError(f"regime: expected one of {REGIMES}, got {regime!r}")
        if tile_items < 16 or tile_items & (tile_items - 1):
            raise ValueError(f"tile_items: expected a power of two >= 16, got {tile_items}")
        self.regime = regime
        self.tile_items = tile_items
        self.dense_bytes = dense_bytes
        self.workspace_bytes = workspace_bytes
        if table_slots is not None and (table_slots < 2 or table_slots & (table_slots - 1)):
            raise ValueError(f"table_slots: expected a power of two >= 2, got {table_slots}")
        self.table_slots, self.table_programs = table_slots, table_programs

    def plan(self, index: CodeIndex, bags: Bags, k: int) -> Plan:
        postings = bags.postings(index.lengths).cpu().numpy()
        regime = self._auto(index, bags, k, postings, tables=True) if self.regime == "auto" else self.regime
        if regime == "table":  # the (B, k) keys; queries that do not fit go the candidate way
            fit = self._fits(torch.from_numpy(postings), k)[0].numpy()
            return Plan(np.where(fit, 16 * k, 40 * postings + 16 * k), regime=regime)
        if regime == "dense":  # the sampled sums, the buckets, the (B, k) keys
            return Plan(np.full(postings.shape, scratch_bytes(index.n_items, k, self.tile_items) + 16 * k), regime=regime)
        if regime == "dense-packed":  # survivors of the floor (keys and owners, sorted twice), the (B, k) keys
            return Plan(np.full(postings.shape, 64 * (64 + k) + 16 * k), regime=regime)
        if regime == "candidate":
            # flat keys, then the ragged selection's gather index and padded matrix
            # (at most twice the keys, 8 bytes each)
            return Plan(40 * postings + 16 * k, regime=regime)
        blocks = -(-index.n_items // self.tile_items)
        return Plan(np.full(postings.shape, 16 * blocks * min(k, self.tile_items) + 16 * k), regime=regime)

    def _auto(self, index: CodeIndex, bags: Bags, k: int, postings: np.ndarray, tables: bool) -> str:
        """``choose_regime`` on the batch's statistics (the table regime only if ``tables``)."""
        mean = float(postings.mean()) if postings.size else 0.0
        tokens = float(bags.codes.numel()) / max(1, bags.n_queries)
        dense_ok = fits(index, index.scores.dtype, self.dense_bytes)
        searches = float((postings * np.diff(bags.offsets.cpu().numpy())).mean()) if postings.size else 0.0
        searched = (1 << _skip(index).steps) - 1  # the longest segment a candidate search covers
        table = (self.table_slots or table_size(torch.from_numpy(postings))) if tables and k <= MAX_K else None
        return choose_regime(index.n_items, tokens, mean, searches, searched, self.tile_items, dense_ok,
                             index.scores.element_size(), table)

    def search(
        self, index: CodeIndex, bags: Bags, k: int, exclude: Exclusion, regime: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = bags.codes.device
        if exclude is None:
            ex_offsets = torch.zeros(bags.n_queries + 1, dtype=torch.int64, device=device)
            ex_items = torch.zeros(1, dtype=torch.int64, device=device)
        else:
            ex_offsets, ex_items = exclude
            if ex_items.numel() == 0:  # kernels need a real pointer; nothing is read from it
                ex_items = torch.zeros(1, dtype=torch.int64, device=device)
        if regime == "table":
            return self._table_search(index, bags, k, ex_offsets, ex_items)
        codes = bags.codes if bags.codes.numel() else torch.zeros(1, dtype=torch.int64, device=device)
        weights = bags.weights if bags.weights is None or bags.weights.numel() else None
        if regime in ("dense", "dense-packed"):
            floor = score_floor(index, bags, k + ex_offsets.diff())
            limit = None if self.workspace_bytes is None else max(1, self.workspace_bytes // SURVIVOR_BYTES)
            search = dense_search if regime == "dense" else dense_packed_search
            return search(dense_rows(index, index.scores.dtype), codes, bags.offsets, weights, floor, ex_offsets,
                          ex_items, k, block_n=self.tile_items, max_survivors=limit)
        args = (index.indptr, index.items, index.scores, codes, bags.offsets, weights, ex_offsets, ex_items, k)
        if regime == "candidate":
            return candidate_search(*args, floor=score_floor(index, bags, k + ex_offsets.diff()), skip=_skip(index))
        return tiled_search(*args, index.n_items, block_n=self.tile_items)

    def _fits(self, postings: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) bool: the queries the table regime takes, and (B,) int64 their table slots:
        ``table_slots`` for all when fixed, else each query's own (``query_tables``)."""
        if self.table_slots is not None:
            slots = torch.full_like(postings, self.table_slots)
        else:
            slots = query_tables(postings)
        return (postings <= slots * LOAD) & (k <= MAX_K), slots

    def _table_search(self, index: CodeIndex, bags: Bags, k: int, ex_offsets: torch.Tensor,
                      ex_items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries that fit a table through the table kernel, one launch per table size
        (queries binned by their postings), the rest through the regime the cost model
        picks for them."""
        device = bags.codes.device
        fit, slots = self._fits(bags.postings(index.lengths), k)
        scores = torch.full((bags.n_queries, k), float("-inf"), device=device)
        ids = torch.full((bags.n_queries, k), -1, dtype=torch.int64, device=device)
        if bool(fit.any()):
            codes = bags.codes if bags.codes.numel() else torch.zeros(1, dtype=torch.int64, device=device)
            floor = score_floor(index, bags, k + ex_offsets.diff())
            for table in torch.unique(slots[fit]).tolist():
                mine = torch.nonzero(fit & (slots == table)).squeeze(1)
                scores[mine], ids[mine] = table_search(index.indptr, index.items, index.scores, codes, bags.offsets,
                                                       bags.weights, ex_offsets, ex_items, floor, mine, k, table=table,
                                                       n_programs=self._programs(table, mine.numel(), device))
        rest = torch.nonzero(~fit).squeeze(1)
        if rest.numel():
            sub = bags.take(rest)
            ex_sub, (ex_rest,) = take_rows(ex_offsets, [ex_items[: int(ex_offsets[-1])]], rest)
            regime = self._auto(index, sub, k, sub.postings(index.lengths).cpu().numpy(), tables=False)
            scores[rest], ids[rest] = self.search(index, sub, k, (ex_sub, ex_rest), regime)
        return scores, ids

    def _programs(self, table: int, queries: int, device: torch.device) -> int:
        """Tables in flight for one launch: ``table_programs`` if set; on CUDA as many as fill
        ``L2_TABLE_BYTES``, at least one per SM, within ``TABLE_BYTES``; 4 on the interpreter."""
        if self.table_programs is not None:
            return self.table_programs
        if device.type != "cuda":
            return 4
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = max(sms, L2_TABLE_BYTES // (8 * table))
        return max(1, min(queries, wanted, TABLE_BYTES // (8 * table)))
