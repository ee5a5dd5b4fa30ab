"""`mmfast kernels-report`: the occupancy arithmetic, the --check rule, the cuobjdump parser, and
one real offline sm_90 compile end to end (a subprocess without the Triton interpreter)."""

import json
import os
import subprocess
import sys

import pytest

from mmfast import kernels_report as K


def test_blocks_per_sm_on_sm90():
    assert K.blocks_per_sm(255, 0, 128) == 2  # 8192 registers per warp x 4 warps of 65536
    assert K.blocks_per_sm(64, 0, 128) == 8
    assert K.blocks_per_sm(32, 0, 32) == 32  # the 32-block cap
    assert K.blocks_per_sm(64, 100_000, 128) == 2  # shared memory: 228 KB / (100 KB + 1 KB)
    assert K.blocks_per_sm(64, K.BLOCK_SHARED_MAX + 1, 128) == 0  # cannot launch at all


def _row(**kw):
    row = dict(op="attention", face="triton", kernel="k", dtype="float16", config="c", registers=100,
               spill_bytes=0, shared_bytes=1000, blocks_per_sm=2)
    row.update(kw)
    return row


def test_check_fails_on_half_precision_spill_and_shared_overflow_only():
    assert K.problems([_row(), _row(dtype="float32", spill_bytes=64)]) == []
    assert len(K.problems([_row(spill_bytes=8)])) == 1
    assert len(K.problems([_row(dtype="bfloat16", spill_bytes=8)])) == 1
    assert len(K.problems([_row(dtype="float32", shared_bytes=K.BLOCK_SHARED_MAX + 1)])) == 1
    assert "does not compile" in K.problems([_row(error="RuntimeError: x")])[0]


def test_cuobjdump_parser():
    text = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _Z20ce_backward_kernelIN3c108BFloat16EEvPKT_:
  REG:40 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function attn_fwd_half:
  REG:128 STACK:0 SHARED:49152 LOCAL:0 CONSTANT[0]:500 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    rows = K.parse_resource_usage(text)
    assert [r["registers"] for r in rows] == [40, 128]
    assert rows[0]["spill_bytes"] == 16 and rows[0]["config"] == "sm_90" and rows[0]["face"] == "cuda"
    assert rows[0]["op"] == "cross_entropy" and rows[1]["op"] == "attention"
    assert rows[1]["shared_bytes"] == 49152 and rows[1]["blocks_per_sm"] == 2  # 128 regs x 256 threads


def test_report_compiles_offline_for_sm90(tmp_path):
    """One configuration, really compiled (Triton's bundled ptxas), the JSON keys exactly those of
    the contract; a second run is served from the cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    cache = tmp_path / "cache.json"
    cmd = [sys.executable, "-m", "mmfast", "kernels-report", "--json", "--cache", str(cache),
           "--only", "attention _attn_bwd_delta_kernel float16 M32 D16 w4 "]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert len(rows) == 1 and list(rows[0]) == list(K.KEYS)
    row = rows[0]
    assert row["kernel"] == "_attn_bwd_delta_kernel" and row["dtype"] == "float16"
    assert 0 < row["registers"] <= 255 and row["spill_bytes"] == 0 and row["blocks_per_sm"] > 0
    assert "compiling 1 Triton" in r.stderr
    r2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert json.loads(r2.stdout) == rows and "compiling" not in r2.stderr


def test_cache_key_does_not_depend_on_where_triton_is_installed():
    """The committed cache must serve a fresh clone with its own virtual env (CI): libdevice's absolute
    path in the compile options is not part of the key; everything else is."""
    opts = lambda root: {"num_warps": 4, "extern_libs": (("libdevice", f"{root}/backends/nvidia/lib/libdevice.10.bc"),)}
    key = lambda root, **kw: K.cache_key("src", dict(opts(root), **kw), "cuda:90", "3.8.0", root)
    assert key("/a/.venv/site-packages/triton") == key("/tmp/ci/.venv/site-packages/triton")
    assert key("/a/triton") != key("/a/triton", num_warps=8)
