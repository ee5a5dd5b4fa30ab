"""Triton faces of mmfast's ops, one module per op family (imported lazily by mmfast.dispatch).

On the CPU they run under the Triton interpreter: TRITON_INTERPRET=1 must be set before these
modules are imported.

Convention for ``mmfast kernels-report`` (mmfast/kernels_report.py): every module here defines

    def launches(arch: str) -> Iterable[Launch]

yielding one :class:`Launch` per kernel configuration its dispatch can launch on ``arch`` (e.g.
"sm_90"): every dtype, head dim / block size, flag (mask, causal, dropout, ...) and launch config.
The report compiles each offline for that architecture and reads registers, spills and shared
memory. A module builds a Launch's arguments with the same code as its real launch, so what is
compiled is what runs; tensors may live on the "meta" device (the compiler only sees dtypes and
alignment).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Launch:
    op: str  # op family, e.g. "attention"
    kernel: Any  # the @triton.jit function
    dtype: str  # the data dtype the configuration serves, e.g. "bfloat16"
    config: str  # what sets it apart from the op's other launches of this kernel and dtype
    args: tuple  # positional arguments, as the real launch passes them
    kwargs: dict = field(default_factory=dict)  # constexprs and num_warps / num_stages
