"""Packed (unpadded) text in the zoo: ``create_model(name, packed=True)``.

A packed model keeps only the real text tokens: hidden states are ``(total, width)`` rows, sample
``b`` owning rows ``cu_seqlens[b]:cu_seqlens[b+1]`` (a :class:`Layout`), and every attention over
them runs :func:`mmfast.ops.attention_varlen`. Token-wise layers (Linear, LayerNorm, GELU) read the
rows as they are. Image tokens, all valid, are flattened to ``(batch * tokens, width)`` rows with a
uniform layout when a packed stream attends to them or they to it.

One convention carries both forms through the layers: the argument that holds a ``(batch, length)``
key padding mask for padded hidden states holds the :class:`Layout` of the rows for packed ones.

The model takes either the padded batch (``input_ids (B, L)``, right-padded ``attention_mask``),
packed at its entry with :func:`mmfast.data.pack.pack`, or the packed batch itself (``input_ids
(total,)``, ``cu_seqlens``, optionally ``max_seqlen``: what ``collate(..., packed=True)`` yields).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from mmfast.data.pack import pack, positions_in_sequences as positions  # noqa: F401 (positions: re-exported)


class Layout(NamedTuple):
    """Packed rows: sample ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]`` of a ``(total, ...)`` tensor."""

    cu_seqlens: Tensor  # int32 (batch + 1,), from 0
    max_seqlen: int  # the longest sample (a Python int, as attention_varlen takes it)
    position_ids: Optional[Tensor] = None  # int64 (total,): each row's position in its sample (text only)

    @property
    def first_rows(self) -> Tensor:
        """int64 (batch,): the row of each sample's first token ([CLS])."""
        return self.cu_seqlens[:-1].long()

    def twice(self) -> "Layout":
        """The layout of ``torch.cat([x, x])``: the batch followed by itself (ITM's positives + negatives)."""
        cu = self.cu_seqlens
        pos = None if self.position_ids is None else torch.cat([self.position_ids, self.position_ids])
        return Layout(torch.cat([cu, cu[1:] + cu[-1]]), self.max_seqlen, pos)


def is_packed(mask) -> bool:
    return isinstance(mask, Layout)


def flatten(x: Tensor) -> tuple[Tensor, Layout]:
    """``(B, L, W)`` with every token valid (image tokens) -> ``(B * L, W)`` rows and their uniform layout."""
    B, L = x.shape[:2]
    cu = torch.arange(B + 1, dtype=torch.int32, device=x.device) * L
    return x.reshape(B * L, *x.shape[2:]), Layout(cu, L)


def first_tokens(hidden: Tensor, mask) -> Tensor:
    """Each sample's first token: ``hidden[:, 0]`` (padded) or its first packed row."""
    return hidden[mask.first_rows] if is_packed(mask) else hidden[:, 0]


def twice(hidden: Tensor, mask):
    """``(cat([hidden, hidden]), the mask or layout of that)``."""
    if is_packed(mask):
        return torch.cat([hidden, hidden]), mask.twice()
    return torch.cat([hidden, hidden]), None if mask is None else torch.cat([mask, mask])


def embed(embeddings, input_ids: Tensor, layout: Layout, token_type_ids: Optional[Tensor] = None) -> Tensor:
    """A Hugging Face ``BertEmbeddings`` over packed ids ``(total,)``: each token at its position in
    its own sample, token type 0 unless given -> ``(total, width)``."""
    if token_type_ids is None:  # BERT's buffered zeros are only max_position_embeddings long
        token_type_ids = torch.zeros_like(input_ids)
    return embeddings(input_ids=input_ids[None], token_type_ids=token_type_ids[None],
                      position_ids=layout.position_ids[None])[0]


def shifted_targets(labels: Tensor, layout: Layout) -> Tensor:
    """Next-token targets of packed rows: row t predicts ``labels[t + 1]`` of the same sample; the
    last row of each sample predicts nothing (-100), as the padded ``labels[:, 1:]`` does."""
    shifted = torch.cat([labels[1:], labels.new_full((1,), -100)])
    return shifted.index_fill(0, layout.cu_seqlens[1:].long() - 1, -100)


def rows_in_fused(text: Layout, fused: Layout) -> Tensor:
    """int64 (total_text,): where each packed text row sits in the packed fused sequence (sample
    ``b``'s text first, then its image tokens)."""
    lengths = text.cu_seqlens.long().diff()
    return torch.repeat_interleave(fused.cu_seqlens[:-1].long(), lengths) + text.position_ids


