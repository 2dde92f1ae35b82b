"""The cost model (fbp_kernels.costmodel) against hand-computed cases.

No timing is measured or asserted: the model's outputs are deterministic arithmetic on
its stated assumptions, so these tests pin the arithmetic (byte and FLOP counts, waves,
occupancy, chunking), the orderings the model must respect (more rows never cost less,
the A100 is slower than the H100 where compute or bandwidth bound), the GPU-name mapping,
and that the committed compile facts still match a live compile.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fbp_kernels import costmodel as cm

ROOT = Path(__file__).resolve().parents[1]
H200, H100, A100 = cm.GPUS["H200"], cm.GPUS["H100"], cm.GPUS["A100"]
MFB = dict(m=2048, n=1024, factor=5, o=1000)
#: x (4, 8), y (4, 6), factor 2, o 3: factor*o = 6, fp32 (4 bytes).
TINY = cm.Shape(rows=4, m=8, n=6, factor=2, o=3, dtype="fp32")


def test_floor_flops_and_bytes_by_hand():
    # Forward floor = x W_x^T (4x8 @ 8x6) and y W_y^T (4x6 @ 6x6):
    #   FLOPs = 2*4*6*8 + 2*4*6*6 = 384 + 288 = 672
    #   HBM   = x 4*8*4 + W_x 6*8*4 + out 4*6*4  = 128 + 192 + 96 = 416
    #         + y 4*6*4 + W_y 6*6*4 + out 4*6*4  =  96 + 144 + 96 = 336   -> 752 bytes
    p = cm.predict("floor", TINY, H200, "forward")
    assert p.flops == 672
    assert p.hbm_bytes == 752
    assert p.launches == 2
    # Backward floor: dx = dA W_x (4x6 @ 6x8), dW_x = dA^T x (6x4 @ 4x8), and the same
    # for y: FLOPs 2*4*8*6 * 2 + 2*4*6*6 * 2 = 768 + 576 = 1344; six GEMMs for both.
    b = cm.predict("floor", TINY, H200, "backward")
    assert b.flops == 1344 and b.launches == 4
    fb = cm.predict("floor", TINY, H200, "forward+backward")
    assert fb.flops == 672 + 1344 and fb.launches == 6
    # L2 traffic is never below DRAM traffic (every DRAM byte crosses the L2).
    for q in (p, b, fb):
        assert q.l2_bytes >= q.hbm_bytes


def test_floor_at_the_mfb_default_is_the_two_gemm_flops():
    # 2 * rows * factor*o * (m + n) = 2 * 1024 * 5000 * 3072 = 31.46 GFLOP
    s = cm.Shape(rows=1024, **MFB)
    assert cm.predict("floor", s, H200).flops == 2 * 1024 * 5000 * 3072
    # rows = 1: the weights dominate: W_x + W_y = 5000 * 3072 * 2 bytes = 30.72 MB, all
    # from HBM, so the floor is HBM-bound at >= 30.72e6 / (4.8e12 * 0.88) = 7.3 us.
    one = cm.predict("floor", cm.Shape(rows=1, **MFB), H200)
    assert one.hbm_bytes >= 5000 * 3072 * 2
    assert one.bound == "hbm"
    assert one.time_us >= 30.72e6 / (4.8e12 * cm.HBM_EFFICIENCY) * 1e6


def test_split_hbm_bytes_by_hand():
    # One chunk (the 64 MiB budget holds 64 MiB / (2*6*4) rows): the two GEMMs move
    # 416 + 336 bytes (as the floor); the epilogue reads A and C (192 bytes, just written,
    # L2-resident) and writes out (4 x 3 x 4 = 48 bytes): 800 bytes from HBM.
    p = cm.predict("split", TINY, H200, "forward")
    assert p.hbm_bytes == 416 + 336 + 48
    assert p.launches == 3


def test_split_chunking_counts_launches():
    # bf16, factor*o = 5000: a row of A and C is 2 * 5000 * 2 = 20000 bytes, so a chunk
    # is 64 MiB // 20000 = 3355 rows; 10000 rows = 3 chunks of 3 launches each.
    s = cm.Shape(rows=10000, **MFB)
    assert cm.split_chunk_rows(s) == 67108864 // 20000 == 3355
    assert cm.predict("split", s, H200, "forward").launches == 9
    # Backward per chunk: recompute A and C, the epilogue, 4 GEMMs, 2 bias sums = 9.
    assert cm.predict("split", s, H200, "backward").launches == 27
    # +saved keeps A and C whole (not transient) and writes dA, dC over them: one chunk,
    # forward 3 launches, backward 7 (no recompute).
    assert cm.predict("split+saved", s, H200, "forward+backward").launches == 3 + 7


def test_split_budget_sets_the_chunks_and_auto_can_choose():
    # A 16 MiB budget: 16777216 // 20000 = 838 rows per chunk; 1024 rows = 2 chunks.
    s = cm.Shape(rows=1024, **MFB)
    assert cm.predict("split", s, H200, split_budget_bytes=16 * 2**20).launches == 6
    assert cm.predict("split", s, H200).launches == 3
    # A budget below one row still makes progress: one row per chunk.
    assert cm.predict("split", cm.Shape(rows=3, **MFB), H200,
                      split_budget_bytes=1).launches == 9
    best, preds = cm.best_provider(s, H200, "forward")
    assert set(preds) == {"fused", "split"}
    assert best == min(preds, key=lambda c: preds[c].time_us)


def test_occupancy_from_registers_and_shared_memory():
    # 167 registers -> 168 per thread -> 5376 per warp; 65536 // 5376 = 12 warps resident,
    # so one 8-warp CTA per SM (PERFORMANCE.md: "1 (register-limited)").
    assert cm.ctas_per_sm(167, 8, 24576, H200) == 1
    # 236 registers, 4 warps: 240 * 32 = 7680 per warp -> 8 warps -> 2 CTAs.
    assert cm.ctas_per_sm(236, 4, 24576, H200) == 2
    # 108 registers: 112 * 32 = 3584 -> 18 warps -> 4 CTAs of 4 warps.
    assert cm.ctas_per_sm(108, 4, 16384, H200) == 4
    # Shared memory limits too: 100 KiB per CTA on a 228 KiB SM -> 2.
    assert cm.ctas_per_sm(32, 4, 100 * 1024, H200) == 2
    f = cm.kernel_facts("fbp_fwd", "large", "bf16", H200)
    # 217 registers since its launch bound (one_cta_registers): still one 8-warp CTA.
    assert (f.registers, f.ctas_per_sm, f.tensor_cores) == (217, 1, "wgmma")
    # 3 buffers of (64 + 64) x 32 bf16 = 8 KiB, 2 in flight: 16 KiB per SM.
    assert (f.buffers, f.stage_bytes) == (3, 8192)


def test_fused_waves_for_its_real_grid():
    # The wide forward at rows 1024, bf16, sm_90: 128x128 tiles hold 128 // 5 = 25
    # outputs, rounded down to 24 (tiles span a multiple of 4 columns: one Philox per
    # four elements) -> 8 row tiles x ceil(1000 / 24) = 42 -> 336 CTAs, one per SM (119
    # registers x 512 threads, 128 KiB shared) on 132 SMs: 2.55 waves; in flight 3 of 4
    # stages of (128 + 128) x 64 bf16.
    p = cm.predict("fused", cm.Shape(rows=1024, **MFB), H200)
    assert p.waves == pytest.approx(336 / 132)
    assert cm.wide_tile_outputs(128, 5) == 24 and cm.wide_tile_outputs(128, 2) == 64
    assert cm.wide_tile_outputs(64, 6) == 10 and cm.wide_tile_outputs(64, 17) == 0
    assert p.bytes_in_flight_per_sm == 3 * (128 + 128) * 64 * 2
    # rows 64 (<= SMALL_ROWS): the 128x64 tile, one row tile x 84 output tiles; two CTAs
    # per SM (128 registers x 256 threads, 96 KiB of shared memory each) -> 84 / 264.
    small = cm.wide_facts("bf16", H200, rows=64)
    assert (small.block_m, small.block_o, small.ctas_per_sm) == (128, 64, 2)
    assert cm.predict("fused", cm.Shape(rows=64, **MFB), H200).waves == \
        pytest.approx(84 / (132 * 2))
    # rows 1 (<= TINY_ROWS): the 16x64 tile, 84 output tiles; three CTAs per SM (116
    # registers x 128 threads; 60 KiB + 1 KiB reserved of 228 KiB shared) -> 84 / 396.
    tiny = cm.wide_facts("bf16", H200, rows=1)
    assert (tiny.block_m, tiny.block_o, tiny.ctas_per_sm) == (16, 64, 3)
    p1 = cm.predict("fused", cm.Shape(rows=1, **MFB), H200)
    assert p1.waves == pytest.approx(84 / (132 * 3))
    # ... which streams the weights: HBM-bound, within 1.1x of the two-GEMM floor.
    assert p1.kernels[0].bound == "hbm"
    assert p1.time_us < 1.1 * cm.predict("floor", cm.Shape(rows=1, **MFB), H200).time_us
    # sm_80 (A100) runs the 128x64 tile: 64 // 5 = 12 outputs -> 8 x 84 = 672 CTAs.
    assert cm.predict("fused", cm.Shape(rows=1024, **MFB), cm.GPUS["A100"]).waves == \
        pytest.approx(672 / 108)
    # The one-launch kernel still runs when training keeps the projections (+saved),
    # after the memset of its row blocks' tickets (zeroed per call):
    # large tile 64x64 -> 16 row tiles x ceil(1000/64) = 16 -> 256 CTAs, 1.94 waves.
    ks = cm.kernels("fused+saved", cm.Shape(rows=1024, **MFB), H200, "forward+backward")
    assert ks[0].name == "zero row-block tickets" and ks[0].hbm_bytes == 16 * 4
    legacy = ks[1]
    assert legacy.waves == pytest.approx(256 / 132) and legacy.bytes_in_flight_per_sm == 2 * 8192
    # rows 256: medium 32x64 -> 8 x 16 = 128 CTAs at 2 per SM -> 128 / 264 waves.
    legacy = cm.kernels("fused+saved", cm.Shape(rows=256, **MFB), H200, "forward+backward")[1]
    assert legacy.waves == pytest.approx(128 / 264)
    # rows 1: "small" would give 16 programs < 132 SMs, so "tiny" 16x16: 63 CTAs at 3 per
    # SM (158 registers, allocated in 8s: 160 x 128 threads = 20480 of 65536).
    assert cm.pick_tile(1, 1000, "bf16", 132) == "tiny"
    assert cm.kernel_facts("fbp_fwd", "tiny", "bf16", H200).registers == 158
    legacy = cm.kernels("fused+saved", cm.Shape(rows=1, **MFB), H200, "forward+backward")[1]
    assert legacy.waves == pytest.approx(63 / (132 * 3))
    # o = 1000 never picks "small" (PERFORMANCE.md: dead configuration) ...
    assert {cm.pick_tile(r, 1000, "bf16", 132) for r in range(1, 33)} == {"tiny"}
    # ... but a wide layer does: 2 row tiles x 64 output tiles = 128 < 132 -> tiny;
    # o = 8192 -> 128 output tiles x 2 = 256 >= 132 -> small.
    assert cm.pick_tile(32, 8192, "bf16", 132) == "small"


def test_fused_reads_x_and_y_once_per_output_tile_through_l2():
    # Wide forward on sm_90: L2 -> SM bytes of the main loop = e * (m+n) * (rows * n_j +
    # BLOCK_N * n_j * n_m) = 2 * 3072 * (1024 * 42 + 128 * 42 * 8) = 528.5 MB at rows 1024
    # (42 output tiles of 24), plus the fp32 pooled scratch (written, then read twice by
    # the row finish).
    p = cm.predict("fused", cm.Shape(rows=1024, **MFB), H200)
    main = 2 * 3072 * (1024 * 42 + 128 * 42 * 8)
    scratch = 1024 * 1000 * 4
    assert main + 3 * scratch <= p.l2_bytes < (main + 3 * scratch) * 1.01
    # ~59 useful FLOP per L2 byte (2*128*128 / (2 * (128 + 128)) = 64 at full tiles; 120
    # of 128 columns used) against 32 for the one-launch kernel, which re-reads x and y
    # once per factor group:
    assert p.flops / main == pytest.approx(2 * 1024 * 5000 * 3072 / main) and \
        58 < p.flops / main < 64
    legacy = cm.kernels("fused+saved", cm.Shape(rows=1024, **MFB), H200, "forward+backward")[1]
    old = 2 * 3072 * (5 * 1024 * 16 + 5000 * 16)
    assert legacy.flops / old == pytest.approx(32, rel=0.02)


def test_wide_tile_table_matches_the_kernel():
    from fbp_kernels.backends import triton_wide as W

    assert set(cm.WIDE_TILES) == set(W.WIDE_CONFIGS)
    for fam, cfg in W.WIDE_CONFIGS.items():
        assert cm.WIDE_TILES[fam] == (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps,
                                      cfg.num_stages, cfg.group_m, cfg.tma), fam
    for arch, cap in ((80, (8, 0)), (90, (9, 0))):
        for dt, tdt in (("bf16", torch.bfloat16), ("fp16", torch.float16),
                        ("fp32", torch.float32)):
            for rows in (None, 1, W.TINY_ROWS, W.TINY_ROWS + 1, W.SMALL_ROWS,
                         W.SMALL_ROWS + 1):
                assert cm.wide_family(dt, arch, rows) == W.config_family(tdt, cap, rows)
    assert cm.WIDE_SMALL_ROWS == W.SMALL_ROWS and cm.WIDE_TINY_ROWS == W.TINY_ROWS
    assert set(cm.WIDE_BWD_TILES) == set(W.WIDE_BWD_CONFIGS)
    for fam, cfg in W.WIDE_BWD_CONFIGS.items():
        assert cm.WIDE_BWD_TILES[fam] == (cfg.block_m, cfg.block_n, cfg.block_k,
                                          cfg.num_warps, cfg.num_stages, cfg.group_m,
                                          cfg.tma), fam


@pytest.mark.parametrize("mode", cm.MODES)
def test_more_rows_never_cost_less(mode):
    rows = [1, 2, 4, 16, 64, 256, 1024, 4096, 16384]
    for prov in ("floor", "eager", "compile", "split", "split+saved"):
        times = [cm.predict(prov, cm.Shape(rows=r, **MFB), H200, mode).time_us for r in rows]
        # Tiny kernels are latency-bound and their grid grows with the rows, so a kernel
        # of 2 rows can finish a few hundredths of a microsecond before one of 1 row (grid
        # rounding): allowed up to 0.25 us; anything larger is a modelling error.
        for a, b in zip(times, times[1:]):
            assert b >= a - 0.25, (prov, times)
        assert times[-1] > 10 * times[0], (prov, times)
    for prov in cm.PROVIDERS:
        flops = [cm.predict(prov, cm.Shape(rows=r, **MFB), H200, mode).flops for r in rows]
        assert flops == sorted(flops) and len(set(flops)) == len(flops), prov
    # The fused kernel switches tiles with rows (so rows 16 can beat rows 1), but within
    # one tile configuration (large: rows > 256) more rows never cost less.
    big = [cm.predict("fused", cm.Shape(rows=r, **MFB), H200, mode).time_us
           for r in (257, 512, 1024, 4096, 16384)]
    assert big == sorted(big)


@pytest.mark.parametrize("rows", [1024, 16384])
def test_a100_is_slower_than_h100_and_h100_no_faster_than_h200(rows):
    s = cm.Shape(rows=rows, **MFB)
    for prov in (*cm.PROVIDERS, "fused+saved", "split+saved"):
        for mode in cm.MODES:
            a, h, h2 = (cm.predict(prov, s, g, mode).time_us for g in (A100, H100, H200))
            assert a > h >= h2, (prov, mode, a, h, h2)


def test_floor_is_the_fastest_provider():
    for rows in (1, 16, 256, 1024, 16384):
        s = cm.Shape(rows=rows, **MFB)
        for mode in cm.MODES:
            floor = cm.predict("floor", s, H200, mode).time_us
            for prov in ("eager", "compile", "fused", "split", "fused+saved", "split+saved",
                         "cuda"):
                assert cm.predict(prov, s, H200, mode).time_us >= floor, (rows, mode, prov)


def test_coattention_projects_the_shared_side_once():
    # B 64 x R 100 regions, one question per sample: the floor and split project y for 64
    # rows, not 6400; the flattened problem projects 6400.
    co = cm.Shape(rows=6400, x_rows=6400, y_rows=64, **MFB)
    flat = cm.Shape(rows=6400, **MFB)
    y_flops = 2 * 5000 * 1024
    assert cm.predict("floor", flat, H200).flops - cm.predict("floor", co, H200).flops == \
        (6400 - 64) * y_flops
    assert cm.predict("split", co, H200).time_us < cm.predict("split", flat, H200).time_us
    # The wide kernels read y's projection per group of 100 rows (formed once by cuBLAS)
    # and skip the y main loop: issue 12's target, at least 1.3x faster than flattened.
    fused_co, fused_flat = cm.predict("fused", co, H200), cm.predict("fused", flat, H200)
    assert fused_co.flops < fused_flat.flops
    assert fused_flat.time_us >= 1.3 * fused_co.time_us, (fused_co.time_us, fused_flat.time_us)


def test_gpu_name_mapping():
    assert cm.gpu_for_name("NVIDIA H100 80GB HBM3") is H100
    assert cm.gpu_for_name("NVIDIA H100 PCIe") is H100
    assert cm.gpu_for_name("NVIDIA H200") is H200
    assert cm.gpu_for_name("NVIDIA A100-SXM4-80GB") is A100
    # Unknown names go by compute capability to the nearest entry.
    assert cm.gpu_for_name("NVIDIA GeForce RTX 4090", (8, 9)) is A100
    assert cm.gpu_for_name("NVIDIA L40S", (8, 9)) is A100
    assert cm.gpu_for_name("Some Hopper part", (9, 0)) is H100
    assert cm.gpu_for_name("NVIDIA B200", (10, 0)) is H200
    assert cm.gpu_for_name("mystery") is H200
    assert cm.gpu_for("NVIDIA A100 80GB PCIe") is A100  # a name, not a device spec
    import torch
    if not torch.cuda.is_available():
        assert cm.gpu_for() is H200


def test_published_peaks():
    # Datasheet values (dense): H100/H200 SXM bf16 989.4 TFLOP/s, A100 312; HBM 3.35,
    # 4.8, 2.039 TB/s; 132, 132, 108 SMs.
    assert (H100.tensor_tflops["bf16"], H100.hbm_tbs, H100.sms) == (989.4, 3.35, 132)
    assert (H200.tensor_tflops["bf16"], H200.hbm_tbs, H200.sms) == (989.4, 4.8, 132)
    assert (A100.tensor_tflops["bf16"], A100.hbm_tbs, A100.sms) == (312.0, 2.039, 108)
    assert {H100, H200, A100}  # hashable (by name)


def test_bad_arguments():
    s = cm.Shape(rows=4, **MFB)
    with pytest.raises(ValueError, match="mode"):
        cm.predict("floor", s, H200, "sideways")
    with pytest.raises(ValueError, match="provider"):
        cm.predict("magic", s, H200)
    with pytest.raises(ValueError, match="\\+saved"):
        cm.predict("eager+saved", s, H200)
    with pytest.raises(ValueError, match="dtype"):
        cm.Shape(rows=4, dtype="fp8", **MFB)
    with pytest.raises(ValueError, match="y_rows"):
        cm.Shape(rows=4, y_rows=8, **MFB)


def test_every_dtype_predicts():
    for dtype in cm.DTYPE_BYTES:
        s = cm.Shape(rows=1024, dtype=dtype, **MFB)
        for prov in cm.PROVIDERS:
            for g in (H100, H200, A100):
                p = cm.predict(prov, s, g, "forward+backward")
                assert math.isfinite(p.time_us) and p.time_us > 0
    # fp32 (IEEE) GEMMs run on CUDA cores: 15x slower peak than bf16 tensor cores.
    f32 = cm.predict("floor", cm.Shape(rows=4096, dtype="fp32", **MFB), H200).time_us
    b16 = cm.predict("floor", cm.Shape(rows=4096, dtype="bf16", **MFB), H200).time_us
    assert f32 > 5 * b16


def test_cuda_provider_by_hand():
    """The CUDA extension's forward at the MFB default, rows 1024: 128-row x 128-column
    tiles (on an H200 the wgmma + TMA engine) of 128 // 5 = 25 outputs -> 8 x 40 = 320
    CTAs, two GEMMs' FLOPs on the 125 useful of 128 columns, 64 FLOP per L2 byte per
    k-step; then the row-norm finish.  Slower than split (L2-bound at 64 FLOP per byte,
    and its wgmma priced at Triton's efficiency, below cuBLAS's) but never faster than
    the floor."""
    s = cm.Shape(rows=1024, **MFB)
    ks = cm.kernels("cuda", s, H200, "forward")
    assert [k.name.split(" (")[0] for k in ks] == ["cuda fused forward",
                                                   "cuda row-norm finish"]
    main = ks[0]
    assert main.ctas == 8 * 40
    assert main.flops == 2.0 * 1024 * 5000 * (2048 + 1024)
    # sm_90: the wgmma + TMA engine, 128x128x64, 4 stages, 198 KiB: one CTA per SM.
    f = cm.cuda_facts("fused_forward", "bf16", H200, 1024)
    assert (f.block_m, f.block_o, f.block_k, f.num_warps, f.num_stages) == (128, 128, 64, 8, 4)
    assert f.ctas_per_sm == 1 and f.tensor_cores == "wgmma"
    assert 2 * 128 * 128 * 64 / ((128 + 128) * 64 * 2) == 64.0
    # sm_80: the cp.async mma.sync engine, 128x128x32 (152576 B, 196 registers x 256 threads).
    a100 = cm.GPUS["A100"]
    f80 = cm.cuda_facts("fused_forward", "bf16", a100, 1024)
    assert (f80.block_k, f80.ctas_per_sm, f80.tensor_cores) == (32, 1, "mma")
    # fp32 keeps the 64x64 FMA tile: 64 // 5 = 12 outputs, 16 x 84 CTAs.  Half precision
    # on sm_80: up to 128 rows the 64x64 cp.async tile (2 x 84 CTAs at rows 128), above it
    # 128x128; on sm_90 the 128x128 wgmma tile at every row count.
    fp32 = cm.kernels("cuda", cm.Shape(rows=1024, **{**MFB, "dtype": "fp32"}), H200, "forward")
    assert fp32[0].ctas == 16 * 84
    assert cm.kernels("cuda", cm.Shape(rows=128, **MFB), a100, "forward")[0].ctas == 2 * 84
    assert cm.kernels("cuda", cm.Shape(rows=129, **MFB), a100, "forward")[0].ctas == 2 * 40
    assert cm.kernels("cuda", cm.Shape(rows=128, **MFB), H200, "forward")[0].ctas == 1 * 40
    for mode in cm.MODES:
        t = {p: cm.predict(p, s, H200, mode).time_us for p in ("floor", "split", "cuda")}
        assert t["floor"] < t["split"] < t["cuda"], (mode, t)
    # backward: ds, dA/dC, four GEMMs, bias sums
    names = [k.name.split(" (")[0] for k in cm.kernels("cuda", s, H200, "backward")]
    assert names[:2] == ["cuda ds = dL/ds", "cuda dA/dC"] and len(names) == 7, names


def test_cuda_coattention_by_hand():
    """Co-attention on the CUDA backend (B 64, R 100 regions, one question per sample):
    the question is projected once per sample by cuBLAS (64 rows), the fused kernel
    multiplies only the regions' side (2 * 6400 * 5000 * 2048 FLOP) and reads the
    question's projection per tile; nothing is materialised.  Backward: the question
    projection again, its gradient summed per sample before its GEMMs on 64 rows.
    Faster than the same problem flattened (which copies and re-projects the question
    per region)."""
    co = cm.Shape(rows=6400, y_rows=64, **MFB)
    flat = cm.Shape(rows=6400, **MFB)
    fwd = cm.kernels("cuda", co, H200, "forward")
    names = [k.name.split(" (")[0] for k in fwd]
    assert names == ["shared projection", "cuda fused forward", "cuda row-norm finish"], names
    assert fwd[0].flops == 2.0 * 64 * 5000 * 1024
    assert fwd[1].flops == 2.0 * 6400 * 5000 * 2048
    bwd = [k.name.split(" (")[0] for k in cm.kernels("cuda", co, H200, "backward")]
    assert bwd[0] == "shared projection" and "dy projection summed per group" in bwd
    assert not any("materialise" in n for n in names + bwd)
    for mode in cm.MODES:
        assert cm.predict("cuda", co, H200, mode).time_us < \
            cm.predict("cuda", flat, H200, mode).time_us, mode


def test_costmodel_imports_with_the_standard_library_only():
    """Loaded as a lone file in a fresh interpreter: no torch, no triton at import."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('cm', {str(ROOT / 'fbp_kernels' / 'costmodel.py')!r})\n"
            "mod = importlib.util.module_from_spec(spec); sys.modules['cm'] = mod\n"
            "spec.loader.exec_module(mod)\n"
            "mod.predict('split', mod.Shape(1024, 2048, 1024, 5, 1000), mod.GPUS['H200'])\n"
            "print('torch' in sys.modules, 'triton' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_predicted_targets_table(capsys):
    """Issue 12's targets as the model predicts them: each row's value recomputed here
    from predict() at its worst shape, its verdict from its threshold, and the CLI."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import model

    rows = model.predicted_targets(H200)
    assert len(rows) == len(model.TARGETS) + 2
    for r, (label, rows_list, mode, suffix, ratio, threshold) in zip(rows, model.TARGETS):
        assert r["target"] == label and r["rows"] in rows_list
        s = cm.Shape(rows=r["rows"], **MFB)
        mine = cm.predict(r["provider"], s, H200, mode).time_us
        base = cm.predict("floor" if ratio == "floor" else "eager", s, H200, mode).time_us
        assert r["value"] == pytest.approx(mine / base if ratio == "floor" else base / mine)
        assert r["met"] == (r["value"] <= threshold if ratio == "floor"
                            else r["value"] >= threshold)
        # the worst shape: no other shape of the target is worse for the shipped design
        for rows_ in rows_list:
            s2 = cm.Shape(rows=rows_, **MFB)
            t = min(cm.predict(p + suffix, s2, H200, mode).time_us for p in ("fused", "split"))
            b = cm.predict("floor" if ratio == "floor" else "eager", s2, H200, mode).time_us
            v = t / b if ratio == "floor" else b / t
            assert (v <= r["value"] + 1e-12) if ratio == "floor" else (v >= r["value"] - 1e-12)
    assert all(r["threshold"] == 1.3 and "coatt" in r["target"] for r in rows[-2:])
    assert model.main(["--targets"]) == 0
    text = capsys.readouterr().out
    assert text.count("| met |") + text.count("| missed |") == len(rows)


def test_model_cli_table_and_coatt_sweep(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    from benchmarks import model

    out = tmp_path / "rows.json"
    assert model.main(["--rows", "1,1024", "--mode", "all", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Predicted (cost model, not measured)" in text
    assert all(f"{g} us" in text for g in ("H100", "H200", "A100"))
    import json
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 3 * len(model.TABLE_PROVIDERS)
    floor = [r for r in rows if r["provider"] == "floor"]
    assert all(r["over_floor"] == 1.0 for r in floor)
    assert {r["mode"] for r in rows} == set(cm.MODES)
    assert model.main(["--sweep", "coatt", "--providers", "floor,split"]) == 0
    text = capsys.readouterr().out
    assert "coatt B=64 R=100" in text and "flattened B*R=6400" in text
    # --set changes one assumption of the --gpu entry: a slower L2 slows the fused kernel
    # (bound by L2 at rows 1024), and an unknown field is refused.
    slow = model.apply_overrides(H200, ["l2_tbs=4"])
    assert slow.l2_tbs == 4.0 and H200.l2_tbs == cm.GH100_L2_TBS
    s1024 = cm.Shape(rows=1024, **MFB)
    assert cm.predict("fused", s1024, slow).time_us > 1.2 * cm.predict("fused", s1024, H200).time_us
    with pytest.raises(SystemExit):
        model.apply_overrides(H200, ["nonsense=1"])
    (label, co), (_, flat) = model.coatt_shapes()
    assert (co.rows, co.rx, co.ry, flat.ry) == (6400, 6400, 64, 6400)


# ----------------------------------------------------------------------------- vs the kernels

triton_kernels = pytest.importorskip("fbp_kernels.backends.triton_kernels",
                                     reason="needs triton")


def test_tile_table_matches_the_kernels_heuristic(monkeypatch):
    K = triton_kernels
    for fam, cfgs in K.CONFIGS.items():
        assert set(cfgs) == set(cm.TILE_CONFIGS[fam])
        for name, c in cfgs.items():
            assert cm.TILE_CONFIGS[fam][name] == (c.block_m, c.block_o, c.block_k,
                                                   c.num_warps, c.num_stages), (fam, name)
    import torch
    monkeypatch.setattr(K, "INTERPRET", False)
    monkeypatch.setattr(K, "_sm_count", lambda device: 132)
    for dtype, tdt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for rows in (1, 16, 32, 33, 256, 257, 4096):
            for o in (256, 1000, 8192):
                cfg = K.pick_config(rows, o, tdt, torch.device("cpu"))
                name = cm.pick_tile(rows, o, dtype, 132)
                assert cm.TILE_CONFIGS[cm.config_family(dtype)][name][:3] == \
                    (cfg.block_m, cfg.block_o, cfg.block_k), (dtype, rows, o)


def test_compile_facts_match_a_live_compile():
    """The committed table cannot go stale silently: compile one configuration (the
    sm_90 bf16 training forward) now and compare.  Regenerate the table with
    ``python benchmarks/model.py --refresh-facts``."""
    import triton

    table_version = cm.COMPILE_FACTS_SOURCE.split(",")[0].split()[-1]
    if triton.__version__ != table_version:
        # Register counts differ between Triton releases (the GPU machine has 3.6): the
        # table describes the dev Triton, so only that version can check it.
        pytest.skip(f"compile facts are from triton {table_version}, this is "
                    f"{triton.__version__}")
    sys.path.insert(0, str(ROOT))
    from benchmarks import model

    live = model.compile_facts_live(kernels=("fbp_fwd",), archs=(90,), dtypes=("bf16",),
                                    configs=("large",), timeout_s=240)
    key = ("fbp_fwd", 90, "bf16", "large")
    assert live["facts"][key] == cm.COMPILE_FACTS[key], (
        f"compile facts are stale (triton {live['triton']}): live {live['facts'][key]} vs "
        f"committed {cm.COMPILE_FACTS[key]}; run python benchmarks/model.py --refresh-facts")
    assert cm.COMPILE_FACTS_SOURCE.startswith(f"triton {live['triton']}")


def test_readme_prediction_table_matches_the_model():
    """README's predicted H200 table (Benchmarks section) is the model's output, rounded:
    a model change that moves it must update the README too."""
    import re

    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (\d+) \| ([\d /]+) \| ([\d /]+) \|$", text, flags=re.M)
    assert {int(r[0]) for r in rows} >= {1, 1024, 16384}
    for r, fwd, fb in rows:
        s = cm.Shape(rows=int(r), **MFB)
        for mode, cells in (("forward", fwd), ("forward+backward", fb)):
            want = [round(cm.predict(p, s, H200, mode).time_us)
                    for p in ("floor", "eager", "fused", "split")]
            assert [int(c) for c in cells.split(" / ")] == want, (r, mode)


def test_keeping_one_projection_recomputes_only_the_other():
    # save_projections="x": backward recomputes C alone (one GEMM of rows x 5000 x 1024);
    # its predicted time lies between keeping both and keeping neither.
    s = cm.Shape(rows=16384, **MFB)
    names = [k.name for k in cm.kernels("split+keep_x", s, H200, "forward+backward")]
    assert any(n.startswith("recompute C") for n in names)
    assert not any(n.startswith("recompute A") for n in names)
    t = {p: cm.predict(p, s, H200, "forward+backward").time_us
         for p in ("split", "split+keep_x", "split+keep_y", "split+saved")}
    assert t["split+saved"] < t["split+keep_x"] < t["split"]
    assert t["split+saved"] < t["split+keep_y"] < t["split"]
    # Keeping x's projection saves the larger GEMM (m = 2048 > n = 1024).
    assert t["split+keep_x"] < t["split+keep_y"]


def test_fused_middle_mode_reads_the_kept_projection():
    # fused+keep_x (backend triton, save_projections="x"): cuBLAS forms A once in
    # forward (saved, not formed again in backward); the wide main loops run over y
    # alone, forward and backward.  So exactly one x projection (2 R K m FLOPs) fewer
    # than the lean mode, which recomputes A in both main loops.
    s = cm.Shape(rows=1024, **MFB)
    names = [k.name for k in cm.kernels("fused+keep_x", s, H200, "forward+backward")]
    assert sum(n.startswith("kept projection (x)") for n in names) == 1
    assert not any(n.startswith("kept projection (x)")
                   for n in (k.name for k in cm.kernels("fused+keep_x", s, H200, "backward")))
    lean = cm.predict("fused", s, H200, "forward+backward")
    keep_x = cm.predict("fused+keep_x", s, H200, "forward+backward")
    keep_y = cm.predict("fused+keep_y", s, H200, "forward+backward")
    assert lean.flops - keep_x.flops == pytest.approx(2 * 1024 * 5000 * 2048)
    assert lean.flops - keep_y.flops == pytest.approx(2 * 1024 * 5000 * 1024)
    # Reading A back costs rows x K*o from HBM: still ahead of recomputing it.
    assert keep_x.time_us < keep_y.time_us < lean.time_us
    # The forward alone: the kept GEMM replaces x's main loop (the kernel then runs only
    # the y loop); the flops are the lean forward's.
    fwd = [cm.predict(p, s, H200, "forward") for p in ("fused", "fused+keep_x")]
    assert fwd[0].flops == pytest.approx(fwd[1].flops)


def test_refresh_cuda_facts_rewrites_every_entry(tmp_path):
    """benchmarks/model.py --refresh-cuda-facts: each CUDA_COMPILE_FACTS entry is taken
    from the compile report's row of its (kernel, arch, dtype, engine config), nothing
    else in the file changes (here from report rows made up from the table, one
    changed)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import model

    copy = tmp_path / "costmodel.py"
    text = (ROOT / "fbp_kernels" / "costmodel.py").read_text()
    copy.write_text(text)
    rows = [dict(kernel=k, arch=a, dtype=d, config=model.CUDA_ENGINE_CONFIGS[e],
                 registers=regs + (7 if (k, a, d, e) == ("fused_forward", 90, "bf16", "wide")
                                   else 0),
                 shared_bytes=smem, tensor_cores=tc)
            for (k, a, d, e), (regs, smem, tc) in cm.CUDA_COMPILE_FACTS.items()]
    assert model.refresh_cuda_facts(copy, rows) == len(cm.CUDA_COMPILE_FACTS)
    new = copy.read_text()
    regs, smem, tc = cm.CUDA_COMPILE_FACTS[("fused_forward", 90, "bf16", "wide")]
    assert f'("fused_forward", 90, "bf16", "wide"): ({regs + 7}, {smem}, "{tc}")' in new
    assert new.replace(f"({regs + 7}, {smem}", f"({regs}, {smem}", 1) == text


