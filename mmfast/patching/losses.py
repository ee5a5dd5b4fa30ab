"""Loss patching for Hugging Face task heads (``losses=True``).

The model's ``forward`` is overridden on the instance (``model.forward = ...``; the class, the
parameters and ``state_dict`` are untouched; ``unpatch`` deletes the override).

* **Softmax cross-entropy heads** (``BertForTokenClassification``, ``BertForSequenceClassification``
  with integer labels, ``BertForMultipleChoice``, ``BertForNextSentencePrediction``,
  ``ViltForTokenClassification``, ``ViltForImagesAndTextClassification``): the stock forward runs
  with ``labels=None`` and the loss is computed from its ``logits`` with
  ``mmfast.ops.cross_entropy`` (same formula: mean over targets != -100). Regression and
  multi-label problem types keep the stock loss.
* **Masked-LM heads** (``BertForMaskedLM``): with labels, the loss goes through
  ``mmfast.ops.linear_cross_entropy`` on the hidden states of the labelled tokens only, so the
  (B, L, 30522) logits are never materialised. **The switch**: the patched forward takes an extra
  keyword ``return_logits``. ``None`` (default) materialises ``outputs.logits`` unless this is a
  training step (``model.training`` and gradients recorded): evaluation loops (``model.eval()`` or
  ``torch.no_grad()``) get their logits; in a training step with labels ``outputs.logits`` is
  ``None``. ``return_logits=True`` always returns them (the loss then comes from
  ``mmfast.ops.cross_entropy`` on those logits), ``return_logits=False`` never does. Without
  labels the forward is the stock one.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Optional

import torch

from mmfast import ops

BACKEND_ATTR = "_mmfast_backend"


def _backend(model) -> str:
    return getattr(model, BACKEND_ATTR, "auto")


def _original_forward(model):
    """The forward that would run without the patch (an earlier instance override, e.g. an
    accelerate hook, or the class's), as a function taking ``model`` first.

    Not a bound method of ``model``: torch.compile rebuilds a bound method of a module after a graph
    break as ``model.forward``, which is this patch's own override (infinite recursion)."""
    saved = getattr(model, "_mmfast_saved_forward", None)
    if saved is not None:
        return lambda _model, *args, **kwargs: saved(*args, **kwargs)
    return type(model).forward


def _with_loss(output, loss):
    """Puts ``loss`` first in a ModelOutput (rebuilt so ``output[0]`` / ``to_tuple()`` see it) or
    prepends it to a tuple, as HF's heads do."""
    if isinstance(output, tuple):
        return (loss,) + output
    if dataclasses.is_dataclass(output):
        fields = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
        fields["loss"] = loss
        return type(output)(**fields)
    output["loss"] = loss
    return output


def _logits_of(output):
    return output[0] if isinstance(output, tuple) else output.logits


# ---------------------------------------------------------------------------------------------
# Cross-entropy computed from the logits the stock head returns.
def _ce_single_label(model, logits, labels):
    """Sequence classification: HF infers and stores config.problem_type on first use; mirror it."""
    cfg = model.config
    num_labels = model.num_labels
    if cfg.problem_type is None:
        if num_labels == 1:
            cfg.problem_type = "regression"
        elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
            cfg.problem_type = "single_label_classification"
        else:
            cfg.problem_type = "multi_label_classification"
    if cfg.problem_type != "single_label_classification":
        return None
    return logits.view(-1, num_labels), labels.view(-1)


def _ce_flat(model, logits, labels):
    C = logits.shape[-1]
    return logits.reshape(-1, C), labels.reshape(-1).to(logits.device)


def _ce_multiple_choice(model, logits, labels):
    return logits, labels.to(logits.device)


# class name -> how to flatten (logits, labels) for the CE, or None to keep the stock loss
CE_HEADS = {
    "BertForTokenClassification": _ce_flat,
    "BertForSequenceClassification": _ce_single_label,
    "BertForMultipleChoice": _ce_multiple_choice,
    "BertForNextSentencePrediction": _ce_flat,
    "ViltForTokenClassification": _ce_flat,
    "ViltForImagesAndTextClassification": _ce_flat,
}
MLM_HEADS = ("BertForMaskedLM",)
# Heads whose loss is not a softmax cross-entropy: reported, left alone.
NOT_CE = {
    "ViltForQuestionAnswering": "its loss is binary_cross_entropy_with_logits over soft VQA answer scores "
                                "(multi-label), not a softmax cross-entropy",
    "BertForQuestionAnswering": "start/end-span loss clamps positions to the sequence length first; kept stock",
}


def _ce_forward(self, *args, **kwargs):
    orig = _original_forward(self)
    try:
        bound = self._mmfast_ce_signature.bind(*args, **kwargs)
    except TypeError:
        return orig(self, *args, **kwargs)  # let the stock forward raise its own error
    labels = bound.arguments.get("labels")
    if labels is None or labels.is_floating_point():
        return orig(self, *args, **kwargs)
    bound.arguments["labels"] = None
    output = orig(self, *bound.args, **bound.kwargs)
    logits = _logits_of(output)
    flat = CE_HEADS[type(self).__name__](self, logits, labels)
    if flat is None:  # not a single-label problem: the stock loss
        return orig(self, *args, **kwargs)
    lg, tg = flat
    loss = ops.cross_entropy(lg, tg, backend=_backend(self))
    return _with_loss(output, loss)


# ---------------------------------------------------------------------------------------------
# Masked LM through linear_cross_entropy.
def _mlm_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, labels=None,
                 return_logits: Optional[bool] = None, **kwargs):
    orig = _original_forward(self)
    if labels is None:
        return orig(self, input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                    position_ids=position_ids, inputs_embeds=inputs_embeds,
                    encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                    **kwargs)
    from transformers.modeling_outputs import MaskedLMOutput

    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    outputs = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        position_ids=position_ids, inputs_embeds=inputs_embeds,
                        encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                        return_dict=True, **kwargs)
    seq = outputs[0]
    head = self.cls.predictions
    decoder = head.decoder
    if return_logits is None:  # evaluation gets its logits; a training step does not pay for them
        return_logits = not (self.training and torch.is_grad_enabled())
    V = decoder.weight.shape[0]
    labels = labels.to(seq.device)
    if return_logits:
        logits = self.cls(seq)
        loss = ops.cross_entropy(logits.view(-1, V), labels.view(-1), backend=_backend(self))
    else:
        logits = None
        D = seq.shape[-1]
        flat_labels = labels.reshape(-1)
        # Only labelled tokens enter the loss (mean over targets != -100): run the head's
        # transform and the vocabulary projection on those rows only.
        keep = flat_labels != -100
        rows = seq.reshape(-1, D)[keep]
        hidden = head.transform(rows)
        loss = ops.linear_cross_entropy(hidden, decoder.weight, flat_labels[keep], decoder.bias,
                                        backend=_backend(self))
    out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                         attentions=outputs.attentions)
    return out if return_dict else out.to_tuple()


