"""The CUDA C++ backend: build, registration, shapes, checks, resources, and (on a GPU)
correctness.

Without nvcc the build tests skip with the missing tool named.  With nvcc but no GPU
(CI) the extension is compiled, linked and imported here, so a compile error in
``csrc/`` fails this file; the kernels themselves run only on a GPU, where
``test_correctness.py`` also runs its whole suite for backend ``cuda``.
"""

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fbp_kernels
from fbp_kernels.backends import cuda_backend, cuda_build
from helpers import CASES, Case, assert_close, detached64, grads, make_inputs, reference_fbp
from test_correctness import compare

CSRC = Path(cuda_build.CSRC)
MISSING = cuda_build.missing_requirements()
needs_toolchain = pytest.mark.skipif(
    bool(MISSING), reason="cannot build the CUDA extension here: " + "; ".join(MISSING))
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def ops():
    """The compiled operators; building them is part of the test (a compile error fails)."""
    if MISSING:
        pytest.skip("cannot build the CUDA extension here: " + "; ".join(MISSING))
    cuda_build.load()
    return torch.ops.fbp_kernels_cuda


# ------------------------------------------------------------------ without the toolchain

def test_cpu_device_is_refused_with_a_reason():
    reason = cuda_backend.unsupported_reason(torch.device("cpu"))
    assert reason is not None and "CUDA device" in reason
    with pytest.raises(fbp_kernels.backends.BackendUnavailableError, match="cuda"):
        fbp_kernels.backends.resolve("cuda", torch.device("cpu"))


def test_missing_toolchain_is_named_with_a_fix(monkeypatch):
    monkeypatch.setattr(cuda_build, "find_cuda_home", lambda: None)
    monkeypatch.setattr("torch.utils.cpp_extension.is_ninja_available", lambda: False)
    missing = " ".join(cuda_build.missing_requirements())
    assert "nvcc" in missing and "CUDA_HOME" in missing and "ninja" in missing
    with pytest.raises(cuda_build.CudaBuildError, match="missing: .*nvcc"):
        cuda_build.compile_extension("never_built", [], cuda_build.cache_root() / "unused")


def test_gpu_without_toolchain_or_with_a_failed_build_says_why(monkeypatch):
    """On a GPU machine the reason names the missing tool, or the build error, and
    never starts a build itself."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_build, "_loaded", None)
    monkeypatch.setattr(cuda_build, "_try_aot", lambda: None)
    monkeypatch.setattr(cuda_build, "missing_requirements", lambda: ["ninja: `pip install ninja`"])
    reason = cuda_backend.unsupported_reason(torch.device("cuda"))
    assert "cannot be built just in time" in reason and "pip install ninja" in reason
    monkeypatch.setattr(cuda_build, "_failure", "building the CUDA extension failed: boom\n...")
    assert "failed to build: building the CUDA extension failed: boom" in \
        cuda_backend.unsupported_reason(torch.device("cuda"))
    with pytest.raises(cuda_build.CudaBuildError, match="boom"):
        cuda_build.load()


def _fresh_loader(monkeypatch, tmp_path):
    """cuda_build.load() as in a new process, with its cache under tmp_path."""
    monkeypatch.setenv("FBP_CUDA_CACHE", str(tmp_path))
    monkeypatch.setattr(cuda_build, "_loaded", None)
    monkeypatch.setattr(cuda_build, "_failure", None)
    monkeypatch.setattr(cuda_build, "_try_aot", lambda: None)


def test_no_build_mode_loads_only_an_existing_build(monkeypatch, tmp_path):
    """FBP_CUDA_NO_BUILD=1 (make gpu-check after its build phase): no compiler run, and
    without a build of this tree a CudaBuildError at once that says so."""
    _fresh_loader(monkeypatch, tmp_path)
    monkeypatch.setenv("FBP_CUDA_NO_BUILD", "1")

    def never(*a, **k):
        raise AssertionError("compiled in FBP_CUDA_NO_BUILD mode")

    monkeypatch.setattr(cuda_build, "compile_extension", never)
    with pytest.raises(cuda_build.CudaBuildError, match="FBP_CUDA_NO_BUILD=1 and no build"):
        cuda_build.load()
    with pytest.raises(cuda_build.CudaBuildError, match="FBP_CUDA_NO_BUILD"):
        cuda_build.load()  # remembered: not retried


def test_a_killed_builds_stale_torch_lock_is_removed_before_building(monkeypatch, tmp_path):
    """torch's build lock file outlives a killed build and would make every later build
    wait forever; under the package's own lock it is stale and removed."""
    _fresh_loader(monkeypatch, tmp_path)
    monkeypatch.delenv("FBP_CUDA_NO_BUILD", raising=False)
    directory = cuda_build.build_dir()
    directory.mkdir(parents=True)
    (directory / "lock").write_text("")
    seen = []

    def fake(name, sources, where, verbose=False):
        seen.append((where / "lock").exists())
        return where / "fake.so"

    monkeypatch.setattr(cuda_build, "compile_extension", fake)
    assert cuda_build.load() == str(directory / "fake.so")
    assert seen == [False]


def test_arch_list_takes_torchs_spellings(monkeypatch):
    """Space- or comma-separated lists (torch accepts them; images export them) read as
    the ';' list, so 9.0a is seen by arch_defines and by the resource check."""
    for spelled in ("8.0 9.0a", "8.0,9.0a", " 8.0; 9.0a "):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", spelled)
        assert cuda_build.arch_list() == "8.0;9.0a"
        assert cuda_build.arch_defines() == ["-DFBP_SM90A"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0 9.0a")
    assert cuda_build.arch_defines() == []


def _fake_toolkit(root):
    home = root / "cuda-99.9"
    (home / "bin").mkdir(parents=True)
    (home / "lib64").mkdir()
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (home / "lib64" / "libcudart.so").write_text("")
    return home


def test_cuda_home_found_behind_an_exec_wrapper(tmp_path, monkeypatch):
    """Like /usr/local/bin/nvcc on the CI machine: a shell script that execs the real
    nvcc.  torch would guess /usr/local and fail to link -lcudart."""
    home = _fake_toolkit(tmp_path)
    wrapper = tmp_path / "wrapper" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper.parent))
    assert cuda_build.find_cuda_home() == str(home)
    monkeypatch.setenv("CUDA_HOME", str(_fake_toolkit(tmp_path / "other")))
    assert cuda_build.find_cuda_home() == str(tmp_path / "other" / "cuda-99.9")


def test_cache_key_tracks_sources_and_architectures(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "k.cu").write_text("__global__ void k() {}\n")
    monkeypatch.setattr(cuda_build, "CSRC", src)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    key = cuda_build.build_key()
    assert key == cuda_build.build_key()
    (src / "k.cu").write_text("__global__ void k() { }\n")
    edited = cuda_build.build_key()
    assert edited != key
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert cuda_build.build_key() != edited
    monkeypatch.setenv("FBP_CUDA_CACHE", str(tmp_path / "cache"))
    assert cuda_build.build_dir() == tmp_path / "cache" / cuda_build.build_key()


def test_wgmma_flag_only_when_every_hopper_image_is_sm90a():
    """-DFBP_SM90A (the binding may pick the wgmma engine) needs 9.0a in the list and
    no plain 9.0 beside it: that image's wgmma engine is a trap stub, and which of the
    two images the driver loads on a Hopper GPU is not documented."""
    assert cuda_build.arch_defines("8.0;9.0a") == ["-DFBP_SM90A"]
    assert cuda_build.arch_defines("9.0a+PTX") == ["-DFBP_SM90A"]
    assert cuda_build.arch_defines("8.0; 9.0a ;10.0") == ["-DFBP_SM90A"]
    assert cuda_build.arch_defines("8.0;9.0;9.0a") == []
    assert cuda_build.arch_defines("9.0a;9.0+PTX") == []
    assert cuda_build.arch_defines("8.0;9.0") == []
    assert cuda_build.arch_defines("8.0") == []


