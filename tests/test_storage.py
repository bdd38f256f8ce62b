"""Index directories: bit-exact round trips and clear errors for damaged files."""

import json
import struct

import pytest
import torch
from helpers import quantized_index
from safetensors.torch import save_file

from sparcode.engine import CodeIndex, Engine
from sparcode.engine.storage import MANIFEST, TENSORS, _sha256


def same(a: CodeIndex, b: CodeIndex) -> bool:
    fields = ("indptr", "items", "scores", "codebooks", "item_ids")
    for f in fields:
        x, y = getattr(a, f), getattr(b, f)
        if (x is None) != (y is None) or (x is not None and (x.dtype != y.dtype or not torch.equal(x, y))):
            return False
    return a.n_items == b.n_items and a.n_tokens == b.n_tokens


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_is_bit_exact(tmp_path, dtype, mmap):
    index = quantized_index(
        16, 50, 6, seed=2, dtype=dtype, n_tokens=4,
        codebooks=torch.randn(2, 4, 8), item_ids=torch.randperm(50) * 3 + 7,
    )
    index.save(tmp_path / "ix")
    loaded = CodeIndex.load(tmp_path / "ix", mmap=mmap)
    assert same(index, loaded)
    assert torch.equal(Engine(loaded, backend="torch").search(torch.tensor([[1, 2, 3, 3]]), k=5).ids,
                       Engine(index, backend="torch").search(torch.tensor([[1, 2, 3, 3]]), k=5).ids)


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    index = quantized_index(8, 20, 4, seed=1)
    index.save(tmp_path / "ix")
    with pytest.raises(FileExistsError, match="already exists"):
        index.save(tmp_path / "ix")
    other = quantized_index(8, 30, 4, seed=2)
    other.save(tmp_path / "ix", overwrite=True)
    assert CodeIndex.load(tmp_path / "ix").n_items == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]  # no temporary left behind


# Each replace path's fault points, and whether the path holds the new index after each.
REPLACE_STEPS = {
    "exchange": {"start": False, "exchanged": True, "synced": True},
    "two-renames": {"start": False, "moved-old": False, "moved-new": True, "synced": True},
}

CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from helpers import quantized_index
import sparcode.engine.replace as replace
if {mode!r} == "two-renames":
    replace.exchange = lambda a, b: False
def fault(step):
    if step == {step!r}:
        os.kill(os.getpid(), signal.SIGKILL)
