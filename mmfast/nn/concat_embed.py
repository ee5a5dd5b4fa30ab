"""Single-stream fusion input embedding as a module: per-modality position tables, modality-type
embeddings, LayerNorm and dropout around ``mmfast.ops.concat_embed``."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from mmfast import ops


class ConcatEmbed(nn.Module):
    """``(out, mask) = ConcatEmbed(D, M, ...)(features, masks=None)``: adds modality m's position
    embeddings (rows [:L_m]) and type embedding m to ``features[m]`` (B, L_m, D), concatenates the
    modalities along the sequence, applies LayerNorm and (in training) dropout, and concatenates the
    masks (None entries mean all tokens valid).

    Parameters (state_dict keys): ``type_embeddings.weight`` (M, D); ``position_embeddings.<m>.weight``
    (max_positions[m], D) for each modality with a table; ``norm.weight`` / ``norm.bias`` (D,).

    ``max_positions``: None (no position tables: e.g. the towers added their own), an int (a table
    of that length for every modality) or a list with an int or None per modality.
    """

    def __init__(self, hidden_size: int, num_modalities: int, max_positions=None, layer_norm: bool = True,
                 eps: float = 1e-12, dropout: float = 0.0, *, backend: str = "auto"):
        super().__init__()
        if not 1 <= int(num_modalities) <= 4:
            raise ValueError(f"mmfast.nn.ConcatEmbed: argument 'num_modalities' must be 1 to 4, got {num_modalities}")
        if int(hidden_size) < 1:
            raise ValueError(f"mmfast.nn.ConcatEmbed: argument 'hidden_size' must be positive, got {hidden_size}")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"mmfast.nn.ConcatEmbed: argument 'dropout' must be in [0, 1], got {dropout}")
        self.hidden_size, self.num_modalities = int(hidden_size), int(num_modalities)
        self.eps, self.dropout, self.backend = float(eps), float(dropout), backend
        if max_positions is None or isinstance(max_positions, int):
            max_positions = [max_positions] * self.num_modalities
        max_positions = list(max_positions)
        if len(max_positions) != self.num_modalities:
            raise ValueError(f"mmfast.nn.ConcatEmbed: argument 'max_positions' must have one entry per modality "
                             f"({self.num_modalities}), got {len(max_positions)}")
        for m, p in enumerate(max_positions):
            if p is not None and (not isinstance(p, int) or p < 1):
                raise ValueError(f"mmfast.nn.ConcatEmbed: argument 'max_positions[{m}]' must be a positive int or "
                                 f"None, got {p!r}")
        self.max_positions = max_positions
        self.type_embeddings = nn.Embedding(self.num_modalities, self.hidden_size)
        self.position_embeddings = nn.ModuleDict(
            {str(m): nn.Embedding(p, self.hidden_size) for m, p in enumerate(max_positions) if p is not None})
        self.norm = nn.LayerNorm(self.hidden_size, eps=self.eps) if layer_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # BERT's initialisation for embedding tables (std 0.02); LayerNorm to identity.
        nn.init.normal_(self.type_embeddings.weight, std=0.02)
        for emb in self.position_embeddings.values():
            nn.init.normal_(emb.weight, std=0.02)
        if self.norm is not None:
            self.norm.reset_parameters()

    def forward(self, features: Sequence[Tensor], masks: Optional[Sequence[Optional[Tensor]]] = None):
        if len(features) != self.num_modalities:
            raise ValueError(f"mmfast.nn.ConcatEmbed: argument 'features' must have {self.num_modalities} entries "
                             f"(num_modalities), got {len(features)}")
        pos = [self.position_embeddings[str(m)].weight if str(m) in self.position_embeddings else None
               for m in range(self.num_modalities)]
        return ops.concat_embed(
            list(features), type_embeddings=self.type_embeddings.weight,
            pos_embeddings=pos if self.position_embeddings else None,
            ln_weight=self.norm.weight if self.norm is not None else None,
            ln_bias=self.norm.bias if self.norm is not None else None,
            eps=self.eps, dropout_p=self.dropout if self.training else 0.0, masks=masks, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_modalities={self.num_modalities}, "
                f"max_positions={self.max_positions}, layer_norm={self.norm is not None}, eps={self.eps}, "
                f"dropout={self.dropout}, backend={self.backend!r}")
