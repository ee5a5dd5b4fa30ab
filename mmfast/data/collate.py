"""Batching: pad text, build attention masks, stack images and labels; or pack the text
(``collate(items, packed=True)``, :func:`pack_batch` / :func:`unpack_batch`) for the zoo's
``packed=True`` models and :func:`mmfast.ops.attention_varlen`."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mmfast.data.pack import pack, right_padded_indices, unpack

# Per-token entries a batch may hold besides input_ids (they follow input_ids' length)
TOKEN_KEYS = ("input_ids", "token_type_ids", "labels", "mlm_labels")


def collate(items: list[dict], pad_token_id: int = 0, label_pad_id: int = -100, packed: bool = False) -> dict:
    """Collate dataset items (dicts of tensors) into one batch dict.

    - ``input_ids`` (1-D, variable length) are right-padded with ``pad_token_id``; ``attention_mask``
      is built (1 = real token) unless the items bring their own (then it is padded with 0).
    - 1-D ``labels`` / ``mlm_labels`` whose length follows ``input_ids`` (captions, MLM, NER) are padded with
      ``label_pad_id`` (-100: ignored by cross-entropy); scalar labels are stacked.
    - every other tensor (``pixel_values``, ...) is stacked and must have equal shapes.

    ``packed=True``: the padded batch, then :func:`pack_batch`: ``input_ids`` and the per-token
    entries become packed rows ``(total,)``, ``attention_mask`` becomes ``cu_seqlens`` + ``max_seqlen``.
    """
    if not isinstance(packed, bool):
        raise TypeError(f"collate: argument 'packed' must be a bool, got {packed!r}")
    batch = _padded(items, pad_token_id, label_pad_id)
    return pack_batch(batch) if packed else batch


def _padded(items: list[dict], pad_token_id: int, label_pad_id: int) -> dict:
    if not items:
        raise ValueError("collate: got an empty list of items")
    keys = items[0].keys()
    for i, it in enumerate(items):
        if it.keys() != keys:
            raise ValueError(f"collate: item {i} has keys {sorted(it.keys())}, item 0 has {sorted(keys)}")
    batch = {}
    lengths = [len(it["input_ids"]) for it in items] if "input_ids" in keys else None
    longest = max(lengths) if lengths else 0

    def pad(seqs, value):
        out = torch.full((len(seqs), longest), value, dtype=torch.as_tensor(seqs[0]).dtype)
        for row, s in enumerate(seqs):
            s = torch.as_tensor(s)
            out[row, : len(s)] = s
        return out

    for key in keys:
        values = [it[key] for it in items]
        if key == "input_ids":
            batch[key] = pad(values, pad_token_id)
        elif key == "attention_mask":
            batch[key] = pad(values, 0)
        elif lengths is not None and torch.as_tensor(values[0]).dim() == 1 and key in TOKEN_KEYS:
            batch[key] = pad(values, 0 if key == "token_type_ids" else label_pad_id)
        else:
            try:
                batch[key] = torch.stack([torch.as_tensor(v) for v in values])
            except RuntimeError as e:
                shapes = sorted({tuple(torch.as_tensor(v).shape) for v in values})
                raise ValueError(f"collate: cannot stack {key!r}: shapes differ across items {shapes}") from e
    if lengths is not None and "attention_mask" not in batch:
        batch["attention_mask"] = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
    return batch


def pack_batch(batch: dict) -> dict:
    """A padded batch -> the same batch packed: ``input_ids`` and every per-token entry
    (``token_type_ids``, ``labels`` / ``mlm_labels`` of ``input_ids``' shape) become ``(total,)``
    rows of the real tokens, sample after sample; ``attention_mask`` is replaced by ``cu_seqlens``
    (int32 ``(batch + 1,)``) and ``max_seqlen`` (int); everything else is kept. Any padding side is
    read; the zoo's packed models want right padding (positions count from each sample's start)."""
    if "input_ids" not in batch or "attention_mask" not in batch:
        raise ValueError(f"pack_batch: argument 'batch' must hold 'input_ids' and 'attention_mask', "
                         f"got keys {sorted(batch)}")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    p = pack(ids, mask)  # checks the mask's shape and values
    out = {}
    for key, value in batch.items():
        if key == "attention_mask":
            out["cu_seqlens"], out["max_seqlen"] = p.cu_seqlens, p.max_seqlen
        elif key == "input_ids":
            out[key] = p.values
        elif key in TOKEN_KEYS and isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(ids.shape):
            out[key] = pack(value, mask).values
        else:
            out[key] = value
    return out


def unpack_batch(batch: dict, pad_token_id: int = 0, label_pad_id: int = -100,
                 token_keys: Optional[Sequence[str]] = None) -> dict:
    """The inverse of :func:`pack_batch`: right-padded ``(batch, max_seqlen)`` per-token entries
    (``input_ids`` padded with ``pad_token_id``, labels with ``label_pad_id``, token types with 0)
    and an ``attention_mask`` (1 = token) in place of ``cu_seqlens`` / ``max_seqlen``.
    ``token_keys``: the packed per-token entries (default: those of :data:`TOKEN_KEYS` present; name
    them when ``labels`` could be per-sample labels, i.e. when every sample has one token)."""
    cu = batch.get("cu_seqlens")
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or "input_ids" not in batch:
        raise ValueError("unpack_batch: argument 'batch' must hold packed 'input_ids' and int32 'cu_seqlens' "
                         "(pack_batch's output)")
    B, total = cu.numel() - 1, batch["input_ids"].shape[0]
    seqlen = batch.get("max_seqlen") or (int(cu.diff().max()) if B else 0)
    if token_keys is None:
        token_keys = [k for k in TOKEN_KEYS if k in batch]
        if "labels" in batch and total == B:
            raise ValueError("unpack_batch: 'labels' has one entry per sample and per token alike (every sample has "
                             "one token): say which with argument 'token_keys'")
    indices = right_padded_indices(cu, seqlen)
    pads = {"input_ids": pad_token_id, "labels": label_pad_id, "mlm_labels": label_pad_id}
    out = {}
    for key, value in batch.items():
        if key == "cu_seqlens":
            ones = torch.ones(total, dtype=torch.long, device=cu.device)
            out["attention_mask"] = unpack(ones, indices, B, seqlen, pad_value=0)
        elif key == "max_seqlen":
            continue
        elif key in token_keys:
            if value.shape[:1] != (total,):
                raise ValueError(f"unpack_batch: per-token entry {key!r} must have {total} rows (cu_seqlens[-1]), "
                                 f"got {tuple(value.shape)}")
            out[key] = unpack(value, indices, B, seqlen, pad_value=pads.get(key, 0))
        else:
            out[key] = value
    return out
