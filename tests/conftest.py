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


def devices():
    """Devices to parametrise GPU-capable tests over."""
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])
