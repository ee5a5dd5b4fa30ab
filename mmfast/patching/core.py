"""``mmfast.patch`` / ``mmfast.unpatch``: swap the attention, embedding-merge and loss layers of
stock Hugging Face and timm models for mmfast's ops, in place, without touching parameters.

What is recognised (everything else is left alone and listed in the report; ``patch`` never raises
on an unfamiliar model):

=====================================  =========================================================
HF models on the attention registry    config's attention implementation set to "mmfast"
(BERT, and every model whose modeling  (registered in AttentionInterface + AttentionMaskInterface;
file calls ALL_ATTENTION_FUNCTIONS)    see hf_attention.py)
ViLT / VisualBERT / LXMERT attention   module class swapped for a subclass (hf_vilt.py)
ViltEmbeddings (embeddings=True)       class swapped: merge through concat_embed (hf_vilt.py)
timm.layers.Attention                  class swapped for a subclass (timm_vit.py)
HF task heads (losses=True)            instance ``forward`` override (losses.py)
BertEncoder (unpad=True)               class swapped: runs the valid tokens only, packed, through
                                       attention_varlen (hf_unpad.py)
=====================================  =========================================================

``unpad=True`` is the one option that raises on a model it cannot serve (one line naming why):
silently running padded would defeat its purpose.

Undo information is kept on the model as plain data (module names, classes, previous values),
never as references to modules, so ``copy.deepcopy`` of a patched model is patched the same way
and unpatches on its own.
"""

from __future__ import annotations

import sys
from typing import Optional

from torch import nn

from mmfast import dispatch
from mmfast.patching.report import PatchReport

STATE_ATTR = "_mmfast_patch"
BACKEND_ATTR = "_mmfast_backend"
_HANDWRITTEN_MODULES = ("transformers.models.vilt.", "transformers.models.visual_bert.",
                        "transformers.models.lxmert.")
# Hand-written attention mmfast knows about but does not swap, with the reason.
_KNOWN_LEFT_ALONE = {
    "BlipAttention": "not covered yet: BLIP vision attention returns its attention probabilities on every call "
                     "(HF's output recording reads them when output_attentions=True); a swap needs to know per call "
                     "whether they are wanted",
    "BlipTextSelfAttention": "not covered yet: BLIP text attention returns its attention probabilities on every "
                             "call and does its own KV-cache bookkeeping (self and cross)",
    "VisualBertRegionToPhraseAttention": "returns raw alignment scores (a loss input), not an attention output",
    "MultiheadAttention": "torch.nn.MultiheadAttention (already fused by PyTorch): not patched",
}


def _attn_impl(config) -> Optional[str]:
    return getattr(config, "_attn_implementation", None)


def _set_attn_impl(config, value) -> None:
    # The internal attribute sets this config only (the public setter recurses into sub-configs,
    # whose models may not use the registry).
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = value
    else:
        config._attn_implementation = value


def _is_hf_pretrained(m) -> bool:
    mod = sys.modules.get("transformers.modeling_utils")
    return mod is not None and isinstance(m, mod.PreTrainedModel)


def _availability_notes(model: nn.Module, backend: str, ops_used: list, report: PatchReport) -> None:
    try:
        p = next(model.parameters())
    except StopIteration:
        return
    for op in ops_used:
        why = None
        try:
            if backend != "auto":
                why = dispatch.availability(op, backend, p.device.type, p.dtype)
        except Exception as e:  # noqa: BLE001
            why = str(e)
        if why:
            report.notes.append(f"{op}: backend {backend!r} is unavailable for {p.device.type}/"
                                f"{str(p.dtype).replace('torch.', '')} here ({why}); calls will raise until it is")


def _check_unpad(model: nn.Module, attention: bool) -> None:
    """Raises the one-line reason why ``unpad=True`` cannot patch ``model``."""
    if not attention:
        raise ValueError("mmfast.patch: argument 'unpad'=True needs attention=True (the packed rows run "
                         "mmfast.ops.attention_varlen)")
    why = "transformers is not imported"
    if "transformers" in sys.modules:
        from mmfast.patching import hf_unpad

        why = hf_unpad.unsupported_reason(model)
    if why is not None:
        raise ValueError(f"mmfast.patch: argument 'unpad'=True supports stock Hugging Face BERT encoders (transformers "
                         f"BertModel and its heads, config.is_decoder=False), got {type(model).__name__}: {why}")