def test_build_lock_waits_for_another_process(tmp_path):
    """Two processes building into one cache directory: the second waits (flock)."""
    lock = tmp_path / ".fbp-build.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import fcntl, time\nf = open({str(lock)!r}, 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
         f"print('held', flush=True)\ntime.sleep(1.0)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with cuda_build._file_lock(lock):
            waited = time.monotonic() - start
    finally:
        holder.wait(timeout=30)
    assert waited > 0.5, f"acquired the lock after {waited:.2f} s while another process held it"


def test_resource_usage_parser():
    text = """
Fatbin elf code:
================
arch = sm_80
code version = [1,7]

Resource usage:
 Common:
  GLOBAL:0
 Function _Z3fooPf:
  REG:40 STACK:0 SHARED:33280 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z3barv:
  REG:255 STACK:336 SHARED:0 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
 Function _Z3fooPf:
  REG:38 STACK:0 SHARED:33280 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    rows = cuda_build.parse_resource_usage(text)
    assert [(r.arch, r.registers, r.stack, r.shared, r.spills) for r in rows] == [
        ("sm_80", 40, 0, 33280, False), ("sm_80", 255, 336, 0, True),
        ("sm_90", 38, 0, 33280, False)]
    assert rows[0].kernel.startswith("foo")  # demangled (or mangled without c++filt)


# ------------------------------------------------------------------ the build (CI: no GPU)

@needs_toolchain
def test_a_compile_error_fails_the_build(tmp_path):
    """What makes a broken kernel fail CI: the build raises with nvcc's message."""
    bad = tmp_path / "broken.cu"
    bad.write_text("__global__ void broken(float* p) { p[0] = undeclared_name; }\n")
    with pytest.raises(cuda_build.CudaBuildError, match="undeclared_name"):
        cuda_build.compile_extension("fbp_broken_probe", [str(bad)], tmp_path / "build")


def test_extension_builds_and_registers_its_operators(ops):
    for name in ("fbp_forward", "fbp_backward", "dropout_keep", "philox4x32_10", "row_norm",
                 "grad_pooled", "cp_async_staging"):
        assert hasattr(ops, name), name
    # The operator namespace is the extension's own, not the Python custom ops'.
    assert torch.ops.fbp_kernels_cuda.fbp_forward.default.name().startswith("fbp_kernels_cuda::")


@pytest.mark.parametrize("dtype,norm_dtype", [
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float32, torch.float32), (torch.float64, torch.float64)], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_meta_kernels_give_shapes(ops, dtype, norm_dtype, normalize):
    rows, m, n, factor, o = 7, 6, 5, 3, 4
    meta = dict(device="meta", dtype=dtype)
    x, y = torch.empty(rows, m, **meta), torch.empty(rows, n, **meta)
    wx, wy = torch.empty(factor * o, m, **meta), torch.empty(factor * o, n, **meta)
    bx = torch.empty(factor * o, **meta)
    out, norm, a, c, _ = ops.fbp_forward(x, y, wx, wy, bx, None, factor, 0.1, 5, normalize, 1e-6)
    assert out.shape == (rows, o) and out.dtype == dtype and out.device.type == "meta"
    assert a.shape == c.shape == (0,)  # the lean mode keeps no projection
    assert norm.shape == ((rows,) if normalize else (0,))
    if normalize:
        assert norm.dtype == norm_dtype
    grad = torch.empty(rows, o, **meta)
    dx, dy, dwx, dwy, dbx, dby, carry = ops.fbp_backward(grad, x, y, wx, wy, bx, None, out,
                                                         norm, factor, 0.1, 5, normalize, 1e-6)
    assert carry.shape == (0,)  # FBP passes nothing along an MFH chain
    assert (dx.shape, dy.shape, dwx.shape, dwy.shape) == (x.shape, y.shape, wx.shape, wy.shape)
    assert dbx.shape == (factor * o,) and dby.shape == (0,)
    assert all(t.dtype == dtype for t in (dx, dy, dwx, dwy, dbx))


def _meta_args(rows=4, m=6, n=5, ko=6, dtype=torch.float32):
    meta = dict(device="meta", dtype=dtype)
    return [torch.empty(rows, m, **meta), torch.empty(rows, n, **meta),
            torch.empty(ko, m, **meta), torch.empty(ko, n, **meta), None, None]


@pytest.mark.parametrize("change,message", [
    (lambda a: a.__setitem__(0, torch.empty(4, 7, device="meta")), r"x has 7 features"),
    (lambda a: a.__setitem__(1, torch.empty(3, 5, device="meta")), r"same number of rows"),
    (lambda a: a.__setitem__(3, torch.empty(9, 5, device="meta")), r"same number of rows"),
    (lambda a: a.__setitem__(4, torch.empty(5, device="meta")), r"bias_x must have shape \(6,\)"),
    (lambda a: a.__setitem__(1, torch.empty(4, 5, device="meta", dtype=torch.float64)),
     r"one dtype"),
    (lambda a: a.__setitem__(0, torch.empty(2, 2, 6, device="meta")), r"x must be 2-D"),
], ids=["features", "rows", "weight-rows", "bias", "dtype", "ndim"])
def test_cpp_checks_name_the_offending_shapes(ops, change, message):
    args = _meta_args()
    change(args)
    with pytest.raises(RuntimeError, match=message):
        ops.fbp_forward(*args, 3, 0.0, None, True, 1e-6)


@pytest.mark.parametrize("factor,dropout,eps,message", [
    (4, 0.0, 1e-6, "positive multiple of factor=4"),
    (0, 0.0, 1e-6, "factor must be >= 1"),
    (3, 1.0, 1e-6, r"dropout must be in \[0, 1\)"),
    (3, 0.0, 0.0, "eps must be a finite float > 0"),
])
def test_cpp_checks_options(ops, factor, dropout, eps, message):
    with pytest.raises(RuntimeError, match=message):
        ops.fbp_forward(*_meta_args(), factor, dropout, None, True, eps)


@pytest.mark.parametrize("activation,norm_group,message", [
    (3, 1, r"activation must be 0 \(none\), 1 \(relu\) or 2 \(tanh\), got 3"),
    (-1, 1, "activation must be"),
    (0, 3, "norm_group .* must be >= 1 and divide the 4 rows, got 3"),
    (0, 0, "norm_group"),
])
def test_cpp_checks_drop_in_options(ops, activation, norm_group, message):
    args = _meta_args()
    with pytest.raises(RuntimeError, match=message):
        ops.fbp_forward(*args, 3, 0.0, None, True, 1e-6, activation, norm_group)
    grad = torch.empty(4, 2, device="meta")
    with pytest.raises(RuntimeError, match=message):
        ops.fbp_backward(grad, *args, grad, torch.empty(4, device="meta"), 3, 0.0, None, True,
                         1e-6, activation, norm_group)


def test_meta_kernels_take_the_drop_in_options(ops):
    # Groups of 2 of the 4 rows, tanh: the shapes do not depend on either option.
    args = _meta_args()
    out, norm, a, c, _ = ops.fbp_forward(*args, 3, 0.0, None, True, 1e-6, 2, 2)
    assert out.shape == (4, 2) and norm.shape == (4,) and a.shape == c.shape == (0,)
    grads = ops.fbp_backward(out, *args, out, norm, 3, 0.0, None, True, 1e-6, 2, 2)
    assert [g.shape for g in grads[:4]] == [a.shape for a in args[:4]]