replace.fault = fault
quantized_index(8, 30, 4, seed=2).save({path!r}, overwrite=True)
"""


@pytest.mark.parametrize("mode,step", [(m, s) for m, steps in REPLACE_STEPS.items() for s in steps])
def test_replace_killed_at_each_step_leaves_a_whole_index(tmp_path, mode, step):
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "ix"
    quantized_index(8, 20, 4, seed=1).save(path)
    script = CHILD.format(tests=str(Path(__file__).parent), mode=mode, step=step, path=str(path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr  # killed at that step
    loaded = CodeIndex.load(path)
    assert loaded.n_items == (30 if REPLACE_STEPS[mode][step] else 20)
    expected = quantized_index(8, 30, 4, seed=2) if REPLACE_STEPS[mode][step] else quantized_index(8, 20, 4, seed=1)
    assert same(loaded, expected)


@pytest.mark.parametrize("mode,step", [(m, s) for m, steps in REPLACE_STEPS.items() for s in steps])
def test_replace_interrupted_at_each_step_keeps_a_whole_index(tmp_path, monkeypatch, mode, step):
    import sparcode.engine.replace as replace

    path = tmp_path / "ix"
    quantized_index(8, 20, 4, seed=1).save(path)
    if mode == "two-renames":
        monkeypatch.setattr(replace, "exchange", lambda a, b: False)

    def interrupt(at):
        if at == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(replace, "fault", interrupt)
    with pytest.raises(KeyboardInterrupt):
        quantized_index(8, 30, 4, seed=2).save(path, overwrite=True)
    assert CodeIndex.load(path).n_items == (30 if REPLACE_STEPS[mode][step] else 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]  # no temporary or old copy left behind


def rewrite(directory, tensors=None, manifest_edit=None):
    """Replace the tensors (keeping the manifest consistent with them) or edit the manifest."""
    manifest = json.loads((directory / MANIFEST).read_text())
    if tensors is not None:
        save_file(tensors, str(directory / TENSORS))
        manifest["files"][TENSORS] = {"bytes": (directory / TENSORS).stat().st_size, "sha256": _sha256(directory / TENSORS)}
    if manifest_edit is not None:
        manifest_edit(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def saved(tmp_path):
    index = quantized_index(8, 20, 4, seed=1, dtype=torch.float32)
    index.save(tmp_path / "ix")
    return tmp_path / "ix", index


def base_tensors(index):
    return {"indptr": index.indptr.clone(), "items": index.items.clone(), "scores": index.scores.clone()}


def test_truncated_tensor_file(saved):
    path, _ = saved
    data = (path / TENSORS).read_bytes()
    (path / TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"index.safetensors: has \d+ bytes, manifest says"):
        CodeIndex.load(path)


def test_truncated_file_with_matching_manifest(saved):
    path, _ = saved
    data = (path / TENSORS).read_bytes()
    (path / TENSORS).write_bytes(data[:-40])
    rewrite(path, manifest_edit=lambda m: m["files"][TENSORS].update(bytes=len(data) - 40, sha256=_sha256(path / TENSORS)))
    with pytest.raises(ValueError, match=r"index.safetensors: \w+: byte range .* outside the"):
        CodeIndex.load(path)


def test_edited_byte_fails_checksum(saved):
    path, _ = saved
    data = bytearray((path / TENSORS).read_bytes())
    data[-3] ^= 0xFF
    (path / TENSORS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 differs from the manifest"):
        CodeIndex.load(path)


def test_garbage_header(saved):
    path, _ = saved
    (path / TENSORS).write_bytes(struct.pack("<Q", 10**12) + b"{}")
    rewrite(path, manifest_edit=lambda m: m["files"][TENSORS].update(bytes=10, sha256=_sha256(path / TENSORS)))
    with pytest.raises(ValueError, match="header length 1000000000000 does not fit"):
        CodeIndex.load(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=99), "manifest.json: format_version: this library reads version 3, got 99"),
        (lambda m: m.update(format="other"), "manifest.json: format: expected 'sparcode-index'"),
        (lambda m: m.update(n_items=-3), "manifest.json: n_items: expected a positive integer"),
        (lambda m: m.update(nnz=m["nnz"] + 1) or m.update(nnz=26), "differs from the manifest's [26]"),
        (lambda m: m["dtypes"].update(scores="F16"), "index.safetensors: scores: dtype F32 differs from the manifest's F16"),
        (lambda m: m.pop("files"), "manifest.json: files"),
    ],
)
def test_bad_manifest(saved, edit, message):
    path, _ = saved
    rewrite(path, manifest_edit=edit)
    with pytest.raises(ValueError) as info:
        CodeIndex.load(path)
    assert message in str(info.value)


def test_manifest_not_json(saved):
    path, _ = saved
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        CodeIndex.load(path)


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="not an index directory"):
        CodeIndex.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="manifest.json: missing"):
        CodeIndex.load(tmp_path / "empty")


def test_items_out_of_range(saved):
    path, index = saved
    t = base_tensors(index)
    t["items"][-1] = 20
    rewrite(path, t)
    with pytest.raises(ValueError, match=r"index.safetensors: items: item 20 of code \d+ is outside \[0, 20\)"):
        CodeIndex.load(path)


def test_unsorted_list(saved):
    path, index = saved
    t = base_tensors(index)
    code = int(torch.nonzero(index.lengths >= 2)[0])
    lo = int(index.indptr[code])
    t["items"][lo], t["items"][lo + 1] = t["items"][lo + 1].clone(), t["items"][lo].clone()
    rewrite(path, t)
    with pytest.raises(ValueError, match=f"index.safetensors: items: posting list of code {code} must be strictly increasing"):
        CodeIndex.load(path)


def test_nan_score(saved):
    path, index = saved
    t = base_tensors(index)
    t["scores"][3] = float("nan")
    rewrite(path, t)
    with pytest.raises(ValueError, match="index.safetensors: scores: non-finite score nan"):
        CodeIndex.load(path)


def test_wrong_dtype(saved):
    path, index = saved
    t = base_tensors(index)
    t["items"] = t["items"].to(torch.int64)
    rewrite(path, t, manifest_edit=lambda m: m["dtypes"].update(items="I64"))
    with pytest.raises(ValueError, match="index.safetensors: items: expected dtype int32, got int64"):
        CodeIndex.load(path)


def test_unexpected_tensor(saved):
    path, index = saved
    t = base_tensors(index)
    t["payload"] = torch.zeros(3)
    rewrite(path, t)
    with pytest.raises(ValueError, match=r"holds tensors \['indptr', 'items', 'payload', 'scores'\]"):
        CodeIndex.load(path)