def patch(model: nn.Module, *, attention: bool = True, losses: bool = True, embeddings: bool = True,
          backend: str = "auto", unpad: bool = False) -> PatchReport:
    """Makes ``model`` run mmfast's ops in place and returns a :class:`PatchReport`.

    ``attention``: attention layers; ``losses``: task-head losses (cross-entropy, masked-LM
    linear cross-entropy); ``embeddings``: ViLT's embedding merge; ``backend``: passed to every op
    ("auto", "triton", "cuda", "cpu", "torch"); ``unpad``: run HF BERT encoders on the valid tokens
    only, packed (hf_unpad.py: what padded positions hold, when a call runs padded); raises
    ValueError on a model it does not support. Parameters, buffers and ``state_dict`` are not
    changed. Patching a patched model first undoes the earlier patch."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"mmfast.patch: argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if backend != "auto" and backend not in dispatch.BACKENDS:
        raise ValueError(f"mmfast.patch: argument 'backend' must be one of {('auto',) + dispatch.BACKENDS}, "
                         f"got {backend!r}")
    if not isinstance(unpad, bool):
        raise TypeError(f"mmfast.patch: argument 'unpad' must be a bool, got {type(unpad).__name__}")
    if getattr(model, STATE_ATTR, None) is not None:
        unpatch(model)
    if unpad:
        _check_unpad(model, attention)  # before this patch changes anything
    report = PatchReport(model=type(model).__name__, backend=backend)
    undo: list = []
    ops_used: set = set()
    swapped_names: set = set()
    covered_attention: set = set()

    def set_backend(name, m):
        m.__dict__[BACKEND_ATTR] = backend
        undo.append(("attr", name, BACKEND_ATTR))

    named = list(model.named_modules())

    # 1. Hugging Face models on the attention registry.
    if attention and "transformers" in sys.modules and any(_is_hf_pretrained(m) for _, m in named):
        from mmfast.patching import hf_attention

        hf_attention.register()
        done_configs = set()
        for name, m in named:
            if not _is_hf_pretrained(m) or id(m.config) in done_configs:
                continue
            done_configs.add(id(m.config))
            if not hf_attention.uses_attention_registry(type(m)):
                continue
            mods = hf_attention.attention_modules(model, m.config)
            if not mods:
                # Its attention modules do not keep a reference to the config, so they cannot be
                # enumerated: switch anyway and list the sub-model, with its attention-named
                # modules carrying the backend.
                mods = [(n, sm) for n, sm in m.named_modules(prefix=name)
                        if "attention" in type(sm).__name__.lower()
                        and not any("attention" in type(c).__name__.lower() for c in sm.children())]
                if not mods:
                    continue
            old = _attn_impl(m.config)
            if getattr(m.config, "output_attentions", False):
                report.notes.append(f"{name or '<model>'}: config.output_attentions=True: attention weights are "
                                    "requested, so attention runs HF's eager path")
            _set_attn_impl(m.config, hf_attention.NAME)
            undo.append(("attn_impl", name, old))
            for aname, am in mods:
                kind = "cross-attention" if "cross" in type(am).__name__.lower() else "self-attention"
                if kind == "self-attention" and getattr(am, "is_causal", False):
                    kind = "causal self-attention"
                report.add(aname, f"attention: {type(am).__name__} {kind} via HF AttentionInterface 'mmfast'"
                                  f" (was {old!r})")
                set_backend(aname, am)
                covered_attention.add(aname)
                swapped_names.add(aname)
            ops_used.add("attention")

    # 1b. Unpadded BERT encoders (their self-attention goes through the "mmfast" function above).
    if unpad:
        from mmfast.patching import hf_unpad

        for name, m in hf_unpad.encoders(model):
            undo.append(("class", name, type(m)))
            m.__class__ = hf_unpad.UnpadBertEncoder
            report.add(name, "unpad: BertEncoder runs the valid tokens only, packed (mmfast.data.pack), self-attention "
                             "via mmfast.ops.attention_varlen; outputs scattered back to (B, L), 0 at padded positions")
            swapped_names.add(name)
        ops_used.add("attention_varlen")

    # 2. Hand-written HF attention / embeddings (ViLT, VisualBERT, LXMERT).
    if (attention or embeddings) and any(type(m).__module__.startswith(_HANDWRITTEN_MODULES) for _, m in named):
        from mmfast.patching import hf_vilt

        for name, m in named:
            entry = hf_vilt.SWAPS.get(type(m))
            if entry is None:
                continue
            is_emb = type(m) in hf_vilt.EMBEDDING_CLASSES
            if (is_emb and not embeddings) or (not is_emb and not attention):
                continue
            new_cls, kind = entry
            undo.append(("class", name, type(m)))
            m.__class__ = new_cls
            set_backend(name, m)
            report.add(name, kind)
            swapped_names.add(name)
            ops_used.add("concat_embed" if is_emb else "attention")

    # 3. timm Vision Transformer attention.
    if attention and "timm" in sys.modules:
        timm_layers = sys.modules.get("timm.layers")
        timm_attention = getattr(timm_layers, "Attention", None) if timm_layers is not None else None
        if timm_attention is not None and any(type(m) is timm_attention for _, m in named):
            from mmfast.patching import timm_vit

            for name, m in named:
                if type(m) is timm_vit.ORIGINAL:
                    undo.append(("class", name, type(m)))
                    m.__class__ = timm_vit.MMFastTimmAttention
                    set_backend(name, m)
                    report.add(name, "attention: timm.layers.Attention, fused qkv (class swap) -> mmfast.ops.attention")
                    swapped_names.add(name)
                    ops_used.add("attention")

    # 4. Losses of HF task heads.
    cls_name = type(model).__name__
    if losses and type(model).__module__.startswith("transformers."):
        from mmfast.patching import losses as _losses

        kind = None
        if cls_name in _losses.CE_HEADS:
            kind = "ce"
        elif cls_name in _losses.MLM_HEADS:
            head = getattr(getattr(model, "cls", None), "predictions", None)
            if hasattr(model, "bert") and hasattr(head, "transform") and hasattr(head, "decoder"):
                kind = "mlm"
            else:
                report.skip("", "masked-LM head without the BERT layout (bert + cls.predictions.transform/decoder)")
        elif cls_name in _losses.NOT_CE:
            report.skip("", f"loss of {cls_name}: {_losses.NOT_CE[cls_name]}")
        elif "For" in cls_name and _is_hf_pretrained(model):
            report.skip("", f"loss of {cls_name}: no mmfast loss patch for this head (stock loss kept)")
        if kind is not None:
            _losses.install(model, kind)
            model.__dict__[BACKEND_ATTR] = backend
            undo.append(("forward", "", None))
            undo.append(("attr", "", BACKEND_ATTR))
            if kind == "mlm":
                report.add("", f"loss: {cls_name} masked-LM loss via mmfast.ops.linear_cross_entropy on the labelled "
                               "tokens (logits with labels: see return_logits)")
                report.notes.append("masked-LM with labels: outputs.logits is None in a training step (model.train() "
                                    "with gradients recorded); pass return_logits=True to get them (eval/no_grad "
                                    "calls return them)")
                ops_used.update(("linear_cross_entropy", "cross_entropy"))
            else:
                report.add("", f"loss: {cls_name} cross-entropy via mmfast.ops.cross_entropy")
                ops_used.add("cross_entropy")

    # 5. Everything attention-like that nobody took: listed with a reason.
    if attention:
        for name, m in named:
            cname = type(m).__name__
            if name in swapped_names or "attention" not in cname.lower():
                continue
            if any("attention" in type(c).__name__.lower() for c in m.children()):
                continue  # a container (e.g. BertAttention = self-attention + output)
            src = sys.modules.get(type(m).__module__)
            if src is not None and hasattr(src, "ALL_ATTENTION_FUNCTIONS") and name not in covered_attention:
                owner_cfg = getattr(m, "config", None)
                if owner_cfg is not None and _attn_impl(owner_cfg) == "mmfast":
                    continue
                if owner_cfg is None:
                    continue  # a helper of a registry model (its attention module is listed above)
                report.skip(name, f"{cname}: its model does not let the attention implementation be set "
                                  "(HF _can_set_attn_implementation is False)")
                continue
            reason = _KNOWN_LEFT_ALONE.get(cname)
            if reason is None:
                origin = type(m).__module__.split(".")[0]
                reason = f"unfamiliar attention module ({origin}.{cname}): no mmfast swap for it"
            report.skip(name, f"{cname}: {reason}")

    if not report.swapped:
        report.notes.append("nothing recognised: the model is unchanged")
    else:
        model.__dict__[STATE_ATTR] = undo
    _availability_notes(model, backend, sorted(ops_used), report)
    return report


def unpatch(model: nn.Module) -> None:
    """Restores everything :func:`patch` changed on ``model`` (no-op on an unpatched model)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"mmfast.unpatch: argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    undo = model.__dict__.pop(STATE_ATTR, None)
    if not undo:
        return
    for kind, name, payload in reversed(undo):
        m = model.get_submodule(name) if name else model
        if kind == "attr":
            m.__dict__.pop(payload, None)
        elif kind == "class":
            m.__class__ = payload
        elif kind == "attn_impl":
            _set_attn_impl(m.config, payload)
        elif kind == "forward":
            from mmfast.patching import losses as _losses

            _losses.uninstall(m)


def is_patched(model: nn.Module) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


__all__ = ["patch", "unpatch", "is_patched"]