@pytest.mark.parametrize("keep_x,keep_y", [(True, True), (True, False), (False, True)])
def test_meta_kernels_keep_the_projections(ops, keep_x, keep_y):
    # The memory modes: the kept raw projections are (rows, K) in the input dtype, and
    # backward takes them back (shape and dtype checked).
    args = _meta_args(dtype=torch.bfloat16)
    out, norm, a, c, _ = ops.fbp_forward(*args, 3, 0.0, None, True, 1e-6, 0, 1, keep_x, keep_y)
    for t, kept in ((a, keep_x), (c, keep_y)):
        assert t.shape == ((4, 6) if kept else (0,)) and t.dtype == torch.bfloat16
    back = dict(a=a if keep_x else None, c=c if keep_y else None)
    grads = ops.fbp_backward(out, *args, out, norm, 3, 0.0, None, True, 1e-6, 0, 1, **back)
    assert [g.shape for g in grads[:4]] == [t.shape for t in args[:4]]
    with pytest.raises(RuntimeError, match=r"a \(a kept projection\) must have shape \(4, 6\)"):
        ops.fbp_backward(out, *args, out, norm, 3, 0.0, None, True, 1e-6, 0, 1,
                         a=torch.empty(4, 5, device="meta", dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="must have x's dtype"):
        ops.fbp_backward(out, *args, out, norm, 3, 0.0, None, True, 1e-6, 0, 1,
                         c=torch.empty(4, 6, device="meta"))


def test_backward_refuses_a_gradient_on_another_device(ops):
    """grad, out and norm reach the kernels as raw pointers: on another device than x
    they must be refused by name, not read as if they were x's (meta x, CPU grad: the
    dispatcher picks the meta kernel, which runs the same checks)."""
    args = _meta_args()
    out, norm = torch.empty(4, 2, device="meta"), torch.empty(4, device="meta")
    with pytest.raises(RuntimeError, match="grad and out must be on x's device"):
        ops.fbp_backward(torch.empty(4, 2), *args, out, norm, 3, 0.0, None, True, 1e-6, 0, 1)
    with pytest.raises(RuntimeError, match="norm must be on x's device"):
        ops.fbp_backward(out, *args, out, torch.empty(4), 3, 0.0, None, True, 1e-6, 0, 1)


def test_philox_known_answers(ops):
    """Random123's known-answer vectors for Philox4x32-10 (kat_vectors)."""
    counters = torch.tensor([[0, 0, 0, 0], [0xFFFFFFFF] * 4,
                             [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]])
    keys = [0, -1, 0x299F31D0A4093822]  # (k0, k1) = (low, high) 32 bits
    expected = [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
                [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
                [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]]
    for ctr, key, exp in zip(counters, keys, expected):
        got = ops.philox4x32_10(ctr.view(1, 4), key)[0].tolist()
        assert got == exp, [hex(v) for v in got]


def expected_keep(ops, index, seed, rate):
    """The dropout rule computed independently of ``dropout_keep``, from the raw Philox
    operator: stream index i is kept when word ``i & 3`` of philox4x32_10(counter =
    (lo32(i >> 2), hi32(i >> 2), 0, 0), key = seed), read as Triton's
    uint_to_uniform_float (int32, negatives bit-flipped, x 4.6566127342e-10 in fp32),
    is >= rate."""
    group = index >> 2
    zeros = torch.zeros_like(group)
    counter = torch.stack([group & 0xFFFFFFFF, group >> 32, zeros, zeros], dim=1)
    words = ops.philox4x32_10(counter, seed)  # (N, 4), each word in [0, 2^32)
    word = words.gather(1, (index & 3).view(-1, 1)).view(-1)
    s = torch.where(word >= 2 ** 31, word - 2 ** 32, word)  # as int32
    s = torch.where(s < 0, -s - 1, s).to(torch.float32)  # exact: |s| < 2^31, one rounding
    u = s * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    return u >= torch.tensor(rate, dtype=torch.float32)


@pytest.mark.parametrize("seed", [1234, -5, 2**40 + 17], ids=["small", "negative", "high-word"])
def test_dropout_keep_follows_the_four_per_call_rule(ops, seed):
    """Known answers for the mask: the kernels' rule recomputed from the raw Philox op,
    over indices whose group crosses 2^32 (the counter's high word)."""
    index = torch.cat([torch.arange(0, 4099), 2**34 - 7 + torch.arange(0, 29),
                       2**42 + 3 + torch.arange(0, 13)]).to(torch.int64)
    for rate in (0.1, 0.5, 0.9):
        keep = ops.dropout_keep(index, seed, rate)
        assert torch.equal(keep, expected_keep(ops, index, seed, rate)), (seed, rate)
    # The four elements of a group read four different words of their call (not one
    # word four times): with rate 0.5, 14 of 16 groups are mixed.
    keep = ops.dropout_keep(torch.arange(40000, dtype=torch.int64), seed, 0.5).view(-1, 4)
    mixed = (keep.any(1) & ~keep.all(1)).float().mean().item()
    assert abs(mixed - (1 - 2 / 16)) < 0.02, mixed


@pytest.mark.parametrize("seed", [1234, 2**40 + 17, 2**62 - 3], ids=["small", "high-word", "top"])
@pytest.mark.parametrize("ko", [1, 7, 12, 30])
def test_mask_is_the_triton_kernels_stream(ops, seed, ko):
    """Both GPU backends draw one mask: cuda_backend.dropout_mask (rows of K = ko
    columns, stream index row * K4 + col) against the Triton stream's NumPy reference,
    also for rows whose group index passes 2^32 (through the operator directly)."""
    from fbp_kernels.backends import cuda_backend as C
    from philox_ref import expected_keep as triton_rule

    for rate in (0.1, 0.5):
        got = C.dropout_mask(seed, (37, ko), rate, "cpu").numpy()
        assert (got == triton_rule(seed, 37, ko, rate)).all(), (seed, ko, rate)
    row0, k4 = 2**31 + 5, (ko + 3) // 4 * 4
    index = (row0 + torch.arange(3))[:, None] * k4 + torch.arange(ko)[None, :]
    got = ops.dropout_keep(index.to(torch.int64), seed, 0.5).numpy()
    assert (got == triton_rule(seed, 3, ko, 0.5, row0=row0)).all()


def test_dropout_keep_is_a_function_of_seed_and_index(ops):
    index = torch.arange(20000, dtype=torch.int64)
    keep = ops.dropout_keep(index, 1234, 0.25)
    assert keep.dtype == torch.bool and keep.shape == index.shape
    assert abs(keep.float().mean().item() - 0.75) < 0.02
    assert torch.equal(keep, ops.dropout_keep(index, 1234, 0.25))
    assert torch.equal(keep[777:9000], ops.dropout_keep(index[777:9000], 1234, 0.25))
    assert torch.equal(keep[777:9000].flip(0), ops.dropout_keep(index[777:9000].flip(0), 1234,
                                                                0.25))
    assert not torch.equal(keep, ops.dropout_keep(index, 1235, 0.25))
    assert ops.dropout_keep(index, 1234, 0.0).all()


# ------------------------------------------------------------------ row norm and ds (CPU mirrors)

def _norm_rows(dtype):
    """Rows of t that a plain fp32 sum of squares gets wrong: values near 1e20 (t^2
    overflows), near 1e-30 (t^2 underflows to 0), both in one row across tiles, a
    zero row and an ordinary one."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 70, generator=g, dtype=torch.float64)
    scale = torch.tensor([1e20, 1e-30, 1.0, 0.0, 1.0, 3e19], dtype=torch.float64)
    t = base * scale[:, None]
    t[4, :35] *= 1e19   # huge and ordinary values in one row, several tiles each
    t[4, 35:] *= 1e-19
    return t.to(dtype)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.float64, 1e-14)], ids=str)
@pytest.mark.parametrize("per_tile", [1, 5, 12, 64, 70])
def test_row_norm_does_not_overflow(ops, dtype, rtol, per_tile):
    """The forward kernel's norm (scaled parts per output tile, combined by the
    finisher), run on the CPU through the kernels' own functions."""
    t = _norm_rows(dtype)
    got = ops.row_norm(t, per_tile)
    exact = torch.linalg.vector_norm(t.double(), dim=1)
    assert torch.isfinite(got).all(), got
    assert got[3] == 0
    assert torch.allclose(got.double(), exact, rtol=rtol, atol=0), (got, exact)
    if dtype == torch.float32:  # what the unscaled fp32 sum of squares gives instead
        naive = t.pow(2).sum(1).sqrt()
        assert torch.isinf(naive[0]) and naive[1] == 0


def test_row_norm_propagates_nan_and_inf(ops):
    t = torch.ones(3, 20)
    t[0, 7] = float("nan")
    t[1, 13] = float("inf")
    got = ops.row_norm(t, 5)
    assert torch.isnan(got[0]) and torch.isinf(got[1]) and got[2] == pytest.approx(20 ** 0.5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=str)
def test_grad_pooled_matches_the_torch_backend_rule(ops, dtype, tol):
    """The backward's ds (grad_pooled_kernel's per-element function) against
    torch_backend.grad_pooled, degenerate rows included: ||t|| <= 1e-12 (zero rows,
    exactly delta, below it) get exactly zero gradient; just above delta does not."""
    from fbp_kernels.backends import torch_backend

    g = torch.Generator().manual_seed(5)
    rows, o, eps = 7, 9, 1e-6
    grad = torch.randn(rows, o, generator=g, dtype=torch.float64).to(dtype)
    out = torch.randn(rows, o, generator=g, dtype=torch.float64)
    out = (out / out.norm(dim=1, keepdim=True)).to(dtype)
    norm = torch.tensor([1.3, 0.0, 1e-12, 5e-13, 4e-12, 7.0, 1e-30], dtype=dtype)
    out[1] = 0
    got = ops.grad_pooled(grad, out, norm, eps)
    ref = torch_backend.grad_pooled(grad, out, norm, normalize=True, eps=eps)
    assert torch.isfinite(got).all()
    degenerate = ~(norm > 1e-12)
    assert degenerate.tolist() == [False, True, True, True, False, False, True]
    assert (got[degenerate] == 0).all() and (ref[degenerate] == 0).all()
    assert (got[~degenerate] != 0).any(1).all()
    assert torch.allclose(got, ref, rtol=tol, atol=0), (got - ref).abs().max()


# ------------------------------------------------------------------ drop-in options

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_activation_math_is_torchs(ops, dtype):
    """The kernels' activate / activation_grad (fbp_math.cuh) on the CPU against torch:
    relu exactly (NaN passes through, gradient 0 at the kink as torch.relu's), tanh
    within 4 ulp of torch.tanh (two libms), the gradient 1 - act^2 from the kernel's
    own activated value."""
    v = torch.tensor([-3.0, -1e-30, 0.0, -0.0, 1e-30, 0.25, 2.0, 30.0, -30.0, float("nan"),
                      float("inf"), -float("inf")], dtype=dtype)
    v = torch.cat([v, torch.randn(200, dtype=torch.float64).to(dtype) * 3])
    ulp = torch.finfo(dtype).eps
    for code, name in ((0, None), (1, "relu"), (2, "tanh")):
        act, grad = ops.activation(v, code)
        leaf = v.clone().requires_grad_()
        ref = leaf if name is None else getattr(torch, name)(leaf)
        (ref_grad,) = torch.autograd.grad(ref, leaf, torch.ones_like(ref))
        if name == "tanh":
            assert torch.allclose(act, ref.detach(), rtol=4 * ulp, atol=0, equal_nan=True)
            # From the kernel's own activated value (1 ulp of room: a compiler may
            # contract 1 - act*act into one fused multiply-add); +-inf give 0.
            assert torch.allclose(grad, 1 - act * act, rtol=ulp, atol=ulp, equal_nan=True)
        else:
            assert torch.equal(act.isnan(), ref.isnan())
            finite = ~act.isnan()
            assert torch.equal(act[finite], ref.detach()[finite])
            assert torch.equal(grad[finite], ref_grad[finite])
        if name == "relu":
            assert grad[2] == 0 and grad[3] == 0 and act[3] == 0  # the kink
    with pytest.raises(RuntimeError, match="activation must be"):
        ops.activation(v, 5)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.float64, 1e-14)], ids=str)
