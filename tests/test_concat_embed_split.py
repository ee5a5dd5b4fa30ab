"""concat_embed backward fills the GPU (issue #16 item 5): the Triton face splits positions, then
batch rows, until the grid has two programs per SM; the split backward still meets the rule and
its two-stage parameter reduction is bit-for-bit reproducible. Under the interpreter the split is
forced by pretending the machine has many SMs. Also: every Triton launch goes through the device
guard (item 6)."""

import importlib

import pytest
import torch
import triton

from mmfast.ops import concat_embed
from test_concat_embed import make_case, run_rule

tce = importlib.import_module("mmfast.triton.concat_embed")


@pytest.mark.parametrize("B", [8, 16, 64, 256])
@pytest.mark.parametrize("L", [40, 197, 577])
@pytest.mark.parametrize("D", [384, 768, 1024])
def test_split_gives_every_h100_sm_two_programs_and_no_more_than_needed(B, L, D):
    _, lt_max, _ = tce._bwd_launch_cfg(D)
    lt, bb = tce._bwd_split(B, L, lt_max, 132)
    programs = lambda lt, bb: triton.cdiv(L, lt) * triton.cdiv(B, bb)
    assert programs(lt, bb) >= 2 * 132, (lt, bb)
    assert 1 <= bb <= 32 and 1 <= lt <= lt_max
    if bb < 32:  # the batch was split: one step coarser would not have been enough
        assert programs(lt, 2 * bb) < 2 * 132


def test_split_stops_at_one_row_per_program():
    assert tce._bwd_split(2, 3, 4, 132) == (1, 1)  # 6 programs: as many as there are rows


def test_backward_tiles_stay_within_128_registers_worth_of_values():
    """<= 1024 float32 values per accumulator tile and <= 8 per thread (sm_90 compiles of these
    shapes: 48-128 registers, no spills; see the module docstring)."""
    for D in (16, 64, 100, 384, 768, 1024, 1500, 4096):
        block, lt_max, warps = tce._bwd_launch_cfg(D)
        assert block >= D and lt_max * block <= max(1024, block)
        assert lt_max * block // (32 * warps) <= 8


@pytest.fixture
def many_sms(monkeypatch):
    """The interpreter's grid sized as for a 64-SM GPU; records each modality's (lt, bb)."""
    splits = []
    real = tce._bwd_split

    def spy(B, L, lt_max, sms):
        splits.append((B, real(B, L, lt_max, sms)))
        return splits[-1][1]

    monkeypatch.setattr(tce, "_INTERPRETER_SMS", 64)
    monkeypatch.setattr(tce, "_bwd_split", spy)
    return splits


def test_split_backward_meets_the_rule(many_sms):
    run_rule("triton", (2, (7, 13), 48, "tPlb", 9), torch.float32)
    assert len(many_sms) == 2 and all(bb < B for B, (lt, bb) in many_sms), many_sms  # the batch was split


def _grads(flat, unpack, dropout_p, seed=0):
    flat = [t.detach().clone().requires_grad_() for t in flat]
    fs, te, ps, w, b = unpack(flat)
    torch.manual_seed(seed)
    out = concat_embed(fs, type_embeddings=te, pos_embeddings=ps, ln_weight=w, ln_bias=b, dropout_p=dropout_p,
                       backend="triton")[0]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad(out, flat, g)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_split_backward_is_bitwise_reproducible_and_matches_the_unsplit_one(monkeypatch, many_sms, dropout_p):
    flat, unpack = make_case(2, (5, 11), 40, "tPlb", 12, torch.float32)
    runs = [_grads(flat, unpack, dropout_p) for _ in range(3)]
    assert all(bb < 12 for _, (_, bb) in many_sms)
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c)
    monkeypatch.setattr(tce, "_INTERPRETER_SMS", 1)  # one program per 32 batch rows
    unsplit = _grads(flat, unpack, dropout_p)
    assert many_sms[-1][1][1] == 32
    for a, c in zip(runs[0], unsplit):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)  # only the summation order differs


def test_every_triton_launch_goes_through_the_device_guard(monkeypatch):
    entered = []
    real = tce._device_guard

    def spy(t):
        entered.append(t.device)
        return real(t)

    monkeypatch.setattr(tce, "_device_guard", spy)
    flat, unpack = make_case(2, (3, 4), 16, "tPl", 2, torch.float32)
    _grads(flat, unpack, 0.0)
    assert len(entered) == 1 + 2  # the forward's launches, then each modality's backward launch


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_split_backward_meets_the_rule_and_is_bitwise_reproducible(backend):
    """B = 8 at BERT+ViT lengths: the split grid (two blocks per SM) on a real GPU."""
    case = (2, (40, 197), 768, "tplb", 8)
    run_rule(backend, case, torch.bfloat16, "cuda")
    flat, unpack = make_case(*case, torch.bfloat16, "cuda")
    fs, te, ps, w, b = unpack(flat)
    runs = []
    for _ in range(2):
        ins = [t.detach().clone().requires_grad_() for t in flat]
        fs, te, ps, w, b = unpack(ins)
        torch.manual_seed(0)
        out = concat_embed(fs, type_embeddings=te, pos_embeddings=ps, ln_weight=w, ln_bias=b, dropout_p=0.1,
                           backend=backend)[0]
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        runs.append(torch.autograd.grad(out, ins, g))
    for a, c in zip(*runs):
        assert torch.equal(a, c)
