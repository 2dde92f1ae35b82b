"""The Triton kernels compile for real GPUs (sm_80, sm_90) without one, and do not spill,
with the dev Triton and with Triton 3.6 (the GPU machine's version).

The interpreter tests never run Triton's GPU compiler; this does, in a subprocess
with TRITON_INTERPRET unset (triton.compile needs real JIT kernels).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed")


#: Triton 3.6 is the GPU machine's version; `make setup` installs it beside the dev stack.
TRITON_36 = Path(__file__).resolve().parents[1] / ".venv" / "triton-3.6"


def _versions():
    yield pytest.param(None, id="dev-triton")
    marks = [] if (TRITON_36 / "triton").is_dir() else [pytest.mark.skip(
        reason=f"Triton 3.6 not installed at {TRITON_36} (`make setup` installs it; on the "
               f"GPU machine the system Triton is 3.6 and the dev-triton case covers it)")]
    yield pytest.param(TRITON_36, id="triton-3.6", marks=marks)


@pytest.fixture(scope="module", params=list(_versions()))
def compile_rows(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if request.param is not None:
        # The other Triton first on the path; the package itself from this checkout.
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([str(request.param), root,
                                             env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "fbp_kernels.backends.triton_compile",
                           "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=1800)
    print(proc.stdout)  # the resource table, visible with -s or on failure
    assert out.exists(), f"compile report not written:\n{proc.stdout}\n{proc.stderr}"
    if request.param is not None:
        version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"],
                                 env=env, capture_output=True, text=True).stdout.strip()
        assert version.startswith("3.6"), version  # the compile really used Triton 3.6
    return proc.returncode, json.loads(out.read_text()), proc.stdout + proc.stderr


def test_every_kernel_compiles_for_sm80_and_sm90(compile_rows):
    _, rows, log = compile_rows
    combos = {(r["kernel"], r["arch"], r["dtype"], r["config"]) for r in rows}
    # (fwd, bwd, row_dot) x archs x dtypes x configs, plus the mask kernel per arch, plus
    # the split epilogues (fwd, bwd) x archs x dtypes x their five tile shapes, and the
    # wide forward (three pooling paths) plus its row finish per arch and dtype
    assert len(combos) == len(rows) == 3 * 2 * 3 * 4 + 2 + 2 * 2 * 3 * 5 + 2 * 3 * 4, log
    assert {r["kernel"] for r in rows} == {"fbp_fwd", "fbp_bwd", "row_dot", "mask",
                                           "split_fwd", "split_bwd", "wide_fwd", "finish"}
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['config']}: "
                                 f"{r['error']}" for r in failed)


def test_no_register_spills(compile_rows):
    rc, rows, log = compile_rows
    spilled = [r for r in rows if r["ok"] and r["stack_bytes"] > 0]
    assert not spilled, "spilling kernels:\n" + "\n".join(
        f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['config']}: {r['registers']} regs, "
        f"{r['stack_bytes']} B stack" for r in spilled)
    assert rc == 0, log


def test_hopper_half_precision_uses_wgmma(compile_rows):
    _, rows, _ = compile_rows
    for r in rows:
        if r["kernel"] not in ("fbp_fwd", "fbp_bwd"):
            continue  # reductions and the mask kernel have no matmul
        if r["arch"] == 90 and r["dtype"] in ("fp16", "bf16") and r["config"] == "large":
            assert r["tensor_cores"] == "wgmma", r
        if r["dtype"] in ("fp16", "bf16"):
            assert r["tensor_cores"] in ("mma", "wgmma"), r
    # The wide forward: wgmma on Hopper, mma.sync on Ampere, for every pooling path.
    wide = [r for r in rows if r["kernel"] == "wide_fwd" and r["dtype"] != "fp32"]
    assert wide and all(r["tensor_cores"] == ("wgmma" if r["arch"] == 90 else "mma")
                        for r in wide), wide
