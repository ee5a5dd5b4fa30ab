"""Test set-up. Triton kernels run on the CPU through the interpreter, which reads
TRITON_INTERPRET when kernels are *defined*: it must be set before mmfast.triton.* is imported.
On a GPU machine the real Triton compiler runs instead."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Test shapes are small and gain nothing from a second thread, while OpenMP's barrier spinning
    on a busy 2-core machine (pytest-xdist runs one worker per core) makes them up to 50x slower.
    Tests of the kernels' multi-threaded paths set their own thread count inside the test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def devices():
    """Devices to parametrise GPU-capable tests over."""
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


# ---------------------------------------------------------------------------------------------
# Face provenance: a test parametrised with ``backend`` must run that face of the ops it calls,
# and no other (a face that silently ran the torch reference would pass most numeric checks).
FACES = ("cpu", "triton", "cuda", "torch")


def pytest_configure(config):
    config.addinivalue_line("markers", "no_face_runs(reason): a backend-parametrised test in which no face runs "
                                       "(argument errors raised before any kernel)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item._mmfast_call_passed = rep.passed


@pytest.fixture(autouse=True)
def _asked_face_ran(request):
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    backend = params.get("backend")
    if backend not in FACES or request.node.get_closest_marker("no_face_runs"):
        yield None
        return
    from mmfast import testing

    with testing.faces_run() as ran:
        yield ran
    if getattr(request.node, "_mmfast_call_passed", False):
        # forward, or backward alone for a test of a backward op (e.g. opcheck of it)
        only_backward = not any(d == "forward" for (_, _, d), n in ran.items() if n) and any(ran.values())
        testing.assert_face_ran(ran, None, backend, ("backward",) if only_backward else ("forward",),
                                what=request.node.name)
