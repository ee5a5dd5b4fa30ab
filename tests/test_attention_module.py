"""mmfast.nn.MultiheadCrossAttention against an independent eager twin: torch.nn.MultiheadAttention
loaded with the same weights (kdim/vdim for cross-modal widths; its key_padding_mask is True =
ignore, the opposite of mmfast's)."""

import pytest
import torch
from torch import nn

import mmfast
from mmfast.nn import MultiheadCrossAttention


def twin_of(mod: MultiheadCrossAttention) -> nn.MultiheadAttention:
    t = nn.MultiheadAttention(mod.hidden_size, mod.num_heads, dropout=0.0, batch_first=True,
                              kdim=mod.kv_hidden_size, vdim=mod.kv_hidden_size)
    with torch.no_grad():
        if t._qkv_same_embed_dim:
            t.in_proj_weight.copy_(torch.cat([mod.q_proj.weight, mod.k_proj.weight, mod.v_proj.weight]))
        else:
            t.q_proj_weight.copy_(mod.q_proj.weight)
            t.k_proj_weight.copy_(mod.k_proj.weight)
            t.v_proj_weight.copy_(mod.v_proj.weight)
        t.in_proj_bias.copy_(torch.cat([mod.q_proj.bias, mod.k_proj.bias, mod.v_proj.bias]))
        t.out_proj.weight.copy_(mod.out_proj.weight)
        t.out_proj.bias.copy_(mod.out_proj.bias)
    return t


def _backends():
    return ["cpu", "torch"] + (["triton"] if not torch.cuda.is_available() else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("cross", [False, True])
def test_matches_torch_multihead_attention(backend, cross):
    torch.manual_seed(0)
    B, Lq, Lk, hidden, kv_hidden, heads = 2, 7, 19 if cross else 7, 64, 96 if cross else 64, 2
    mod = MultiheadCrossAttention(hidden, heads, kv_hidden_size=kv_hidden if cross else None, backend=backend)
    twin = twin_of(mod)
    x = torch.randn(B, Lq, hidden, requires_grad=True)
    enc = torch.randn(B, Lk, kv_hidden, requires_grad=True) if cross else None
    mask = torch.rand(B, Lk) > 0.3
    mask[:, 0] = True  # nn.MultiheadAttention gives NaN for rows without keys: keep one
    causal = not cross
    out = mod(x, enc, key_padding_mask=mask, causal=causal)
    kv = x if enc is None else enc
    attn_mask = torch.ones(Lq, Lk, dtype=torch.bool).triu(1) if causal else None  # True = masked
    ref, _ = twin(x, kv, kv, key_padding_mask=~mask, attn_mask=attn_mask, need_weights=False)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    up = torch.randn_like(out)
    inputs = [x] + ([enc] if cross else [])
    g = torch.autograd.grad(out, inputs + [mod.q_proj.weight, mod.k_proj.weight, mod.out_proj.bias], up)
    w_in = twin.in_proj_weight if twin._qkv_same_embed_dim else None
    gr = torch.autograd.grad(ref, inputs + ([w_in] if w_in is not None else [twin.q_proj_weight, twin.k_proj_weight])
                             + [twin.out_proj.bias], up)
    if w_in is not None:  # the twin packs q/k/v weights: split its gradient
        gq, gk, _ = gr[len(inputs)].split(hidden)
        gr = list(gr[:len(inputs)]) + [gq, gk, gr[-1]]
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dropout_only_in_training_and_reproducible():
    torch.manual_seed(0)
    mod = MultiheadCrossAttention(64, 4, dropout=0.3, backend="cpu")
    x = torch.randn(2, 9, 64)
    mod.eval()
    assert torch.equal(mod(x), mod(x))
    mod.train()
    torch.manual_seed(5)
    a = mod(x)
    torch.manual_seed(5)
    b = mod(x)
    assert torch.equal(a, b)
    mod.eval()
    assert not torch.equal(a, mod(x))


def test_fully_masked_query_gets_only_the_output_bias():
    mod = MultiheadCrossAttention(32, 2, kv_hidden_size=48, backend="cpu")
    x, enc = torch.randn(2, 5, 32), torch.randn(2, 11, 48)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1] = False
    out = mod(x, enc, key_padding_mask=mask)
    torch.testing.assert_close(out[1], mod.out_proj.bias.expand(5, 32))
    assert torch.isfinite(out).all()


def test_constructor_and_forward_errors():
    with pytest.raises(ValueError, match="'hidden_size'"):
        MultiheadCrossAttention(100, 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        MultiheadCrossAttention(36, 3)
    with pytest.raises(ValueError, match="'dropout'"):
        MultiheadCrossAttention(64, 2, dropout=1.5)
    mod = MultiheadCrossAttention(64, 2, kv_hidden_size=32, backend="cpu")
    with pytest.raises(ValueError, match="'encoder_hidden_states'"):
        mod(torch.randn(2, 3, 64), torch.randn(2, 5, 64))
    with pytest.raises(ValueError, match="'hidden_states'"):
        mod(torch.randn(2, 3, 32), torch.randn(2, 5, 32))


def test_exported_from_mmfast_nn():
    assert mmfast.nn.MultiheadCrossAttention is MultiheadCrossAttention


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_bf16_matches_fp32_twin(backend):
    torch.manual_seed(0)
    mod = MultiheadCrossAttention(768, 12, kv_hidden_size=768, backend=backend).cuda()
    twin = twin_of(mod).cuda()
    x, enc = torch.randn(4, 40, 768, device="cuda"), torch.randn(4, 197, 768, device="cuda")
    mask = torch.rand(4, 197, device="cuda") > 0.3
    mask[:, 0] = True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = mod(x, enc, key_padding_mask=mask)
    ref, _ = twin(x, enc, enc, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