@pytest.mark.parametrize("gpu_name", ["H200", "A100"])
def test_forward_needs_are_what_the_model_needs_to_meet_the_target(gpu_name):
    """Each row of ``model.forward_needs`` is the model's own threshold: at the stated
    main-loop efficiency (L2 unlimited) the fused forward meets the target, at 3% less
    it misses; likewise at the stated L2 bandwidth (full efficiency), stated as FLOP per
    L2 byte at the entry's L2; unreachable rows are inf and miss even at full
    efficiency with unlimited bandwidth."""
    import dataclasses

    sys.path.insert(0, str(ROOT))
    from benchmarks import model

    gpu = cm.GPUS[gpu_name]
    rows = model.forward_needs(gpu)
    assert [r["rows"] for r in rows] == [1024, 4096, 16384] * 2
    for r in rows:
        threshold = 1.15 if "1.15x" in r["target"] else 1.5
        s = cm.Shape(rows=r["rows"], **MFB)
        floor = "floor" in r["target"]
        base = cm.predict("floor" if floor else "eager", s, gpu).time_us
        allowed = base * threshold if floor else base / threshold

        def time(**change):
            return cm.predict("fused", s, dataclasses.replace(gpu, **change)).time_us

        main = max(cm.predict("fused", s, gpu).kernels, key=lambda k: k.flops)
        assert r["flop_per_byte_now"] == pytest.approx(main.flops / main.l2_bytes)
        if math.isinf(r["efficiency"]):
            assert time(mma_efficiency=1.0, l2_tbs=1e6) > allowed
            continue
        assert time(mma_efficiency=r["efficiency"], l2_tbs=1e6) <= allowed
        assert time(mma_efficiency=r["efficiency"] * 0.97, l2_tbs=1e6) > allowed
        assert time(mma_efficiency=1.0, l2_tbs=r["l2_tbs"]) <= allowed
        assert time(mma_efficiency=1.0, l2_tbs=r["l2_tbs"] * 0.97) > allowed
        assert r["flop_per_byte"] == pytest.approx(
            r["flop_per_byte_now"] * r["l2_tbs"] / gpu.l2_tbs)
        # Where today's fused forward misses, it needs more than today's efficiency or
        # intensity; where it meets, today's satisfy both (the two rules agree).
        misses = cm.predict("fused", s, gpu).time_us > allowed
        assert misses == (r["efficiency"] > r["assumed_efficiency"]
                          or r["flop_per_byte"] > r["flop_per_byte_now"]), r


