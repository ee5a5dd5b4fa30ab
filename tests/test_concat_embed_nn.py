"""mmfast.nn.ConcatEmbed: parameters and names, the eager formula, train/eval dropout, training parity."""

import copy

import pytest
import torch

from mmfast import dispatch, testing
from mmfast.nn import ConcatEmbed
from mmfast.reference import concat_embed as reference

BACKEND = testing.cpu_faces("concat_embed")[0]  # raises when a face that should exist does not load


def _eager(mod, features, masks=None):
    pos = [mod.position_embeddings[str(m)].weight if str(m) in mod.position_embeddings else None
           for m in range(mod.num_modalities)]
    return reference(features, type_embeddings=mod.type_embeddings.weight,
                     pos_embeddings=pos if mod.position_embeddings else None,
                     ln_weight=mod.norm.weight if mod.norm is not None else None,
                     ln_bias=mod.norm.bias if mod.norm is not None else None, eps=mod.eps,
                     dropout_p=mod.dropout if mod.training else 0.0, masks=masks)


def test_parameter_names_and_shapes():
    mod = ConcatEmbed(64, 3, max_positions=[40, None, 200])
    shapes = {k: tuple(v.shape) for k, v in mod.state_dict().items()}
    assert shapes == {"type_embeddings.weight": (3, 64), "position_embeddings.0.weight": (40, 64),
                      "position_embeddings.2.weight": (200, 64), "norm.weight": (64,), "norm.bias": (64,)}
    bare = ConcatEmbed(32, 2, layer_norm=False)
    assert set(bare.state_dict()) == {"type_embeddings.weight"}
    assert set(ConcatEmbed(32, 2, max_positions=8).state_dict()) >= {"position_embeddings.0.weight",
                                                                      "position_embeddings.1.weight"}


@pytest.mark.parametrize("max_positions", [None, 50, [45, None]])
@pytest.mark.parametrize("layer_norm", [True, False])
def test_forward_matches_eager_formula(max_positions, layer_norm):
    torch.manual_seed(0)
    mod = ConcatEmbed(64, 2, max_positions=max_positions, layer_norm=layer_norm, eps=1e-5, backend=BACKEND).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine
        if mod.norm is not None:
            mod.norm.weight.normal_(1.0, 0.3)
            mod.norm.bias.normal_()
    feats = [testing.randn(3, 40, 64), testing.randn(3, 7, 64)]
    masks = [torch.rand(3, 40) > 0.2, None]
    out, mask = mod(feats, masks)
    ref_out, ref_mask = _eager(mod, feats, masks)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, ref_mask)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    mod = ConcatEmbed(32, 2, max_positions=16, dropout=0.5, backend=BACKEND)
    feats = [testing.randn(2, 5, 32), testing.randn(2, 3, 32)]
    mod.train()
    torch.manual_seed(4)
    a = mod(feats)[0]
    torch.manual_seed(4)
    b = mod(feats)[0]
    assert torch.equal(a, b) and (a == 0).float().mean() > 0.3
    mod.eval()
    c = mod(feats)[0]
    torch.testing.assert_close(c, _eager(mod, feats)[0], rtol=1e-5, atol=1e-5)


def test_training_parity_with_eager():
    """Same init and data, a few SGD steps: fused and eager losses match step by step (fp32)."""
    torch.manual_seed(0)
    fused = ConcatEmbed(48, 2, max_positions=[12, 20], eps=1e-5, backend=BACKEND)
    eager = copy.deepcopy(fused)
    head = torch.nn.Linear(48, 1)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.5)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        feats = [torch.randn(4, 10, 48, generator=gen), torch.randn(4, 17, 48, generator=gen)]
        target = torch.randn(4, 27, 1, generator=gen)
        losses = []
        for mod, opt, run in ((fused, opt_f, lambda: fused(feats)[0]), (eager, opt_e, lambda: _eager(eager, feats)[0])):
            opt.zero_grad()
            loss = ((head(run()) - target) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[1]) + 1e-7, (step, losses)
    for (n, p), (_, q) in zip(fused.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_bad_arguments():
    with pytest.raises(ValueError, match="'num_modalities'"):
        ConcatEmbed(32, 5)
    with pytest.raises(ValueError, match="'max_positions'"):
        ConcatEmbed(32, 2, max_positions=[8])
    with pytest.raises(ValueError, match=r"'max_positions\[1\]'"):
        ConcatEmbed(32, 2, max_positions=[8, 0])
    with pytest.raises(ValueError, match="'dropout'"):
        ConcatEmbed(32, 2, dropout=2.0)
    mod = ConcatEmbed(32, 2, max_positions=4)
    with pytest.raises(ValueError, match="'features'"):
        mod([testing.randn(1, 3, 32)])
    with pytest.raises(ValueError, match=r"'pos_embeddings\[1\]'.*shorter"):
        mod([testing.randn(1, 3, 32), testing.randn(1, 5, 32)])
