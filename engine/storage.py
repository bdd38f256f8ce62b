"""Index directories on disk: ``manifest.json`` + ``index.safetensors`` (+ the query
encoder's ``encoder.safetensors`` with its config in the manifest), no pickle.

Saving writes a sibling temporary directory, then puts it in place with
``replace.replace_dir``: at every instant the path holds the complete old index or the
complete new one, never a mixture or nothing. Loading parses the safetensors
header itself (a JSON table of dtype, shape and byte range per tensor), checks every
byte range against the file size before touching data, memory-maps the tensors when
asked, and then validates the CSR as ``CodeIndex.from_postings`` does. Every failure is a
``ValueError`` that names the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .encoder import QueryEncoder
from .replace import recover, replace_dir
from .validate import check_codebooks, check_item_ids, check_postings, fail

FORMAT_NAME = "sparcode-index"
FORMAT_VERSION = 3  # the encoder config names whether per-token codebooks use error feedback
MANIFEST = "manifest.json"
ENCODER = "encoder.safetensors"
TENSORS = "index.safetensors"
MAX_HEADER_BYTES = 100 * 2**20

# safetensors dtype tag -> (torch dtype, numpy dtype used to map the bytes)
_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "I64": (torch.int64, np.dtype("<i8")),
    "I32": (torch.int32, np.dtype("<i4")),
    "F32": (torch.float32, np.dtype("<f4")),
    "F16": (torch.float16, np.dtype("<f2")),
    "BF16": (torch.bfloat16, np.dtype("<u2")),
    "BOOL": (torch.bool, np.dtype("?")),
}
_TAGS = {t: tag for tag, (t, _) in _DTYPES.items()}


def library_version() -> str:
    try:
        return metadata.version("sparcode")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def save_index(path: Path, tensors: Mapping[str, torch.Tensor], n_items: int, n_tokens: int | None, *,
               overwrite: bool = False, encoder: QueryEncoder | None = None) -> None:
    """Write an index directory from its tensors (indptr, items, scores, and optionally
    codebooks and item_ids), atomically."""
    n_codes = tensors["indptr"].numel() - 1
    if encoder is not None and not isinstance(encoder, QueryEncoder):
        raise TypeError(f"encoder: expected a QueryEncoder, got {type(encoder).__name__}")
    if encoder is not None and encoder.quantizer.n_codes != n_codes:
        raise ValueError(f"encoder: makes {encoder.quantizer.n_codes} codes but the index has {n_codes}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items() if t is not None}

    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / TENSORS))
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": library_version(),
            "n_codes": n_codes,
            "n_items": n_items,
            "nnz": tensors["items"].numel(),
            "n_tokens": n_tokens,
            "codebooks": list(tensors["codebooks"].shape) if "codebooks" in tensors else None,
            "dtypes": {name: _TAGS[t.dtype] for name, t in tensors.items()},
            "files": {TENSORS: {"bytes": (tmp / TENSORS).stat().st_size, "sha256": _sha256(tmp / TENSORS)}},
        }
        if encoder is not None:
            state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
            save_file(state, str(tmp / ENCODER))
            _fsync_file(tmp / ENCODER)
            manifest["encoder"] = encoder.config()
            manifest["files"][ENCODER] = {"bytes": (tmp / ENCODER).stat().st_size, "sha256": _sha256(tmp / ENCODER)}
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        _fsync_file(tmp / TENSORS)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover: the new index before the swap, the old one after it


def load_index(path: Path, mmap: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) of an index directory, every field validated."""
    recover(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not an index directory")
    manifest = read_manifest(path)
    tensor_file = path / TENSORS
    _check_file(tensor_file, manifest["files"][TENSORS])

    tensors = read_safetensors(tensor_file, mmap=mmap)
    where = {f: f"{tensor_file}: {f}" for f in ("indptr", "items", "scores", "codebooks", "item_ids")}
    where["n_items"] = f"{path / MANIFEST}: n_items"
    wanted = {"indptr", "items", "scores"} | {n for n in ("codebooks", "item_ids") if n in manifest["dtypes"]}
    if set(tensors) != wanted:
        fail(str(tensor_file), f"holds tensors {sorted(tensors)}, expected {sorted(wanted)}")
    for name, t in tensors.items():
        if _TAGS[t.dtype] != manifest["dtypes"][name]:
            fail(where[name], f"dtype {_TAGS[t.dtype]} differs from the manifest's {manifest['dtypes'][name]}")
    shapes = {"indptr": [manifest["n_codes"] + 1], "items": [manifest["nnz"]], "scores": [manifest["nnz"]],
              "item_ids": [manifest["n_items"]], "codebooks": manifest["codebooks"]}
    for name, t in tensors.items():
        if list(t.shape) != shapes[name]:
            fail(where[name], f"shape {list(t.shape)} differs from the manifest's {shapes[name]}")

    check_postings(tensors["indptr"], tensors["items"], tensors["scores"], manifest["n_items"], where)
    if "codebooks" in tensors:
        check_codebooks(tensors["codebooks"], manifest["n_codes"], where["codebooks"])
    if "item_ids" in tensors:
        check_item_ids(tensors["item_ids"], manifest["n_items"], where["item_ids"])
    return manifest, tensors


def load_encoder(path: Path, device: torch.device | str | None = None) -> QueryEncoder | None:
    """The query encoder saved with an index (eval mode), or None when it has none."""
    manifest = read_manifest(path)
    if "encoder" not in manifest:
        return None
    file = path / ENCODER
    _check_file(file, manifest["files"][ENCODER])
    encoder = QueryEncoder.from_config(manifest["encoder"], f"{path / MANIFEST}: encoder")
    state = read_safetensors(file, mmap=False)
    want = encoder.state_dict()
    if set(state) != set(want):
        fail(str(file), f"holds tensors {sorted(set(state) ^ set(want))[:5]} that the encoder config does not match")
    for name, t in state.items():
        if t.shape != want[name].shape or t.dtype != want[name].dtype:
            fail(f"{file}: {name}", f"{t.dtype} {list(t.shape)} differs from the config's {want[name].dtype} "
                                    f"{list(want[name].shape)}")
    encoder.load_state_dict({k: v.clone() for k, v in state.items()})
    encoder.eval()
    return encoder if device is None else encoder.to(device)


def _check_file(file: Path, expected: dict) -> None:
    if not file.is_file():
        fail(str(file), "missing")
    if file.stat().st_size != expected["bytes"]:
        fail(str(file), f"has {file.stat().st_size} bytes, manifest says {expected['bytes']} (truncated or replaced)")
    if _sha256(file) != expected["sha256"]:
        fail(str(file), "sha256 differs from the manifest (the file was edited or damaged)")


def read_manifest(path: Path) -> dict:
    """Parse and type-check ``manifest.json`` of an index directory."""
    file = path / MANIFEST
    where = str(file)
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(where, "missing (not a SparCode index directory?)")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(where, f"not valid JSON ({exc})")
    if not isinstance(manifest, dict):
        fail(where, "must be a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        fail(f"{where}: format", f"expected {FORMAT_NAME!r}, got {manifest.get('format')!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        fail(f"{where}: format_version", f"this library reads version {FORMAT_VERSION}, got {manifest.get('format_version')!r}")
    for field in ("n_codes", "n_items", "nnz"):
        value = manifest.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if field == "nnz" else 1):
            fail(f"{where}: {field}", f"expected a positive integer, got {value!r}")
    tokens = manifest.get("n_tokens")
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1):
        fail(f"{where}: n_tokens", f"expected a positive integer or null, got {tokens!r}")
    books = manifest.get("codebooks")
    valid_books = isinstance(books, list) and len(books) in (3, 4) and all(
        isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in books)
    if books is not None and not valid_books:
        fail(f"{where}: codebooks", f"expected null, [P, C, d_sub] or [T, P, C, d_sub], got {books!r}")
    dtypes = manifest.get("dtypes")
    if not isinstance(dtypes, dict) or not {"indptr", "items", "scores"} <= set(dtypes):
        fail(f"{where}: dtypes", "expected an object with at least indptr, items, scores")
    unknown = set(dtypes) - {"indptr", "items", "scores", "codebooks", "item_ids"}
    if unknown:
        fail(f"{where}: dtypes", f"unknown tensors {sorted(unknown)}")
    if ("codebooks" in dtypes) != (books is not None):
        fail(f"{where}: codebooks", "shape and dtype entries disagree")
    files = manifest.get("files")
    entry = files.get(TENSORS) if isinstance(files, dict) else None
    if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
        fail(f"{where}: files", f"expected {{{TENSORS!r}: {{bytes, sha256}}}}")
    if "encoder" in manifest:
        entry = files.get(ENCODER)
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
            fail(f"{where}: files", f"an encoder is listed but {ENCODER!r} has no {{bytes, sha256}} entry")
    return manifest


def read_safetensors(file: Path, *, mmap: bool) -> dict[str, torch.Tensor]:
    """Read a safetensors file with every header entry checked against the file size."""
    where = str(file)
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            fail(where, "too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            fail(where, f"header length {header_len} does not fit in a {size}-byte file")
        try:
            header = json.loads(fh.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            fail(where, f"header is not valid JSON ({exc})")
    if not isinstance(header, dict):
        fail(where, "header must be a JSON object")
    header.pop("__metadata__", None)
    start = 8 + header_len
    data_bytes = size - start
    base = np.memmap(file, dtype=np.uint8, mode="c") if mmap else np.fromfile(file, dtype=np.uint8)
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        field = f"{where}: {name}"
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
            fail(field, f"unsupported or missing dtype in header entry {info!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            fail(field, f"bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            fail(field, f"bad data_offsets {offsets!r}")
        torch_dtype, np_dtype = _DTYPES[info["dtype"]]
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes:
            fail(field, f"byte range [{begin}, {end}) lies outside the {data_bytes} data bytes (truncated file?)")
        if end - begin != math.prod(shape) * np_dtype.itemsize:
            fail(field, f"byte range holds {end - begin} bytes, shape {shape} needs {math.prod(shape) * np_dtype.itemsize}")
        if begin % np_dtype.itemsize:
            fail(field, "data is not aligned to its dtype")
        array = base[start + begin : start + end].view(np_dtype).reshape(shape)
        tensor = torch.from_numpy(array)
        tensors[name] = tensor.view(torch_dtype) if torch_dtype == torch.bfloat16 else tensor
    return tensors


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _write_synced(file: Path, data: bytes) -> None:
    with open(file, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_file(file: Path) -> None:
    with open(file, "rb+") as fh:
        os.fsync(fh.fileno())
