"""Packing: padded ``(batch, seqlen, ...)`` tensors <-> packed ``(total, ...)`` rows plus ``cu_seqlens``,
the layout of :func:`mmfast.ops.attention_varlen` (and of flash-attn's ``unpad_input``/``pad_input``).

The valid tokens of row ``b`` (``attention_mask[b]`` true, in order; right, left or any padding) become
packed rows ``cu_seqlens[b]:cu_seqlens[b+1]``. Both directions are differentiable (an index select
and an index copy), so hidden states can be packed inside a model and unpacked after it.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor


class Packed(NamedTuple):
    values: Tensor  # (total, ...) the valid rows, sequence after sequence
    cu_seqlens: Tensor  # int32 (batch + 1,) cumulative lengths from 0
    max_seqlen: int  # the longest sequence (a Python int, as attention_varlen takes it)
    indices: Tensor  # int64 (total,) position of each packed row in the flattened (batch * seqlen) input


def cu_seqlens_from_lengths(lengths: Tensor | Sequence[int]) -> Tensor:
    """int32 ``(batch + 1,)`` = ``[0, l0, l0 + l1, ...]``."""
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.is_floating_point() or bool((lengths < 0).any()):
        raise ValueError(f"mmfast.data.pack: argument 'lengths' must be a 1-D sequence of non-negative integers, "
                         f"got {lengths.tolist() if lengths.numel() < 20 else tuple(lengths.shape)}")
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def positions_in_sequences(cu_seqlens: Tensor) -> Tensor:
    """int64 ``(total,)``: each packed row's position in its own sequence (0 at every sequence start)."""
    cu = cu_seqlens.long()
    return torch.arange(int(cu[-1]), device=cu.device) - torch.repeat_interleave(cu[:-1], cu.diff())


def right_padded_indices(cu_seqlens: Tensor, seqlen: int) -> Tensor:
    """int64 ``(total,)``: where each packed row sits in a right-padded ``(batch, seqlen)`` batch,
    flattened (the ``indices`` :func:`unpack` takes)."""
    cu = cu_seqlens.long()
    starts = torch.arange(cu.numel() - 1, device=cu.device) * seqlen
    return positions_in_sequences(cu_seqlens) + torch.repeat_interleave(starts, cu.diff())


def _check_mask(padded: Tensor, attention_mask: Tensor) -> Tensor:
    if not isinstance(padded, Tensor) or padded.dim() < 2:
        raise ValueError(f"mmfast.data.pack: argument 'padded' must be a (batch, seqlen, ...) tensor, got "
                         f"{tuple(getattr(padded, 'shape', ()))}")
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(padded.shape[:2]):
        raise ValueError(f"mmfast.data.pack: argument 'attention_mask' must have shape (batch, seqlen) = "
                         f"{tuple(padded.shape[:2])}, got {tuple(getattr(attention_mask, 'shape', ()))}")
    if attention_mask.dtype != torch.bool:
        if attention_mask.is_floating_point() or bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("mmfast.data.pack: argument 'attention_mask' must be bool or hold only 0 and 1 "
                             "(1 = real token)")
        attention_mask = attention_mask != 0
    if attention_mask.device != padded.device:
        raise ValueError(f"mmfast.data.pack: argument 'attention_mask' is on {attention_mask.device}, "
                         f"'padded' on {padded.device}")
    return attention_mask


def pack(padded: Tensor, attention_mask: Tensor) -> Packed:
    """The valid tokens of ``padded`` ``(batch, seqlen, ...)`` (``attention_mask`` ``(batch, seqlen)``,
    bool or 0/1, true = real token) packed into ``(total, ...)`` with their ``cu_seqlens``.
    One device->host copy (``max_seqlen`` and the packed size are data)."""
    mask = _check_mask(padded, attention_mask)
    lengths = mask.sum(1)
    indices = mask.reshape(-1).nonzero().reshape(-1)
    values = padded.reshape(-1, *padded.shape[2:]).index_select(0, indices)
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return Packed(values, cu_seqlens_from_lengths(lengths), max_seqlen, indices)


