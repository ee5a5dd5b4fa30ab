"""``mmfast.patch(model, unpad=True)``: a stock Hugging Face BERT run unpadded, as HF's
FlashAttention-2 path does for packed sequences.

Every ``BertEncoder`` of the model is class-swapped for :class:`UnpadBertEncoder`. Its forward takes
the embeddings' output ``(B, L, hidden)`` and the attention mask HF built, keeps the valid tokens
only (``mmfast.data.pack``: one packed ``(1, total, hidden)`` batch plus ``cu_seqlens``), runs the
stock layers on those rows -- so the per-token layers (Q/K/V and output projections, LayerNorms,
feed-forward) see ``total`` rows, not ``B * L`` -- with every self-attention going through
``mmfast.ops.attention_varlen`` (HF's ``cu_seq_lens_q/k`` kwargs, read by the "mmfast" attention
function in hf_attention.py), and scatters the result back to ``(B, L, hidden)`` at the end
(``mmfast.data.unpack``), so the model's outputs and heads keep their shapes.

**What padded positions hold**: ``last_hidden_state`` is exactly 0 at every padded position (the
stock model has there the hidden state of a padding token attending to the real ones, which nothing
that ignores padding reads). Heads see those zeros: token-classification logits at padded positions
equal the classifier bias, masked-LM logits there are the head applied to a zero vector. Outputs on
valid tokens, losses whose labels are -100 at padded positions (HF's token-classification and
masked-LM collators do this), the pooler output of right-padded rows (it reads position 0) and
every parameter gradient under such a loss are the stock model's, within rounding. With left
padding, position 0 is padding: ``pooler_output`` of such rows (and sequence classification built
on it) is then computed from zeros, unlike the stock model's; this is warned about once.

A call that cannot run packed runs the padded path (the "mmfast" attention on ``(B, L)``), warned
about once per reason and counted in :func:`padded_counts`: no ``attention_mask`` given (nothing to
unpad), hidden states or attention weights requested (they would come out packed), a 4-D mask that
is not key padding, a cache, or a config whose attention implementation is no longer "mmfast".
Supported at patch time: ``BertEncoder`` with ``config.is_decoder=False`` and no cross-attention
(:func:`unsupported_reason`).
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from typing import Optional

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertEncoder

from mmfast.data.pack import pack, unpack
from mmfast.patching import hf_attention
from mmfast.patching import masks as _masks

ORIGINAL = BertEncoder
_padded: Counter = Counter()
_warned: set = set()  # one-time warnings already given (besides _padded's reasons)


def padded_counts() -> dict:
    """How many forwards of unpadded encoders ran the padded path instead, per reason (this process)."""
    return dict(_padded)


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why ``unpad=True`` cannot patch ``model`` (None when it can): it must hold at least one stock
    ``BertEncoder``, and every one of them must be a bidirectional encoder without cross-attention."""
    encoders = [(n, m) for n, m in model.named_modules() if type(m) is ORIGINAL]
    if not encoders:
        return f"no transformers BertEncoder in {type(model).__name__}"
    for name, m in encoders:
        cfg = m.config
        if cfg.is_decoder or cfg.add_cross_attention:
            return (f"{name or '<model>'} is a decoder (config.is_decoder={cfg.is_decoder}, add_cross_attention="
                    f"{cfg.add_cross_attention}); only bidirectional encoders are supported")
    return None


def encoders(model: nn.Module) -> list:
    """(qualified name, module) of the stock BertEncoders of ``model``."""
    return [(n, m) for n, m in model.named_modules() if type(m) is ORIGINAL]


def _capturing_outputs(kwargs: dict, config) -> bool:
    """Whether hidden states or attention weights are being recorded for this forward (HF records
    per-layer outputs with hooks, which would see packed rows)."""
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag, getattr(config, flag, False)):
            return True
    capturing = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(capturing, "_active_collector", None)
    try:
        active = collector.get() if collector is not None else None
    except LookupError:
        active = None
    return bool(active)


def _run_padded(reason: str) -> None:
    if reason not in _padded:
        warnings.warn(f"mmfast: unpad=True: BertEncoder runs the padded path for calls where {reason}",
                      RuntimeWarning, stacklevel=4)
    _padded[reason] += 1


class UnpadBertEncoder(BertEncoder):
    """BertEncoder on the valid tokens only (see the module docstring)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None, cache=None, use_cache=None, **kwargs):
        def padded():
            return super(UnpadBertEncoder, self).forward(
                hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                cache=cache, use_cache=use_cache, **kwargs)

        B, L = hidden_states.shape[:2]
        if attention_mask is None:
            _run_padded("no attention_mask is given (every position is a token: nothing to unpad)")
            return padded()
        if self.config._attn_implementation != hf_attention.NAME:
            _run_padded(f"the config's attention implementation is {self.config._attn_implementation!r}, "
                        "not 'mmfast' (only it reads packed sequences)")
            return padded()
        if cache is not None:
            _run_padded("a cache is given")
            return padded()
        if _capturing_outputs(kwargs, self.config):
            _run_padded("hidden states or attention weights are requested (they would come out packed)")
            return padded()
        try:
            kpm, causal = _masks.decompose(attention_mask, B, L, L)
        except _masks.NotExpressible as e:
            _run_padded(f"the attention mask is not key padding ({e})")
            return padded()
        if causal:
            _run_padded("the attention mask is causal")
            return padded()
        if kpm is None:  # a mask with no padding
            kpm = torch.ones(B, L, dtype=torch.bool, device=hidden_states.device)
        if L and "left padding" not in _warned and not bool(kpm[:, 0].all()):
            _warned.add("left padding")
            warnings.warn("mmfast: unpad=True: position 0 is padding in some rows (left padding): their padded "
                          "positions are 0 and pooler_output (read from position 0) is computed from zeros, unlike "
                          "the stock model's; pad on the right for the stock pooled output", RuntimeWarning,
                          stacklevel=3)
        rows = pack(hidden_states, kpm)
        out = super().forward(rows.values[None], None, encoder_hidden_states,
                              encoder_attention_mask=encoder_attention_mask, cache=None, use_cache=use_cache,
                              cu_seq_lens_q=rows.cu_seqlens, cu_seq_lens_k=rows.cu_seqlens,
                              max_length_q=rows.max_seqlen, max_length_k=rows.max_seqlen, **kwargs)
        out.last_hidden_state = unpack(out.last_hidden_state[0], rows.indices, B, L)
        return out
