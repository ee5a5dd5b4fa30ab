"""CLIP's contrastive loss over the global batch of all processes (``contrastive_loss(..., gather=True)``).

Each process holds ``n`` image and ``n`` text features. It all-gathers both (with their gradient:
:class:`_AllGatherWithGrad`) and computes only its own rows against all ``N = P * n`` columns:
image rows -> all texts and text rows -> all images, two ``(n, N)`` logit blocks (memory
O(local x global), never N x N). Its loss is the mean of the two directions over its own rows, so

    mean over processes of the loss  ==  contrastive_loss over the concatenated global batch.

Gradients follow DistributedDataParallel's convention (as open_clip's ``gather_with_grad``): the
backward of the all-gather *sums* the gradient every process sends to a slice, so a process's
local features receive the gradient of the sum of all processes' losses, i.e. ``P`` times the
one-process gradient of their rows; DDP then averages parameter gradients over the ``P``
processes, which gives exactly the one-process parameter gradients (``logit_scale`` is not
gathered: its gradient averaged over processes is the one-process gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast.ops.cross_entropy import cross_entropy


def _dist():
    """torch.distributed when a process group is initialised, else a clear error."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("mmfast.contrastive_loss: argument 'gather'=True needs an initialised torch.distributed "
                           "process group (call torch.distributed.init_process_group first), or pass gather=False")
    return dist


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenation along dim 0 of ``x`` from every process; backward sums the incoming gradients
    of all processes and returns this process's slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        dist = _dist()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        dist = _dist()
        grad = grad.contiguous()
        mine = torch.empty_like(grad[: ctx.n])
        if dist.get_backend() == "nccl":
            dist.reduce_scatter_tensor(mine, grad)
        else:  # gloo has no reduce-scatter: sum everything, keep our slice
            total = grad.clone()
            dist.all_reduce(total)
            mine.copy_(total[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n])
        return mine


def all_gather_with_grad(x: Tensor) -> Tensor:
    """``x`` of every process concatenated along dim 0 (same shape on every process), differentiable."""
    return _AllGatherWithGrad.apply(x)


def _check_same_batch_everywhere(dist, n: int, device: torch.device) -> None:
    """Every process must hold the same number of rows (all_gather needs equal sizes)."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=device))
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"mmfast.contrastive_loss: with gather=True argument 'image_features' must have the same "
                         f"number of rows on every process, got {sizes} (rank order)")


def gathered_contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, *,
                              label_smoothing: float = 0.0, backend: str = "auto") -> Tensor:
    """This process's share of the global-batch loss (see the module docstring); arguments already checked
    by :func:`mmfast.ops.contrastive_loss`. The cross-entropies run on mmfast's fused ``cross_entropy``."""
    dist = _dist()
    n = image_features.shape[0]
    _check_same_batch_everywhere(dist, n, image_features.device)
    all_img = all_gather_with_grad(image_features)
    all_txt = all_gather_with_grad(text_features)
    labels = torch.arange(n, device=image_features.device) + dist.get_rank() * n
    scale = logit_scale.reshape(()).to(image_features.dtype)
    image_to_text = cross_entropy((image_features @ all_txt.T) * scale, labels,
                                  label_smoothing=label_smoothing, backend=backend)
    text_to_image = cross_entropy((text_features @ all_img.T) * scale, labels,
                                  label_smoothing=label_smoothing, backend=backend)
    return (image_to_text + text_to_image) / 2
