"""Training step of stock Hugging Face models, patched with ``mmfast.patch`` vs unpatched.

* ``BertForMaskedLM`` (BERT-base: 768/12 layers, vocab 30522), B=64, L=128, padded (lengths drawn
  in [L/2, L]), 15 % of the real tokens labelled. Unpatched = HF's default attention (SDPA).
* ``ViltForQuestionAnswering`` (ViLT-B/32: 768/12 layers, 384 px images -> 144 patches + cls,
  40 text tokens, 3129 answers), B=64, padded text. Unpatched = stock (ViLT has eager attention only).

One step = forward with labels + backward + zero_grad, in bfloat16 on a GPU (float32 in CPU smoke
mode, with tiny configs). Recorded per case: samples/s, median ms, peak memory, and the ratio to the
unpatched model (``ratio_to_eager``: unpatched ms / patched ms, > 1 = patched is faster).
Issue targets (H100, bf16): BERT >= 1.2x SDPA, ViLT >= 1.5x stock, lower peak memory.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from harness import DEVICE, SMOKE, bench, model_check

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
import mmfast  # noqa: E402

DTYPE = torch.float32 if SMOKE else torch.bfloat16
B = 2 if SMOKE else 64


def _bert_case():
    from transformers import BertConfig, BertForMaskedLM

    if SMOKE:
        cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64)
        L = 16
    else:
        cfg = BertConfig()  # bert-base-uncased: 768 hidden, 12 layers, 12 heads, vocab 30522
        L = 128
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000 if not SMOKE else 1, cfg.vocab_size, (B, L), generator=g) * mask
    chosen = (torch.rand(B, L, generator=g) < 0.15) & mask.bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    inputs = {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE), "labels": labels.to(DEVICE)}
    model = BertForMaskedLM(cfg).to(DEVICE, DTYPE).train()
    return model, inputs, f"BertForMaskedLM {cfg.hidden_size}x{cfg.num_hidden_layers} B={B} L={L} padded"


def _vilt_case():
    from transformers import ViltConfig, ViltForQuestionAnswering

    if SMOKE:
        cfg = ViltConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, image_size=32, patch_size=8, max_position_embeddings=40, num_labels=7)
        L = 8
    else:
        cfg = ViltConfig(num_labels=3129)  # ViLT-B/32 (vqa head): 768 hidden, 12 layers, 384 px, patch 32
        L = 40
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, cfg.vocab_size, (B, L), generator=g) * mask
    pixels = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    labels = torch.rand(B, cfg.num_labels, generator=g) * (torch.rand(B, cfg.num_labels, generator=g) < 0.01)
    inputs = {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE),
              "pixel_values": pixels.to(DEVICE, DTYPE), "labels": labels.to(DEVICE, DTYPE)}
    model = ViltForQuestionAnswering(cfg).to(DEVICE, DTYPE).train()
    return model, inputs, f"ViltForQuestionAnswering {cfg.hidden_size}x{cfg.num_hidden_layers} B={B} text L={L} padded"


_CASES = {"bert_mlm": _bert_case, "vilt_vqa": _vilt_case}
_built: dict = {}


def _models(name):
    """(stock model, patched deep copy, inputs, case) built once per process and shared by impls."""
    if name not in _built:
        stock, inputs, case = _CASES[name]()
        patched = copy.deepcopy(stock)
        report = mmfast.patch(patched)
        _built[name] = (stock, patched, inputs, case, report)
    return _built[name]


def _step(model, inputs):
    def run():
        out = model(**inputs)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
    return run


@pytest.mark.parametrize("name", list(_CASES))
@pytest.mark.parametrize("impl", ["stock", "mmfast"])
def test_training_step(benchmark, name, impl):
    stock, patched, inputs, case, report = _models(name)
    stock_impl = "sdpa" if name == "bert_mlm" else "eager"  # what the unpatched model runs
    model = patched if impl == "mmfast" else stock
    bench(benchmark, _step(model, inputs), op=f"patch:{name}", impl=stock_impl if impl == "stock" else "mmfast",
          check=model_check(model, model, stock, inputs, name=case),
          mode="train step (fwd+bwd)", case=case, dtype=DTYPE, eager=_step(stock, inputs), samples=B,
          extra={"swapped": len(report.swapped), "swapped_kinds": report.kinds(),
                 "stock_attn_implementation": stock.config._attn_implementation})
