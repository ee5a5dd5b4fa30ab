"""The fusion model zoo: five BERT+ViT architectures built on mmfast's ops, each with an eager twin.

    model = mmfast.models.create_model("cross_attention_tiny", task="pretrain")          # fused
    twin  = mmfast.models.create_model("cross_attention_tiny", task="pretrain", fused=False)
    twin.load_state_dict(model.state_dict())                                              # same names
    out = model(**model.example_inputs(batch_size=2)); out.loss.backward()

``create_model(name, packed=True)`` runs the text unpadded (mmfast/models/packing.py).

Architectures (one file each): single_stream (ViLT), cross_attention (ALBEF), co_attention (METER),
dual_encoder (CLIP-style), captioner (BLIP's decoder, ``generate``). Sizes: tiny (CPU tests),
small (MiniLM-L6-H384 + ViT-S/16), base (BERT-base + ViT-B/16 @ 224).
"""

from mmfast.models.common import FusionOutput, Kernels, ZooConfig, CheckpointError, tower_parameter_counts
from mmfast.models.registry import (ARCHS, REFERENCES, config_for, create_model, default_task, describe_models,
                                    list_models)

__all__ = ["ARCHS", "CheckpointError", "FusionOutput", "Kernels", "REFERENCES", "ZooConfig", "config_for",
           "create_model", "default_task", "describe_models", "list_models", "tower_parameter_counts"]
