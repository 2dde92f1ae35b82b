"""The device and software every result row is tagged with."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Dict, Optional

import torch

import fbp_kernels

#: Peak memory bandwidth in GB/s by device-name substring, first match wins, for
#: the "share of peak" of the small-rows forward (it reads the weights and little
#: else).  Datasheet values; ``--peak-bandwidth`` overrides them.
PEAK_BANDWIDTH_GBPS = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),   # SXM5, HBM3
    ("A100-SXM4-80GB", 2039.0),
    ("A100", 1555.0),
)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except Exception:  # not installed, or broken: either way, not part of this run
        return None


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {_cpu_name()}"


def describe(device: torch.device) -> Dict[str, object]:
    """Everything a reader needs to reproduce or compare a run."""
    info: Dict[str, object] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_type": device.type,
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fbp_kernels": fbp_kernels.__version__,
        "commit": _git_commit(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["capability"] = f"{props.major}.{props.minor}"
        info["sm_count"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        # Whether fp32 matmuls of the baseline may use TF32 (PyTorch's default: no).
        # (the package's reader: the legacy flag raises once the new API was used)
        from fbp_kernels.backends._common import matmul_allows_tf32

        info["matmul_tf32"] = matmul_allows_tf32()
        # The CUDA backend's engine settings (make gpu-check's smoke may set them).
        info["cuda_engine_env"] = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                                           if k.startswith("FBP_CUDA_")) or "none"
    return info


def peak_bandwidth_gbps(name: str) -> Optional[float]:
    for key, value in PEAK_BANDWIDTH_GBPS:
        if key in name:
            return value
    return None


def slug(text: str) -> str:
    """A file-name-safe form of a device name: ``"NVIDIA H100 80GB HBM3"`` ->
    ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def default_out_dir(root: Path, device: torch.device) -> Path:
    """``benchmarks/out/<device>-<UTC date and time>/``: never overwrites a run."""
    name = "cpu" if device.type == "cpu" else slug(device_name(device))
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return root / f"{name}-{stamp}"
