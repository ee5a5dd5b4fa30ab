"""The eager fast paths of concat_embed and the cross-entropy family (as
tests/test_attention_hot_path.py for attention): a plain eager call runs the face through an
autograd.Function, without the torch.library custom op whose Python cost exceeded the kernels at
the zoo's tiny sizes; under a dispatch mode (as under torch.compile or a tensor subclass) the
custom op runs. Both give the same outputs and gradients, bit for bit."""

import importlib

import pytest
import torch

import mmfast
from mmfast import testing
from test_attention_hot_path import _SeenOps  # records the ops a dispatch mode sees

CE = importlib.import_module("mmfast.ops.cross_entropy")
CAT = importlib.import_module("mmfast.ops.concat_embed")


def _concat_embed(backend):
    feats = [testing.randn(3, 7, 16, seed=1), testing.randn(3, 1, 16, seed=2)]
    params = dict(type_embeddings=testing.randn(2, 16, seed=3), pos_embeddings=[testing.randn(9, 16, seed=4), None],
                  ln_weight=testing.randn(16, seed=5), ln_bias=testing.randn(16, seed=6))
    leaves = feats + [params["type_embeddings"], params["pos_embeddings"][0], params["ln_weight"], params["ln_bias"]]
    return leaves, lambda: mmfast.ops.concat_embed(feats, **params, backend=backend)[0]


def _cross_entropy(backend):
    x, t = testing.randn(13, 30, seed=1, scale=3.0), torch.randint(0, 30, (13,), generator=torch.Generator().manual_seed(7))
    return [x], lambda: mmfast.ops.cross_entropy(x, t, label_smoothing=0.1, backend=backend)


def _linear_cross_entropy(backend):
    h, w, t = testing.randn(11, 8, seed=1), testing.randn(40, 8, seed=2), torch.randint(0, 40, (11,), generator=torch.Generator().manual_seed(8))
    return [h, w], lambda: mmfast.ops.linear_cross_entropy(h, w, t, reduction="none", backend=backend)


def _contrastive_loss(backend):
    img, txt = testing.randn(9, 16, seed=1), testing.randn(9, 16, seed=2)
    return [img, txt], lambda: mmfast.ops.contrastive_loss(img, txt, torch.tensor(3.0), label_smoothing=0.1,
                                                          backend=backend)


CASES = {  # op: (module, custom op attribute, its torch.ops name, builder)
    "concat_embed": (CAT, "_concat_embed_op", "mmfast.concat_embed.default", _concat_embed),
    "cross_entropy": (CE, "_cross_entropy_op", "mmfast.cross_entropy.default", _cross_entropy),
    "linear_cross_entropy": (CE, "_linear_cross_entropy_op", "mmfast.linear_cross_entropy.default",
                             _linear_cross_entropy),
    "contrastive_loss": (CE, "_contrastive_op", "mmfast.contrastive_loss.default", _contrastive_loss),
}


@pytest.mark.parametrize("op,backend", [(op, b) for op in CASES for b in testing.cpu_faces(op)])
def test_eager_path_skips_the_custom_op_and_matches_it(monkeypatch, op, backend):
    module, attr, name, build = CASES[op]
    calls = []
    real = getattr(module, attr)
    monkeypatch.setattr(module, attr, lambda *a: calls.append(1) or real(*a))

    def run(mode=None):
        leaves, fn = build(backend)
        for t in leaves:
            t.requires_grad_(True)
        with testing.faces_run() as ran:
            if mode is None:
                out = fn()
            else:
                with mode:
                    out = fn()
            upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)) + 2.0
            grads = torch.autograd.grad(out, leaves, upstream)
        testing.assert_face_ran(ran, op, backend, ("forward", "backward"), what=op)
        return [out.detach(), *grads]

    eager = run()
    assert calls == [], f"a plain eager {op} call went through the custom op"
    mode = _SeenOps()
    custom = run(mode)
    assert calls == [1] and name in mode.ops, (calls, sorted(o for o in mode.ops if "mmfast" in o))
    for a, b in zip(eager, custom):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
