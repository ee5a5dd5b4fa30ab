"""Batching: pad text, build attention masks, stack images and labels."""

from __future__ import annotations

import torch


def collate(items: list[dict], pad_token_id: int = 0, label_pad_id: int = -100) -> dict:
    """Collate dataset items (dicts of tensors) into one batch dict.

    - ``input_ids`` (1-D, variable length) are right-padded with ``pad_token_id``; ``attention_mask``
      is built (1 = real token) unless the items bring their own (then it is padded with 0).
    - 1-D ``labels`` whose length follows ``input_ids`` (captions, MLM, NER) are padded with
      ``label_pad_id`` (-100: ignored by cross-entropy); scalar labels are stacked.
    - every other tensor (``pixel_values``, ...) is stacked and must have equal shapes.
    """
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
        elif lengths is not None and torch.as_tensor(values[0]).dim() == 1 and key in ("labels", "token_type_ids"):
            batch[key] = pad(values, label_pad_id if key == "labels" else 0)
        else:
            try:
                batch[key] = torch.stack([torch.as_tensor(v) for v in values])
            except RuntimeError as e:
                shapes = sorted({tuple(torch.as_tensor(v).shape) for v in values})
                raise ValueError(f"collate: cannot stack {key!r}: shapes differ across items {shapes}") from e
    if lengths is not None and "attention_mask" not in batch:
        batch["attention_mask"] = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
    return batch