def test_gluon_forward_model_matches_its_kernel_and_is_l2_bound_at_training_batches():
    """The fused-ws provider prices backends/gluon_wide.py: the model's tile is the
    kernel's, it applies where the kernel does, and it changes only the forward.  At the
    128x128 tile (64 FLOP per L2 byte) the model puts it L2-bound from rows 1024 on the
    H200 (7.7 TB/s x 64 = 493 TFLOP/s, 0.50 of peak, below WS_MMA_EFFICIENCY), so it gains
    only where the Triton loop was compute-bound: the larger tile is the next step."""
    from fbp_kernels.backends import gluon_wide as G

    assert cm.WS_TILE[:3] == (G.BLOCK_M, G.BLOCK_N, G.BLOCK_K)
    assert cm.WS_TILE[3:6] == (G.NUM_WARPS + 4, G.STAGES, G.MAXNREG)
    gpu = cm.GPUS["H200"]
    for rows in (256, 1024, 4096):
        s = cm.Shape(rows, 2048, 1024, 5, 1000, "bf16")
        fused, ws = (cm.predict(p, s, gpu) for p in ("fused", "fused-ws"))
        assert ws.time_us <= fused.time_us
        assert cm.predict("fused-ws", s, gpu, "backward").time_us == \
            cm.predict("fused", s, gpu, "backward").time_us
    s = cm.Shape(256, 2048, 1024, 5, 1000, "bf16")
    assert cm.predict("fused-ws", s, gpu).time_us < cm.predict("fused", s, gpu).time_us
    s = cm.Shape(4096, 2048, 1024, 5, 1000, "bf16")
    assert cm.predict("fused-ws", s, gpu).bound == "l2"
    # Not on sm_80, not in fp32, not at small batches: the Triton kernel's prediction.
    for gpu_, s in ((cm.GPUS["A100"], cm.Shape(1024, 2048, 1024, 5, 1000, "bf16")),
                    (gpu, cm.Shape(1024, 2048, 1024, 5, 1000, "fp32")),
                    (gpu, cm.Shape(16, 2048, 1024, 5, 1000, "bf16"))):
        assert cm.predict("fused-ws", s, gpu_).time_us == cm.predict("fused", s, gpu_).time_us
