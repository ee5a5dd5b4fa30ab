"""Bad arguments to the loss ops raise one clear error naming the argument; meta tensors either
get a clear error (a fused face asked for by name) or shape inference (``auto`` runs the reference
formula on meta, which is what building a model on the meta device needs)."""

import pytest
import torch

import mmfast
from mmfast import ops

META = torch.device("meta")
x, t = torch.randn(3, 5), torch.tensor([0, 4, 2])


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(logits=torch.ones(3, 5, dtype=torch.long)), TypeError, "argument 'logits' must be a floating-point"),
    (dict(target=torch.zeros(3)), TypeError, "argument 'target' must hold integer class indices"),
    (dict(target=torch.zeros(4, dtype=torch.long)), ValueError, r"argument 'target' must have shape \(3,\)"),
    (dict(logits=torch.randn(3, 5, 2)), ValueError, r"argument 'target' must have shape \(3, 2\)"),
    (dict(reduction="avg"), ValueError, "argument 'reduction' must be one of"),
    (dict(label_smoothing=1.5), ValueError, r"argument 'label_smoothing' must be in \[0, 1\]"),
    (dict(label_smoothing=-0.1), ValueError, r"argument 'label_smoothing' must be in \[0, 1\]"),
    (dict(weight=torch.ones(4)), ValueError, r"argument 'weight' must have shape \(5,\)"),
    (dict(weight=torch.ones(5, device=META)), ValueError, "argument 'weight' is on meta"),
    (dict(target=t.to(META)), ValueError, "argument 'target' is on meta"),
])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.no_face_runs("the arguments are refused before any face runs")
def test_cross_entropy_argument_errors(kwargs, exc, pattern, backend):
    args = dict(logits=x, target=t)
    args.update(kwargs)
    logits, target = args.pop("logits"), args.pop("target")
    with pytest.raises(exc, match=pattern):
        ops.cross_entropy(logits, target, backend=backend, **args)


i4 = torch.randn(3, 4)


@pytest.mark.parametrize("args,kwargs,pattern", [
    ((i4, torch.randn(4, 4), torch.tensor(1.0)), {}, "'image_features' and 'text_features' must have the same shape"),
    ((i4, i4.double(), torch.tensor(1.0)), {}, "must have the same shape and dtype"),
    ((torch.randn(4), torch.randn(4), torch.tensor(1.0)), {}, "argument 'image_features' must be a 2-D floating"),
    ((i4, i4.long(), torch.tensor(1.0)), {}, "argument 'text_features' must be a 2-D floating"),
    ((i4, i4, torch.ones(2)), {}, "argument 'logit_scale' must be a scalar tensor"),
    ((i4, i4, torch.tensor(1.0)), {"label_smoothing": 1.1}, r"argument 'label_smoothing' must be in \[0, 1\]"),
])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.no_face_runs("the arguments are refused before any face runs")
def test_contrastive_loss_argument_errors(args, kwargs, pattern, backend):
    with pytest.raises(ValueError, match=pattern):
        ops.contrastive_loss(*args, backend=backend, **kwargs)


def _meta_calls():
    m = lambda *s: torch.randn(*s, device=META)
    tm = torch.zeros(3, dtype=torch.long, device=META)
    return {
        "attention": (lambda be: ops.attention(m(1, 2, 3, 8), m(1, 2, 4, 8), m(1, 2, 4, 8), backend=be), (1, 2, 3, 8)),
        "cross_entropy": (lambda be: ops.cross_entropy(m(3, 5), tm, reduction="none", backend=be), (3,)),
        "linear_cross_entropy": (lambda be: ops.linear_cross_entropy(m(3, 4), m(5, 4), tm, backend=be), ()),
        "contrastive_loss": (lambda be: ops.contrastive_loss(m(3, 4), m(3, 4), m(()), backend=be), ()),
        "concat_embed": (lambda be: ops.concat_embed([m(2, 3, 8), m(2, 1, 8)], backend=be)[0], (2, 4, 8)),
    }


@pytest.mark.parametrize("op", list(_meta_calls()))
@pytest.mark.parametrize("face", ["cpu", "triton", "cuda"])
def test_meta_tensors_to_a_named_face_give_a_clear_error(op, face):
    call, _ = _meta_calls()[op]
    with pytest.raises(RuntimeError, match=rf"mmfast\.{op}: backend '{face}' is unavailable for meta/float32 inputs"):
        call(face)


@pytest.mark.parametrize("op", list(_meta_calls()))
def test_meta_tensors_with_auto_infer_the_shape(op):
    call, shape = _meta_calls()[op]
    with mmfast.testing.faces_run() as ran:
        out = call("auto")
    assert out.device.type == "meta" and tuple(out.shape) == shape
    assert set(ran) == {(op, "torch", "forward")}, dict(ran)  # the reference formula, on meta
