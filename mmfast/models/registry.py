"""Model names ``<arch>_<size>``, ``create_model``, ``list_models`` and ``describe_models``."""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from mmfast.models.common import SIZES, FusionModel, ZooConfig, tower_parameter_counts

ARCHS = ("single_stream", "cross_attention", "co_attention", "dual_encoder", "captioner")

# Published sizes of the reference models, for the `mmfast models` table: (reference, published
# parameters per part or None where we quote no figure, how our base model compares).
REFERENCES = {
    "single_stream": ("ViLT-B/32", {"total": 87.4e6},
                      "ViLT's figure matches its ViT-B/32 transformer (87.46M with patch_size=32); ours uses "
                      "ViT-B/16 @ 224 (85.80M) and also counts BERT's 23.84M embeddings as 'text'"),
    "cross_attention": ("ALBEF", {"text": 123.7e6, "vision": 85.8e6},
                        "ALBEF's text figure includes BERT's unused pooler (0.59M), which our tower omits"),
    "co_attention": ("METER (BERT-base + ViT-B/16, 6 co-attention layers)", None, ""),
    "dual_encoder": ("CLIP ViT-B/16 image tower + BERT-base text tower", None,
                     "CLIP's own text tower is a 63M GPT-style transformer, not BERT"),
    "captioner": ("BLIP captioner (ViT-B/16 + BERT-base decoder with cross-attention)", None, ""),
}


def _classes() -> dict:
    # imported lazily: the architecture files import transformers and timm
    from mmfast.models.captioner import CaptionerModel
    from mmfast.models.co_attention import CoAttentionModel
    from mmfast.models.cross_attention import CrossAttentionModel
    from mmfast.models.dual_encoder import DualEncoderModel
    from mmfast.models.single_stream import SingleStreamModel

    return {c.arch: c for c in (SingleStreamModel, CrossAttentionModel, CoAttentionModel, DualEncoderModel,
                                CaptionerModel)}


def list_models() -> list[str]:
    return [f"{a}_{s}" for a in ARCHS for s in SIZES]


def _split(name: str):
    if not isinstance(name, str):
        raise TypeError(f"mmfast.models.create_model: argument 'name' must be a str, got {type(name)}")
    for arch in ARCHS:
        if name.startswith(arch + "_") and name[len(arch) + 1:] in SIZES:
            return arch, name[len(arch) + 1:]
    raise ValueError(f"mmfast.models.create_model: unknown model {name!r}; available: {list_models()}")


def default_task(name: str) -> str:
    """The task ``create_model(name)`` builds when none is given (no model is built)."""
    arch, _ = _split(name)
    return _classes()[arch].default_task


def config_for(name: str, **overrides) -> ZooConfig:
    arch, size = _split(name)
    return ZooConfig(**SIZES[size]).updated(overrides)


def create_model(name: str, *, task: Optional[str] = None, num_labels: Optional[int] = None, fused: bool = True,
                 text_pretrained=None, vision_pretrained=None, packed: bool = False, **overrides) -> FusionModel:
    """Builds a zoo model (random init, nothing downloaded), then loads the given checkpoints.

    ``fused=False`` builds the eager twin: same modules and parameter names, plain PyTorch ops.
    ``packed=True`` runs the text unpadded (packed rows + cu_seqlens through ``attention_varlen``;
    single_stream: the fused text+image sequence): same parameters, same outputs on the valid
    tokens; the forward also takes packed ``input_ids (total,)`` with ``cu_seqlens`` (and
    ``max_seqlen``), and returns token-level outputs as packed rows (mmfast/models/packing.py).
    ``backend`` (an override) selects the mmfast backend for every op (str) or per op (dict).
    Other overrides replace :class:`ZooConfig` fields (e.g. ``fusion_layer=4``, ``img_size=384``)."""
    arch, size = _split(name)
    backend = overrides.pop("backend", "auto")
    cfg = ZooConfig(**SIZES[size]).updated(overrides)
    cls = _classes()[arch]
    task = cls.default_task if task is None else task
    if task not in cls.tasks:
        raise ValueError(f"mmfast.models.create_model: {arch} supports tasks {list(cls.tasks)}, got task={task!r}")
    if num_labels is not None and (not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(f"mmfast.models.create_model: argument 'num_labels' must be a positive int, got {num_labels!r}")
    model = cls(cfg, task=task, num_labels=num_labels, fused=fused, backend=backend, size=size, packed=packed)
    model.load_pretrained(text_pretrained, vision_pretrained)
    return model


@lru_cache(maxsize=None)
def _counts(name: str) -> tuple:
    # built on the meta device: no memory, no initialisation cost, exact shapes
    with torch.device("meta"):
        m = create_model(name)
    return tuple(tower_parameter_counts(m).items())


def describe_models(sizes=None) -> list[dict]:
    """One dict per model: name, arch, size, default task, tasks, parameter counts per tower
    (:func:`tower_parameter_counts`: text / vision / fusion / heads of the default task / backbone /
    total), and for base models the reference model, its published size where we quote one
    (``reference_params``: {part: count} or None) and a note on how the two compare."""
    classes = _classes()
    rows = []
    for name in list_models():
        arch, size = _split(name)
        if sizes is not None and size not in sizes:
            continue
        ref_name, ref_params, note = REFERENCES[arch]
        rows.append({"name": name, "arch": arch, "size": size, "default_task": classes[arch].default_task,
                     "tasks": list(classes[arch].tasks), "params": dict(_counts(name)),
                     "reference": ref_name if size == "base" else None,
                     "reference_params": ref_params if size == "base" else None,
                     "note": note if size == "base" else ""})
    return rows
