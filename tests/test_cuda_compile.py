"""Compile facts of the CUDA C++ kernels (``python -m fbp_kernels.backends.cuda_compile``).

With nvcc and cuobjdump (CI has both; no GPU needed) every ``csrc/*.cu`` file is
compiled for sm_80 and sm_90 and the per-kernel report is checked: every kernel is
there for both architectures, nothing spills, the fp16/bf16 GEMM kernels use tensor
cores, and the derived fields (CTAs per SM, FLOP per byte, bytes in flight) agree with
a recomputation from the raw facts. Issue 12's main-loop thresholds (HGMMA, TMA,
``flop_per_byte >= 64``, 64 KiB in flight) are asserted for the sm_90 training engine
(WgmmaEngine, sm_90a) and printed for the others (docs/cuda.md, "Compile facts").

The tile table the report uses is checked against ``csrc/`` without any toolchain.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fbp_kernels.backends import cuda_build, cuda_compile

CSRC = Path(cuda_build.CSRC)
MISSING = cuda_compile.missing_tools()
needs_nvcc = pytest.mark.skipif(
    bool(MISSING), reason="cannot compile the CUDA kernels here: " + "; ".join(MISSING))

DTYPES = ("fp16", "bf16", "fp32", "fp64")
GEMM = cuda_compile.GEMM_KERNELS
EXPECTED = ({(k, d, cuda_compile.ENGINE_OF_DTYPE[d]) for k in GEMM for d in DTYPES}
            | {(k, d, e) for k in GEMM for d, e in cuda_compile.ASYNC_ENGINE_OF_DTYPE.items()}
            | {(k, d, e) for k in GEMM for d, e in cuda_compile.WIDE_ENGINE_OF_DTYPE.items()}
            | {(k, d, "default") for k in ("finish_norm", "grad_pooled", "finish_group_norm",
                                           "grad_pooled_group") for d in DTYPES}
            | {("dropout_keep", "-", "default")})
#: sm_90 (built as sm_90a) adds the wgmma + TMA engine.
EXPECTED_90 = EXPECTED | {(k, d, e) for k in GEMM
                          for d, e in cuda_compile.WGMMA_ENGINE_OF_DTYPE.items()}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if MISSING:
        pytest.skip("cannot compile the CUDA kernels here: " + "; ".join(MISSING))
    out = tmp_path_factory.mktemp("cuda-compile") / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "fbp_kernels.backends.cuda_compile",
                           "--json", str(out)], capture_output=True, text=True, timeout=1800)
    print(proc.stdout)  # the table and the issue-12 gap list, visible with -s
    assert out.exists(), f"report not written:\n{proc.stdout}\n{proc.stderr}"
    return proc.returncode, json.loads(out.read_text()), proc.stdout + proc.stderr


# ------------------------------------------------------------------ without a toolchain

def _struct_body(text: str, name: str) -> str:
    start = re.search(rf"struct {name}\b[^;{{]*{{", text).start()
    return text[start:text.index("\n};", start)]


def _constant(body: str, name: str) -> int:
    m = re.search(rf"\b{name}\s*=\s*(\d+)", body)
    assert m, f"{name} not found"
    return int(m.group(1))


def test_tile_table_matches_the_headers():
    """TILES / ENGINE_OF_DTYPE / ROW_KERNEL_THREADS are the constants of csrc/, so the
    report's FLOP per byte and occupancy cannot drift from the kernels."""
    tile_h = (CSRC / "fbp_tile.cuh").read_text()
    wmma = _struct_body(tile_h, "WmmaEngine")
    fma = _struct_body(tile_h, "FmaEngine")
    kinds = {"__half": "fp16", "__nv_bfloat16": "bf16", "float": "fp32", "double": "fp64"}
    found = dict(re.findall(r"struct EngineFor<(\w+)> \{ using type = (\w+)<", tile_h))
    assert {kinds[t]: e for t, e in found.items()} == {
        d: e.split("<")[0] for d, e in cuda_compile.ENGINE_OF_DTYPE.items()}
    for t, name in (("float", "FmaEngine<float>"), ("double", "FmaEngine<double>")):
        m = re.search(rf"struct EngineFor<{t}> \{{ using type = FmaEngine<{t}, {t}, (\d+), (\d+)>",
                      tile_h)
        tile = cuda_compile.TILES[name]
        assert (tile.bm, tile.bn) == (int(m.group(1)), int(m.group(2))), name
        assert tile.bk == _constant(fma, "BK") and tile.threads == _constant(fma, "kThreads")
    tile = cuda_compile.TILES["WmmaEngine"]
    assert (tile.bm, tile.bn, tile.bk, tile.threads) == tuple(
        _constant(wmma, k) for k in ("BM", "BN", "BK", "kThreads"))
    assert tile.stages == 1 == _constant(wmma, "kStages") == _constant(fma, "kStages")
    assert cuda_compile.TILES["FmaEngine<float>"].stages == 1
    pipeline = _struct_body(tile_h, "WmmaPipeline")
    for name in ("WmmaAsyncEngine", "WmmaWideEngine"):
        m = re.search(rf"struct {name} : WmmaPipeline<T, (\d+), (\d+), (\d+), (\d+), (\d+)>",
                      tile_h)
        bm, bn, warps_m, warps_n, stages = map(int, m.groups())
        tile = cuda_compile.TILES[name]
        assert (tile.bm, tile.bn, tile.bk, tile.threads, tile.stages) == (
            bm, bn, _constant(pipeline, "BK"), 32 * warps_m * warps_n, stages), name
    wgmma = _struct_body(tile_h, "WgmmaEngine")
    tma_h = (CSRC / "fbp_tma.cuh").read_text()
    box_k, box_rows = _constant(tma_h, "kTmaBoxK"), _constant(tma_h, "kTmaBoxRows")
    assert re.search(r"BM = kTmaBoxRows, BN = kTmaBoxRows, BK = kTmaBoxK;", wgmma)
    assert tuple(cuda_compile.TILES["WgmmaEngine"]) == (
        box_rows, box_rows, box_k, _constant(wgmma, "kThreads"), _constant(wgmma, "kStages"))
    for table, engine in ((cuda_compile.ASYNC_ENGINE_OF_DTYPE, "AsyncEngineFor"),
                          (cuda_compile.WIDE_ENGINE_OF_DTYPE, "WideEngineFor"),
                          (cuda_compile.WGMMA_ENGINE_OF_DTYPE, "WgmmaEngineFor")):
        found = dict(re.findall(rf"struct {engine}<(\w+)> \{{ using type = (\w+)<", tile_h))
        assert {kinds[t]: e for t, e in found.items()} == table, engine
    for source in ("fbp_forward.cu", "fbp_backward.cu"):
        rows = re.findall(r"constexpr int kRowsPerBlock = (\d+);", (CSRC / source).read_text())
        assert rows and all(int(r) * 32 == cuda_compile.ROW_KERNEL_THREADS["finish_norm"]
                            for r in rows), source
    group = _constant((CSRC / "fbp_launch.h").read_text(), "kGroupThreads")
    assert all(cuda_compile.ROW_KERNEL_THREADS[k] == group
               for k in ("finish_group_norm", "grad_pooled_group"))
    forward = (CSRC / "fbp_forward.cu").read_text()
    keep = forward[forward.index("cudaError_t launch_dropout_keep"):]
    assert _constant(keep, "kThreads") == cuda_compile.ROW_KERNEL_THREADS["dropout_keep"]