def _signature(model, kind: str) -> inspect.Signature:
    """The stock forward's signature (Trainer reads it to pick dataset columns), plus
    ``return_logits`` for masked-LM heads."""
    sig = inspect.signature(type(model).forward)
    if kind != "mlm":
        return sig
    params = list(sig.parameters.values())
    extra = inspect.Parameter("return_logits", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
    return sig.replace(parameters=params[:at] + [extra] + params[at:])


def install(model, kind: str) -> None:
    """Overrides ``model.forward`` (kind "ce" or "mlm"), keeping any earlier instance override."""
    impl = _ce_forward if kind == "ce" else _mlm_forward

    def forward(self, *args, **kwargs):
        return impl(self, *args, **kwargs)

    forward.__signature__ = _signature(model, kind)
    forward.__name__ = forward.__qualname__ = "forward"
    forward.__doc__ = (type(model).forward.__doc__ or "") + "\n\n(loss computed by mmfast; see mmfast.patching.losses)"
    prev = model.__dict__.get("forward")
    if prev is not None:
        model._mmfast_saved_forward = prev
    if kind == "ce":
        # The stock forward's signature (without self), read here rather than in the traced forward:
        # torch 2.11's dynamo cannot trace the function.__get__ that binding it there needs.
        model._mmfast_ce_signature = inspect.signature(prev if prev is not None else type(model).forward.__get__(model))
    model.forward = types.MethodType(forward, model)


def uninstall(model) -> None:
    model.__dict__.pop("forward", None)
    model.__dict__.pop("_mmfast_ce_signature", None)
    prev = model.__dict__.pop("_mmfast_saved_forward", None)
    if prev is not None:
        model.forward = prev
