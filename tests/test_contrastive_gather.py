"""contrastive_loss(..., gather=True): P processes on gloo (CPU) against one process over the
concatenated global batch, under the rule vs float64, with column tiles smaller than the global
batch (the tiled path) and as wide as it (one tile).

Each process projects its slice of a shared input ``x`` with a shared weight ``W`` (as a DDP
replica would), normalises, and takes the gathered loss. Checked: the mean over processes of the
loss; the mean over processes of the gradients of ``W`` and of the log logit scale (what DDP's
all-reduce does); and each process's input gradient, which is ``P`` times the one-process
gradient of its rows (the all-gather's backward sums over processes, DDP's convention).

The memory bound: every tensor any op allocates during one forward + backward is recorded
(a TorchDispatchMode); none may be larger than one ``n x tile`` logits block or the gathered
``N x D`` features, which fails for any ``n x N`` block (the untiled loss)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import mmfast
import mmfast.ops.contrastive_gather as gather_mod
from mmfast.reference import contrastive_loss as ref_contrastive
from mmfast.testing import assert_close, assert_face_ran, faces_run

D_IN, D = 5, 7  # odd sizes
CASES = [(0.0, "auto"), (0.1, "auto"), (0.1, "torch")]
D_SMALL = 2  # features for the memory test: N x D_SMALL stays below n x N


def _inputs(N):
    gen = torch.Generator().manual_seed(1234 + N)
    x = torch.randn(2, N, D_IN, generator=gen)
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


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (elements) any op returns inside the block, forward and backward."""

    def __init__(self):
        super().__init__()
        self.numel, self.where = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.where = t.numel(), f"{func} -> {tuple(t.shape)}"
        return out


def _worker(rank, P, sizes, tile, reduce_scatter, rdv, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=P)
    if tile is not None:
        gather_mod.COLUMN_TILE = tile
    if reduce_scatter:  # the all-gather's NCCL backward (padded reduce-scatter), which gloo runs in torch >= 2.6
        gather_mod._reduce_scatter = lambda dist: True
    try:
        n = sizes[rank]
        x, W, log_scale = _inputs(sum(sizes))
        mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        results = {}
        for eps, backend in CASES:
            fn = lambda i, t, s: mmfast.ops.contrastive_loss(i, t, s, label_smoothing=eps, gather=True,
                                                             backend=backend)
            with faces_run() as faces:
                results[(eps, backend)] = _loss_and_grads(fn, x[0, mine], x[1, mine], W, log_scale, torch.float32)
            assert_face_ran(faces, "contrastive_loss", "torch")
        # the memory bound: one forward + backward on bare features, every allocation recorded
        f = torch.randn(2, n, D_SMALL, generator=torch.Generator().manual_seed(rank)).requires_grad_(True)
        with _LargestTensor() as seen:
            mmfast.ops.contrastive_loss(f[0], f[1], torch.tensor(3.0), label_smoothing=0.1, gather=True).backward()
        results["largest"] = (seen.numel, seen.where)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# (local batch of each process, column tile, all-gather backward by reduce-scatter): one tile as wide
# as the global batch (the default), and tiles narrower than it that do not divide it, with local
# batches of 1 and 7, equal and uneven
@pytest.mark.parametrize("sizes,tile,reduce_scatter", [((3, 3), None, False), ((7, 7, 7), 5, False),
                                                       ((1, 1), 1, False), ((7, 1, 4), 3, False),
                                                       ((4, 7, 1), 2, True)])
def test_gathered_loss_matches_one_process_over_the_global_batch(sizes, tile, reduce_scatter, tmp_path):
    if reduce_scatter and torch.__version__ < "2.6":
        pytest.skip("gloo reduce-scatter needs torch >= 2.6")
    P, N = len(sizes), sum(sizes)
    mp.spawn(_worker, args=(P, sizes, tile, reduce_scatter, str(tmp_path / "rdv"), str(tmp_path)), nprocs=P,
             join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(P)]
    x, W, log_scale = _inputs(N)
    for eps, backend in CASES:
        ref = lambda i, t, s: ref_contrastive(i, t, s, label_smoothing=eps)
        loss64, g64 = _loss_and_grads(ref, x[0], x[1], W, log_scale, torch.float64)
        loss32, g32 = _loss_and_grads(ref, x[0], x[1], W, log_scale, torch.float32)
        got = [r[(eps, backend)] for r in per_rank]
        tag = f"sizes={sizes} tile={tile} reduce_scatter={reduce_scatter} eps={eps} backend={backend}"
        # the reductions behind each element (the rule's rounding floor): projection over D_IN, similarity
        # over D, log-sum-exp over N columns, sum over N rows; the scale's gradient sums all N x N logits
        red, red_scale = (D_IN, D, N, N), (D_IN, D, N, N * N)
        assert_close(torch.stack([g[0] for g in got]).mean(), loss64, loss32, name=f"{tag} mean loss", reduction=red)
        for k, name in ((0, "x_img"), (1, "x_txt")):  # local rows: P x the one-process gradient, any sizes
            cat = torch.cat([g[1][k] for g in got]) / P
            assert_close(cat, g64[k], g32[k], grad=True, name=f"{tag} grad {name}", reduction=red)
        for k, name in ((2, "W_img"), (3, "W_txt"), (4, "log_scale")):  # replicated: DDP's mean
            mean = torch.stack([g[1][k] for g in got]).mean(0)
            assert_close(mean, g64[k], g32[k], grad=True, name=f"{tag} grad {name}",
                         reduction=red_scale if name == "log_scale" else red)
    tile = min(tile or gather_mod.COLUMN_TILE, N)
    for n, r in zip(sizes, per_rank):
        # the gathered features (zero-padded parts travel as P x max(sizes) rows) or one logits block
        bound = max(P * max(sizes) * D_SMALL, n * tile)
        if n > D_SMALL and tile < N:  # e.g. (7, 7, 7): a whole 7 x 21 block (147) would break the bound (42)
            assert bound < n * N
        numel, where = r["largest"]
        assert numel <= bound, f"{where}: {numel} elements > one {n} x {tile} block ({bound})"


def test_gather_without_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    f = torch.randn(4, D)
    with pytest.raises(RuntimeError, match="argument 'gather'=True needs an initialised torch.distributed"):
        mmfast.ops.contrastive_loss(f, f, torch.tensor(1.0), gather=True)


def test_gather_names_the_backend_it_cannot_take():
    f = torch.randn(4, D)
    with pytest.raises(ValueError, match="with gather=True argument 'backend' must be 'auto' or 'torch'"):
        mmfast.ops.contrastive_loss(f, f, torch.tensor(1.0), gather=True, backend="triton")
