"""Float scalars reach the Triton kernels in fp64.

Triton types an unannotated Python float argument fp32, so on a GPU an fp64 run would
use ``eps``, ``sqrt(eps)`` and the dropout scale ``1/(1-p)`` rounded to fp32 (relative
error ~3e-8, far outside fp64 tolerances), while the interpreter keeps Python floats
exact and cannot show it.  Every launched kernel therefore declares these parameters
fp64 and converts them once to its accumulation dtype, and the compile check
(triton_compile.py) must build the signature a launch would.  ``drop_p`` stays fp32:
the keep decision compares an fp32 uniform with it, as torch compares a float32
tensor with a Python scalar.
"""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed")

from triton.runtime.jit import _normalize_ty  # noqa: E402

from fbp_kernels.backends import triton_kernels, triton_split, triton_wide  # noqa: E402

#: Parameters whose fp32 rounding would break an fp64 result.
FP64_SCALARS = ("eps", "sqrt_eps", "keep_scale")


def _python_function(fn):
    # a JITFunction, or the interpreter's wrapper of one
    return getattr(fn, "fn", fn)


def _annotations(fn):
    """``{parameter: Triton type}`` of the annotated, non-constexpr parameters."""
    out = {}
    for name, param in inspect.signature(_python_function(fn)).parameters.items():
        if param.annotation is not inspect.Parameter.empty:
            ty = _normalize_ty(param.annotation)
            if "constexpr" not in ty:
                out[name] = ty
    return out


def _launched_kernels():
    for module in (triton_kernels, triton_split, triton_wide):
        for name, fn in vars(module).items():
            if name.endswith("_kernel") and hasattr(_python_function(fn), "__code__"):
                yield f"{module.__name__.rsplit('.', 1)[-1]}.{name}", fn


KERNELS = dict(_launched_kernels())


def test_the_kernels_taking_the_scalars_are_all_found():
    taking = sorted(n for n, fn in KERNELS.items()
                    if set(inspect.signature(_python_function(fn)).parameters) & set(FP64_SCALARS))
    assert taking == sorted([
        "triton_kernels._fbp_fwd_kernel", "triton_kernels._fbp_bwd_kernel",
        "triton_split._split_fwd_kernel", "triton_split._split_fwd_dropin_kernel",
        "triton_split._split_bwd_kernel", "triton_split._split_bwd_dropin_kernel",
        "triton_wide._wide_fwd_kernel", "triton_wide._wide_grad_kernel",
        "triton_wide._grad_pooled_kernel", "triton_wide._finish_kernel"]), taking


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_float_scalars_are_declared_fp64(name):
    params = inspect.signature(_python_function(KERNELS[name])).parameters
    declared = _annotations(KERNELS[name])
    for p in FP64_SCALARS:
        if p in params:
            assert declared.get(p) == "fp64", (name, p, declared.get(p))
    if "drop_p" in params:
        assert "drop_p" not in declared, (name, "drop_p is compared in fp32")


def _jit_env():
    """The environment of a JIT-mode subprocess (triton.compile needs real JIT kernels)
    that imports the package from this checkout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    return env


_COLLECT = r"""
import json, sys
from fbp_kernels.backends import triton_compile as tc

seen = []
def record(triton, target, kernel, arch, dtype, cfg_name, num_warps, num_stages,
           source_fn, loop=None):
    src = source_fn()
    seen.append([src.fn.__name__, dict(src.signature)])
    return tc.CompileRow(kernel, arch, dtype, cfg_name, num_warps, -1, -1, -1, "none", False)
tc._compile_row = record
tc.compile_all()
json.dump(seen, open(sys.argv[1], "w"))
"""


def test_the_compile_report_builds_the_declared_signatures(tmp_path):
    # Builds every ASTSource of the report (no compilation) in a JIT-mode subprocess.
    out = tmp_path / "sigs.json"
    env = _jit_env()
    proc = subprocess.run([sys.executable, "-c", _COLLECT, str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_name = {_python_function(fn).__name__: fn for fn in KERNELS.values()}
    checked = 0
    for kernel, sig in json.loads(out.read_text()):
        if kernel not in by_name:
            continue  # e.g. the dropout-mask kernel
        for param, ty in _annotations(by_name[kernel]).items():
            assert sig.get(param) == ty, (kernel, param, sig.get(param), ty)
            checked += 1
    assert checked > 100  # every build of the ten kernels above


_HALF_DS = r"""
import triton
from triton.backends.compiler import GPUTarget
from fbp_kernels.backends import triton_compile as tc, triton_wide as W

cfg = W.WIDE_BWD_CONFIGS["half"]
out = []
for dtype in ("bf16", "fp16"):
    # normalize=False: ds is the cotangent itself, in the input dtype
    src = tc._wide_bwd_source(dtype, cfg, 5, "ieee")
    src.signature["ds_ptr"] = "*" + dtype
    ptx = triton.compile(src, target=GPUTarget("cuda", 80, 32),
                         options={"num_warps": cfg.num_warps,
                                  "num_stages": cfg.num_stages}).asm["ptx"]
    out.append(f"{dtype} {'cvt.rn.f32.f64' in ptx} {('cvt.rn.' + dtype + '.f64') in ptx}")
print("\n".join(out))
"""


def test_wide_backward_scales_half_cotangents_by_an_fp32_scale(tmp_path):
    """Without normalisation the wide backward's ds is the half-precision cotangent; its
    fp64 dropout scale must still become an fp32 one (cvt.rn.f32.f64), never a bf16/fp16
    one (bf16(1/0.9) = 1.109375: a -0.16% bias on every gradient, which no tolerance
    against the eager reference can see).  A compile fact (sm_80, no GPU needed)."""
    env = _jit_env()
    proc = subprocess.run([sys.executable, "-c", _HALF_DS], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["bf16", "True", "False", "fp16", "True", "False"], proc.stdout
