"""`mmfast kernels-report`: the occupancy arithmetic, the --check rule, the cuobjdump parser, the join
of CUDA kernels with the launch configurations the library declares, and one real offline sm_90
compile end to end (a subprocess without the Triton interpreter)."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmfast import kernels_report as K


# Hand-checked against the CUDA occupancy calculator's rules for sm_90 (cuda_occupancy.h): registers
# per warp rounded up to 256, 16384 per sub-partition (4), shared memory + 1 KB rounded up to 128 B out
# of 233472, 64 warps, 32 blocks.
@pytest.mark.parametrize("registers,shared,threads,blocks,limited_by", [
    # 255 -> 256 x 32 = 8192 per warp: 2 warps per sub-partition, 8 per SM: two blocks of 4 warps
    (255, 0, 128, 2, "registers"),
    (64, 0, 128, 8, "registers"),  # 2048 per warp: 8 per sub-partition, 32 warps
    # 136 x 32 = 4352: 3 per sub-partition (not 65536 // 4352 = 15 warps per SM): 12 one-warp blocks
    (136, 0, 32, 12, "registers"),
    # 130 -> 4160 rounds up to 4352: 3 per sub-partition, 12 warps: three blocks of 4 (FA2 forward D32)
    (130, 25_616, 128, 3, "registers"),
    # a block of 32 warps at 255 registers exceeds the register file (hardware check): cannot launch
    (255, 0, 1024, 0, "registers"),
    (64, 100_000, 128, 2, "shared memory"),  # 233472 // (101024 -> 101120)
    # 45576 + 1024 = 46600 rounds up to 46720: 4 blocks (233472 // 46600 would give 5)
    (32, 45_576, 32, 4, "shared memory"),
    (32, 115_712, 128, 2, "shared memory"),  # + 1 KB = 116736 = 228 KB / 2 exactly
    (32, 116_736, 128, 1, "shared memory"),  # the same without the reserved KB would fit twice
    (32, K.BLOCK_SHARED_MAX, 128, 1, "shared memory"),  # 227 KB: the most a block may have
    (32, K.BLOCK_SHARED_MAX + 1, 128, 0, "shared memory"),  # cannot launch at all
    (16, 0, 768, 2, "warps"),  # 24 warps: 64 // 24 (registers would allow 5)
    (32, 0, 2048, 0, "warps"),  # more than 1024 threads per block
    (32, 0, 32, 32, "blocks"),  # the 32-block cap (registers and warps would allow 64)
    (32, 0, 256, 8, "registers, warps"),  # 8 warps: both allow 8 (ties name every binding limit)
])
def test_occupancy_on_sm90(registers, shared, threads, blocks, limited_by):
    assert K.occupancy(registers, shared, threads) == (blocks, limited_by)
    assert K.blocks_per_sm(registers, shared, threads) == blocks


def _row(**kw):
    row = dict(op="attention", face="triton", kernel="k", dtype="float16", config="c", registers=100,
               spill_bytes=0, shared_bytes=1000, blocks_per_sm=2, threads=128, limited_by="registers",
               min_blocks_per_sm=None)
    row.update(kw)
    return row


def test_check_fails_on_half_precision_spill_and_shared_overflow_only():
    assert K.problems([_row(), _row(dtype="float32", spill_bytes=64)]) == []
    assert len(K.problems([_row(spill_bytes=8)])) == 1
    assert len(K.problems([_row(dtype="bfloat16", spill_bytes=8)])) == 1
    assert len(K.problems([_row(dtype="float32", shared_bytes=K.BLOCK_SHARED_MAX + 1)])) == 1
    assert "does not compile" in K.problems([_row(error="does not compile: RuntimeError: x")])[0]


def test_check_fails_on_any_cuda_spill_and_on_occupancy_below_the_declared_need():
    assert len(K.problems([_row(face="cuda", dtype="float32", spill_bytes=8)])) == 1  # any dtype on CUDA
    assert K.problems([_row(face="cuda", blocks_per_sm=2, min_blocks_per_sm=2)]) == []
    (msg,) = K.problems([_row(face="cuda", blocks_per_sm=1, min_blocks_per_sm=2, limited_by="registers")])
    assert "1 blocks per SM (limited by registers), needs 2" in msg
    assert K.problems([_row(face="cuda", blocks_per_sm=1, min_blocks_per_sm=None)]) == []  # no need declared


CUOBJDUMP = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN6mmfast12_GLOBAL__N_128cross_entropy_forward_kernelIN3c108BFloat16ELi8EEEvPKT_:
  REG:40 STACK:16 SHARED:264 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN6mmfast45_GLOBAL__N__0c1f7e2b_12_attention_cu_5c9de0a715attn_fwd_kernelI6__halfLi64EEEvNS0_6ParamsE:
  REG:170 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:500 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_cuobjdump_parser():
    rows = K.parse_resource_usage(CUOBJDUMP)
    assert [r["registers"] for r in rows] == [40, 170]
    assert rows[0]["spill_bytes"] == 16 and rows[0]["arch"] == "sm_90" and rows[0]["static_shared_bytes"] == 264
    # demangled; both sides of the join reduce to the same key
    assert K.kernel_key(rows[0]["kernel"]) == "cross_entropy_forward_kernel<BFloat16,8>"
    assert K.kernel_key(rows[1]["kernel"]) == K.kernel_key("attn_fwd_kernel<__half, 64>") == "attn_fwd_kernel<__half,64>"


def _declared(kernel, threads, smem, need=0, op="attention"):
    return dict(op=op, kernel=kernel, threads=threads, dynamic_smem_bytes=smem, min_blocks_per_sm=need)


def test_cuda_rows_use_the_declared_block_size_and_dynamic_shared_memory():
    usage = K.parse_resource_usage(CUOBJDUMP)
    declared = [_declared("cross_entropy_forward_kernel<BFloat16, 8>", 512, 0, op="cross_entropy"),
                _declared("attn_fwd_kernel<__half, 64>", 128, 44_048, need=2)]
    ce, fwd = K.join_launch_configs(usage, declared)
    assert (ce["op"], ce["dtype"], ce["threads"], ce["shared_bytes"]) == ("cross_entropy", "bfloat16", 512, 264)
    assert (ce["blocks_per_sm"], ce["limited_by"]) == (3, "registers")  # 1280 per warp: 12 per sub-partition, 48 // 16
    assert (fwd["threads"], fwd["shared_bytes"], fwd["min_blocks_per_sm"]) == (128, 44_048, 2)
    assert (fwd["blocks_per_sm"], fwd["limited_by"]) == (2, "registers")  # 170 -> 5632 per warp: 2 per sub-partition
    assert K.problems([fwd]) == []
    # the same kernel declared with 3 x the shared memory: one block per SM, below its need
    (fat,) = K.join_launch_configs(usage[1:], [_declared("attn_fwd_kernel<__half, 64>", 128, 3 * 44_048, need=2)])
    assert (fat["blocks_per_sm"], fat["limited_by"]) == (1, "shared memory") and len(K.problems([fat])) == 1


def test_cuda_kernel_without_declared_launch_configuration_is_an_error():
    usage = K.parse_resource_usage(CUOBJDUMP)
    rows = K.join_launch_configs(usage, [_declared("attn_fwd_kernel<__half, 64>", 128, 44_048, need=2)])
    (undeclared,) = [r for r in rows if "error" in r]
    assert "cross_entropy_forward_kernel" in undeclared["kernel"] and "no launch configuration" in undeclared["error"]
    assert len(K.problems(rows)) == 1
    # a declaration whose kernel is not in the library (a typo, a removed instantiation): an error too
    rows = K.join_launch_configs(usage[1:], [_declared("attn_fwd_kernel<__half, 64>", 128, 44_048),
                                             _declared("attn_fwd_kernel<__half, 80>", 128, 56_336)])
    (stale,) = [r for r in rows if "error" in r]
    assert stale["kernel"] == "attn_fwd_kernel<__half, 80>" and "no such kernel" in stale["error"]


def _built_cuda_library():
    import mmfast

    libs = glob.glob(str(Path(mmfast.__file__).parent / "_C_cuda*.so"))
    if not libs:
        pytest.skip("mmfast._C_cuda is not built (MMFAST_BUILD_CUDA=1)")
    return libs[0]


def test_built_library_declares_every_kernel_it_holds():
    """The real table (ctypes, no GPU) against the real binary: no kernel without a configuration,
    and the attention forward and backward at every head dim declare the 2 blocks per SM they are
    built for."""
    lib = _built_cuda_library()
    declared = K.launch_configs(lib)
    rows = K.cuda_rows(lib)
    assert rows and not [r for r in rows if "error" in r]
    assert {K.kernel_key(d["kernel"]) for d in declared} == {K.kernel_key(r["kernel"]) for r in rows}
    for d in declared:
        assert d["threads"] > 0 and d["dynamic_smem_bytes"] >= 0, d
    needs = {r["kernel"]: r["min_blocks_per_sm"] for r in rows if r["op"] == "attention"}
    for dtype in ("__half", "__nv_bfloat16"):
        for D in (64, 128):
            assert needs[f"attn_fwd_kernel<{dtype}, {D}>"] == needs[f"attn_bwd_kernel<{dtype}, {D}>"] == 2


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
