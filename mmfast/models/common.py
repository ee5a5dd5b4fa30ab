"""The zoo's base class :class:`FusionModel`, the shared :class:`Pooler` and parameter counts per
tower. The other shared pieces live by subject and are re-exported here, where the architectures
import them from: ``kernels`` (the fused / eager switch), ``config`` (:class:`ZooConfig`, sizes,
:class:`FusionOutput`), ``text`` (BERT tower), ``vision`` (timm ViT), ``checkpoints``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mmfast.models.checkpoints import (CheckpointError, _read_state_dict, _strict_load, check_bert_config,  # noqa: F401
                                       load_bert_checkpoint, load_text_tower, load_vision_tower)
from mmfast.models.config import SIZES, FusionOutput, ModelOutput, ZooConfig  # noqa: F401
from mmfast.models.kernels import OP_NAMES, Kernels, as_bool_mask, eager_attention  # noqa: F401
from mmfast.models.packing import Layout, first_tokens, is_packed, pack_text  # noqa: F401
from mmfast.models.text import (TextAttention, TextEncoderLayers, TextLayer, TextSelfAttention,  # noqa: F401
                                TextTower)
from mmfast.models.vision import FusedViTAttention, build_vit, vit_block  # noqa: F401

class Pooler(nn.Module):
    """``BertPooler``: tanh(dense(first token)); ``mask`` a packed Layout when ``hidden`` is packed rows."""

    def __init__(self, width: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.activation = nn.Tanh()

    def forward(self, hidden: Tensor, mask=None) -> Tensor:
        return self.activation(self.dense(first_tokens(hidden, mask)))


class FusionModel(nn.Module):
    """Common behaviour of the zoo models: task bookkeeping, backend switching, example inputs.

    ``packed=True``: the text runs unpadded (see mmfast/models/packing.py); token-level outputs
    (``last_hidden_state``, MLM/caption logits) are then packed rows ``(total, ...)`` in the order of
    the valid tokens (``padded[attention_mask.bool()]``); per-sample outputs keep their shape."""

    arch: str = ""
    tasks: tuple = ()

    def __init__(self, cfg: ZooConfig, task: str, fused: bool, backend="auto", size: str = "", packed: bool = False):
        super().__init__()
        if task not in self.tasks:
            raise ValueError(f"mmfast.models: {self.arch} supports tasks {list(self.tasks)}, got task={task!r}")
        if not isinstance(packed, bool):
            raise TypeError(f"mmfast.models: argument 'packed' must be a bool, got {packed!r}")
        self.cfg = cfg
        self.task = task
        self.size = size
        self.packed = packed
        self.kernels = Kernels(fused, backend)

    @property
    def fused(self) -> bool:
        return self.kernels.fused

    def set_backend(self, backend) -> "FusionModel":
        """Backend for every op (str) or per op ({op: backend}); applies to all modules."""
        self.kernels.set_backend(backend)
        return self

    def extra_repr(self) -> str:
        return f"arch={self.arch}, size={self.size}, task={self.task}, fused={self.fused}, packed={self.packed}"

    def _text_batch(self, input_ids: Tensor, attention_mask, token_type_ids, cu_seqlens, max_seqlen, batch: int,
                    labels: Optional[Tensor] = None, mlm_labels: Optional[Tensor] = None) -> tuple:
        """(input_ids, mask, token_type_ids, labels, mlm_labels): padded as given (mask: bool or
        None), or packed (ids (total,), mask: their Layout, the per-token tensors packed alike:
        token types, MLM labels, and ``labels`` where the task's labels are per token)."""
        if not self.packed:
            if cu_seqlens is not None or max_seqlen is not None:
                raise ValueError(f"mmfast.models: 'cu_seqlens'/'max_seqlen' (packed input_ids) need a model built "
                                 f"with packed=True; {self.arch}_{self.size} was built padded")
            return input_ids, as_bool_mask(attention_mask), token_type_ids, labels, mlm_labels
        p = pack_text(input_ids, attention_mask, cu_seqlens, max_seqlen, token_type_ids, batch)
        if self.task in ("mlm", "caption"):
            labels = p.labels(labels, "labels")
        return p.input_ids, p.layout, p.token_type_ids, labels, p.labels(mlm_labels, "mlm_labels")

    # -- example inputs ---------------------------------------------------------------------------
    def _device(self):
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _dtype(self):
        p = next(self.parameters(), None)
        return p.dtype if p is not None and p.is_floating_point() else torch.float32

    def _example_text(self, B: int, gen: torch.Generator):
        """[CLS] w ... w [SEP] [PAD]...: the last sample is padded to about 60 % of the length."""
        c, L = self.cfg, self.cfg.text_len
        # ordinary word ids: above the special tokens (and BERT's [unused] block when the vocabulary is real)
        low = 1000 if c.vocab_size > 2000 else c.mask_token_id + 1
        ids = torch.randint(low, c.vocab_size, (B, L), generator=gen, device="cpu")
        lengths = torch.full((B,), L, device="cpu")
        if B > 1:
            lengths[-1] = max(3, int(L * 0.6))
        pos = torch.arange(L, device="cpu")[None, :]
        ids[:, 0] = c.cls_token_id
        ids[pos == (lengths[:, None] - 1)] = c.sep_token_id
        mask = pos < lengths[:, None]
        ids = ids.masked_fill(~mask, c.pad_token_id)
        return ids, mask.long()

    def _example_mlm(self, ids, mask, gen):
        """BERT masking (all selected tokens become [MASK]); at least one per sample."""
        c = self.cfg
        special = (ids == c.cls_token_id) | (ids == c.sep_token_id) | (mask == 0)
        sel = (torch.rand(ids.shape, generator=gen, device="cpu") < c.mlm_probability) & ~special
        sel[:, 1] = True  # position 1 is always a word
        labels = ids.masked_fill(~sel, -100)
        return ids.masked_fill(sel, c.mask_token_id), labels

    def _example_pixels(self, B: int, gen: torch.Generator):
        c = self.cfg
        return torch.randn(B, 3, c.img_size, c.img_size, generator=gen, device="cpu")

    def example_inputs(self, batch_size: int = 2, seed: int = 0) -> dict:
        """A valid input dict for this model's task, labels included, on the model's device and dtype
        (text: [CLS] words [SEP], the last sample padded; pixels: standard normal)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        B = batch_size
        ids, mask = self._example_text(B, gen)
        inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": self._example_pixels(B, gen)}
        t = self.task
        if t == "mlm":
            inputs["input_ids"], inputs["labels"] = self._example_mlm(ids, mask, gen)
        elif t == "pretrain" and getattr(self, "mlm_head", None) is not None:
            inputs["mlm_labels"] = self._example_mlm(ids, mask, gen)[1]
        elif t == "itm":
            inputs["labels"] = torch.randint(0, 2, (B,), generator=gen, device="cpu")
        elif t in ("vqa", "classification"):
            inputs["labels"] = torch.randint(0, self.num_labels, (B,), generator=gen, device="cpu")
        elif t == "caption":
            inputs["labels"] = ids.masked_fill(mask == 0, -100)
        dev, dt = self._device(), self._dtype()
        return {k: (v.to(dev, dt) if v.is_floating_point() else v.to(dev)) for k, v in inputs.items()}

    # -- shared helpers ---------------------------------------------------------------------------
    def _mask_for_mlm(self, input_ids: Tensor, mlm_labels: Tensor) -> Tensor:
        return input_ids.masked_fill(mlm_labels != -100, self.cfg.mask_token_id)

    def load_pretrained(self, text_pretrained=None, vision_pretrained=None) -> None:
        if text_pretrained is not None:
            load_text_tower(self.text_pretrained_target(), text_pretrained, self.cfg)
        if vision_pretrained is not None:
            load_vision_tower(self.vision_encoder, vision_pretrained)

    def text_pretrained_target(self) -> nn.Module:
        return self.text_encoder


HEAD_MODULES = ("mlm_head", "lm_head", "itm_head", "classifier", "contrastive")


def tower_parameter_counts(model: FusionModel) -> dict:
    """Parameters per part: ``text`` (text tower or decoder; single_stream: BERT embeddings),
    ``vision`` (the timm ViT), ``fusion`` (everything else but the task heads), ``heads`` (the task's
    heads and projections), ``backbone`` = text + vision + fusion, ``total``. Tied weights (the
    MLM/LM decoder is the word embedding) count once."""
    seen = set()
    counts = {"text": 0, "vision": 0, "fusion": 0, "heads": 0}

    def add(key, mod):
        for p in mod.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                counts[key] += p.numel()

    for mod in (getattr(model, "text_encoder", None), getattr(model, "text_decoder", None),
                getattr(model, "text_embeddings", None)):
        if mod is not None:
            add("text", mod)
    add("vision", model.vision_encoder)
    for name in HEAD_MODULES:
        if getattr(model, name, None) is not None:
            add("heads", getattr(model, name))
    add("fusion", model)
    counts["backbone"] = counts["text"] + counts["vision"] + counts["fusion"]
    counts["total"] = counts["backbone"] + counts["heads"]
    return counts