@pytest.mark.parametrize("regs,smem,threads,arch,expected", [
    (32, 0, 256, 80, (8, "registers")),        # 1024 regs/warp: 64 warps = 8 CTAs (= threads)
    (198, 35328, 128, 80, (2, "registers")),   # 200 * 32 = 6400/warp -> 10 warps -> 2 CTAs
    (89, 35328, 128, 80, (4, "shared")),       # 164 KiB / (35328 + 1 KiB) = 4
    (89, 35328, 128, 90, (5, "registers")),   # 96 * 32 -> 21 warps -> 5 (shared: 6)
    (18, 0, 256, 90, (8, "threads")),          # 2048 / 256
    (16, 0, 32, 80, (32, "blocks")),           # the 32-CTA cap
    (255, 100 * 1024, 256, 90, (1, "registers")),
])
def test_ctas_per_sm_by_hand(regs, smem, threads, arch, expected):
    assert cuda_compile.ctas_per_sm(regs, smem, threads, arch) == expected


def test_tile_intensity_by_hand():
    # 64x64x32 fp16: 2*64*64*32 FLOP over (64+64)*32*2 bytes = 32 FLOP/B, one 8 KiB tile.
    assert cuda_compile.tile_intensity(cuda_compile.Tile(64, 64, 32, 128, 1), 2) == (32.0, 8192)
    # A 3-stage pipeline keeps two tiles in flight.
    assert cuda_compile.tile_intensity(cuda_compile.Tile(64, 64, 32, 128, 3), 2) == (32.0, 16384)
    assert cuda_compile.tile_intensity(cuda_compile.Tile(32, 64, 16, 256, 1), 8)[0] == \
        pytest.approx(65536 / 12288)


