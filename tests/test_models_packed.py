"""The zoo run packed (``create_model(..., packed=True)``): every architecture and task gives the
padded model's outputs on the valid tokens and its gradients (the rule: packed fused float32 vs the
padded eager twin in float64, the padded eager twin in float32 as the baseline); skewed lengths
(1 ... 40) packed vs padded at float64; the packed model provably runs attention_varlen and no
padded attention over text; packed inputs (cu_seqlens) equal padded ones; bad input errors."""

import copy

import pytest
import torch

import mmfast.models as mm
from mmfast import testing
from mmfast.models.kernels import Kernels
from mmfast.models.registry import _classes
from mmfast.testing import assert_close, finite_magnitude

from test_models import _model_reduction, _run  # the zoo's own parity helpers

CASES = [(arch, task) for arch, cls in _classes().items() for task in cls.tasks]
DEFAULT_TASK = {arch: cls.default_task for arch, cls in _classes().items()}
SKEWED = [1, 7, 40, 13]  # one sample is [CLS] alone; 40 is far beyond the others


def _models(arch, task, backend="auto", **overrides):
    """(packed fused, padded eager twin) with the same weights."""
    torch.manual_seed(0)
    packed = mm.create_model(f"{arch}_tiny", task=task, packed=True, backend=backend, **overrides)
    padded = mm.create_model(f"{arch}_tiny", task=task, fused=False, **overrides)
    padded.load_state_dict(packed.state_dict())
    return packed, padded


def skewed_inputs(model, lengths, seed=0) -> dict:
    """A right-padded batch with the given text lengths ([CLS] words [SEP]; a 1-token sample is
    [CLS]) and the task's labels, only ever on real tokens (a label on padding would count in the
    padded loss but not in the packed one)."""
    c, g = model.cfg, torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    n = torch.tensor(lengths)
    pos = torch.arange(L)[None, :]
    mask = pos < n[:, None]
    ids = torch.randint(c.mask_token_id + 1, c.vocab_size, (B, L), generator=g)
    ids[:, 0] = c.cls_token_id
    ids[(pos == n[:, None] - 1) & (n[:, None] > 1)] = c.sep_token_id
    ids = ids.masked_fill(~mask, c.pad_token_id)
    inputs = {"input_ids": ids, "attention_mask": mask.long(),
              "pixel_values": torch.randn(B, 3, c.img_size, c.img_size, generator=g)}
    words = mask & (ids != c.cls_token_id) & (ids != c.sep_token_id)
    picked = words & (torch.rand(B, L, generator=g) < 0.3)
    picked[:, 1] |= words[:, 1]  # every sample with a word has a masked one
    mlm = ids.masked_fill(~picked, -100)
    if model.task == "mlm":
        inputs["input_ids"], inputs["labels"] = ids.masked_fill(picked, c.mask_token_id), mlm
    elif model.task == "pretrain" and getattr(model, "mlm_head", None) is not None:
        inputs["mlm_labels"] = mlm
    elif model.task == "itm":
        inputs["labels"] = torch.randint(0, 2, (B,), generator=g)
    elif model.task in ("vqa", "classification"):
        inputs["labels"] = torch.randint(0, model.num_labels, (B,), generator=g)
    elif model.task == "caption":
        inputs["labels"] = ids.masked_fill(~mask, -100)
    return inputs


def _valid_rows(model, name, padded_out, inputs):
    """Rows of a padded token-level output that the packed model returns (in the same order)."""
    mask = inputs["attention_mask"].bool()
    if padded_out.dim() < 3:
        return padded_out  # per-sample outputs keep their shape
    if model.arch == "single_stream":  # the merged sequence: text, then every image token
        image = torch.ones(mask.shape[0], padded_out.shape[1] - mask.shape[1], dtype=torch.bool)
        mask = torch.cat([mask, image], 1)
    return padded_out[mask]


def _tokens(model, inputs) -> int:
    return int(inputs["attention_mask"].sum()) + inputs["pixel_values"].shape[0] * (
        model.vision_encoder.patch_embed.num_patches + 1)


@pytest.mark.parametrize("arch,task", CASES, ids=[f"{a}-{t}" for a, t in CASES])
def test_packed_matches_padded_by_the_rule(arch, task):
    packed, padded = _models(arch, task)
    inputs = skewed_inputs(packed, [5, 1, 7])
    ref = copy.deepcopy(padded).double()
    inputs64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    with testing.faces_run() as ran:
        out_p, g_p = _run(packed, inputs, poison=True)
    testing.assert_face_ran(ran, "attention_varlen", "cpu", what=f"packed {arch}/{task}")
    out_e, g_e = _run(padded, inputs)
    out_r, g_r = _run(ref, inputs64)
    assert set(out_p) == set(out_r) and "loss" in out_p and torch.isfinite(out_p["loss"])
    reduction = _model_reduction(ref, _tokens(ref, inputs))
    for k in out_r:
        assert_close(out_p[k], _valid_rows(ref, k, out_r[k], inputs), _valid_rows(ref, k, out_e[k], inputs),
                     name=k, reduction=reduction)
    magnitude = max(finite_magnitude(g) for g in g_r.values() if g is not None)
    for n, g in g_r.items():
        if g is None:
            assert g_p[n] is None, f"{n}: a gradient only in the packed model"
            continue
        assert g_p[n] is not None, f"{n}: no gradient in the packed model"
        assert_close(g_p[n], g, g_e[n], grad=True, name=f"grad {n}", reduction=reduction, magnitude=magnitude)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("arch", list(DEFAULT_TASK))
