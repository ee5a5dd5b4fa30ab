"""Benchmarks: `pytest benchmarks/ --benchmark-json=out.json`. Without a GPU they run in smoke
mode (tiny shapes, one round; see harness.py) so CI keeps them working."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `from harness import ...`
