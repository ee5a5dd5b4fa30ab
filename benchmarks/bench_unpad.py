"""NER training step on length-skewed text: stock BERT (padded) vs ``mmfast.patch`` padded vs
``mmfast.patch(model, unpad=True)`` (valid tokens only, packed; attention through attention_varlen).

Case: ``BertForTokenClassification`` with a MiniLM-L6-sized config (384 hidden, 6 layers, 12 heads,
9 labels, random weights: the same weights for every impl), a batch whose lengths come from a
long-tailed distribution (2 + geometric, mean about 12, one row at the maximum 64, so the batch pads
to 64), labels -100 at padded positions. One step = forward with labels + backward + zero_grad.
Every impl's loss is checked against the stock model in float64 under the rule before it is timed.
Reported: valid tokens/s (``tokens_per_s``) and the ratio to the stock padded model.

* ``pytest benchmarks/bench_unpad.py``: the harness's cases (smoke mode without a GPU: a tiny config
  and batch, one round, seconds).
* ``python benchmarks/bench_unpad.py [--threads 2] [--batch 64] [--reps 3]``: the full-size case on
  the CPU, one process, the impls one after another; prints a table.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import DEVICE, SMOKE, bench, model_check, time_ms  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import mmfast  # noqa: E402

MAX_LEN = 64
IMPLS = ("stock", "mmfast", "mmfast-unpad")


def skewed_lengths(batch: int, max_len: int = MAX_LEN, seed: int = 0) -> torch.Tensor:
    """Long-tailed lengths: 2 + geometric(p = 0.1) (mean 12 before clipping at ``max_len``); the
    last row is ``max_len`` long, as a real batch has its longest sentence."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(batch, generator=g, dtype=torch.float64).clamp_min(1e-12)
    lengths = (2 + torch.floor(torch.log(u) / torch.log(torch.tensor(0.9, dtype=torch.float64)))).long()
    lengths = lengths.clamp(2, max_len)
    lengths[-1] = max_len
    return lengths


def ner_case(batch: int, smoke: bool, device=DEVICE, dtype=torch.float32):
    """(stock model, inputs, valid tokens, case name)."""
    from transformers import BertConfig, BertForTokenClassification

    if smoke:
        cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=MAX_LEN, num_labels=9)
        max_len = 16
    else:  # all-MiniLM-L6-v2's shape
        cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, max_position_embeddings=512, num_labels=9)
        max_len = MAX_LEN
    torch.manual_seed(0)
    model = BertForTokenClassification(cfg).to(device, dtype).train()
    lengths = skewed_lengths(batch, max_len)
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(max_len)[None, :] < lengths[:, None]
    ids = torch.randint(1, cfg.vocab_size, (batch, max_len), generator=g) * mask
    labels = torch.randint(0, cfg.num_labels, (batch, max_len), generator=g).masked_fill(~mask, -100)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.long().to(device), "labels": labels.to(device)}
    case = (f"BertForTokenClassification {cfg.hidden_size}x{cfg.num_hidden_layers} B={batch} L={max_len} "
            f"mean length {lengths.double().mean():.1f}")
    return model, inputs, int(lengths.sum()), case


def variants(stock):
    """impl -> model (deep copies of ``stock``: the same weights)."""
    out = {"stock": stock}
    for impl, unpad in (("mmfast", False), ("mmfast-unpad", True)):
        out[impl] = copy.deepcopy(stock)
        mmfast.patch(out[impl], unpad=unpad)
    return out


def step(model, inputs):
    def run():
        model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)
    return run


# ---------------------------------------------------------------------------------------------
# pytest-benchmark cases
_built: dict = {}


def _case():
    if not _built:
        stock, inputs, tokens, case = ner_case(4 if SMOKE else 64, SMOKE,
                                               dtype=torch.float32 if SMOKE else torch.bfloat16)
        _built.update(models=variants(stock), inputs=inputs, tokens=tokens, case=case)
    return _built


@pytest.mark.parametrize("impl", IMPLS)
def test_ner_training_step(benchmark, impl):
    c = _case()
    models, inputs = c["models"], c["inputs"]
    info = bench(benchmark, step(models[impl], inputs), op="unpad:ner", impl="sdpa" if impl == "stock" else impl,
                 check=model_check(models[impl], models[impl], models["stock"], inputs, name=f"{impl} {c['case']}"),
                 mode="train step (fwd+bwd)", case=c["case"], dtype=next(models[impl].parameters()).dtype,
                 eager=step(models["stock"], inputs), extra={"valid_tokens": c["tokens"]})
    info["tokens_per_s"] = c["tokens"] / (info["median_ms"] * 1e-3)
    benchmark.extra_info["tokens_per_s"] = info["tokens_per_s"]
    print(f"\n{impl}: {info['tokens_per_s']:.0f} valid tokens/s ({c['case']}{', smoke' if SMOKE else ''})")


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    stock, inputs, tokens, case = ner_case(args.batch, smoke=False, device="cpu")
    models = variants(stock)
    padded = inputs["input_ids"].numel()
    print(f"{case}: {tokens} valid tokens of {padded} padded positions; {args.threads} threads, "
          f"median of {args.reps} steps after 1 warm-up, impls interleaved (a shared machine's load drifts)")
    for impl, m in models.items():
        model_check(m, m, stock, inputs, name=impl)()  # the rule, before timing
        step(m, inputs)()  # warm-up
    times = {impl: [] for impl in models}
    for _ in range(args.reps):
        for impl, m in models.items():
            times[impl].append(time_ms(step(m, inputs), warmup=0, reps=1))
    ms = {impl: statistics.median(t) for impl, t in times.items()}
    for impl in models:
        print(f"  {impl:13s} {ms[impl]:9.1f} ms/step  {tokens / (ms[impl] * 1e-3):9.0f} valid tokens/s  "
              f"{ms['stock'] / ms[impl]:5.2f}x stock  (steps: {', '.join(f'{t:.0f}' for t in times[impl])} ms)")


if __name__ == "__main__":
    main()