def test_parsers():
    ptxas = """ptxas info    : Compiling entry function '_Z1kPf' for 'sm_80'
ptxas info    : Function properties for _Z1kPf
    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 33280 bytes smem, 400 bytes cmem[0]
"""
    assert cuda_compile.parse_ptxas(ptxas) == {
        "_Z1kPf": {"stack": 24, "spill_stores": 16, "spill_loads": 8, "registers": 40,
                   "smem": 33280}}
    sass = """	code for sm_90
		Function : _Z1kPf
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P0 UTMALDG.2D [UR8], [UR4] ;
        /*0020*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], R24 ;
		Function : _Z1jv
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0010*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
"""
    ops = cuda_compile.parse_sass(sass)
    assert cuda_compile.tensor_core_kind(ops["_Z1kPf"]) == "HGMMA" and "UTMALDG" in ops["_Z1kPf"]
    assert cuda_compile.tensor_core_kind(ops["_Z1jv"]) == "HMMA" and "LDGSTS" in ops["_Z1jv"]
    assert cuda_compile.classify(
        "void fbp::(anonymous namespace)::fused_forward_kernel<__nv_bfloat16, "
        "fbp::WmmaEngine<__nv_bfloat16> >(fbp::(anonymous namespace)::ForwardParams<"
        "__nv_bfloat16, float>)") == ("fused_forward", "bf16", "WmmaEngine")
    assert cuda_compile.classify(
        "void fbp::(anonymous namespace)::projection_grads_kernel<double, fbp::FmaEngine<"
        "double, double, 32, 64> >(...)") == ("projection_grads", "fp64", "FmaEngine<double>")
    assert cuda_compile.classify("fbp::(anonymous namespace)::dropout_keep_kernel(long const*, "
                                 "bool*, long, unsigned long, float)")[:2] == ("dropout_keep", "-")


# ------------------------------------------------------------------ the report (nvcc)

@needs_nvcc
def test_every_kernel_is_reported_for_both_architectures(report):
    _, rows, log = report
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    for arch in cuda_compile.ARCHS:
        got = [(r["kernel"], r["dtype"], r["config"]) for r in rows if r["arch"] == arch]
        want = EXPECTED_90 if arch == 90 else EXPECTED
        assert len(got) == len(set(got)), f"sm_{arch}: duplicate rows"
        assert set(got) == want, f"sm_{arch}: {sorted(set(got) ^ want)}\n{log}"


@needs_nvcc
def test_no_kernel_spills(report):
    rc, rows, log = report
    spilled = [r for r in rows if r["stack_bytes"] or r["local_bytes"] or r["spill_stores"]
               or r["spill_loads"]]
    assert not spilled, "\n".join(f"{r['kernel']} sm_{r['arch']} {r['dtype']}: "
                                  f"{r['registers']} regs, {r['stack_bytes']} B stack, "
                                  f"{r['spill_stores']} B spill stores" for r in spilled)
    assert all(0 <= r["spill_loads"] for r in rows), "ptxas -v report missing for a kernel"
    assert rc == 0, log


@needs_nvcc
def test_half_precision_gemm_kernels_use_tensor_cores(report):
    _, rows, _ = report
    for r in rows:
        if r["kernel"] in cuda_compile.GEMM_KERNELS and r["dtype"] in ("fp16", "bf16"):
            assert r["tensor_cores"] in ("HMMA", "HGMMA"), r
            # The cp.async engine really issues LDGSTS; the synchronous one does not.
            assert r["cp_async"] == (r["config"] in ("WmmaAsyncEngine", "WmmaWideEngine")), r
            # The cp.async engines load their fragments with ldmatrix (bf16 too: wmma's own
            # bf16 loads are scalar, which is why they issue mma.sync themselves).
            if r["cp_async"]:
                assert r["ldmatrix"], r
            # The wgmma engine really is wgmma fed by bulk tensor copies; no other is.
            hopper = r["config"] == "WgmmaEngine"
            assert (r["tensor_cores"] == "HGMMA") == hopper and r["tma"] == hopper, r
        if r["kernel"] not in cuda_compile.GEMM_KERNELS:
            assert r["tensor_cores"] == "none" and not r["cp_async"], r


