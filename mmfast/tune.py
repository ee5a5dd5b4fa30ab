"""Offline tuner of the Triton attention launch configs: ``MMFAST_TUNE=1 python -m mmfast.tune``.

On a GPU, for every key of the static table (dtype, head-dim block, Lq bucket, causal, dropout) it
runs attention forward+backward on a representative shape with MMFAST_TUNE=1, which makes
``mmfast.triton.attention._choose`` time each candidate config once (``triton.testing.do_bench``),
drops a candidate that fails to compile or (fp16/bf16) spills registers, and writes the winners to
``mmfast/triton_attention_configs.json`` under the GPU's architecture (e.g. "sm_90"). User calls
then read that table and never time anything (MMFAST_TUNE unset).

    MMFAST_TUNE=1 python -m mmfast.tune [--dtypes bfloat16,float16] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _representative(lqb: int) -> tuple[int, int]:
    """(Lq, Lk) for a bucket: cross-modal text -> image for short queries, ViT self-attention else."""
    return {32: (30, 197), 64: (40, 197)}.get(lqb, (197, 197))


def tune(dtypes, out: Path, batch_heads=(8, 12), progress=print) -> dict:
    import torch

    import mmfast.triton.attention as T
    from mmfast.ops.attention import attention

    if not T._autotuning():
        raise RuntimeError("mmfast.tune: set MMFAST_TUNE=1 and run on a GPU (the Triton compiler, not the interpreter)")
    arch = T._arch_of(torch.cuda.current_device())
    table = T.config_table()
    entries = dict(table.get(arch, {}))
    B, H = batch_heads
    for dtype in dtypes:
        for block_d in T.HEAD_DIM_BLOCKS:
            for lqb in T.LQ_BUCKETS:
                Lq, Lk = _representative(lqb)
                for causal in (False, True):
                    for dropout_p in (0.0, 0.1):
                        t0 = time.perf_counter()
                        q = torch.randn(B, H, Lq, block_d, device="cuda", dtype=dtype, requires_grad=True)
                        k = torch.randn(B, H, Lk, block_d, device="cuda", dtype=dtype, requires_grad=True)
                        v = torch.randn(B, H, Lk, block_d, device="cuda", dtype=dtype, requires_grad=True)
                        attention(q, k, v, causal=causal, dropout_p=dropout_p, backend="triton").sum().backward()
                        key = T.table_key(dtype, block_d, lqb, causal, dropout_p > 0)
                        entries[key] = {d: T._tuned[(d, arch, key)] for d in ("fwd", "bwd")}
                        progress(f"{arch} {key}: {entries[key]} ({time.perf_counter() - t0:.1f} s)")
    table = {**table, arch: dict(sorted(entries.items()))}
    out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def main(argv=None) -> int:
    import torch

    import mmfast.triton.attention as T

    p = argparse.ArgumentParser(prog="python -m mmfast.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="bfloat16,float16,float32")
    p.add_argument("--out", default=str(T.TABLE_PATH))
    a = p.parse_args(argv)
    if os.environ.get("MMFAST_TUNE") != "1" or not torch.cuda.is_available():
        print("mmfast.tune: needs MMFAST_TUNE=1 and a CUDA GPU (it times launch configs there)", file=sys.stderr)
        return 2
    tune([getattr(torch, d) for d in a.dtypes.split(",")], Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
