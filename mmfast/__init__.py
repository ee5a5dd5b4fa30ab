"""mmfast: fused kernels for BERT+ViT vision-language fusion models.

    mmfast.ops      attention, concat_embed, cross_entropy, linear_cross_entropy, contrastive_loss
    mmfast.nn       modules built on the ops
    mmfast.patch    swap the attention/loss layers of stock Hugging Face and timm models
    mmfast.models   the fusion model zoo          mmfast.train / mmfast.data   training
"""

import importlib

__version__ = "0.1.0"

from mmfast import nn, ops  # noqa: E402
from mmfast.dispatch import get_default_backend, set_default_backend  # noqa: E402
from mmfast.info import backends  # noqa: E402

# `from_pretrained(..., attn_implementation="mmfast")` must work right after `import mmfast`, yet
# `import mmfast` must not import transformers: register now if transformers' model code is loaded,
# else through a one-shot import hook that fires when it loads (mmfast/patching/_hf_hook.py).
from mmfast.patching._hf_hook import install as _install_hf_hook  # noqa: E402

_install_hf_hook()

_LAZY_SUBMODULES = ("models", "patching", "train", "data", "testing", "cli")


def __getattr__(name):
    # Heavy or optional dependencies (transformers, timm) load only when asked for.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"mmfast.{name}")
    if name in ("patch", "unpatch"):
        return getattr(importlib.import_module("mmfast.patching"), name)
    raise AttributeError(f"module 'mmfast' has no attribute {name!r}")


__all__ = ["__version__", "backends", "get_default_backend", "nn", "ops", "patch", "set_default_backend", "unpatch"]