@pytest.mark.parametrize("per_tile", [1, 5, 12])
def test_group_norm_is_one_norm_per_group_of_rows(ops, dtype, rtol, per_tile):
    """Joint normalisation: the forward's parts of a group's rows combined by the
    group finisher's order (one block of kGroupThreads), overflow-safe as per row;
    every row of a group holds the same bits."""
    t = _norm_rows(dtype)  # 6 rows: huge, tiny, ordinary, zero, mixed, huge
    for group in (2, 3, 6):
        got = ops.row_norm(t, per_tile, group)
        exact = torch.linalg.vector_norm(t.double().view(-1, group * t.shape[1]), dim=1)
        assert torch.isfinite(got).all(), got
        per_group = got.view(-1, group)
        assert torch.equal(per_group, per_group[:, :1].expand_as(per_group))
        assert torch.allclose(per_group[:, 0].double(), exact, rtol=rtol, atol=0), (got, exact)
    assert torch.equal(ops.row_norm(t, per_tile, 1), ops.row_norm(t, per_tile))
    with pytest.raises(RuntimeError, match="rows_per_group must be >= 1 and divide the 6 rows"):
        ops.row_norm(t, per_tile, 4)


def test_group_norm_order_covers_every_thread(ops):
    # More parts than the block has threads (300 rows x 3 tiles > 256): each thread
    # walks several, and the sum still matches the exact norm.
    t = torch.rand(300, 30, dtype=torch.float64) + 0.5
    got = ops.row_norm(t, 12, 300)
    assert got.unique().numel() == 1
    # 1e-13: the mirror's order is fixed; torch's fp64 norm errs ~1e-16 on any CPU.
    assert got[0].item() == pytest.approx(t.norm().item(), rel=1e-13)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=str)
def test_group_grad_pooled_matches_the_torch_backend_rule(ops, dtype, tol):
    """ds with <z, g> over groups of 3 consecutive rows, against torch_backend's
    norm_dims=2 rule on the (groups, 3, o) view; a degenerate group gets zero."""
    from fbp_kernels.backends import torch_backend

    g = torch.Generator().manual_seed(6)
    groups, group, o, eps = 3, 3, 7, 1e-6
    grad = torch.randn(groups, group, o, generator=g, dtype=torch.float64).to(dtype)
    out = torch.randn(groups, group, o, generator=g, dtype=torch.float64)
    out = (out / out.flatten(1).norm(dim=1)[:, None, None]).to(dtype)
    out[2] = 0
    norm = torch.tensor([2.5, 0.7, 0.0], dtype=dtype)[:, None].expand(groups, group)
    got = ops.grad_pooled(grad.view(-1, o), out.view(-1, o), norm.reshape(-1), eps, group)
    ref = torch_backend.grad_pooled(grad, out, norm, normalize=True, eps=eps, norm_dims=2)
    assert (got.view(groups, group, o)[2] == 0).all()
    # <z, g> is summed in another order: its rounding moves each element by up to a
    # few ulp of the largest magnitude (g - z<z, g> cancels), hence atol scaled by it.
    scale = ref.abs().max().item()
    assert torch.allclose(got.view_as(ref), ref, rtol=tol, atol=tol * scale), \
        (got.view_as(ref) - ref).abs().max()
    # Row by row it is a different rule (the option did something).
    rowwise = ops.grad_pooled(grad.view(-1, o), out.view(-1, o), norm.reshape(-1), eps)
    assert not torch.allclose(rowwise, got, rtol=1e-3)


# ------------------------------------------------------------------ the Python glue

