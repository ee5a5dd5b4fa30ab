"""Drop-in patching of stock Hugging Face and timm models: ``mmfast.patch(model)``.

    report = mmfast.patch(model, attention=True, losses=True, embeddings=True, backend="auto")
    print(report)            # what was swapped (qualified name, kind) and what was left alone, why
    mmfast.unpatch(model)    # restores the stock behaviour exactly

Importing this package does not import transformers or timm: each model family's module is
imported only when a model holds its classes. See core.py for what is recognised.
"""

from mmfast.patching.core import is_patched, patch, unpatch
from mmfast.patching.report import PatchReport


def fallback_counts() -> dict:
    """Attention calls that ran HF's eager path instead of mmfast (reason -> count), this process."""
    import sys

    mod = sys.modules.get("mmfast.patching.hf_attention")
    return mod.fallback_counts() if mod is not None else {}


__all__ = ["PatchReport", "fallback_counts", "is_patched", "patch", "unpatch"]