def unpack(values: Tensor, indices: Tensor, batch: int, seqlen: int, pad_value: float | int = 0) -> Tensor:
    """The inverse of :func:`pack`: ``(batch, seqlen, ...)`` with ``values`` at ``indices`` (from
    ``pack``) and ``pad_value`` everywhere else."""
    if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.shape[0] != values.shape[0]:
        raise ValueError(f"mmfast.data.pack: argument 'indices' must be 1-D with one entry per packed row "
                         f"({values.shape[0]}), got {tuple(getattr(indices, 'shape', ()))}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= batch * seqlen):
        raise ValueError(f"mmfast.data.pack: argument 'indices' must lie in [0, batch * seqlen = {batch * seqlen})")
    out = values.new_full((batch * seqlen, *values.shape[1:]), pad_value)
    return out.index_copy(0, indices.to(torch.int64), values).reshape(batch, seqlen, *values.shape[1:])


def pack_sequences(sequences: Sequence[Tensor]) -> Packed:
    """Tensors ``(length_b, ...)`` of any lengths concatenated into one packed tensor (no padded
    batch needed: a collate function can build the packed batch directly). ``indices`` are those
    a right-padded ``(batch, max_seqlen, ...)`` batch would have."""
    if not sequences:
        raise ValueError("mmfast.data.pack: argument 'sequences' must not be empty")
    lengths = [int(s.shape[0]) for s in sequences]
    longest = max(lengths)
    cu_seqlens = cu_seqlens_from_lengths(lengths).to(sequences[0].device)
    return Packed(torch.cat(list(sequences), 0), cu_seqlens, longest, right_padded_indices(cu_seqlens, longest))


def concat_embed_packed(text: Tensor, text_cu_seqlens: Tensor, image: Tensor, **concat_embed_kwargs) -> Packed:
    """The fused text+image sequence of every sample, packed: sample ``b`` is its text tokens
    (packed rows ``text_cu_seqlens[b]:text_cu_seqlens[b+1]`` of ``text`` ``(total_text, D)``, its own
    length) followed by its ``image`` tokens ``(B, L_image, D)``, with the position, type embeddings,
    LayerNorm and dropout of :func:`mmfast.ops.concat_embed` (``concat_embed_kwargs``, e.g.
    ``type_embeddings``, ``pos_embeddings``, ``ln_weight``; not ``masks``). Returns the packed fused
    rows with their ``cu_seqlens`` (length_b + L_image each) for :func:`mmfast.ops.attention_varlen`.

    Not a packed kernel: the text is padded to the longest, run through the fused ``concat_embed``
    and packed again (the padded rows are computed and dropped)."""
    from mmfast.ops import concat_embed

    if "masks" in concat_embed_kwargs:
        raise ValueError("mmfast.data.pack: argument 'masks' is not taken by concat_embed_packed: the text lengths "
                         "come from 'text_cu_seqlens', image tokens are all valid")
    if not isinstance(image, Tensor) or image.dim() != 3 or text.dim() != 2 or image.shape[2] != text.shape[1]:
        raise ValueError(f"mmfast.data.pack: arguments 'text' (total_text, D) and 'image' (B, L_image, D) must share "
                         f"D, got {tuple(text.shape)} and {tuple(getattr(image, 'shape', ()))}")
    if not isinstance(text_cu_seqlens, Tensor) or text_cu_seqlens.dtype != torch.int32 \
            or tuple(text_cu_seqlens.shape) != (image.shape[0] + 1,):
        raise ValueError(f"mmfast.data.pack: argument 'text_cu_seqlens' must be int32 of shape ({image.shape[0] + 1},) "
                         f"(batch + 1), got {getattr(text_cu_seqlens, 'dtype', None)} "
                         f"{tuple(getattr(text_cu_seqlens, 'shape', ()))}")
    lengths = text_cu_seqlens.diff()
    if int(text_cu_seqlens[0]) != 0 or bool((lengths < 0).any()) or int(text_cu_seqlens[-1]) != text.shape[0]:
        raise ValueError(f"mmfast.data.pack: argument 'text_cu_seqlens' must start at 0, never decrease and end at "
                         f"total_text = {text.shape[0]}, got {text_cu_seqlens.tolist()}")
    B = image.shape[0]
    L_text = max(int(lengths.max()) if B else 0, 1)  # concat_embed takes no empty modality: one masked token
    text_mask = torch.arange(L_text, device=text.device)[None, :] < lengths[:, None].to(text.device)
    indices = text_mask.reshape(-1).nonzero().reshape(-1)
    padded_text = unpack(text, indices, B, L_text)
    fused, fused_mask = concat_embed([padded_text, image], masks=[text_mask, None], **concat_embed_kwargs)
    return pack(fused, fused_mask)
