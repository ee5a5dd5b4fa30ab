"""CLIP's contrastive loss over the global batch of all processes (``contrastive_loss(..., gather=True)``).

Process ``r`` holds ``n_r`` image and ``n_r`` text features (sizes may differ between processes). It
all-gathers both (with their gradient: :class:`_AllGatherWithGrad`) and owns only its own rows: image
rows -> all ``N = sum(n_r)`` texts (image->text) and text rows -> all images (text->image). Both are
cross-entropies of a row against every column, and the labels of process ``r`` are its own columns
``n_0 + ... + n_{r-1} + i``. Its loss is

    loss_r = P / (2N) * sum over its own rows of (image->text row loss + text->image row loss)

so the mean over processes of ``loss_r`` is exactly the one-process loss over the concatenated batch
(every row of both directions is owned by one process).

Memory O(local x global), tiled: the ``n x N`` logits of a direction are never held whole. Columns
come ``COLUMN_TILE`` at a time; the forward keeps, per row, an online log-sum-exp (max-shifted,
merged with logaddexp), the target logit and the row sum (label smoothing), and drops each tile;
the backward rebuilds each tile from the features and turns it into its gradient in place. At any
moment one ``n x COLUMN_TILE`` block of logits exists (the test records every tensor allocated).

Gradients follow DistributedDataParallel's convention (as open_clip's ``gather_with_grad``): the
backward of the all-gather *sums* the gradient every process sends to a slice, so a process's local
features receive the gradient of the sum of all processes' losses, i.e. ``P`` times the one-process
gradient of their rows; DDP then averages parameter gradients over the ``P`` processes, which gives
exactly the one-process parameter gradients (``logit_scale`` is not gathered: its gradient averaged
over processes is the one-process gradient).

Faces: the tiles are two matmuls plus elementwise torch ops, on every device ("torch" in
``mmfast.testing.faces_run``). The fused cross-entropy kernels of ``mmfast.ops.cross_entropy``
normalise over the columns they are given, while a column tile needs the row's log-sum-exp over all
tiles, so they do not fit here; ``backend`` therefore takes "auto" or "torch" only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast import _provenance
from mmfast.ops.cross_entropy import _loss_dtype

# Columns per logits block. 2048 as the one-process contrastive_loss's row tiles: an n x 2048 GEMM
# per tile keeps a GPU's matmul units full for any n >= 64 and the per-tile overhead small, and a
# float32 block stays n x 8 KiB (2 MiB at n = 256, where the whole n x N block of a 32k global batch
# would be 32 MiB, times two directions and their gradients). Tests shrink it.
COLUMN_TILE = 2048


def _dist():
    """torch.distributed when a process group is initialised, else a clear error."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("mmfast.contrastive_loss: argument 'gather'=True needs an initialised torch.distributed "
                           "process group (call torch.distributed.init_process_group first), or pass gather=False")
    return dist


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenation along dim 0 of ``x`` from every process (``sizes[r]`` rows from rank ``r``; the
    collectives need equal shapes, so uneven parts travel zero-padded to the largest); backward sums
    the incoming gradients of all processes and returns this process's rows (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list) -> Tensor:
        dist = _dist()
        rows = max(sizes)
        x = x.contiguous() if x.shape[0] == rows else torch.cat([x, x.new_zeros((rows - x.shape[0],) + x.shape[1:])])
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x)
        ctx.rank, ctx.sizes = dist.get_rank(), sizes
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        dist = _dist()
        sizes, rank = ctx.sizes, ctx.rank
        if _reduce_scatter(dist):  # each rank's part zero-padded to the largest, as in the forward
            rows = max(sizes)
            padded = grad.new_zeros((len(sizes) * rows,) + grad.shape[1:])
            for r, n in enumerate(sizes):
                padded[r * rows:r * rows + n] = grad[sum(sizes[:r]):sum(sizes[:r]) + n]
            mine = grad.new_empty((rows,) + grad.shape[1:])
            # reduce_scatter_single: torch >= 2.14's name for reduce_scatter_tensor
            getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(mine, padded)
            return mine[:sizes[rank]], None
        total = grad.contiguous().clone()  # no reduce-scatter: sum everything, keep our rows
        dist.all_reduce(total)
        first = sum(sizes[:rank])
        return total[first:first + sizes[rank]], None


def _reduce_scatter(dist) -> bool:
    """NCCL reduce-scatters; gloo (CPU) all-reduces, as it lacks reduce-scatter in older torch."""
    return dist.get_backend() == "nccl"


def all_gather_with_grad(x: Tensor, sizes: list | None = None) -> Tensor:
    """``x`` of every process concatenated along dim 0, differentiable; ``sizes``: the number of rows
    of every process, in rank order (default: ``x``'s on every process)."""
    return _AllGatherWithGrad.apply(x, sizes or [x.shape[0]] * _dist().get_world_size())


