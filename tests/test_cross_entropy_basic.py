"""Cross-entropy through every layer of the plumbing: C++ CPU kernel, custom op, fake tensor,
autograd, torch.compile. (The full matrix lives in test_cross_entropy.py.)"""

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast import testing

pytestmark = pytest.mark.skipif(not mmfast.backends()["extension"]["loaded"], reason="mmfast._C not built")


@pytest.mark.parametrize("N,C", [(1, 7), (113, 1000), (7, 30522)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cpu_face_matches_rule(N, C, reduction):
    x = testing.randn(N, C, scale=3.0)
    t = torch.randint(0, C, (N,))
    t[::5] = -100
    testing.check_op(
        lambda x, t: mmfast.ops.cross_entropy(x, t, reduction=reduction, backend="cpu"),
        lambda x, t: F.cross_entropy(x, t, reduction=reduction),
        [x, t], grad_inputs=[0], name=f"ce {N}x{C} {reduction}")


def test_opcheck():
    from mmfast.ops.cross_entropy import _cross_entropy_op

    x = torch.randn(9, 13, requires_grad=True)
    t = torch.randint(0, 13, (9,))
    w = torch.rand(13)
    for red in ("mean", "sum", "none"):
        torch.library.opcheck(_cross_entropy_op, (x, t, w, -100, 0.1, red, True, "cpu"))


def test_compile_fullgraph():
    x = torch.randn(16, 50, requires_grad=True)
    t = torch.randint(0, 50, (16,))
    f = torch.compile(lambda x, t: mmfast.ops.cross_entropy(x, t, label_smoothing=0.1, backend="cpu") * 2,
                      fullgraph=True, backend="aot_eager")
    loss = f(x, t)
    (g,) = torch.autograd.grad(loss, x)
    ref = F.cross_entropy(x, t, label_smoothing=0.1) * 2
    (gr,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g, gr)


def test_out_of_range_target_raises_naming_argument():
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="argument 'target'.*outside \\[0, 5\\)"):
        mmfast.ops.cross_entropy(x, torch.tensor([0, 1, 5, 2]), backend="cpu")
