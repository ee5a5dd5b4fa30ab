"""Model zoo: a training step (forward + backward + AdamW step) and inference (forward without
grad, eval mode) of every architecture, fused model vs its eager twin vs torch.compile(eager twin).

GPU: base size (BERT-base + ViT-B/16), batch 64, text 40 (last sample padded), image 224, bf16
autocast with float32 weights and optimizer state. CPU smoke mode: tiny size, batch 2, float32,
torch.compile on one architecture only (tracing cost), one round: smoke timings are not results.

Each architecture runs its training objective: single_stream, cross_attention and co_attention
``pretrain`` (their ITM + MLM or ITC + ITM + MLM recipes), dual_encoder ``itc``, captioner
``caption``; inference runs the same forward in eval mode under ``torch.inference_mode``.
Recorded per case (``extra_info``): samples/s, ratio to the eager twin, peak extra GPU memory.

    pytest benchmarks/bench_models.py --benchmark-json=models.json

Environment: ``MMFAST_BENCH_MODELS_ARCHS=dual_encoder,captioner`` runs only those architectures;
``MMFAST_BENCH_MODELS_COMPILE=0`` skips the torch.compile cases (inductor compiles a base model's
forward+backward in tens of seconds per architecture and mode).
"""

from __future__ import annotations

import os

import pytest
import torch

import mmfast.models as mm
from harness import DEVICE, SMOKE, bench, model_check

SIZE = "tiny" if SMOKE else "base"
BATCH = 2 if SMOKE else 64
TEXT_LEN = None if SMOKE else 40  # tiny keeps its own (odd) length
IMG = None if SMOKE else 224
AMP_DTYPE = None if DEVICE == "cpu" else torch.bfloat16
TASK = {"single_stream": "pretrain", "cross_attention": "pretrain", "co_attention": "pretrain",
        "dual_encoder": "itc", "captioner": "caption"}
IMPLS = ["eager", "mmfast", "compile"]
SMOKE_COMPILE = {"dual_encoder"}
ARCHS = [a for a in os.environ.get("MMFAST_BENCH_MODELS_ARCHS", ",".join(mm.ARCHS)).split(",") if a]
COMPILE = os.environ.get("MMFAST_BENCH_MODELS_COMPILE", "1") != "0"
_unknown = sorted(set(ARCHS) - set(mm.ARCHS))
if _unknown:
    raise ValueError(f"MMFAST_BENCH_MODELS_ARCHS names unknown architectures {_unknown}; known: {list(mm.ARCHS)}")

_cache: dict = {}


def _models(arch: str) -> dict:
    """Fused model and eager twin with the same weights, optimizers, inputs; one arch at a time
    (base models with AdamW state are ~3 GB each)."""
    if _cache.get("arch") != arch:
        _cache.clear()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        over = {} if SMOKE else {"text_len": TEXT_LEN, "img_size": IMG}
        torch.manual_seed(0)
        with torch.device(DEVICE):  # initialise on the GPU directly (base models init slowly on CPU)
            fused = mm.create_model(f"{arch}_{SIZE}", task=TASK[arch], **over)
            eager = mm.create_model(f"{arch}_{SIZE}", task=TASK[arch], fused=False, **over)
        eager.load_state_dict(fused.state_dict())
        _cache.update(arch=arch, mmfast=fused, eager=eager, inputs=fused.example_inputs(BATCH))
    return _cache


def _model_for(arch: str, impl: str):
    c = _models(arch)
    if impl == "compile":
        if "compiled" not in c:
            c["compiled"] = torch.compile(c["eager"], backend="aot_eager" if SMOKE else "inductor")
        return c["compiled"], c["eager"]
    return c[impl], c[impl]


def _autocast():
    if AMP_DTYPE is None:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(DEVICE, dtype=AMP_DTYPE)


def _step_fn(arch: str, impl: str, mode: str):
    model, params_owner = _model_for(arch, impl)
    inputs = _cache["inputs"]
    if mode == "train":
        key = f"opt-{impl}"
        if key not in _cache:
            _cache[key] = torch.optim.AdamW(params_owner.parameters(), lr=1e-5, fused=DEVICE == "cuda")
        opt = _cache[key]

        def fn():
            params_owner.train()
            with _autocast():
                loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        def fn():
            params_owner.eval()
            with torch.inference_mode(), _autocast():
                return model(**inputs).loss
    return fn


@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_model_step(benchmark, arch, impl, mode):
    if impl == "compile" and not COMPILE:
        pytest.skip("MMFAST_BENCH_MODELS_COMPILE=0")
    if SMOKE and impl == "compile" and arch not in SMOKE_COMPILE:
        pytest.skip(f"smoke mode compiles only {sorted(SMOKE_COMPILE)} (tracing cost on CPU)")
    fn = _step_fn(arch, impl, mode)
    inputs = _cache["inputs"]
    L = inputs["input_ids"].shape[1]
    img = inputs["pixel_values"].shape[-1]
    dtype = AMP_DTYPE or torch.float32
    case = f"{arch}_{SIZE}/{TASK[arch]} B={BATCH} text={L} img={img}"
    eager_fn = _step_fn(arch, "eager", mode) if impl != "eager" else None
    model, weights = _model_for(arch, impl)
    check = model_check(model, weights, _cache["eager"], inputs, name=case)
    info = bench(benchmark, fn, op=f"model:{arch}", impl=impl, mode=mode, case=case, dtype=dtype, eager=eager_fn,
                 check=check,
                 samples=BATCH, extra={"arch": arch, "size": SIZE, "task": TASK[arch],
                                       "params": sum(p.numel() for p in _cache["eager"].parameters())})
    assert info["median_ms"] > 0