class _ModelOps:
    """The operators' contract (csrc/fbp_binding.cpp) written in PyTorch, to test the
    glue's layouts on the CPU: broadcast row r reads row r // rows_per of each input; a
    kept projection is x W^T at that input's rows; the math is torch_backend's on the
    expanded rows (the kernels' own math is tested through the CPU mirrors above and,
    on a GPU, against the reference)."""

    def __init__(self):
        self.calls = []
        self.kept_requests = []

    @staticmethod
    def _expand(t, per):
        return t.repeat_interleave(per, 0)

    def fbp_forward(self, x, y, wx, wy, bx, by, factor, dropout, seed, normalize, eps,
                    activation, group, keep_x, keep_y, per_x, per_y, prev, chain):
        from fbp_kernels.backends import torch_backend

        self.calls.append(("forward", x.shape, y.shape, per_x, per_y))
        self.kept_requests.append((keep_x, keep_y))
        xr, yr = self._expand(x, per_x), self._expand(y, per_y)
        act = {0: None, 1: "relu", 2: "tanh"}[activation]
        nd = 2 if group > 1 else 1
        lead = (xr.shape[0] // group, group) if nd == 2 else (xr.shape[0],)
        res = torch_backend.forward(xr.view(*lead, -1), yr.view(*lead, -1), wx, wy, bx, by,
                                    factor=factor, dropout=dropout, seed=seed,
                                    normalize=normalize, eps=eps, save_projections=False,
                                    norm_dims=nd, activation=act)
        empty = x.new_empty(0)
        assert prev is None and not chain  # FBP (MFH's chain: test_cuda_mfh.py)
        return (res.out.reshape(xr.shape[0], -1),
                res.norm.reshape(-1) if normalize else empty,
                x @ wx.t() if keep_x else empty, y @ wy.t() if keep_y else empty, empty)

    def fbp_backward(self, grad, x, y, wx, wy, bx, by, out, norm, factor, dropout, seed,
                     normalize, eps, activation, group, a, c, per_x, per_y, prev, carry,
                     carry_out):
        from fbp_kernels.backends import torch_backend

        self.calls.append(("backward", x.shape, y.shape, per_x, per_y,
                           None if a is None else a.shape, None if c is None else c.shape))
        for kept, side, w in ((a, x, wx), (c, y, wy)):
            assert kept is None or torch.allclose(kept, side @ w.t())  # what forward kept
        xr, yr = self._expand(x, per_x), self._expand(y, per_y)
        act = {0: None, 1: "relu", 2: "tanh"}[activation]
        nd = 2 if group > 1 else 1
        lead = (xr.shape[0] // group, group) if nd == 2 else (xr.shape[0],)
        g = torch_backend.backward(grad.view(*lead, -1), xr.view(*lead, -1), yr.view(*lead, -1),
                                   wx, wy, bx, by, out.view(*lead, -1),
                                   norm.view(lead) if normalize else None, None, None,
                                   factor=factor, dropout=dropout, seed=seed,
                                   normalize=normalize, eps=eps, norm_dims=nd, activation=act)
        dx = g.dx.reshape(x.shape[0], per_x, -1).sum(1)
        dy = g.dy.reshape(y.shape[0], per_y, -1).sum(1)
        empty = x.new_empty(0)
        assert prev is None and carry is None and not carry_out
        return (dx, dy, g.dweight_x, g.dweight_y,
                g.dbias_x if bx is not None else empty, g.dbias_y if by is not None else empty,
                empty)


@pytest.mark.parametrize("xs,ys,per", [
    ((2, 3), (2, 1), (1, 3)),        # regions x question: y once per sample
    ((2, 1), (2, 3), (3, 1)),        # the mirror
    ((6,), (), (1, 6)),              # one y for every row
    ((5, 3, 4), (1, 3, 1), (1, 4)),  # shared rows broadcast on a leading dimension
    ((2, 1, 3), (1, 2, 1), (1, 1)),  # crossed broadcast: materialised
    ((4,), (4,), (1, 1)),
], ids=str)
@pytest.mark.parametrize("keep", [False, True, "x", "y"], ids=str)
def test_glue_layouts_against_a_model_of_the_operators(monkeypatch, xs, ys, per, keep):
    """cuda_backend's layouts on the CPU, with the operators replaced by a PyTorch model of
    their contract: co-attention passes the shared input once per group (rows_per), kept
    projections come back at their input's own leading shape, every gradient lands on its
    input's shape, all equal to backend torch's on the original tensors."""
    from fbp_kernels.backends import torch_backend

    model = _ModelOps()
    monkeypatch.setattr(cuda_backend, "_ops", lambda: model)
    g = torch.Generator().manual_seed(2)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    m, n, k, o = 4, 3, 2, 3
    x, y, wx, wy, bx, by = r(*xs, m), r(*ys, n), r(k * o, m), r(k * o, n), r(k * o), r(k * o)
    opts = dict(factor=k, dropout=0.0, seed=None, normalize=True, eps=1e-6)
    nd = 2 if len(torch.broadcast_shapes(xs, ys)) >= 2 else 1
    got = cuda_backend.forward(x, y, wx, wy, bx, by, save_projections=keep, norm_dims=nd,
                               activation="tanh", **opts)
    ref = torch_backend.forward(x, y, wx, wy, bx, by, save_projections=False, norm_dims=nd,
                                activation="tanh", **opts)
    assert model.calls[0][3:] == per
    assert_close(got.out, ref.out, atol=1e-12, rtol=1e-10, name="out")
    keep_x, keep_y = keep in (True, "x"), keep in (True, "y")
    for proj, inp, w, wanted in ((got.a, x, wx, keep_x), (got.c, y, wy, keep_y)):
        if wanted:
            assert proj.shape == (*inp.shape[:-1], k * o)
            assert_close(proj, inp @ w.t(), atol=1e-12, rtol=1e-12, name="kept")
        else:
            assert proj is None
    grad = r(*got.out.shape)
    gb = cuda_backend.backward(grad, x, y, wx, wy, bx, by, got.out, got.norm, got.a, got.c,
                               norm_dims=nd, activation="tanh", **opts)
    rb = torch_backend.backward(grad, x, y, wx, wy, bx, by, ref.out, ref.norm, None, None,
                                norm_dims=nd, activation="tanh", **opts)
    for name in gb._fields:
        a, e = getattr(gb, name), getattr(rb, name)
        assert a.shape == e.shape, name
        assert_close(a, e, atol=1e-10, rtol=1e-8, name=name)
    # A kept projection is written by the kernels and read back unless its input is a
    # materialised broadcast (then it is the input's own rows, formed outside them).
    materialised = per == (1, 1) and xs != ys
    call = model.calls[-1]
    assert (call[5] is not None) == (keep_x and not materialised)
    assert (call[6] is not None) == (keep_y and not materialised)
    assert model.kept_requests == [(keep_x and not materialised, keep_y and not materialised)]


# ------------------------------------------------------------------ operand staging

def _operands(m=16, n=24, rows=5, ko=12, dtype=torch.float16):
    return [torch.zeros(rows, m, dtype=dtype), torch.zeros(rows, n, dtype=dtype),
            torch.zeros(ko, m, dtype=dtype), torch.zeros(ko, n, dtype=dtype)]


def test_cp_async_staging_rule(ops, monkeypatch):
    """Which fp16/bf16 operands the cp.async engine takes (the CPU form of the rule:
    contiguous along K, 16-byte-aligned rows; the GPU adds compute capability >= 8)."""
    monkeypatch.delenv("FBP_CUDA_STAGING", raising=False)
    monkeypatch.delenv("FBP_CUDA_BROKEN_ENGINES", raising=False)  # gpu-check may set it
    assert ops.cp_async_staging(*_operands())
    assert ops.cp_async_staging(*_operands(dtype=torch.bfloat16))
    assert not ops.cp_async_staging(*_operands(dtype=torch.float32))
    assert not ops.cp_async_staging(*_operands(m=7))          # rows of 14 bytes
    x, y, wx, wy = _operands()
    wide, wide_w = torch.zeros(5, 24, dtype=torch.float16), torch.zeros(12, 24, dtype=torch.float16)
    assert ops.cp_async_staging(wide[:, :20], y, wide_w[:, :20], wy)  # stride 24: aligned rows
    assert not ops.cp_async_staging(wide[:, 1:17], y, wx, wy)     # data pointer + 2 bytes
    assert not ops.cp_async_staging(x, y, wx.t().contiguous().t(), wy)  # K not contiguous
    assert ops.cp_async_staging(x, y[:1].expand(5, 24), wx, wy)   # broadcast row: stride 0
    monkeypatch.setenv("FBP_CUDA_STAGING", "sync")
    assert not ops.cp_async_staging(*_operands())
    monkeypatch.setenv("FBP_CUDA_STAGING", "async")
    assert ops.cp_async_staging(*_operands())
    with pytest.raises(RuntimeError, match="FBP_CUDA_STAGING=async, but x is not contiguous"):
        ops.cp_async_staging(*_operands(m=7))
    assert not ops.cp_async_staging(*_operands(dtype=torch.float32))  # no cp.async engine
    monkeypatch.setenv("FBP_CUDA_STAGING", "wide")
    assert ops.cp_async_staging(*_operands())
    with pytest.raises(RuntimeError, match="FBP_CUDA_STAGING=wide, but x is not contiguous"):
        ops.cp_async_staging(*_operands(m=7))
    monkeypatch.setenv("FBP_CUDA_STAGING", "fast")
    with pytest.raises(RuntimeError, match="must be auto, sync, async, wide or wgmma"):
        ops.cp_async_staging(*_operands())


def test_gemm_engine_rule(ops, monkeypatch):
    """Which engine the fused kernels run: auto takes the 128x128 one wherever cp.async
    may above kWideEngineAboveRows rows (on CPU tensors the layout rule alone: no GPU's
    shared memory to check), the 64x64 cp.async one up to them; the environment forces
    each; fp32/fp64 always run the FMA one ("default")."""
    from fbp_kernels import costmodel as cm

    header = (CSRC / "fbp_launch.h").read_text()
    above = int(re.search(r"kWideEngineAboveRows = (\d+);", header).group(1))
    assert above == cm.CUDA_WIDE_ABOVE_ROWS
    monkeypatch.delenv("FBP_CUDA_STAGING", raising=False)
    monkeypatch.delenv("FBP_CUDA_BROKEN_ENGINES", raising=False)  # gpu-check may set it
    assert ops.gemm_engine(*_operands(rows=above + 1)) == "wide"
    assert ops.gemm_engine(*_operands(rows=above)) == "async"
    assert ops.gemm_engine(*_operands(rows=above + 1, m=7)) == "default"
    assert ops.gemm_engine(*_operands(rows=above + 1, dtype=torch.float32)) == "default"
    # wgmma where the loaded library holds sm_90a code (the default arch list; CPU
    # tensors: the operand rules alone, and auto answers as for sm_80).
    sm90a = ops.wgmma_built()
    if cuda_build.load() != "fbp_kernels._C":  # built just now from this arch list
        assert sm90a == bool(cuda_build.arch_defines())
    modes = [("sync", "default", "default"), ("async", "async", "async"),
             ("wide", "wide", "wide"), ("auto", "async", "wide")]
    for mode, few, many in modes + ([("wgmma", "wgmma", "wgmma")] if sm90a else []):
        monkeypatch.setenv("FBP_CUDA_STAGING", mode)
        assert ops.gemm_engine(*_operands(dtype=torch.bfloat16)) == few, mode
        assert ops.gemm_engine(*_operands(rows=above + 1, dtype=torch.bfloat16)) == many, mode
        assert ops.gemm_engine(*_operands(dtype=torch.float64)) == "default", mode
    # Engines the GPU smoke found broken leave auto's choice (the next one the operands
    # allow); a forced engine is still that engine.
    monkeypatch.setenv("FBP_CUDA_STAGING", "auto")
    for broken, few, many in (("wide", "async", "async"), ("async", "wide", "wide"),
                              ("wgmma,wide,async", "default", "default"), ("sync", "async", "wide")):
        monkeypatch.setenv("FBP_CUDA_BROKEN_ENGINES", broken)
        assert ops.gemm_engine(*_operands(dtype=torch.bfloat16)) == few, broken
        assert ops.gemm_engine(*_operands(rows=above + 1, dtype=torch.bfloat16)) == many, broken
    monkeypatch.setenv("FBP_CUDA_STAGING", "wide")
    assert ops.gemm_engine(*_operands(dtype=torch.bfloat16)) == "wide"
    monkeypatch.delenv("FBP_CUDA_BROKEN_ENGINES")
    # Only the operands a GEMM reads decide: co-attention's shared question (its
    # projection given), unaligned, leaves the cp.async engines; the broadcast rows count.
    monkeypatch.delenv("FBP_CUDA_STAGING", raising=False)
    x, y, wx, wy = _operands(rows=above + 1, n=7)
    assert ops.gemm_engine(x, y, wx, wy) == "default"
    assert ops.gemm_engine(x, y, wx, wy, above + 1, True, False) == "wide"
    assert ops.gemm_engine(*_operands(rows=4), 4 * (above + 1)) == "wide"
    monkeypatch.setenv("FBP_CUDA_STAGING", "wgmma")
    with pytest.raises(RuntimeError, match="FBP_CUDA_STAGING=wgmma, but x is not contiguous"):
        ops.gemm_engine(*_operands(m=7))
    if sm90a:
        assert ops.gemm_engine(x, y, wx, wy, above + 1, True, False) == "wgmma"
        # A broadcast row (stride 0) is cp.async's but no tensor map's: forcing wgmma
        # names it (auto then takes a cp.async engine; on a GPU, see the GPU tests).
        x, y, wx, wy = _operands(rows=above + 1)
        shared = y[:1].expand(above + 1, y.shape[1])
        with pytest.raises(RuntimeError, match="y .*cannot be read through a TMA tensor map"):
            ops.gemm_engine(x, shared, wx, wy)
    else:
        with pytest.raises(RuntimeError, match="no sm_90a code"):
            ops.gemm_engine(x, y, wx, wy, above + 1, True, False)


def test_engine_tiles_are_the_report_and_model_tables(ops):
    """The tiles of the built engines (fbp_tile.cuh's constants, through engine_tile)
    are cuda_compile.TILES / DYNAMIC_SMEM_BYTES and the cost model's CUDA_TILES: the
    compile report's FLOP per byte, bytes in flight and occupancy, and the model's
    prediction, describe the kernels that run."""
    from fbp_kernels import costmodel as cm
    from fbp_kernels.backends import cuda_compile as cc

    names = {"default": cc.ENGINE_OF_DTYPE, "async": cc.ASYNC_ENGINE_OF_DTYPE,
             "wide": cc.WIDE_ENGINE_OF_DTYPE, "wgmma": cc.WGMMA_ENGINE_OF_DTYPE}
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
              "fp64": torch.float64}
    for engine, table in names.items():
        for name, dtype in dtypes.items():
            got = ops.engine_tile(engine, dtype)
            if name not in table:
                assert got == [], (engine, name)
                continue
            bm, bn, bk, threads, stages, smem = got
            tile = cc.TILES[table[name]]
            assert (bm, bn, bk, threads, stages) == tuple(tile), (engine, name)
            dynamic = cc.DYNAMIC_SMEM_BYTES.get(table[name])
            assert (smem > 48 * 1024) == (dynamic is not None), (engine, name, smem)
            if dynamic is not None:
                assert smem == dynamic
    for engine, dtype in (("wgmma", torch.float16), ("wide", torch.bfloat16),
                          ("async", torch.float16), ("fp32", torch.float32)):
        got = ops.engine_tile("default" if engine == "fp32" else engine, dtype)
        assert cm.CUDA_TILES[engine] == tuple(got[:5]), engine
        name = str(dtype).replace("torch.float", "fp").replace("torch.bfloat", "bf")
        for kernel in ("fused_forward", "projection_grads"):
            assert cm.CUDA_COMPILE_FACTS[(kernel, 90, name, engine)][1] == got[5], engine
    with pytest.raises(RuntimeError, match="engine must be default, async, wide or wgmma"):
        ops.engine_tile("huge", torch.float16)


def test_default_kernels_do_not_spill(ops):
    """ptxas resource usage of every kernel, per architecture (printed with -s)."""
    rows = cuda_build.resource_usage()
    print("\n" + cuda_build.format_resource_usage(rows))
    archs = {r.arch for r in rows}
    wanted = {"sm_" + a.replace(".", "").replace("+PTX", "")
              for a in cuda_build.arch_list().split(";")}
    assert wanted <= archs, f"built for {sorted(archs)}, expected {sorted(wanted)}"
    fused = [r for r in rows if "fused_forward_kernel" in r.kernel
             or "projection_grads_kernel" in r.kernel]
    # 4 dtypes x 2 fused kernels, plus both for each fp16/bf16 cp.async engine and the
    # wgmma one (on sm_80 a trap stub: host code instantiates every engine), per arch
    assert len(fused) == 20 * len(wanted), cuda_build.format_resource_usage(fused)
    spilling = [r for r in rows if r.spills]
    assert not spilling, "kernels spill:\n" + cuda_build.format_resource_usage(spilling)
    # Static shared memory is capped at 48 KiB per CTA (the 128x128 engines' 149 / 198 KiB are
    # dynamic); cuobjdump's SHARED counts the 1 KiB system reserve on top of it on sm_90
    # (not on sm_80).
    assert all(r.shared - (1024 if r.arch.startswith("sm_90") and r.shared else 0) <= 48 * 1024
               for r in rows), cuda_build.format_resource_usage(rows)


# ------------------------------------------------------------------ on a GPU

gpu = pytest.mark.usefixtures("ops")

# Beyond the shared suite: several row and output tiles, factor > one 64-column
# chunk, and a wide factor*o with o not a multiple of the tile.
LARGE_CASES = [Case((130,), (130,), 40, 24, 5, 70), Case((3, 5), (3, 1), 9, 11, 70, 2),
               Case((67,), (1,), 33, 65, 1, 129, bias=False)]


@cuda_only
@gpu
@pytest.mark.parametrize("case", LARGE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
def test_matches_reference_on_larger_tiles(case, dtype):
    compare(case, dtype, "cuda", torch.device("cuda"))


@cuda_only
@gpu
@pytest.mark.parametrize("case", [CASES[2], LARGE_CASES[0]], ids=str)
def test_dropout_matches_reference_with_the_same_mask(case):
    device = torch.device("cuda")
    rate = 0.3
    tensors = make_inputs(case, torch.float64, device)
    torch.manual_seed(99)
    out = fbp_kernels.fbp(*tensors, factor=case.factor, dropout=rate, training=True,
                          backend="cuda")
    torch.manual_seed(99)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # what fbp() drew
    mask = cuda_backend.dropout_mask(seed, (*out.shape[:-1], case.factor * case.o), rate,
                                     device)
    assert 0.5 < mask.float().mean().item() < 0.9 or mask.numel() < 50
    g = torch.randn_like(out)
    got = [out] + grads(out, tensors, g)
    exact_in = detached64(tensors)
    exact_out = reference_fbp(exact_in, case, dropout=rate, dropout_mask=mask)
    exact = [exact_out] + grads(exact_out, exact_in, g)
    for name, a, e in zip(["out", "dx", "dy", "dwx", "dwy", "dbx", "dby"], got, exact):
        if e is not None:
            assert_close(a, e, atol=1e-10, rtol=1e-8, name=name)


@cuda_only
@gpu
@pytest.mark.parametrize("o", [70, 1000])
def test_huge_pooled_values_keep_a_finite_norm(ops, o):
    """fp32 inputs near 1e18: s ~ 1e37, t ~ 3e18, sum t^2 over a row > fp32's max.
    The norm is finite and the output matches the float64 reference."""
    case = Case((9,), (9,), 8, 6, 2, o)
    x, y, wx, wy, bx, by = make_inputs(case, torch.float32, "cuda", requires_grad=False)
    x, y = x * 1e18, y * 1e18
    out, norm, *_ = ops.fbp_forward(x, y, wx, wy, bx, by, case.factor, 0.0, None, True, 1e-6)
    assert torch.isfinite(norm).all() and torch.isfinite(out).all()
    exact = reference_fbp(detached64([x, y, wx, wy, bx, by]), case)
    assert_close(out, exact, atol=2e-5, rtol=2e-4, name="out")


# fp16/bf16 cases whose operands the cp.async engine takes (widths multiples of 8
# halves): K tails inside a k-tile (m 24, 40), several k-tiles, factor > 64 chunks, a
# broadcast question row, and row / output tiles that are not full.
ALIGNED_CASES = [LARGE_CASES[0], Case((37,), (37,), 24, 16, 5, 19),
                 Case((2, 3), (2, 1), 32, 16, 3, 5), Case((70,), (70,), 72, 8, 70, 2),
                 Case((9,), (9,), 8, 128, 1, 130, bias=False)]


def _skip_if_smoke_failed(engine):
    """make gpu-check's engine smoke (scripts/gpu_smoke.py) found ``engine`` hanging or
    wrong: forcing it here would hang the test phase or repeat what smoke.json says."""
    broken = os.environ.get("FBP_CUDA_BROKEN_ENGINES", "").split(",")
    if engine in broken:
        pytest.skip(f"gpu_smoke: the {engine} engine hung or was wrong on this GPU "
                    f"(smoke.json); FBP_CUDA_BROKEN_ENGINES={','.join(broken)}")


def _skip_unless_wgmma_runs():
    """The wgmma + TMA engine needs an sm_90 GPU and a build with sm_90a code."""
    _skip_if_smoke_failed("wgmma")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip(f"the wgmma engine needs an sm_90 GPU, this is "
                    f"{torch.cuda.get_device_name()} (compute capability "
                    f"{'.'.join(map(str, torch.cuda.get_device_capability()))})")
    if not cuda_build.ops().wgmma_built():
        pytest.skip(f"the loaded extension ({cuda_build.load()}) holds no sm_90a code "
                    f"(TORCH_CUDA_ARCH_LIST must name 9.0a)")


@cuda_only
@gpu
@pytest.mark.parametrize("staging", ["wgmma", "wide", "async", "sync"])
@pytest.mark.parametrize("case", ALIGNED_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_both_staging_paths_match_reference(case, dtype, staging, monkeypatch):
    """The wgmma + TMA and cp.async engines (forced: an error if one could not run) and
    the synchronous one, each against the reference with test_correctness's
    low-precision bound."""
    if staging == "wgmma":
        _skip_unless_wgmma_runs()
    _skip_if_smoke_failed(staging)
    monkeypatch.setenv("FBP_CUDA_STAGING", staging)
    compare(case, dtype, "cuda", torch.device("cuda"))


@cuda_only
@gpu
@pytest.mark.parametrize("case", ALIGNED_CASES, ids=str)
def test_wgmma_engine_reads_strided_operands_through_its_tensor_maps(ops, case, monkeypatch):
    """The TMA tensor maps carry the row stride: x sliced out of a wider buffer (rows 8
    halves longer than K) gives the contiguous input's forward and gradients bit for bit
    (the same boxes land in shared memory, zero-filled past K either way); dW_x, which
    cuBLAS forms from x itself (another leading dimension may pick another kernel), to
    the bf16 bound."""
    _skip_unless_wgmma_runs()
    monkeypatch.setenv("FBP_CUDA_STAGING", "wgmma")
    tensors = make_inputs(case, torch.bfloat16, "cuda")
    wide = torch.zeros(*case.batch_x, case.m + 8, device="cuda", dtype=torch.bfloat16)
    wide[..., :case.m] = tensors[0].detach()
    sliced = [wide[..., :case.m].requires_grad_()] + tensors[1:]
    results = []
    for inputs in (tensors, sliced):
        torch.manual_seed(4)
        out = fbp_kernels.fbp(*inputs, factor=case.factor, dropout=0.2, training=True,
                              backend="cuda")
        results.append([out] + grads(out, inputs, torch.ones_like(out)))
    for name, a, b in zip(["out", "dx", "dy", "dwx", "dwy", "dbx", "dby"], *results):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        if name == "dwx":  # fp32 sums in another order, rounded to bf16: a few ulps
            assert_close(a, b, atol=2 ** -6 * b.abs().max().item(), rtol=2 ** -7, name=name)
        else:
            assert torch.equal(a, b), name


@cuda_only
@gpu
@pytest.mark.parametrize("case", ALIGNED_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cp_async_engine_is_bitwise_the_synchronous_one(ops, case, dtype, monkeypatch):
    """Both engines run the same WMMA sequence on the same zero-padded tiles, so the
    forward and every gradient agree bit for bit; sliced inputs (row stride 8 halves
    wider than K) included."""
    for engine in ("async", "sync"):
        _skip_if_smoke_failed(engine)
    tensors = make_inputs(case, dtype, "cuda")
    wide = torch.randn(*case.batch_x, case.m + 8, device="cuda").to(dtype)
    sliced = [wide[..., :case.m].requires_grad_()] + tensors[1:]
    for inputs in (tensors, sliced):
        results = []
        for staging in ("async", "sync"):
            monkeypatch.setenv("FBP_CUDA_STAGING", staging)
            torch.manual_seed(4)  # the same dropout seed for both
            out = fbp_kernels.fbp(*inputs, factor=case.factor, dropout=0.2, training=True,
                                  backend="cuda")
            g = torch.ones_like(out)
            results.append([out] + grads(out, inputs, g))
        for name, a, b in zip(["out", "dx", "dy", "dwx", "dwy", "dbx", "dby"], *results):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name


@cuda_only
@gpu
@pytest.mark.parametrize("case", ALIGNED_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_wide_engine_is_bitwise_the_64x64_one_before_the_norm(ops, case, dtype, monkeypatch):
    """The 128x128 engine runs each element's WMMA sequence (k-tiles of 32, in order) as
    the 64x64 one does, and the epilogue sums each group's products in the same order;
    only the row norm's per-tile parts differ with the tile's outputs.  So without the
    norm the forward and every gradient agree bit for bit, dropout included -- except
    the pooled output of a factor group wider than 64 columns: the 64x64 engine sums it
    in chunks (a carried partial), the 128x128 one in one sequence, so its fp32 sums
    may differ in the last bit and the output by one unit in the last place."""
    for engine in ("wide", "async"):
        _skip_if_smoke_failed(engine)
    tensors = make_inputs(case, dtype, "cuda")
    results = []
    for staging in ("wide", "async"):
        monkeypatch.setenv("FBP_CUDA_STAGING", staging)
        assert ops.gemm_engine(tensors[0].reshape(-1, case.m), tensors[1].reshape(-1, case.n),
                               tensors[2], tensors[3]) == staging
        torch.manual_seed(4)
        out = fbp_kernels.fbp(*tensors, factor=case.factor, dropout=0.2, training=True,
                              normalize=False, backend="cuda")
        results.append([out] + grads(out, tensors, torch.ones_like(out)))
    for name, a, b in zip(["out", "dx", "dy", "dwx", "dwy", "dbx", "dby"], *results):
        assert (a is None) == (b is None), name
        if a is not None and name == "out" and case.factor > 64:
            fi = torch.finfo(dtype)
            torch.testing.assert_close(a, b, rtol=fi.eps, atol=fi.tiny)  # one ulp
        elif a is not None:
            assert torch.equal(a, b), name


@cuda_only
@gpu
@pytest.mark.parametrize("keep", [True, "x", "y"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_memory_modes_give_the_lean_gradients_bitwise(ops, dtype, keep):
    """fp32/fp64: a kept projection is the forward tile's own accumulator, stored in the
    accumulation dtype, and the backward's engine would recompute exactly those bits
    (same engine, same k order per element), so every memory mode gives the lean mode's
    results bit for bit, dropout included; the kept tensors are x W_x^T and y W_y^T."""
    for case in LARGE_CASES:
        tensors = make_inputs(case, dtype, "cuda")
        results = []
        for mode in (False, keep):
            torch.manual_seed(3)
            out = fbp_kernels.fbp(*tensors, factor=case.factor, dropout=0.2, training=True,
                                  backend="cuda", save_projections=mode)
            results.append([out] + grads(out, tensors, torch.ones_like(out)))
        for name, a, b in zip(["out", "dx", "dy", "dwx", "dwy", "dbx", "dby"], *results):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
        x, y, wx, wy = (t.detach() for t in tensors[:4])
        res = cuda_backend.forward(x, y, wx, wy, None, None, factor=case.factor, dropout=0.0,
                                   seed=None, normalize=True, eps=1e-6, save_projections=keep)
        # A kept projection has its input's own leading shape (co-attention's shared
        # side is kept once per group, not per region: ops.py's fake says the same).
        for got, inp, w, wanted in ((res.a, x, wx, keep in (True, "x")),
                                    (res.c, y, wy, keep in (True, "y"))):
            if not wanted:
                assert got is None
                continue
            assert got.shape == (*inp.shape[:-1], w.shape[0])
            assert_close(got, inp @ w.t(), atol=1e-5, rtol=1e-5, name="kept")


@cuda_only
@gpu
@pytest.mark.parametrize("keep", [True, "x", "y"], ids=str)
@pytest.mark.parametrize("case", ALIGNED_CASES[:3], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_memory_modes_in_half_precision_match_reference(ops, case, dtype, keep):
    """fp16/bf16: the kept projection is rounded to the input dtype (the lean mode
    recomputes it in fp32), so the gradients are held to test_correctness's
    low-precision bound against the reference instead of bitwise."""
    compare(case, dtype, "cuda", torch.device("cuda"), save_projections=keep)


@cuda_only
@gpu
def test_gpu_mask_equals_cpu_mask(ops):
    index = torch.arange(5000, dtype=torch.int64)
    assert torch.equal(ops.dropout_keep(index.cuda(), 77, 0.4).cpu(),
                       ops.dropout_keep(index, 77, 0.4))


@cuda_only
@gpu
def test_forward_is_deterministic():
    case = LARGE_CASES[0]
    tensors = make_inputs(case, torch.float32, "cuda", requires_grad=False)
    a = fbp_kernels.fbp(*tensors, factor=case.factor, backend="cuda")
    b = fbp_kernels.fbp(*tensors, factor=case.factor, backend="cuda")
    assert torch.equal(a, b)


@cuda_only
@gpu
def test_compiled_module_uses_the_cuda_backend():
    layer = fbp_kernels.FactorizedBilinearPooling(12, 10, 6, factor=4, backend="cuda").cuda()
    x, y = torch.randn(5, 12, device="cuda"), torch.randn(5, 10, device="cuda")
    eager = layer(x, y)
    compiled = torch.compile(layer, fullgraph=True)(x, y)
    assert_close(compiled, eager, atol=1e-6, rtol=1e-5, name="compiled")



@cuda_only
@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck_on_the_compiled_operators(ops, normalize):
    """Schema, Meta kernels against the real outputs (shapes, strides, dtypes), and
    dispatch, as torch.compile relies on them."""
    case = Case((9,), (9,), 6, 5, 3, 4)
    x, y, wx, wy, bx, by = make_inputs(case, torch.float32, "cuda", requires_grad=False)
    args = (x, y, wx, wy, bx, by, case.factor, 0.2, 7, normalize, 1e-6)
    torch.library.opcheck(ops.fbp_forward.default, args)
    out, norm, _, _, _ = ops.fbp_forward(*args)
    grad = torch.randn_like(out)
    torch.library.opcheck(ops.fbp_backward.default,
                          (grad, x, y, wx, wy, bx, by, out, norm, case.factor, 0.2, 7,
                           normalize, 1e-6))
    # The memory mode that keeps both projections, forward and backward.
    keep = args + (0, 1, True, True)
    torch.library.opcheck(ops.fbp_forward.default, keep)
    out, norm, a, c, _ = ops.fbp_forward(*keep)
    torch.library.opcheck(ops.fbp_backward.default,
                          (grad, x, y, wx, wy, bx, by, out, norm, case.factor, 0.2, 7,
                           normalize, 1e-6, 0, 1, a, c))
    # One chained MFH block: the previous product in, this one's out; the carry both ways.
    chain = args + (0, 1, False, False, 1, 1, torch.randn(9, 12, device="cuda"), True)
    torch.library.opcheck(ops.fbp_forward.default, chain)
    out, norm, _, _, p = ops.fbp_forward(*chain)
    torch.library.opcheck(ops.fbp_backward.default,
                          (grad, x, y, wx, wy, bx, by, out, norm, case.factor, 0.2, 7,
                           normalize, 1e-6, 0, 1, None, None, 1, 1, p, torch.randn_like(p),
                           True))