def test_skewed_lengths_packed_equals_padded_float64(arch, fused):
    """Lengths 1, 7, 40, 13 (sample 0 is [CLS] alone): packed vs padded, same weights, float64,
    forward and every gradient; the eager twin packed (``fused=False``) too."""
    task = "pretrain" if "pretrain" in _classes()[arch].tasks and arch != "dual_encoder" else DEFAULT_TASK[arch]
    torch.manual_seed(0)
    packed = mm.create_model(f"{arch}_tiny", task=task, packed=True, fused=fused).double()
    padded = mm.create_model(f"{arch}_tiny", task=task).double()
    padded.load_state_dict(packed.state_dict())
    inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in skewed_inputs(packed, SKEWED).items()}
    out_p, g_p = _run(packed, inputs, poison=True)
    out_q, g_q = _run(padded, inputs)
    for k in out_q:
        torch.testing.assert_close(out_p[k], _valid_rows(packed, k, out_q[k], inputs), msg=k)
    for n, g in g_q.items():
        if g is not None:
            torch.testing.assert_close(g_p[n], g, msg=f"grad {n}")


@pytest.mark.parametrize("arch", list(DEFAULT_TASK))
def test_packed_model_runs_varlen_attention_not_padded_text(arch, monkeypatch):
    """Fails if packed=True silently ran the padded path: the packed model's padded attention calls
    are the vision tower's alone (no key padding mask, image-length queries), and attention_varlen
    ran on the packed text (its cu_seqlens are the batch's), forward and backward, on the cpu face."""
    calls = {"padded": [], "varlen": []}
    padded_attention, varlen_attention = Kernels.attention, Kernels.attention_varlen

    def spy_padded(self, q, k, v, key_padding_mask=None, *a, **kw):
        calls["padded"].append((q.shape[-2], k.shape[-2], key_padding_mask is not None))
        return padded_attention(self, q, k, v, key_padding_mask, *a, **kw)

    def spy_varlen(self, q, k, v, q_layout, k_layout, *a, **kw):
        calls["varlen"].append((q_layout.cu_seqlens.tolist(), k_layout.cu_seqlens.tolist()))
        return varlen_attention(self, q, k, v, q_layout, k_layout, *a, **kw)

    monkeypatch.setattr(Kernels, "attention", spy_padded)
    monkeypatch.setattr(Kernels, "attention_varlen", spy_varlen)
    packed, _ = _models(arch, DEFAULT_TASK[arch])
    inputs = skewed_inputs(packed, SKEWED)
    image_tokens = packed.vision_encoder.patch_embed.num_patches + 1
    with testing.faces_run() as ran:
        packed(**inputs).loss.backward()
    testing.assert_face_ran(ran, "attention_varlen", "cpu", what=f"packed {arch}")
    assert calls["varlen"], f"packed {arch}: attention_varlen was never called"
    assert all(c == (image_tokens, image_tokens, False) for c in calls["padded"]), calls["padded"]
    text_cu = [0, *torch.tensor(SKEWED).cumsum(0).tolist()]
    fused_cu = [0, *torch.tensor([n + image_tokens for n in SKEWED]).cumsum(0).tolist()]
    assert any(text_cu in c or fused_cu in c for c in calls["varlen"]), calls["varlen"][:2]


@pytest.mark.parametrize("arch", list(DEFAULT_TASK))
def test_packed_inputs_equal_padded_inputs(arch):
    """The packed model takes ``input_ids (total,)`` + ``cu_seqlens`` (what collate(packed=True)
    yields) and gives exactly what it gives for the padded batch."""
    from mmfast.data.pack import pack

    packed, _ = _models(arch, DEFAULT_TASK[arch])
    padded_in = skewed_inputs(packed, SKEWED)
    mask = padded_in["attention_mask"]
    p = pack(padded_in["input_ids"], mask)
    packed_in = {"input_ids": p.values, "cu_seqlens": p.cu_seqlens, "max_seqlen": p.max_seqlen,
                 "pixel_values": padded_in["pixel_values"]}
    for key in ("labels", "mlm_labels"):
        if key in padded_in:
            v = padded_in[key]
            packed_in[key] = v if v.dim() == 1 else pack(v, mask).values
    with torch.no_grad():
        a, b = packed(**padded_in), packed(**packed_in)
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k