@needs_nvcc
def test_derived_fields_are_consistent(report):
    """ctas_per_sm, flop_per_byte and inflight_bytes_per_sm recomputed from the raw facts
    with the architecture limits written out here."""
    _, rows, _ = report
    limits = {80: (65536, 164 * 1024), 90: (65536, 228 * 1024)}
    for r in rows:
        regs_sm, smem_sm = limits[r["arch"]]
        warps = -(-r["threads"] // 32)
        assert r["num_warps"] == warps and r["threads"] > 0, r
        per_warp = -(-r["registers"] * 32 // 256) * 256
        by_regs = regs_sm // per_warp // warps
        by_smem = smem_sm // (-(-(r["shared_bytes"] + 1024) // 128) * 128)
        expected = min(by_regs, by_smem, 2048 // (32 * warps), 32)
        assert r["ctas_per_sm"] == expected >= 1, r
        # Static shared memory within the 48 KiB an array may have; beyond that the
        # engine's dynamic allocation, which cuobjdump does not see.
        static = r["shared_bytes"] - cuda_compile.DYNAMIC_SMEM_BYTES.get(r["config"], 0)
        assert r["registers"] <= 255 and 0 <= static <= 48 * 1024, r
        if r["kernel"] in cuda_compile.GEMM_KERNELS:
            assert (static == 0) == (r["config"] in cuda_compile.DYNAMIC_SMEM_BYTES), r
        # cuobjdump counts the 1 KiB system reserve in SHARED on sm_90 only: for every
        # kernel with static shared memory, and for those without it in a file whose
        # kernels use dynamic shared memory (the module then reserves it for all).
        reserve = {1024} if r["arch"] == 90 and static else {0, 1024} if r["arch"] == 90 else {0}
        assert r["shared_bytes_cuobjdump"] - static in reserve, r
        if r["kernel"] in cuda_compile.GEMM_KERNELS:
            tile = cuda_compile.TILES[r["config"]]
            assert r["config"] in (cuda_compile.ENGINE_OF_DTYPE[r["dtype"]],
                                   cuda_compile.ASYNC_ENGINE_OF_DTYPE.get(r["dtype"]),
                                   cuda_compile.WIDE_ENGINE_OF_DTYPE.get(r["dtype"]),
                                   cuda_compile.WGMMA_ENGINE_OF_DTYPE.get(r["dtype"]))
            assert (r["bm"], r["bn"], r["bk"], r["stages"]) == (tile.bm, tile.bn, tile.bk,
                                                               tile.stages)
            assert r["threads"] == tile.threads
            elem = cuda_compile.ELEMENT_BYTES[r["dtype"]]
            tile_bytes = (r["bm"] + r["bn"]) * r["bk"] * elem
            assert r["flop_per_byte"] == pytest.approx(2 * r["bm"] * r["bn"] * r["bk"] / tile_bytes,
                                                       abs=1e-3)
            assert r["inflight_bytes_per_sm"] == \
                tile_bytes * max(1, r["stages"] - 1) * r["ctas_per_sm"]
            assert isinstance(r["tma"], bool)
        else:
            assert r["flop_per_byte"] is None and r["inflight_bytes_per_sm"] is None


@needs_nvcc
def test_cost_model_facts_match_the_build(report):
    """costmodel.CUDA_TILES / CUDA_COMPILE_FACTS are the engines the launcher picks on
    sm_80/sm_90 (for half precision wgmma + TMA on sm_90; on sm_80 the 128x128 cp.async
    one above 128 rows, 64x64 cp.async up to them; FMA for fp32) as this nvcc
    compiles them: the cost
    model's CUDA provider cannot drift from the kernels.  (Registers depend on the
    compiler: with another nvcc than the table's the comparison is skipped.)"""
    from fbp_kernels import costmodel as cm

    engines = {"wgmma": cuda_compile.WGMMA_ENGINE_OF_DTYPE,
               "wide": cuda_compile.WIDE_ENGINE_OF_DTYPE, "async": cuda_compile.ASYNC_ENGINE_OF_DTYPE,
               "fp32": {"fp32": cuda_compile.ENGINE_OF_DTYPE["fp32"]}}
    for engine, table in engines.items():
        for dtype, name in table.items():
            tile = cuda_compile.TILES[name]
            assert cm.CUDA_TILES[engine] == \
                (tile.bm, tile.bn, tile.bk, tile.threads, tile.stages), (engine, dtype)
    version = cuda_compile._nvcc_version(cuda_compile.find_nvcc())
    if not cm.CUDA_COMPILE_FACTS_SOURCE.startswith(f"nvcc {version}"):
        pytest.skip(f"the table is {cm.CUDA_COMPILE_FACTS_SOURCE!r}, this nvcc {version!r}")
    _, rows, _ = report
    # 2 kernels x (2 archs x (2 half dtypes x {wide, async} + fp32) + sm_90 x 2 x wgmma)
    assert len(cm.CUDA_COMPILE_FACTS) == 2 * (2 * (2 * 2 + 1) + 2)
    for (kernel, arch, dtype, engine), facts in cm.CUDA_COMPILE_FACTS.items():
        config = engines[engine][dtype]
        found = [r for r in rows if (r["kernel"], r["arch"], r["dtype"], r["config"]) ==
                 (kernel, arch, dtype, config)]
        assert len(found) == 1, (kernel, arch, dtype, config)
        r = found[0]
        assert (r["registers"], r["shared_bytes"], r["tensor_cores"]) == facts, (
            f"{kernel} sm_{arch} {dtype} {config}: built {r['registers']} regs, "
            f"{r['shared_bytes']} B, {r['tensor_cores']}; costmodel.CUDA_COMPILE_FACTS has "
            f"{facts}")


@needs_nvcc
def test_hopper_training_main_loops_meet_the_issue12_thresholds(report):
    """Issue 12's thresholds, asserted for the engine FBP_CUDA_STAGING=auto runs on sm_90
    (WgmmaEngine, fp16 and bf16, forward and backward): HGMMA, TMA bulk
    tensor copies, >= 64 FLOP per staged byte, >= 64 KiB in flight per SM, >= 4 stages,
    no spills.  The other engines' gaps (rows <= 128, operands TMA cannot read) are
    printed."""
    rc, rows, log = report
    facts = [cuda_compile.KernelFacts(**r) for r in rows]
    assert cuda_compile.issue12_gaps(facts) == [] and rc == 0, log
    print("\n".join(cuda_compile.issue12_gaps(facts, training_only=False)))
    training = [r for r in rows if r["arch"] == 90 and r["kernel"] in GEMM
                and r["config"] == cuda_compile.TRAINING_ENGINE_OF_DTYPE[90].get(r["dtype"])]
    assert sorted((r["kernel"], r["dtype"]) for r in training) == sorted(
        (k, d) for k in GEMM for d in ("bf16", "fp16"))
    for r in training:
        assert r["tensor_cores"] == "HGMMA" and r["tma"], r
        assert r["flop_per_byte"] >= 64 and r["inflight_bytes_per_sm"] >= 64 * 1024, r
        assert r["stages"] >= 4 and r["stack_bytes"] == 0 and r["spill_stores"] == 0, r
    half90 = [r for r in rows if r["arch"] == 90 and r["dtype"] in ("fp16", "bf16")
              and r["kernel"] in cuda_compile.GEMM_KERNELS]
    assert len(half90) == 16  # 2 kernels x 2 dtypes x (synchronous, cp.async, wide, wgmma)
    assert "sm_90 training engine (WgmmaEngine): met" in log


@needs_nvcc
def test_a_second_run_is_served_from_the_cache(report):
    results = cuda_compile.compile_all()
    assert all(r.ok and r.cached for r in results), [(r.source, r.arch, r.cached)
                                                     for r in results]
    assert sum(len(r.kernels) for r in results) == len(report[1])


@needs_nvcc
def test_a_compile_error_is_reported(tmp_path):
    (tmp_path / "broken.cu").write_text(
        "__global__ void broken(float* p) { p[0] = undeclared_name; }\n")
    (results,) = cuda_compile.compile_all(archs=(80,), csrc=tmp_path, use_cache=False)
    assert not results.ok and "undeclared_name" in results.log
    assert cuda_compile.failed_row(results)["ok"] is False
