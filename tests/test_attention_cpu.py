"""The CPU attention face in detail: its two kernels (mmfast's C++ kernel csrc/cpu/attention.cpp;
ATen's CPU flash kernels with mmfast's masks when the extension is not built), which one runs when,
both by the correctness rule (tests/test_attention.py covers the face through the C++ kernel), the
C++ kernel in every dtype, its dropout mask against the Philox reference, its argument errors, and
the zoo's eager fast path."""

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmfast import _extension, testing
from mmfast import reference as R
from mmfast.reference.attention import attention_mask
from mmfast.reference.dropout import keep_mask

A = importlib.import_module("mmfast.ops.attention")  # the module (mmfast.ops.attention is the function)

needs_cpp = pytest.mark.skipif(not _extension.has_kernel("attention_forward", "CPU"),
                               reason="mmfast._C built without the C++ CPU attention kernel")


def make_inputs(B, H, Lq, Lk, D, dtype, mask=False, noncontig=False, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(L):
        if noncontig:  # (B, L, H, D) memory, as the projections produce it
            return torch.randn(B, L, H, D, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(B, H, L, D, generator=gen).to(dtype)

    q, k, v = rnd(Lq), rnd(Lk), rnd(Lk)
    m = None
    if mask:
        m = torch.rand(B, Lk, generator=gen) > 0.3
        m[0, 0] = True
        if B > 1:
            m[-1] = False  # every key of the last batch row padded: zeros, zero gradients
    return q, k, v, m


class OpsSeen(TorchDispatchMode):
    """Records the names of the ATen / extension ops that run (to prove which kernel ran)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def _cpp_forced(monkeypatch):
    monkeypatch.setattr(A, "_needs_own_kernel", lambda q, k, dropout_p: True)


# ---------------------------------------------------------------------------------------------
# Which kernel runs

# (the face functions are called directly: a dispatch mode sees the custom op as one opaque call)
@needs_cpp
def test_no_dropout_runs_the_cpp_kernel():
    q, k, v, m = make_inputs(2, 2, 7, 19, 32, torch.float32, mask=True)
    with OpsSeen() as seen:
        A.cpu_forward(q, k, v, m, None, False, 0.2, 0.0)
    assert "mmfast_C::attention_forward" in seen.names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in seen.names


def test_without_the_extension_no_dropout_runs_atens_flash_kernel(monkeypatch):
    monkeypatch.setattr(A, "_use_cpp", lambda q, k, dropout_p: False)
    q, k, v, m = make_inputs(2, 2, 7, 19, 32, torch.float32, mask=True)
    with OpsSeen() as seen:
        A.cpu_forward(q, k, v, m, None, False, 0.2, 0.0)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in seen.names
    assert "mmfast_C::attention_forward" not in seen.names


@needs_cpp
@pytest.mark.parametrize("case", ["dropout", "float64", "one key"])
def test_own_kernel_cases_run_the_cpp_kernel(case):
    dtype = torch.float64 if case == "float64" else torch.float32
    q, k, v, m = make_inputs(2, 2, 7, 1 if case == "one key" else 19, 32, dtype, mask=True)
    p = 0.3 if case == "dropout" else 0.0
    with OpsSeen() as seen:
        A.cpu_forward(q, k, v, m, torch.tensor([5]) if p else None, False, 0.2, p)
    assert "mmfast_C::attention_forward" in seen.names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in seen.names


# ---------------------------------------------------------------------------------------------
# The C++ kernel by the rule, every dtype (forced for cases ATen would otherwise take)

CPP_CASES = [  # B, H, Lq, Lk, D, mask, causal, noncontig
    (2, 2, 1, 1, 32, False, False, False),
    (2, 2, 7, 197, 64, True, False, True),
    (2, 1, 197, 40, 80, True, True, False),   # Lq > Lk causal: rows without keys
    (1, 2, 113, 203, 32, False, True, True),
    (2, 2, 40, 40, 128, True, True, False),
    (1, 1, 577, 577, 64, True, False, False),
]


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,Lq,Lk,D,mask,causal,noncontig", CPP_CASES)
def test_cpp_kernel_rule(monkeypatch, dtype, B, H, Lq, Lk, D, mask, causal, noncontig):
    if dtype != torch.float32 and Lq * Lk > 100_000:
        pytest.skip("one long case per half dtype is enough: (113, 203)")
    _cpp_forced(monkeypatch)
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, dtype, mask, noncontig)
    testing.check_op(
        lambda q, k, v, m: A.attention(q, k, v, key_padding_mask=m, causal=causal, backend="cpu"),
        lambda q, k, v, m: R.attention(q, k, v, key_padding_mask=m, causal=causal),
        [q, k, v, m], grad_inputs=[0, 1, 2], name=f"cpp {B}x{H} {Lq}x{Lk} D{D} {dtype} mask={mask} causal={causal}",
        face=("attention", "cpu"), reduction=(max(Lq, Lk), D))


ATEN_CASES = [  # B, H, Lq, Lk, D, mask, causal: the masks ATen's kernels get from mmfast
    (2, 2, 7, 197, 64, True, False),
    (2, 1, 197, 40, 80, True, True),  # Lq > Lk causal (bottom-right): rows without keys
    (1, 2, 113, 113, 32, False, True),
]


@pytest.mark.parametrize("B,H,Lq,Lk,D,mask,causal", ATEN_CASES)
def test_aten_fallback_rule(monkeypatch, B, H, Lq, Lk, D, mask, causal):
    monkeypatch.setattr(A, "_use_cpp", lambda q, k, dropout_p: False)
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, torch.float32, mask)
    testing.check_op(
        lambda q, k, v, m: A.attention(q, k, v, key_padding_mask=m, causal=causal, backend="cpu"),
        lambda q, k, v, m: R.attention(q, k, v, key_padding_mask=m, causal=causal),
        [q, k, v, m], grad_inputs=[0, 1, 2], name=f"aten {B}x{H} {Lq}x{Lk} D{D} mask={mask} causal={causal}",
        face=("attention", "cpu"), reduction=(max(Lq, Lk), D))


@needs_cpp
def test_cpp_kernel_gradcheck_float64():
    q, k, v, m = make_inputs(1, 2, 5, 7, 8, torch.float64, mask=True)
    m[0, :2] = True
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, v: A.attention(q, k, v, key_padding_mask=m, causal=causal, dropout_p=0.0, backend="cpu"),
            (q, k, v))


# ---------------------------------------------------------------------------------------------
# Dropout: the Philox mask of the shared contract, and a backward consistent with it

@needs_cpp
@pytest.mark.parametrize("causal", [False, True])
def test_cpp_dropout_mask_is_the_philox_reference(causal):
    B, H, Lq, Lk, p = 2, 3, 40, 67, 0.2
    q, k, _, m = make_inputs(B, H, Lq, Lk, Lk, torch.float32, mask=True)  # D = Lk: v can be the identity
    m[-1, :3] = True
    eye = torch.eye(Lk).expand(B, H, Lk, Lk).contiguous()  # v = I: the output is the dropped probabilities
    seed = torch.tensor([0x1234_5678_9ABC], dtype=torch.int64)
    out, _ = A.cpu_forward(q, k, eye, m, seed, causal, Lk ** -0.5, p)
    vis = attention_mask(m, causal, Lq, Lk, "cpu").expand(B, H, Lq, Lk)
    expected = keep_mask(int(seed), B, H, Lq, Lk, p) & vis
    assert torch.equal(out != 0, expected)
    probs = R.attention(q, k, eye, key_padding_mask=m, causal=causal, scale=Lk ** -0.5)
    torch.testing.assert_close(out, probs * expected / (1 - p))


@needs_cpp
def test_cpp_dropout_backward_matches_its_mask():
    B, H, Lq, Lk, D, p = 2, 2, 9, 21, 16, 0.3
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, torch.float32, mask=True)
    seed = 77
    keep = keep_mask(seed, B, H, Lq, Lk, p)

    def fn(q, k, v, m):
        return A._EagerAttention.apply(q, k, v, m, torch.tensor([seed]), False, D ** -0.5, p, "cpu")

    def ref(q, k, v, m):
        e = torch.eye(Lk, dtype=q.dtype).expand(B, H, Lk, Lk)
        probs = R.attention(q, k, e, key_padding_mask=m)
        return (probs * keep.to(q.dtype) / (1 - p)) @ v

    testing.check_op(fn, ref, [q, k, v, m], grad_inputs=[0, 1, 2], name="cpp dropout", face=("attention", "cpu"),
                     reduction=(max(q.shape[2], k.shape[2]), q.shape[3]))


# ---------------------------------------------------------------------------------------------
# Argument errors of the C++ op (called directly: the public API checks first)

@needs_cpp
@pytest.mark.parametrize("change,pattern", [
    (dict(k=torch.randn(2, 3, 9, 16)), "argument 'k'"),
    (dict(v=torch.randn(2, 2, 8, 16)), "argument 'v'"),
    (dict(q=torch.randn(2, 2, 5)), "argument 'q'"),
    (dict(key_padding_mask=torch.ones(2, 9)), "argument 'key_padding_mask'"),
    (dict(dropout_p=1.0), "argument 'dropout_p'"),
    (dict(dropout_p=0.5), "argument 'seed'"),
])
def test_cpp_bad_arguments_name_the_argument(change, pattern):
    args = dict(q=torch.randn(2, 2, 5, 16), k=torch.randn(2, 2, 9, 16), v=torch.randn(2, 2, 9, 16),
                key_padding_mask=None, seed=None, causal=False, scale=0.25, dropout_p=0.0)
    args.update(change)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.mmfast_C.attention_forward(*args.values())


# ---------------------------------------------------------------------------------------------
# The zoo calls the face without the custom-op dispatch in eager mode

def test_zoo_eager_path_skips_the_custom_op():
    from mmfast.models.kernels import Kernels

    q, k, v, m = make_inputs(2, 2, 7, 7, 32, torch.float32, mask=True)
    with OpsSeen() as seen:
        Kernels(fused=True).attention(q, k, v, m)
    assert "mmfast_C::attention_forward" in seen.names
    assert "mmfast::attention_forward" not in seen.names
    with OpsSeen() as seen:
        Kernels(fused=True, backend="torch").attention(q, k, v, m)  # another face: through the public op
    assert "mmfast_C::attention_forward" not in seen.names