def test_bad_input_is_one_clear_line():
    m = mm.create_model("cross_attention_tiny", task="vqa", packed=True)
    inp = skewed_inputs(m, [3, 5])
    left = inp["attention_mask"].flip(1)
    cases = [
        (dict(attention_mask=left), "argument 'attention_mask' must be right-padded"),
        (dict(attention_mask=torch.zeros_like(left)), r"every sample needs at least one token, sample\(s\) \[0, 1\]"),
        (dict(attention_mask=inp["attention_mask"][:, :2]), "argument 'attention_mask' must have the shape"),
        (dict(input_ids=inp["input_ids"].reshape(-1)), "with 'attention_mask', or \\(total,\\) with 'cu_seqlens'"),
        (dict(input_ids=torch.arange(8), attention_mask=None, cu_seqlens=torch.tensor([0, 3, 8])),
         "argument 'cu_seqlens' must be a 1-D int32"),
        (dict(input_ids=torch.arange(8), attention_mask=None, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)),
         "argument 'cu_seqlens' must start at 0, grow by at least 1 .* end at total = 8"),
        (dict(input_ids=torch.arange(8), attention_mask=None, cu_seqlens=torch.tensor([0, 0, 8], dtype=torch.int32)),
         "every sample needs a token"),
        (dict(input_ids=torch.arange(8), attention_mask=None, cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32),
              max_seqlen=4), "argument 'max_seqlen' must be an int >= the longest sample \\(5\\)"),
        (dict(input_ids=torch.arange(8), cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32)),
         "give either 'attention_mask' .* or 'cu_seqlens'"),
        (dict(pixel_values=inp["pixel_values"][:1]), "the text has 2 samples, 'pixel_values' has 1"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            m(**{**inp, **change})
        assert "\n" not in str(e.value) and str(e.value).startswith("mmfast.models (packed=True): ")
    mlm = mm.create_model("cross_attention_tiny", task="mlm", packed=True)
    inp = skewed_inputs(mlm, [3, 5])
    with pytest.raises(ValueError, match="argument 'labels' must have the shape of 'input_ids'"):
        mlm(**{**inp, "labels": inp["labels"][:, :3]})
    with pytest.raises(ValueError, match="argument 'labels' has targets on padding"):
        mlm(**{**inp, "labels": inp["labels"].masked_fill(inp["attention_mask"] == 0, 5)})
    with pytest.raises(ValueError, match="'cu_seqlens'/'max_seqlen' .* need a model built with packed=True"):
        mm.create_model("dual_encoder_tiny")(input_ids=torch.arange(8), cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32),
                                             pixel_values=inp["pixel_values"])
    with pytest.raises(TypeError, match="argument 'packed' must be a bool"):
        mm.create_model("captioner_tiny", packed="yes")


def test_packed_generate_and_repr():
    """Generation has no padding: a packed captioner decodes as the padded one (its cache path)."""
    torch.manual_seed(0)
    m = mm.create_model("captioner_tiny", packed=True).eval()
    twin = mm.create_model("captioner_tiny").eval()
    twin.load_state_dict(m.state_dict())
    px = m.example_inputs(2)["pixel_values"]
    assert torch.equal(m.generate(px, max_new_tokens=6), twin.generate(px, max_new_tokens=6))
    assert "packed=True" in repr(m)


def test_packed_triton_interpreter_matches_padded():
    """``backend={"attention": "triton"}`` runs the Triton varlen kernels on the packed text (in the
    interpreter here), by the rule against the padded eager twin in float64."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (set by tests/conftest.py)")
    if "triton" not in testing.cpu_faces("attention_varlen"):
        pytest.skip("attention_varlen has no Triton face here")
    small = dict(vision_depth=1, num_hidden_layers=2)
    packed, padded = _models("cross_attention", "mlm", backend={"attention": "triton"}, **small)
    inputs = skewed_inputs(packed, [1, 9, 4])
    with testing.faces_run() as ran:
        out_p, g_p = _run(packed, inputs, poison=True)
    testing.assert_face_ran(ran, "attention_varlen", "triton", what="packed cross_attention, triton")
    out_r, g_r = _run(copy.deepcopy(padded).double(),
                      {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()})
    out_e, g_e = _run(padded, inputs)
    reduction = _model_reduction(padded, _tokens(padded, inputs))
    assert_close(out_p["loss"], out_r["loss"], out_e["loss"], name="loss", reduction=reduction)
    magnitude = max(finite_magnitude(g) for g in g_r.values() if g is not None)
    for n, g in g_r.items():
        if g is not None:
            assert_close(g_p[n], g, g_e[n], grad=True, name=f"grad {n}", reduction=reduction, magnitude=magnitude)
