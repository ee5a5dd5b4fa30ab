"""Loading BERT and timm ViT checkpoints into the zoo's towers; errors list every mismatch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from mmfast.models.config import ZooConfig

class CheckpointError(ValueError):
    pass


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".npz":
        raise CheckpointError(f"mmfast.models: {path} is a JAX .npz checkpoint; convert it with timm first "
                              "(timm.create_model(..., pretrained_cfg_overlay=dict(file=...)) then torch.save)")
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def _strict_load(module: nn.Module, sd: dict, what: str, source: str, allow_missing=(), ignore_unexpected=()):
    own = module.state_dict()
    missing = sorted(k for k in own if k not in sd and not any(p in k for p in allow_missing))
    unexpected = sorted(k for k in sd if k not in own and not any(k.startswith(p) for p in ignore_unexpected))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"mmfast.models: {what} checkpoint {source} does not match the model.\n"
            f"  missing keys ({len(missing)}): {missing}\n  unexpected keys ({len(unexpected)}): {unexpected}\n"
            f"  shape mismatches ({len(shapes)}): {shapes}\n"
            "Pick the model size that matches the checkpoint (e.g. *_small for MiniLM-L6-H384, *_base for "
            "bert-base-uncased), or override the size fields in create_model(...).")
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def load_bert_checkpoint(path) -> tuple[dict, dict]:
    """(state_dict with BertModel keys, config dict) from a Hugging Face BERT directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"mmfast.models: text_pretrained must be a Hugging Face BERT directory "
                              f"(config.json + model.safetensors or pytorch_model.bin); {path} is not a directory")
    files = [path / "model.safetensors", path / "pytorch_model.bin"]
    found = [f for f in files if f.exists()]
    if not found:
        raise CheckpointError(f"mmfast.models: no weights in {path} (looked for {[f.name for f in files]})")
    sd = _read_state_dict(found[0])
    conf = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    # BertForMaskedLM/BertForPreTraining checkpoints prefix the encoder with "bert."
    if any(k.startswith("bert.") for k in sd):
        sd = {k[len("bert."):]: v for k, v in sd.items() if k.startswith("bert.")}
    sd.pop("embeddings.position_ids", None)
    return sd, conf


def check_bert_config(conf: dict, cfg: ZooConfig, source) -> None:
    """Fields that change the computation without changing any parameter shape must match too."""
    checks = {"num_attention_heads": cfg.num_attention_heads, "hidden_act": cfg.hidden_act,
              "layer_norm_eps": cfg.layer_norm_eps, "position_embedding_type": "absolute"}
    bad = [f"{k}: checkpoint {conf[k]!r} vs model {v!r}" for k, v in checks.items()
           if k in conf and conf[k] != v and not (isinstance(v, float) and math.isclose(conf[k], v))]
    if bad:
        raise CheckpointError(f"mmfast.models: text checkpoint {source} config does not match the model: {bad}")


def load_text_tower(tower: "TextTower", path, cfg: ZooConfig) -> None:
    """Loads a BERT checkpoint into a text tower: cross-attention weights (not in BERT) stay as
    initialised; the checkpoint's pooler and pre-training heads are not used by the tower."""
    sd, conf = load_bert_checkpoint(path)
    check_bert_config(conf, cfg, path)
    _strict_load(tower, sd, "text (BERT)", str(path), allow_missing=(".crossattention.",),
                 ignore_unexpected=("pooler.", "cls."))


def load_vision_tower(vit: nn.Module, path) -> None:
    """Loads a timm ViT checkpoint file (.safetensors/.pth/.bin); the classifier head is dropped and
    a position embedding for another image size is resampled (timm's resample_abs_pos_embed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"mmfast.models: vision_pretrained must be a timm checkpoint file; {path} not found")
    sd = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("head.")}
    pe = sd.get("pos_embed")
    if pe is not None and pe.shape != vit.pos_embed.shape and pe.shape[-1] == vit.pos_embed.shape[-1]:
        from timm.layers import resample_abs_pos_embed

        sd["pos_embed"] = resample_abs_pos_embed(pe, new_size=vit.patch_embed.grid_size,
                                                 num_prefix_tokens=vit.num_prefix_tokens)
    _strict_load(vit, sd, "vision (timm ViT)", str(path))
