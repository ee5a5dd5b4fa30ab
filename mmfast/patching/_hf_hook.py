"""Registers the "mmfast" attention implementation with Hugging Face transformers as soon as
transformers' model machinery exists, so ``from_pretrained(..., attn_implementation="mmfast")``
works after ``import mmfast`` -- without ``import mmfast`` importing transformers.

If ``transformers.modeling_utils`` is already imported, registration happens at once. Otherwise a
one-shot finder at the front of ``sys.meta_path`` waits for that module: when it is imported
(by ``import transformers.<anything with models>`` or ``from transformers import BertModel``), the
finder lets the normal finders locate it, runs its normal loader, registers, and removes itself.
It never imports anything itself and never raises into the user's import.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

_TARGET = "transformers.modeling_utils"


def _register() -> None:
    try:
        from mmfast.patching import hf_attention

        hf_attention.register()
    except Exception as e:  # noqa: BLE001 - a transformers we cannot register with must not break imports
        warnings.warn(f"mmfast: could not register attn_implementation='mmfast' with transformers: {e}",
                      RuntimeWarning, stacklevel=2)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _uninstall()
            _register()

        loader.exec_module = exec_then_register  # this loader instance serves this one import
        return spec


def _uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterOnImport)]


def install() -> None:
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
