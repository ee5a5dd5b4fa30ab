"""The model zoo on a GPU (skipped without one): fused vs eager twin in bf16 autocast by the
correctness rule (float64 eager twin as reference, bf16-autocast eager twin as the baseline), per
backend, and bf16 training parity over a few steps."""

import copy

import pytest
import torch

import mmfast.models as mm
from mmfast import dispatch
from mmfast.models.common import OP_NAMES
from mmfast.models.registry import _classes
from mmfast.testing import assert_close

pytestmark = pytest.mark.cuda
DEFAULT_TASK = {arch: cls.default_task for arch, cls in _classes().items()}
# No dropout: the fused, eager and float64 twins would each draw their own masks (pass or fail by
# chance), and the CUDA face's dropout is not the eager one's. Dropout is checked per op (S2 smoke).
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _grads(model):
    return {n: (None if p.grad is None else p.grad.detach().float().clone()) for n, p in model.named_parameters()}


def _run(model, inputs, amp):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        out = model(**inputs)
    out.loss.float().backward()
    return {k: v.detach().float() for k, v in out.items() if isinstance(v, torch.Tensor)}, _grads(model)


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("arch", list(DEFAULT_TASK))
def test_bf16_fused_matches_eager_twin(arch, backend):
    if backend == "auto":
        chosen = "auto"
    else:
        ops = [op for op in OP_NAMES if dispatch.availability(op, backend, "cuda", torch.bfloat16) is None]
        if not ops:
            pytest.skip(f"no op has a {backend} face for cuda/bf16 here")
        chosen = {op: backend for op in ops}
    torch.manual_seed(0)
    with torch.device("cuda"):
        fused = mm.create_model(f"{arch}_small", vision_depth=2, num_hidden_layers=2, fusion_layer=1,
                                num_fusion_layers=1, backend=chosen, **NO_DROPOUT)
        eager = mm.create_model(f"{arch}_small", vision_depth=2, num_hidden_layers=2, fusion_layer=1,
                                num_fusion_layers=1, fused=False, **NO_DROPOUT)
    eager.load_state_dict(fused.state_dict())
    ref = copy.deepcopy(eager).double()
    inputs = fused.example_inputs(batch_size=8)
    inputs64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    out_f, g_f = _run(fused, inputs, True)
    out_e, g_e = _run(eager, inputs, True)
    out_r, g_r = _run(ref, inputs64, False)
    for k in out_r:
        assert_close(out_f[k].to(torch.bfloat16), out_r[k], out_e[k].to(torch.bfloat16), name=k)
    scale = max(float(g.abs().max()) for g in g_r.values() if g is not None)
    for n, g in g_r.items():
        if g is None:
            continue
        floor = 1e-3 * scale if float(g.abs().max()) < 1e-9 * scale else None  # see tests/test_models.py
        assert_close(g_f[n].to(torch.bfloat16), g, g_e[n].to(torch.bfloat16), grad=True, name=f"grad {n}",
                     floor=floor)


@pytest.mark.parametrize("arch", ["single_stream", "cross_attention", "captioner"])
def test_bf16_training_parity(arch):
    torch.manual_seed(0)
    task = "pretrain" if "pretrain" in _classes()[arch].tasks else None
    with torch.device("cuda"):
        fused = mm.create_model(f"{arch}_small", task=task, vision_depth=4, num_hidden_layers=4, fusion_layer=2,
                                **NO_DROPOUT)
        eager = mm.create_model(f"{arch}_small", task=task, vision_depth=4, num_hidden_layers=4, fusion_layer=2,
                                fused=False, **NO_DROPOUT)
    eager.load_state_dict(fused.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (fused, eager)]
    losses = ([], [])
    for step in range(10):
        inputs = fused.example_inputs(batch_size=16, seed=step)
        for i, (m, opt) in enumerate(zip((fused, eager), opts)):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(**inputs).loss
            loss.float().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[i].append(float(loss.detach()))
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=2e-2, atol=2e-2)