class PackedText(NamedTuple):
    """The text of one batch, packed: ids ``(total,)``, their layout, token types, and how to pack
    a per-token tensor given like the ids (``labels``)."""

    input_ids: Tensor
    layout: Layout
    token_type_ids: Optional[Tensor]
    labels: Callable[[Optional[Tensor], str], Optional[Tensor]]


def _err(msg: str) -> ValueError:
    return ValueError(f"mmfast.models (packed=True): {msg}")


def pack_text(input_ids: Tensor, attention_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
              max_seqlen: Optional[int], token_type_ids: Optional[Tensor], batch: int) -> PackedText:
    """The model's text inputs, packed. Padded input: ``input_ids (B, L)`` with a right-padded
    ``attention_mask`` (None: no padding). Packed input: ``input_ids (total,)`` with ``cu_seqlens``
    int32 ``(B + 1,)``. Every sample needs at least one token ([CLS]); ``batch`` is the image batch."""
    if not isinstance(input_ids, Tensor) or input_ids.is_floating_point():
        raise _err(f"argument 'input_ids' must be an integer tensor, got {getattr(input_ids, 'dtype', input_ids)}")
    if cu_seqlens is None:
        if input_ids.dim() != 2:
            raise _err(f"argument 'input_ids' must be (batch, length) with 'attention_mask', or (total,) with "
                       f"'cu_seqlens'; got shape {tuple(input_ids.shape)} without 'cu_seqlens'")
        B, L = input_ids.shape
        if attention_mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
        else:
            if tuple(attention_mask.shape) != (B, L):
                raise _err(f"argument 'attention_mask' must have the shape of 'input_ids' {(B, L)}, "
                           f"got {tuple(attention_mask.shape)}")
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
            # positions count from each sample's first token, as the padded model's do only when
            # the padding is on the right
            if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
                raise _err("argument 'attention_mask' must be right-padded (1s, then 0s, in every row); "
                           "left or scattered padding would change the tokens' positions")
        if B and not bool(mask[:, 0].all()):
            raise _err(f"argument 'attention_mask': every sample needs at least one token, sample(s) "
                       f"{(~mask[:, 0]).nonzero().reshape(-1).tolist()} have none")
        p = pack(input_ids, mask)
        layout = Layout(p.cu_seqlens, p.max_seqlen, positions(p.cu_seqlens))

        def labels(t: Optional[Tensor], name: str) -> Optional[Tensor]:
            if t is None:
                return None
            if tuple(t.shape) != (B, L):
                raise _err(f"argument '{name}' must have the shape of 'input_ids' {(B, L)}, got {tuple(t.shape)}")
            # the padded model would train on such a target, the packed one cannot see it
            if name != "token_type_ids" and bool((t[~mask] != -100).any()):
                raise _err(f"argument '{name}' has targets on padding (attention_mask 0); padding must be -100")
            return t.reshape(-1).index_select(0, p.indices)

        tt = labels(token_type_ids, "token_type_ids")
        ids = p.values
    else:
        if attention_mask is not None:
            raise _err("give either 'attention_mask' (padded input_ids) or 'cu_seqlens' (packed input_ids), not both")
        if input_ids.dim() != 1:
            raise _err(f"with 'cu_seqlens', argument 'input_ids' must be packed (total,), got {tuple(input_ids.shape)}")
        total = input_ids.shape[0]
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise _err(f"argument 'cu_seqlens' must be a 1-D int32 tensor, got {getattr(cu_seqlens, 'dtype', cu_seqlens)}")
        c = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(c, c[1:])]
        if not c or c[0] != 0 or c[-1] != total or any(n < 1 for n in lengths):
            raise _err(f"argument 'cu_seqlens' must start at 0, grow by at least 1 per sample (every sample needs "
                       f"a token) and end at total = {total}, got {c if len(c) < 20 else tuple(cu_seqlens.shape)}")
        longest = max(lengths, default=0)
        if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < longest):
            raise _err(f"argument 'max_seqlen' must be an int >= the longest sample ({longest}), got {max_seqlen!r}")
        layout = Layout(cu_seqlens, longest if max_seqlen is None else max_seqlen, positions(cu_seqlens))

        def labels(t: Optional[Tensor], name: str) -> Optional[Tensor]:
            if t is not None and tuple(t.shape) != (total,):
                raise _err(f"argument '{name}' must be packed like 'input_ids' ({total},), got {tuple(t.shape)}")
            return t

        tt = labels(token_type_ids, "token_type_ids")
        ids = input_ids
    if layout.cu_seqlens.numel() - 1 != batch:
        raise _err(f"the text has {layout.cu_seqlens.numel() - 1} samples, 'pixel_values' has {batch}")
    return PackedText(ids, layout, tt, labels)
