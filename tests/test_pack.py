"""mmfast.data.pack: padded <-> packed round trips (right, left and scattered padding, empty rows),
cu_seqlens, gradients, argument errors, and packed attention_varlen == padded attention on valid rows."""

import pytest
import torch

import mmfast
from mmfast.data.pack import cu_seqlens_from_lengths, pack, pack_sequences, unpack


def _masks(B=4, L=7):
    lengths = torch.tensor([7, 0, 3, 1])
    right = torch.arange(L)[None, :] < lengths[:, None]
    left = right.flip(1)
    scattered = torch.rand(B, L, generator=torch.Generator().manual_seed(3)) < 0.5
    return {"right": right, "left": left, "scattered": scattered, "none_valid": torch.zeros(B, L, dtype=torch.bool)}


@pytest.mark.parametrize("kind", ["right", "left", "scattered", "none_valid"])
@pytest.mark.parametrize("trailing", [(), (3, 5)])
def test_round_trip(kind, trailing):
    mask = _masks()[kind]
    x = torch.randn(4, 7, *trailing)
    p = pack(x, mask.to(torch.int64))  # 0/1 ints are accepted as well as bool
    lengths = mask.sum(1)
    assert p.cu_seqlens.dtype == torch.int32
    assert p.cu_seqlens.tolist() == [0] + lengths.cumsum(0).tolist()
    assert p.max_seqlen == int(lengths.max())
    assert p.values.shape == (int(mask.sum()), *trailing)
    for b in range(4):  # each sequence's rows, in order
        torch.testing.assert_close(p.values[p.cu_seqlens[b]:p.cu_seqlens[b + 1]], x[b][mask[b]], rtol=0, atol=0)
    back = unpack(p.values, p.indices, 4, 7, pad_value=-1.0)
    torch.testing.assert_close(back, torch.where(mask.reshape(4, 7, *[1] * len(trailing)), x, -1.0), rtol=0, atol=0)


def test_integer_token_ids_and_pack_sequences_agree():
    seqs = [torch.tensor([5, 6, 7]), torch.tensor([], dtype=torch.int64), torch.tensor([9])]
    direct = pack_sequences(seqs)
    padded = unpack(direct.values, direct.indices, 3, direct.max_seqlen, pad_value=0)
    assert padded.tolist() == [[5, 6, 7], [0, 0, 0], [9, 0, 0]]
    via_padding = pack(padded, torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0]]))
    for a, b in zip(direct, via_padding):
        assert a == b if isinstance(a, int) else torch.equal(a, b)


def test_gradients_flow_both_ways():
    mask = _masks()["scattered"]
    x = torch.randn(4, 7, 3, dtype=torch.float64, requires_grad=True)
    p = pack(x, mask)
    torch.autograd.gradcheck(lambda x: pack(x, mask).values, (x,))
    vals = p.values.detach().requires_grad_(True)
    torch.autograd.gradcheck(lambda v: unpack(v, p.indices, 4, 7), (vals,))


def test_cu_seqlens_from_lengths():
    assert cu_seqlens_from_lengths([2, 0, 5]).tolist() == [0, 2, 2, 7]
    assert cu_seqlens_from_lengths([2, 0, 5]).dtype == torch.int32
    with pytest.raises(ValueError, match="argument 'lengths'"):
        cu_seqlens_from_lengths([2, -1])


def test_errors_name_the_argument():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="argument 'attention_mask' must have shape"):
        pack(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="argument 'attention_mask' must be bool or hold only 0 and 1"):
        pack(x, torch.full((2, 3), 2))
    with pytest.raises(ValueError, match="argument 'padded'"):
        pack(torch.randn(3), torch.ones(3, dtype=torch.bool))
    p = pack(x, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="argument 'indices' must lie in"):
        unpack(p.values, p.indices, 1, 3)
    with pytest.raises(ValueError, match="argument 'indices' must be 1-D"):
        unpack(p.values, p.indices[:-1], 2, 3)


