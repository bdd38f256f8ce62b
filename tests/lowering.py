"""Lower recorded Triton launches to Triton IR for a Hopper target, without a GPU.

The interpreter runs kernels as Python and never meets the compiler's rules (a
loop-carried variable that changes type, a compare-and-swap whose operand types
differ); this check runs the compiler's front end on each launch's real argument types.

    python tests/lowering.py SPECS.json   # exit 1 and the errors when a launch fails to lower

A spec is {"module", "kernel", "args": {name: ["tensor", dtype] | ["int", value] |
["float", value] | ["none"]}, "options": {num_warps, ...}}; ``describe`` builds one.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

TENSOR_TYPES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float64": "fp64",
                "torch.int64": "i64", "torch.int32": "i32", "torch.int16": "i16", "torch.int8": "i8",
                "torch.uint8": "u8", "torch.bool": "i1"}
OPTIONS = ("num_warps", "num_stages")


def describe(fn, args: tuple, kwargs: dict) -> dict:
    """The spec of one launch of ``fn`` (an interpreted kernel) with its arguments."""
    import torch

    names = list(fn.arg_names)
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    out = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            out[name] = ["tensor", str(value.dtype)]
        elif isinstance(value, bool):
            out[name] = ["bool", value]
        elif isinstance(value, int):
            out[name] = ["int", value]
        elif isinstance(value, float):
            out[name] = ["float", value]
        elif value is None:
            out[name] = ["none"]
        else:
            out[name] = ["value", getattr(value, "value", value)]
    return {"module": fn.fn.__module__, "kernel": fn.fn.__name__, "args": out,
            "options": {k: kwargs[k] for k in OPTIONS if k in kwargs}}


def lower(spec: dict) -> None:
    """Run the compiler's front end on one spec for sm_90; raises on a compile error."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    signature, constexprs = {}, {}
    for param in fn.params:
        kind, *value = spec["args"][param.name]
        if param.is_constexpr or kind in ("none", "value"):
            signature[param.name] = "constexpr"
            constexprs[param.name] = value[0] if value else None
        elif kind == "tensor":
            signature[param.name] = "*" + TENSOR_TYPES[value[0]]
        elif kind == "bool":
            signature[param.name] = "i1"
        elif kind == "int":
            signature[param.name] = "i32" if -2**31 <= value[0] < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options(dict(spec["options"]))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    ASTSource(fn=fn, signature=signature, constexprs=constexprs).make_ir(
        target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)


def main(path: str) -> int:
    failures = []
    for spec in json.loads(Path(path).read_text()):
        try:
            lower(spec)
        except Exception as exc:  # every failing launch is reported, not only the first
            failures.append(f"{spec['module']}.{spec['kernel']} {spec['args']}:\n{exc}")
    print("\n\n".join(failures) or "all launches lower")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
