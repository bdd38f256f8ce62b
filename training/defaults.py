"""The one source of training defaults: ``TrainConfig``, the model constructors,
``sparcode train``, the accuracy bench and the demo all read them from here.

Where a default differs by device, a function of the device gives it. The paper's
(256, 256, 256) scorer runs on every (token, item) pair, ~30x the multiply-adds of
(64, 64): minutes per Gowalla epoch on a GPU, hours on 2 CPU cores; so a CPU gets the
smaller scorer, V = 16,384 codes instead of 65,536 for training (exporting all V x N
pairs through the scorer runs at ~1.4M pairs/s there) and a time budget. Evidence for
each choice: docs/accuracy.md.
"""

from __future__ import annotations

import torch

SAMPLINGS = ("uniform", "popularity", "in-batch")  # how negatives are drawn
HOLDOUTS = ("random", "latest")  # which of a user's items an interactions file holds out to test

# optimisation
EPOCHS = 20
BATCH_SIZE = 1024
LR = 1e-3
TWO_TOWER_LR = 2e-3  # TwoTower: the same plateau as 1e-3 in half the epochs (Gowalla, docs/accuracy.md)
NEGATIVES = 100  # shared by the batch; "in-batch" sampling uses the batch's positives instead
L2 = 1e-5  # weight of the squared norm of each batch's item vectors (per example)
PATIENCE = 10  # epochs without a better validation Recall@20 before stopping
VALID_USERS = 1000  # users whose validation Recall@20 drives early stopping
HISTORY = 100  # history items per query (on Gowalla 91% of training interactions; 20 held 56%)
COMMITMENT = 0.0  # the quantizer's commitment loss: it collapses batch-normalised tokens
INDEX_DENSITY = 0.01  # the export rule to use: each code keeps its top 1% of the items (sparcode export --cap-density)
ITEM_CODES_L2 = 10.0  # item codes: l2 = this x the mean item's training interactions (docs/accuracy.md)
ITEM_CODES_KEEP = "magnitude"  # item codes: each code keeps its largest scores by magnitude, or "positive" ones
ITEM_CODES_KEEPS = ("magnitude", "positive")  # the choices of ITEM_CODES_KEEP
ITEM_CODES_NEIGHBOURS = 256  # the neighbour fit: regressors per item (docs/accuracy.md)
ITEM_CODES_CAP = 500  # item-codes: items per code at most, by default (INDEX_DENSITY x N up to it; docs/accuracy.md)
ITEM_CODES_EXACT_SIDE = 40_000  # item-codes --fit auto: exact up to this many users or items (a 6.4 GB matrix)
GRAPH_FILTER_ALPHA = 0.3  # graph-filter codes: weight of the ideal low-pass term (GF-CF's published value)
GRAPH_FILTER_VECTORS = 256  # graph-filter codes: singular vectors of the ideal low-pass term (GF-CF's)
GRAPH_FILTER_KEEPS = ITEM_CODES_KEEPS  # graph-filter codes: keep rules screened on validation (--graph-filter-keeps)
GRAPH_FILTER_SPLIT = "auto"  # graph-filter codes: screened on 10% of every user's train items (tail or wide), refitted
GRAPH_FILTER_SPLITS = ("auto", "valid", "wide", "tail")  # the choices of GRAPH_FILTER_SPLIT (fit_on_validation)
GRAPH_FILTER_FOLDS = 3  # graph-filter codes: disjoint 10% slices a wide screen averages (the tail has one)
GRAPH_FILTER_CAP_DENSITIES = (0.01, 0.03, 0.1, 0.3)  # graph-filter codes: items per code screened on validation, x N
GRAPH_FILTER_GRID = ("0:0", "0.1:256", "0.3:256", "0.3:512", "0.3:1024", "0.1:256:1", "0.3:256:1", "0.1:256:2")  # on validation
TOWER_CODE_LEVELS = 8  # tower codes: residual k-means levels, the codes in each user's bag (tower_codes.py)
TOWER_CODE_SIZE = 256  # tower codes: centres per level
ENSEMBLE_POWERS = (0.0, 0.5, 1.0)  # ensemble: the base family's code weight 1 / |bag|^p, p screened on validation
ENSEMBLE_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)  # ensemble: the added family's relative weight, screened on validation
CPU_TIME_BUDGET = 1800.0  # seconds per model; training stops after the epoch that crosses it

# model
DIM = 64  # token and item embedding size (SparCode, AllToAll; a warm start takes its two-tower's)
TWO_TOWER_DIM = 128  # TwoTower: Gowalla test Recall@20 0.1703 where 64 levels off at ~0.165 (docs/accuracy.md)
TOKENS = 4  # T
SUB_CODEBOOKS = 2  # P
QUANTIZER = "residual"  # or "product", the paper's
PER_TOKEN = True  # one quantizer per token position: V = T * C**P
FEEDBACK = False  # per-token codebooks: each position also quantizes the error the positions before it left
# (closer at the start, but trained on, the 1% index loses more: docs/accuracy.md)
EMBEDDING_STD = 0.1  # initial std of the id and feature embeddings
TEMPERATURE = 0.1  # TwoTower: cosine similarity over this temperature
TOKENIZER_HIDDEN = (256, 256)  # the tokenizer's MLP widths (SparCode, AllToAll)
TWO_TOWER_TOKENIZER_HIDDEN = ()  # TwoTower: the pooled history through one linear map
TWO_TOWER_HISTORY_DROPOUT = 0.5  # TwoTower: history items left out of each training query's mean
GPU_HIDDEN = (256, 256, 256)  # the scorer's MLP widths
CPU_HIDDEN = (64, 64)
GPU_CODEWORDS = 128  # C: V = 4 x 128**2 = 65,536, the paper's code space
CPU_CODEWORDS = 64  # V = 4 x 64**2 = 16,384


def on_cpu(device: str | torch.device) -> bool:
    return torch.device(device).type == "cpu"


def hidden(device: str | torch.device) -> tuple[int, ...]:
    """The scorer widths for ``device``: the paper's on a GPU."""
    return CPU_HIDDEN if on_cpu(device) else GPU_HIDDEN


def codewords(device: str | torch.device, trains: bool = True) -> int:
    """Codewords per codebook: V = 65,536 on a GPU, and for a two-tower converted without
    training (``trains`` False), whose export is a dot product (Gowalla's 65,536 codes in
    42 s on 2 CPU cores) and whose 1% index gains from the larger space (0.1446 -> 0.1522
    Recall@20, docs/accuracy.md); 16,384 for training on a CPU."""
    return CPU_CODEWORDS if on_cpu(device) and trains else GPU_CODEWORDS


def time_budget(device: str | torch.device) -> float | None:
    """Training seconds for ``device``: none on a GPU."""
    return CPU_TIME_BUDGET if on_cpu(device) else None


def sampling(kind: str, density: float | None = None) -> str:
    """How negatives are drawn for model ``kind``: popularity for the scorer models (+30%
    validation Recall@20 over uniform after one Gowalla epoch) and the batch's positives for
    TwoTower, whose dot product makes them cheap (2.9x over 100 uniform); uniform when
    training for a density, whose bias follows uniform negatives."""
    if kind == "two_tower":
        return "in-batch"
    return "uniform" if density is not None else "popularity"


def dim(kind: str) -> int:
    """The embedding size of model ``kind``."""
    return TWO_TOWER_DIM if kind == "two_tower" else DIM


def lr(kind: str) -> float:
    """The learning rate of model ``kind``."""
    return TWO_TOWER_LR if kind == "two_tower" else LR