def _batch_sizes(dist, n: int, device: torch.device) -> list:
    """The number of rows every process holds, in rank order."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=device))
    return [int(s) for s in sizes]


def _logits_tile(rows: Tensor, columns: Tensor, scale: Tensor, acc: torch.dtype) -> Tensor:
    """scale * rows @ columns.T in the accumulation dtype: the only place a logits block is made. The
    matmul runs in the features' dtype whatever autocast says (as the one-process custom op, which
    autocast does not enter), in the forward and in the backward alike."""
    with torch.autocast(rows.device.type, enabled=False):
        tile = (rows @ columns.t()).to(acc)
    return tile.mul_(scale.to(acc))


def _targets_in(c0: int, c1: int, first_label: int, n: int, device) -> tuple[Tensor, Tensor]:
    """(rows, columns within the tile) of the labels ``first_label + i`` that fall in columns [c0, c1)."""
    lo, hi = max(c0, first_label), min(c1, first_label + n)
    cols = torch.arange(lo, max(lo, hi), device=device)
    return cols - first_label, cols - c0


class _RowsAgainstAllColumns(torch.autograd.Function):
    """Per-row label-smoothed cross-entropy of ``scale * rows @ columns.T`` (``n x N``) with targets
    ``first_label + i``, built ``tile`` columns at a time in forward and backward."""

    @staticmethod
    def forward(ctx, rows: Tensor, columns: Tensor, scale: Tensor, first_label: int, eps: float, tile: int):
        _provenance.record("contrastive_loss", "torch", "forward")
        n, N = rows.shape[0], columns.shape[0]
        acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
        lse = torch.full((n,), float("-inf"), dtype=acc, device=rows.device)
        target = torch.zeros(n, dtype=acc, device=rows.device)
        row_sum = torch.zeros(n, dtype=acc, device=rows.device)
        for c0 in range(0, N, tile):
            c1 = min(c0 + tile, N)
            L = _logits_tile(rows, columns[c0:c1], scale, acc)
            r, c = _targets_in(c0, c1, first_label, n, rows.device)
            target[r] = L[r, c]
            row_sum += L.sum(1)
            m = L.amax(1)
            tile_lse = m + L.sub_(m[:, None]).exp_().sum(1).log()  # in place: still the one block
            lse = torch.logaddexp(lse, tile_lse)
            del L  # freed before the next tile is built: one block at a time
        ctx.save_for_backward(rows, columns, scale, lse)
        ctx.first_label, ctx.eps, ctx.tile = first_label, eps, tile
        # (lse - L_y) + eps * (L_y - mean_j L_j): the smoothed cross-entropy, exactly 0 where torch's is (N = 1)
        return ((lse - target) + eps * (target - row_sum / N)).to(_loss_dtype(rows))

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        _provenance.record("contrastive_loss", "torch", "backward")
        rows, columns, scale, lse = ctx.saved_tensors
        eps, tile, first_label = ctx.eps, ctx.tile, ctx.first_label
        n, N = rows.shape[0], columns.shape[0]
        acc = lse.dtype
        up = grad_rows.to(acc)[:, None]
        d_rows = torch.zeros(rows.shape, dtype=acc, device=rows.device)
        d_columns = torch.empty_like(columns)
        d_scale = torch.zeros((), dtype=acc, device=rows.device)
        for c0 in range(0, N, tile):
            c1 = min(c0 + tile, N)
            # dloss_i / dL_ij = softmax_ij - eps / N - (1 - eps) [j = target_i], times the row's upstream
            dL = _logits_tile(rows, columns[c0:c1], scale, acc).sub_(lse[:, None]).exp_().sub_(eps / N)
            r, c = _targets_in(c0, c1, first_label, n, rows.device)
            dL[r, c] -= 1.0 - eps
            dL = dL.mul_(up).to(rows.dtype)
            with torch.autocast(rows.device.type, enabled=False):
                dL_cols = (dL @ columns[c0:c1]).to(acc)  # L = s * rows @ cols.T, so d_rows = s * dL @ cols
                d_columns[c0:c1] = (dL.t() @ rows) * scale.to(rows.dtype)
            d_scale += (dL_cols * rows.to(acc)).sum()  # and d_scale = sum(dL * rows @ cols.T) = sum(dL @ cols * rows)
            d_rows += dL_cols
            del dL  # as in the forward: one block at a time
        d_rows = (d_rows * scale.to(acc)).to(rows.dtype)
        return d_rows, d_columns, d_scale.to(scale.dtype), None, None, None


def gathered_contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, *,
                              label_smoothing: float = 0.0, backend: str = "auto") -> Tensor:
    """This process's share of the global-batch loss (see the module docstring); arguments already checked
    by :func:`mmfast.ops.contrastive_loss`."""
    if backend not in ("auto", "torch"):
        raise ValueError(f"mmfast.contrastive_loss: with gather=True argument 'backend' must be 'auto' or 'torch' "
                         f"(the gathered loss runs its column tiles as torch matmuls), got {backend!r}")
    dist = _dist()
    sizes = _batch_sizes(dist, image_features.shape[0], image_features.device)
    all_img = all_gather_with_grad(image_features, sizes)
    all_txt = all_gather_with_grad(text_features, sizes)
    first, eps, scale = sum(sizes[:dist.get_rank()]), float(label_smoothing), logit_scale.reshape(())
    image_to_text = _RowsAgainstAllColumns.apply(image_features, all_txt, scale, first, eps, COLUMN_TILE)
    text_to_image = _RowsAgainstAllColumns.apply(text_features, all_img, scale, first, eps, COLUMN_TILE)
    P, N = len(sizes), sum(sizes)  # a tensor divided by 2N: NaN for an empty global batch, as the one-process loss
    loss = (image_to_text.sum() + text_to_image.sum()) * P / (2 * N)
    return loss.to(image_features.dtype)
