"""DistributedDataParallel: the layer trains unchanged, gradients equal one process's.

Two CPU processes with the gloo backend split a batch in halves, train a small
model (FBP fusion + a linear head) for a few SGD steps under DDP, and record the
gradients and parameters after every step.  A single process trains a copy of the
same model on the full batch; since DDP averages gradients and each rank's loss is
a mean over its half, both must agree up to float64 rounding.

Robustness of the set-up:
- the rendezvous store is a TCPStore on 127.0.0.1 created by the test with port 0,
  so the OS picks a free port (no fixed port to collide with a parallel run), and
  the workers connect to it as clients;
- gloo is told to use the loopback interface (GLOO_SOCKET_IFNAME=lo), so nothing
  listens beyond 127.0.0.1;
- workers start from a fork server (never from the pytest process itself) and are
  joined with a deadline, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fbp_kernels import FactorizedBilinearPooling

WORLD = 2
STEPS = 3
BATCH = 8
M, N, O, K, CLASSES = 6, 5, 4, 3, 3
TIMEOUT = datetime.timedelta(seconds=60)
JOIN_TIMEOUT_S = 90
LR = 0.5

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fusion = FactorizedBilinearPooling(M, N, O, factor=K, dropout=0.0)
        self.head = nn.Linear(O, CLASSES)

    def forward(self, x, y):
        return self.head(self.fusion(x, y))


def make_problem():
    """The model's initial state and the data: identical on every process."""
    torch.manual_seed(1234)
    model = Model().double()
    # Per step: x (B, 2, M) fused with y (B, 1, N), broadcast over the second dim.
    x = torch.randn(STEPS, BATCH, 2, M, dtype=torch.float64)
    y = torch.randn(STEPS, BATCH, 1, N, dtype=torch.float64)
    target = torch.randint(0, CLASSES, (STEPS, BATCH, 2))
    return model, x, y, target


def loss_fn(logits, target):
    return nn.functional.cross_entropy(logits.reshape(-1, CLASSES), target.reshape(-1))


def sgd_step(model):
    # Plain SGD by hand: torch.optim would import torch._dynamo in each worker,
    # several seconds on a loaded machine, for nothing this test needs.
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
            p.grad = None


def train(model, x, y, target, rows=slice(None)):
    """SGD for STEPS steps on ``rows`` of each batch; returns per-step gradients."""
    grads = []
    params = dict(model.module.named_parameters()) if hasattr(model, "module") \
        else dict(model.named_parameters())
    for step in range(STEPS):
        loss_fn(model(x[step, rows], y[step, rows]), target[step, rows]).backward()
        grads.append({n: p.grad.detach().clone() for n, p in params.items()})
        sgd_step(model)
    return grads


def _worker(rank, port, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=False, timeout=TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=TIMEOUT)
    try:
        model, x, y, target = make_problem()
        half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        grads = train(nn.parallel.DistributedDataParallel(model), x, y, target, half)
        torch.save({"grads": grads, "params": dict(model.named_parameters())},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process_full_batch(tmp_path):
    # The parent hosts the store; port 0 lets the OS choose a free one.
    store = dist.TCPStore("127.0.0.1", 0, WORLD + 1, is_master=True, timeout=TIMEOUT,
                          wait_for_workers=False)
    # Not "fork": the pytest process has run OpenMP-parallel kernels in earlier tests,
    # and children forked from it can deadlock (libgomp is not fork-safe).  A fork
    # server is a fresh process that imports torch once, then forks both workers, so
    # they skip the ~10 s import a "spawn" worker pays on the shared CI machine.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch.nn.parallel.distributed",
                                "torch._dynamo", "fbp_kernels", __name__])
    procs = [ctx.Process(target=_worker, args=(r, store.port, str(tmp_path)), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{len(hung)} DDP worker(s) did not finish within {JOIN_TIMEOUT_S} s"
    for p in procs:
        assert p.exitcode == 0, f"a DDP worker failed with exit code {p.exitcode}"

    model, x, y, target = make_problem()
    single = train(model, x, y, target)

    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    fusion_names = {"fusion.proj_x.weight", "fusion.proj_x.bias",
                    "fusion.proj_y.weight", "fusion.proj_y.bias"}
    assert fusion_names <= set(single[0])
    for step in range(STEPS):
        for name, g in single[step].items():
            assert g.abs().max() > 0, f"{name}: zero gradient, the check would be vacuous"
            for r, res in enumerate(results):
                torch.testing.assert_close(res["grads"][step][name], g, atol=1e-12, rtol=1e-10,
                                           msg=lambda m: f"rank {r} step {step} {name}: {m}")
    for name, p in model.named_parameters():
        for res in results:
            torch.testing.assert_close(res["params"][name], p.detach(), atol=1e-12, rtol=1e-10)
