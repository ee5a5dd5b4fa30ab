"""Packed vs padded training on length-skewed text (issue #19 item 5): the same zoo model built
padded and ``packed=True`` (same weights, same batches), training tokens/s on the CPU.

The text set: lengths drawn from a long-tailed (log-normal) distribution, mean ~12 tokens, clipped
to [2, 64], seeded; [CLS] words [SEP], 15 % of the words MLM-masked (at least one per sample). A
padded batch is padded to its longest sample (``collate``); the packed batch is
``collate(items, packed=True)`` (text rows + cu_seqlens). A training step is forward + backward +
AdamW on the model's default task (cross_attention: pretrain = ITC + ITM + MLM).

Before timing, each case is checked (harness.model_check: the loss in eval mode against the
padded eager twin in float64, the rule) on a leading slice of the first batch, and the packed
batch must give the packed model exactly the loss it gives for the padded batch.

Tokens/s counts real text tokens (the same in both); the steps alternate between the two models
(padded first in even rounds, packed first in odd ones) so load from other processes falls on
both alike; each round uses the next batch of the set.

    python benchmarks/bench_packed.py                       # the CPU table (a few minutes)
    python benchmarks/bench_packed.py --img-size 224 64 --batch 32 --rounds 6
    pytest benchmarks/bench_packed.py                       # smoke: tiny model, one round (CI)

NER (the same run, last row): NER trains a stock Hugging Face BERT through ``mmfast.patch`` (see
mmfast/train/workflows.py), so its packed form is ``mmfast.patch(model, unpad=True)``: the case of
benchmarks/bench_unpad.py (BertForTokenClassification of all-MiniLM-L6-v2's shape, batch 64,
lengths 2 + geometric, mean ~11, max 64), checked under the rule against the stock model, then
``mmfast.patch`` padded vs ``mmfast.patch(unpad=True)`` training steps interleaved.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime, timezone

import numpy as np
import pytest
import torch

import mmfast.models as mm
from harness import SMOKE, bench, device_name, model_check
from mmfast.data import collate

MODEL = "cross_attention_small"
MEAN_LEN, MAX_LEN = 12, 64


def skewed_lengths(n: int, seed: int = 0, mean: float = MEAN_LEN, max_len: int = MAX_LEN) -> np.ndarray:
    """``n`` text lengths, log-normal (sigma 0.8) with the given mean, rounded and clipped to [2, max_len]."""
    sigma = 0.8
    rng = np.random.default_rng(seed)
    x = np.exp(rng.normal(np.log(mean) - sigma ** 2 / 2, sigma, n))
    return np.clip(np.round(x), 2, max_len).astype(np.int64)


def text_items(model, lengths, seed: int = 0) -> list[dict]:
    """Dataset items: ``input_ids`` [CLS] words [SEP], ``mlm_labels`` on 15 % of the words (at least
    one), ``pixel_values`` standard normal."""
    c, g = model.cfg, torch.Generator().manual_seed(seed)
    items = []
    for n in lengths:
        ids = torch.randint(c.mask_token_id + 1, c.vocab_size, (int(n),), generator=g)
        ids[0], ids[-1] = c.cls_token_id, c.sep_token_id
        picked = torch.rand(int(n), generator=g) < 0.15
        picked[0] = picked[-1] = False
        picked[1] = True
        items.append({"input_ids": ids, "mlm_labels": ids.masked_fill(~picked, -100),
                      "pixel_values": torch.randn(3, c.img_size, c.img_size, generator=g)})
    return items


def build(name: str, **overrides):
    """(padded model, packed model, padded eager twin): the same weights."""
    torch.manual_seed(0)
    padded = mm.create_model(name, **overrides)
    packed = mm.create_model(name, packed=True, **overrides)
    twin = mm.create_model(name, fused=False, **overrides)
    packed.load_state_dict(padded.state_dict())
    twin.load_state_dict(padded.state_dict())
    return padded, packed, twin


def batch_set(model, n_batches: int, batch: int, seed: int = 0) -> list[tuple[dict, dict, int]]:
    """(padded batch, packed batch, real text tokens) for ``n_batches`` batches of the skewed set."""
    lengths = skewed_lengths(n_batches * batch, seed)
    out = []
    for i in range(n_batches):
        items = text_items(model, lengths[i * batch:(i + 1) * batch], seed=seed * 1000 + i)
        out.append((collate(items), collate(items, packed=True), int(lengths[i * batch:(i + 1) * batch].sum())))
    return out


def check(padded, packed, twin, padded_batch: dict, packed_batch: dict, rows: int, name: str) -> None:
    """Both models' loss by the rule on the first ``rows`` samples; the packed batch gives the packed
    model the loss of the padded batch, exactly."""
    head = {k: v[:rows] for k, v in padded_batch.items()}
    head = {k: (v[:, :int(head["attention_mask"].sum(1).max())] if v.dim() == 2 else v) for k, v in head.items()}
    model_check(padded, padded, twin, head, name=f"{name} padded")()
    model_check(packed, packed, twin, head, name=f"{name} packed")()
    was = packed.training
    packed.eval()  # no dropout
    try:
        with torch.no_grad():
            a, b = packed(**padded_batch).loss, packed(**packed_batch).loss
    finally:
        packed.train(was)
    if not torch.equal(a, b):
        raise AssertionError(f"{name}: packed batch loss {float(b)} != padded batch loss {float(a)} on the packed model")


def train_step(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(batch: dict) -> None:
        model.train()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(name: str, batch: int, n_batches: int, rounds: int, warmup: int = 1, **overrides) -> dict:
    """Checks, then times padded vs packed training steps; returns the figures of one table row."""
    padded, packed, twin = build(name, **overrides)
    data = batch_set(padded, n_batches, batch)
    check(padded, packed, twin, data[0][0], data[0][1], rows=min(batch, 4), name=name)
    steps = {"padded": train_step(padded), "packed": train_step(packed)}
    pick = {"padded": 0, "packed": 1}
    for r in range(warmup):
        for impl in steps:
            steps[impl](data[r % n_batches][pick[impl]])
    seconds = {impl: 0.0 for impl in steps}
    tokens = padded_tokens = 0
    for r in range(rounds):
        b = data[r % n_batches]
        for impl in (("padded", "packed") if r % 2 == 0 else ("packed", "padded")):
            t = time.perf_counter()
            steps[impl](b[pick[impl]])
            seconds[impl] += time.perf_counter() - t
        tokens += b[2]
        padded_tokens += b[0]["input_ids"].numel()
    return {"model": name, "overrides": overrides, "batch": batch, "rounds": rounds, "tokens": tokens,
            "padding_share": 1 - tokens / padded_tokens,
            "padded_tok_s": tokens / seconds["padded"], "packed_tok_s": tokens / seconds["packed"],
            "speedup": seconds["padded"] / seconds["packed"]}


# ---------------------------------------------------------------------------------------------
# pytest (smoke on the CPU: tiny model, small batch, one round; CI keeps the benchmark working)
SMOKE_CASE = dict(name="cross_attention_tiny", batch=4)
_smoke: dict = {}


@pytest.mark.parametrize("impl", ["padded", "packed"])
def test_packed_training_step(benchmark, impl):
    name, B = (SMOKE_CASE["name"], SMOKE_CASE["batch"]) if SMOKE else (MODEL, 32)
    if not _smoke:
        padded, packed, twin = build(name)
        _smoke.update(models={"padded": padded, "packed": packed}, twin=twin, data=batch_set(padded, 1, B)[0])
    padded_batch, packed_batch, tokens = _smoke["data"]
    model = _smoke["models"][impl]
    batch = packed_batch if impl == "packed" else padded_batch
    step = train_step(model)

    def checked():
        check(_smoke["models"]["padded"], _smoke["models"]["packed"], _smoke["twin"], padded_batch, packed_batch,
              rows=min(B, 4), name=name)

    info = bench(benchmark, lambda: step(batch), op=f"model:{name}", impl=impl, mode="train",
                 case=f"{name} B={B} skewed text (mean {MEAN_LEN}, max {MAX_LEN})", dtype=torch.float32,
                 check=checked, samples=B, extra={"text_tokens": tokens})
    assert info["median_ms"] > 0


# ---------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    return device_name().removeprefix("CPU: ")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--img-size", type=int, nargs="+", default=[224, 64],
                    help="image sizes to run (224: the model as named; 64: 17 image tokens, so text dominates)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4, help="timed steps per model and image size")
    ap.add_argument("--batches", type=int, default=4, help="distinct batches of the skewed set, cycled")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-ner", dest="ner", action="store_false", help="skip the NER row")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc)
    rows = []
    for img in args.img_size:
        r = measure(args.model, args.batch, args.batches, args.rounds, img_size=img)
        rows.append(r)
        print(f"  {args.model} img {img}: padded {r['padded_tok_s']:.0f} tok/s, packed {r['packed_tok_s']:.0f} tok/s "
              f"({r['speedup']:.2f}x)", flush=True)
    lengths = skewed_lengths(args.batches * args.batch)
    print(f"\n{_cpu_name()}, {os.cpu_count()} cores, {args.threads} thread(s), torch {torch.__version__}, "
          f"python {platform.python_version()}, {started:%Y-%m-%d %H:%M} UTC, load average "
          f"{os.getloadavg()[0]:.1f}; text lengths: mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, "
          f"max {lengths.max()} (log-normal, seed 0); batch {args.batch}, {args.rounds} timed training steps "
          f"(forward + backward + AdamW) per model, each check passed first\n")
    print("| model | task | image | padding share | padded tokens/s | packed tokens/s | packed / padded |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {mm.default_task(r['model'])} | {r['overrides']['img_size']} px "
              f"| {r['padding_share']:.0%} | {r['padded_tok_s']:.0f} | {r['packed_tok_s']:.0f} | {r['speedup']:.2f}x |")
    if args.ner:
        r = measure_ner(args.rounds)
        print(f"| NER: {r['case']} | token classification | - | {r['padding_share']:.0%} | {r['padded_tok_s']:.0f} "
              f"| {r['packed_tok_s']:.0f} | {r['speedup']:.2f}x |")
    return 0


def measure_ner(rounds: int) -> dict:
    """mmfast.patch padded vs mmfast.patch(unpad=True) on bench_unpad's NER case, checked first."""
    from bench_unpad import ner_case, step, variants

    stock, inputs, tokens, case = ner_case(64, smoke=False, device="cpu")
    models = variants(stock)
    pair = {"padded": models["mmfast"], "packed": models["mmfast-unpad"]}
    for name, m in pair.items():
        model_check(m, m, stock, inputs, name=f"NER {name}")()  # the rule, before timing
        step(m, inputs)()  # warm-up
    seconds = {name: 0.0 for name in pair}
    for r in range(rounds):
        for name in (("padded", "packed") if r % 2 == 0 else ("packed", "padded")):
            t = time.perf_counter()
            step(pair[name], inputs)()
            seconds[name] += time.perf_counter() - t
    return {"case": case, "padding_share": 1 - tokens / inputs["input_ids"].numel(),
            "padded_tok_s": tokens * rounds / seconds["padded"], "packed_tok_s": tokens * rounds / seconds["packed"],
            "speedup": seconds["padded"] / seconds["packed"]}


if __name__ == "__main__":
    raise SystemExit(main())
