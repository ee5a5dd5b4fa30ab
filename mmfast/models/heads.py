"""Task heads shared by the architectures. Losses go through the model's :class:`Kernels`, so the
fused model uses mmfast's losses and the eager twin uses ``F.cross_entropy`` on full logits."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.models.common import Kernels


class MLMHead(nn.Module):
    """BERT's ``BertLMPredictionHead`` (transform: dense, GELU, LayerNorm; decoder tied to the word
    embeddings; own bias). With labels, the loss goes through ``linear_cross_entropy``: the fused
    model never materialises the (tokens x vocabulary) logits."""

    def __init__(self, config, word_embeddings: nn.Embedding, kernels: Kernels):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        # a plain attribute list keeps the tied weight out of this module's state_dict
        self._embeddings = [word_embeddings]
        self.kernels = kernels

    @property
    def decoder_weight(self) -> Tensor:
        return self._embeddings[0].weight

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(self.transform(hidden), self.decoder_weight, self.bias)

    def loss(self, hidden: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
        h = self.transform(hidden)
        return self.kernels.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.decoder_weight,
                                                 labels.reshape(-1), self.bias, label_smoothing=label_smoothing)


class MLP(nn.Module):
    """ViLT's VQA classifier: Linear(d, 2d), LayerNorm, GELU, Linear(2d, n)."""

    def __init__(self, width: int, num_labels: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(2 * width, eps=eps)
        self.out = nn.Linear(2 * width, num_labels)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.gelu(self.norm(self.dense(x))))


def classifier_head(task: str, width: int, num_labels: int) -> nn.Module:
    """vqa: the MLP above; itm: Linear(width, 2); classification: Linear(width, num_labels)."""
    if task == "vqa":
        return MLP(width, num_labels)
    if task == "itm":
        return nn.Linear(width, 2)
    return nn.Linear(width, num_labels)


class ContrastiveHead(nn.Module):
    """Projections to the shared embedding space and CLIP's learnable temperature (stored as
    log(1/0.07); the scale is clamped at 100 as in CLIP)."""

    def __init__(self, text_width: int, vision_width: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.text_proj = nn.Linear(text_width, embed_dim, bias=bias)
        self.vision_proj = nn.Linear(vision_width, embed_dim, bias=bias)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed(self, text_cls: Tensor, image_cls: Tensor):
        t = F.normalize(self.text_proj(text_cls), dim=-1)
        i = F.normalize(self.vision_proj(image_cls), dim=-1)
        return t, i

    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=100.0)


def shifted_negatives(x: Tensor) -> Tensor:
    """In-batch negatives for ITM: sample i is paired with sample i+1's image. ALBEF mines hard
    negatives from the contrastive similarities; a fixed shift keeps the fused and eager twins on
    exactly the same pairs (needed for parity) at the cost of easier negatives."""
    return torch.roll(x, shifts=1, dims=0)


def itm_labels(B: int, device) -> Tensor:
    return torch.cat([torch.ones(B, dtype=torch.long, device=device), torch.zeros(B, dtype=torch.long, device=device)])


def check_labels(labels: Optional[Tensor], task: str, batch: int) -> None:
    """Type and batch checks; class-range errors come from the cross-entropy itself."""
    if labels is None:
        return
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"mmfast.models: task {task!r}: argument 'labels' must be integer class indices, got {labels.dtype}")
    if labels.shape[0] != batch:
        raise ValueError(f"mmfast.models: task {task!r}: 'labels' has batch {labels.shape[0]}, inputs have {batch}")
