"""contrastive_loss(..., gather=True): P processes on gloo (CPU) against one process over the
concatenated global batch, under the rule vs float64.

Each process projects its slice of a shared input ``x`` with a shared weight ``W`` (as a DDP
replica would), normalises, and takes the gathered loss. Checked: the mean over processes of the
loss; the mean over processes of the gradients of ``W`` and of the log logit scale (what DDP's
all-reduce does); and each process's input gradient, which is ``P`` times the one-process
gradient of its rows (the all-gather's backward sums over processes, DDP's convention)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmfast
from mmfast.reference import contrastive_loss as ref_contrastive
from mmfast.testing import assert_close

N_LOCAL, D_IN, D = 3, 5, 7  # odd sizes; the global batch is P * 3
CASES = [(0.0, "auto"), (0.1, "auto"), (0.1, "torch")]


def _inputs(P):
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(2, P * N_LOCAL, D_IN, generator=gen)
    W = torch.randn(2, D_IN, D, generator=gen)
    log_scale = torch.tensor(2.0)
    return x, W, log_scale


def _loss_and_grads(loss_fn, x_img, x_txt, W, log_scale, dtype):
    """loss and grads of (x_img, x_txt, W_img, W_txt, log_scale) in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x_img, x_txt, W[0], W[1], log_scale)]
    xi, xt, wi, wt, ls = leaves
    img = torch.nn.functional.normalize(xi @ wi, dim=-1)
    txt = torch.nn.functional.normalize(xt @ wt, dim=-1)
    loss = loss_fn(img, txt, ls.exp())
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), [g.detach() for g in grads]


def _worker(rank, P, rdv, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=P)
    try:
        x, W, log_scale = _inputs(P)
        mine = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        results = {}
        for eps, backend in CASES:
            fn = lambda i, t, s: mmfast.ops.contrastive_loss(i, t, s, label_smoothing=eps, gather=True,
                                                             backend=backend)
            results[(eps, backend)] = _loss_and_grads(fn, x[0, mine], x[1, mine], W, log_scale, torch.float32)
        try:  # unequal local batches: every process raises the same clear error
            f = torch.randn(rank + 1, D)
            mmfast.ops.contrastive_loss(f, f, torch.tensor(1.0), gather=True)
            results["unequal"] = "no error"
        except ValueError as e:
            results["unequal"] = str(e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("P", [2, 3])
def test_gathered_loss_matches_one_process_over_the_global_batch(P, tmp_path):
    mp.spawn(_worker, args=(P, str(tmp_path / "rdv"), str(tmp_path)), nprocs=P, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(P)]
    x, W, log_scale = _inputs(P)
    for eps, backend in CASES:
        ref = lambda i, t, s: ref_contrastive(i, t, s, label_smoothing=eps)
        loss64, g64 = _loss_and_grads(ref, x[0], x[1], W, log_scale, torch.float64)
        loss32, g32 = _loss_and_grads(ref, x[0], x[1], W, log_scale, torch.float32)
        got = [r[(eps, backend)] for r in per_rank]
        tag = f"P={P} eps={eps} backend={backend}"
        assert_close(torch.stack([g[0] for g in got]).mean(), loss64, loss32, name=f"{tag} mean loss")
        for k, name in ((0, "x_img"), (1, "x_txt")):  # local rows: P x the one-process gradient
            cat = torch.cat([g[1][k] for g in got]) / P
            assert_close(cat, g64[k], g32[k], grad=True, name=f"{tag} grad {name}")
        for k, name in ((2, "W_img"), (3, "W_txt"), (4, "log_scale")):  # replicated: DDP's mean
            mean = torch.stack([g[1][k] for g in got]).mean(0)
            assert_close(mean, g64[k], g32[k], grad=True, name=f"{tag} grad {name}")
    for r in per_rank:
        assert "same number of rows on every process" in r["unequal"] and "'image_features'" in r["unequal"]


def test_gather_without_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    f = torch.randn(4, D)
    with pytest.raises(RuntimeError, match="argument 'gather'=True needs an initialised torch.distributed"):
        mmfast.ops.contrastive_loss(f, f, torch.tensor(1.0), gather=True)