@pytest.mark.parametrize("kind", ["right", "left"])
def test_packed_attention_equals_padded_attention_on_valid_rows(kind):
    """pack -> attention_varlen -> unpack equals mmfast.ops.attention with key_padding_mask on the valid
    query rows (float64, torch faces: the layouts, not the kernels, are under test here)."""
    mask = _masks()[kind]
    q, k, v = (torch.randn(4, 7, 2, 8, dtype=torch.float64) for _ in range(3))  # (B, L, H, D)
    pq, pk, pv = (pack(t, mask) for t in (q, k, v))
    out = mmfast.ops.attention_varlen(pq.values, pk.values, pv.values, pq.cu_seqlens, pk.cu_seqlens,
                                      pq.max_seqlen, pk.max_seqlen, backend="cpu")
    padded_out = unpack(out, pq.indices, 4, 7)
    ref = mmfast.ops.attention(*(t.transpose(1, 2) for t in (q, k, v)), key_padding_mask=mask,
                               backend="torch").transpose(1, 2)
    torch.testing.assert_close(padded_out[mask], ref[mask])
    assert torch.equal(padded_out[~mask], torch.zeros_like(padded_out[~mask]))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_concat_embed_packed_equals_per_sample_concat_embed(backend):
    """Each packed fused sequence equals concat_embed of that sample alone (its text of its own
    length, then its image tokens), and cu_seqlens = text length + image tokens."""
    from mmfast.data.pack import concat_embed_packed
    from mmfast.reference.concat_embed import concat_embed as ref_concat_embed  # takes a 0-token text

    D, L_img, lens = 16, 3, [5, 0, 2, 7]
    text = torch.randn(sum(lens), D, dtype=torch.float64)
    image = torch.randn(len(lens), L_img, D, dtype=torch.float64)
    kw = dict(type_embeddings=torch.randn(2, D, dtype=torch.float64),
              pos_embeddings=[torch.randn(9, D, dtype=torch.float64), torch.randn(L_img, D, dtype=torch.float64)],
              ln_weight=torch.randn(D, dtype=torch.float64), ln_bias=torch.randn(D, dtype=torch.float64))
    cu = cu_seqlens_from_lengths(lens)
    got = concat_embed_packed(text, cu, image, backend=backend, **kw)
    assert got.cu_seqlens.tolist() == cu_seqlens_from_lengths([n + L_img for n in lens]).tolist()
    assert got.max_seqlen == max(lens) + L_img
    for b in range(len(lens)):
        alone, _ = ref_concat_embed([text[cu[b]:cu[b + 1]][None], image[b:b + 1]], **kw)
        torch.testing.assert_close(got.values[got.cu_seqlens[b]:got.cu_seqlens[b + 1]], alone[0])
    no_text = concat_embed_packed(text[:0], cu_seqlens_from_lengths([0, 0, 0, 0]), image, backend=backend, **kw)
    torch.testing.assert_close(no_text.values, ref_concat_embed([text[:0].reshape(4, 0, D), image], **kw)[0].reshape(-1, D))
    with pytest.raises(ValueError, match="argument 'text_cu_seqlens' must start at 0"):
        concat_embed_packed(text, cu_seqlens_from_lengths([5, 0, 2, 6]), image, **kw)
    with pytest.raises(ValueError, match="argument 'text_cu_seqlens' must be int32"):
        concat_embed_packed(text, cu.long(), image, **kw)


# ---------------------------------------------------------------------------------------------
# The collate option: collate(items, packed=True), pack_batch / unpack_batch

def _items(lengths=(1, 7, 40, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(104, 1000, (n,), generator=g),
             "labels": torch.randint(0, 7, (n,), generator=g),  # per token (NER-style)
             "mlm_labels": torch.randint(-100, 7, (n,), generator=g).clamp(min=-100),
             "pixel_values": torch.randn(3, 32, 32, generator=g)} for n in lengths]


def test_collate_packed_is_pack_batch_of_the_padded_batch_and_back():
    from mmfast.data import collate, pack_batch, unpack_batch

    items = _items()
    padded = collate(items)
    packed = collate(items, packed=True)
    assert set(packed) == {"input_ids", "labels", "mlm_labels", "pixel_values", "cu_seqlens", "max_seqlen"}
    assert padded["mlm_labels"].shape == padded["input_ids"].shape and (padded["mlm_labels"][0, 1:] == -100).all()
    assert packed["cu_seqlens"].dtype == torch.int32 and packed["cu_seqlens"].tolist() == [0, 1, 8, 48, 51]
    assert packed["max_seqlen"] == 40
    assert torch.equal(packed["input_ids"], torch.cat([it["input_ids"] for it in items]))
    assert torch.equal(packed["labels"], torch.cat([it["labels"] for it in items]))
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])
    again = pack_batch(padded)
    assert all(torch.equal(again[k], v) if isinstance(v, torch.Tensor) else again[k] == v for k, v in packed.items())
    back = unpack_batch(packed)
    assert set(back) == set(padded)
    for k, v in padded.items():
        assert torch.equal(back[k], v), k


def test_collate_packed_feeds_a_packed_model_like_the_padded_batch():
    import mmfast.models as mm
    from mmfast.data import collate

    torch.manual_seed(0)
    model = mm.create_model("cross_attention_tiny", task="mlm", packed=True)
    items = _items((5, 1, 9))
    for it in items:
        del it["mlm_labels"]
        it["input_ids"][0] = model.cfg.cls_token_id
        it["labels"] = torch.where(torch.arange(len(it["labels"])) % 2 == 1, it["input_ids"], -100)
    with torch.no_grad():
        a = model(**collate(items)).loss
        b = model(**collate(items, packed=True)).loss
    assert torch.isfinite(a) and torch.equal(a, b)


def test_pack_batch_errors_name_the_argument():
    from mmfast.data import collate, pack_batch, unpack_batch

    with pytest.raises(ValueError, match="argument 'batch' must hold 'input_ids' and 'attention_mask'"):
        pack_batch({"input_ids": torch.zeros(2, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="argument 'attention_mask' must be bool or hold only 0 and 1"):
        pack_batch({"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.full((2, 3), 2)})
    with pytest.raises(ValueError, match="int32 'cu_seqlens'"):
        unpack_batch({"input_ids": torch.zeros(3, dtype=torch.long), "cu_seqlens": torch.tensor([0, 3])})
    with pytest.raises(TypeError, match="argument 'packed' must be a bool"):
        collate(_items(), packed="yes")
    ones = collate([{"input_ids": torch.tensor([5]), "labels": torch.tensor(1)}] * 2, packed=True)
    with pytest.raises(ValueError, match="argument 'token_keys'"):
        unpack_batch(ones)
    assert unpack_batch(ones, token_keys=["input_ids"])["labels"].tolist() == [1, 1]
