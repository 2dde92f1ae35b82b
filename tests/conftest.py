"""Shared fixtures: the test device, the backends, seeding.

Without a GPU the Triton kernels run through Triton's interpreter, which must be
switched on before ``triton.jit`` decorates them, i.e. before fbp_kernels imports
its Triton module: hence this happens at the top of conftest, before any test
module imports the package.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fbp_kernels import backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (the AVER example's tests): its tensors are tiny,
    and with several threads on a busy 2-core machine each op waits on the others
    (measured 40x slower per training step)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def device():
    return DEVICE


def backend_param(name, unsupported_reason=backends.unsupported_reason):
    """``pytest.param(name)``, skipped with the reason when the backend can't run here.
    ``unsupported_reason(name, device)`` defaults to the FBP registry's (MFH passes its own)."""
    reason = unsupported_reason(name, DEVICE)
    marks = [pytest.mark.skip(reason=f"backend {name!r} unavailable on {DEVICE}: {reason}")] \
        if reason else []
    return pytest.param(name, marks=marks, id=name)


@pytest.fixture(params=[backend_param(n) for n in backends.NAMES])
def backend(request):
    """Every backend; one that cannot run on this machine is skipped with its reason."""
    return request.param


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
