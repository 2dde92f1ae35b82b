"""How things are measured: time percentiles, GPU peak memory, saved activations.

Time on a GPU uses CUDA events around each call, with the L2 cache flushed before
every call (by writing a buffer larger than any L2), so repeated calls on the same
inputs do not measure the cache; on the CPU blocks of calls timed with
``time.perf_counter``, the providers interleaved (see :func:`time_cpu_interleaved`
for why, and for why not ``torch.utils.benchmark``).  Both report the median and the 20th/80th percentiles: a wide
p20-p80 band says the number is noisy (on a shared machine, expect that).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

# Several times the L2 cache of current data-centre GPUs (H100 and H200: 50 MB).
_L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Call:
    """What one measured call runs: ``setup`` (not timed, optional), then ``run``.

    The backward mode needs it: each backward consumes a graph that its setup (a
    forward) builds.  Keeping one graph alive with ``retain_graph=True`` instead
    would fail for torch.compile, whose compiled backward donates buffers.
    """

    run: Callable[[], object]
    setup: Optional[Callable[[], object]] = None


Callish = Union[Call, Callable[[], object]]


def as_call(fn: Callish) -> Call:
    return fn if isinstance(fn, Call) else Call(fn)


def call_once(fn: Callish):
    c = as_call(fn)
    if c.setup is not None:
        c.setup()
    return c.run()


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and 20th/80th percentiles over ``samples``."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of sorted values."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms: Iterable[float]) -> Timing:
    values = sorted(times_ms)
    if not values:
        raise ValueError("no timing samples")
    return Timing(_percentile(values, 50), _percentile(values, 20), _percentile(values, 80),
                  len(values))


def _block_ms(call: Call, number: int) -> float:
    """Milliseconds per call of one block of ``number`` calls (after the setup)."""
    if call.setup is not None:
        call.setup()
    t0 = time.perf_counter()
    for _ in range(number):
        call.run()
    return (time.perf_counter() - t0) / number * 1e3


def time_cpu_interleaved(calls: Dict[str, Callish], min_run_time: float = 0.2,
                         min_samples: int = 5) -> Dict[str, Union[Timing, Exception]]:
    """Time several calls on the CPU, one block of each in turn (round robin).

    On a shared machine the background load changes from second to second;
    measured one after another, a burst would land on whichever call was being
    timed and fake a difference between them.  Interleaved, every call sees the
    same mix of quiet and busy moments.  Each call gets at least ``min_samples``
    samples and about ``min_run_time`` seconds.

    Each sample is the mean of a block of calls, sized so that ``min_samples``
    blocks fill ``min_run_time`` (one call when calls are slow); a call with a
    setup is timed one call per sample, after its own setup.  ``time.perf_counter``
    at torch's current thread count.  Not ``torch.utils.benchmark.Timer``, which was
    tried: its ``timeit`` adds two warm-up calls to every sample (tripling the cost
    of a slow call), its ``blocked_autorange`` sizes blocks in powers of ten and can
    return a single block (then percentiles say nothing), and its setup runs once
    per block (a backward would reuse a consumed graph).

    Returns a Timing per name, or the exception that call raised.
    """
    out: Dict[str, Union[Timing, Exception]] = {}
    plan: Dict[str, Tuple[Call, int]] = {}
    for name, fn in calls.items():
        call = as_call(fn)
        try:
            one_call = _block_ms(call, 1) * 1e-3
        except Exception as exc:  # reported to the caller, per call
            out[name] = exc
            continue
        number = 1 if call.setup is not None else \
            max(1, int(min_run_time / min_samples / max(one_call, 1e-7)))
        plan[name] = (call, number)
    samples: Dict[str, List[float]] = {name: [] for name in plan}
    start, budget = time.perf_counter(), min_run_time * len(plan)
    while plan and (min(len(samples[n]) for n in plan) < min_samples
                    or time.perf_counter() - start < budget):
        for name in list(plan):
            try:
                samples[name].append(_block_ms(*plan[name]))
            except Exception as exc:
                out[name] = exc
                del plan[name]
    for name in plan:
        out[name] = summarize(samples[name])
    return out


def time_cpu(fn: Callish, min_run_time: float = 0.2, min_samples: int = 5) -> Timing:
    """Time one call on the CPU (see :func:`time_cpu_interleaved`)."""
    result = time_cpu_interleaved({"fn": fn}, min_run_time, min_samples)["fn"]
    if isinstance(result, Exception):
        raise result
    return result


def time_cuda(fn: Callish, device: torch.device, warmup_ms: float = 10.0,
              rep_ms: float = 50.0, max_reps: int = 1000) -> Timing:
    """Time ``fn`` on a CUDA device with events, flushing L2 before each call.

    The number of warm-up and measured calls comes from a first estimate, as in
    ``triton.testing.do_bench``: about ``warmup_ms`` and ``rep_ms`` of work.  Events
    are recorded on the stream after the setup's and the flush's work, so neither
    is inside the timed interval.
    """
    call = as_call(fn)
    setup = call.setup or (lambda: None)
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    stream = torch.cuda.current_stream(device)
    call_once(call)
    torch.cuda.synchronize(device)
    est = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
           for _ in range(5)]
    for s, e in est:
        setup()
        s.record(stream)
        call.run()
        e.record(stream)
    torch.cuda.synchronize(device)
    estimate_ms = max(sum(s.elapsed_time(e) for s, e in est) / len(est), 1e-3)
    n_warmup = min(max_reps, max(1, int(warmup_ms / estimate_ms)))
    n_reps = min(max_reps, max(10, int(rep_ms / estimate_ms)))
    for _ in range(n_warmup):
        call_once(call)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
    for s, e in zip(starts, ends):
        setup()
        flush.zero_()
        s.record(stream)
        call.run()
        e.record(stream)
    torch.cuda.synchronize(device)
    del flush
    return summarize(s.elapsed_time(e) for s, e in zip(starts, ends))


def median_event_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 10,
                    inner: int = 5) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream by events, with no L2
    flush and a fixed count: for probes whose data should stay resident or that run far
    longer than a flush (benchmarks/calibrate.py, scripts/gpu_smoke.py).  Each sample
    times ``inner`` back-to-back calls between one pair of events, so the GPU is busy
    when the start event is recorded and the host's launch cost (descriptor set-up,
    Python) stays off the clock."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()  # queued first: the start event is recorded behind real work
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / inner)
    times.sort()
    return times[len(times) // 2]


def time_all(calls: Dict[str, Callish], device: torch.device, *, min_run_time: float = 0.2,
             min_samples: int = 5, warmup_ms: float = 10.0,
             rep_ms: float = 50.0) -> Dict[str, Union[Timing, Exception]]:
    """Time every call on the problem's device: a Timing per name, or the exception
    it raised.  CPU calls are interleaved; GPU calls are timed one after another
    (a GPU is not shared with other processes here).  A GPU timing spans the call's
    work from the start event on: where the host's dispatch of a call outlasts the L2
    flush queued before it (small batches, several launches), the exposed host time is
    inside it, as it is for a user of the call; the cost model's host term predicts
    that part (its "host" bound)."""
    if device.type != "cuda":
        return time_cpu_interleaved(calls, min_run_time=min_run_time, min_samples=min_samples)
    out: Dict[str, Union[Timing, Exception]] = {}
    for name, fn in calls.items():
        try:
            out[name] = time_cuda(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms)
        except Exception as exc:  # reported to the caller, per call
            out[name] = exc
    return out


def peak_memory_bytes(fn: Callish, device: torch.device) -> int:
    """Peak CUDA memory ``fn`` allocates above what was allocated before it ran.

    What was live before (inputs, parameters, the graph a backward's setup built)
    is not counted, so the number is the extra memory one call of this mode needs.
    """
    call = as_call(fn)
    if call.setup is not None:
        call.setup()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = call.run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return peak - base


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


def saved_activation_bytes(forward: Callable[[], torch.Tensor],
                           exclude: Iterable[torch.Tensor]) -> int:
    """Bytes autograd keeps for backward after one forward, beyond ``exclude``.

    Every tensor saved for backward (by autograd's own formulas, a custom
    ``autograd.Function`` or a compiled graph) passes through the pack hook of
    ``saved_tensors_hooks``.  Tensors sharing storage with ``exclude`` (the inputs
    and parameters, which live anyway) are not counted; each other storage is
    counted once, whole, however many views of it are saved.
    """
    excluded = {_storage_key(t) for t in exclude}
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in excluded and key not in saved:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(saved.values())
