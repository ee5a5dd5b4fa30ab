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

CPU table (issue #18; real sizes, not smoke), one command that prints it::

    MMFAST_BENCH_CPU=1 python benchmarks/bench_models.py

per architecture, fused speed / eager-twin speed (same weights, same batch of 8, median of
``MMFAST_BENCH_CPU_STEPS`` (default 5; at least 200 at tiny size) interleaved steps after a warm-up): training step (forward +
backward + AdamW) at tiny size with 1 thread and at small size (MiniLM-L6 + ViT-S/16, 224 px, text
40) with 2 threads, inference (eval, no grad) at small size with 2 threads, and the tiny training
step against ``torch.compile(eager twin)`` (inductor; skipped with ``MMFAST_BENCH_MODELS_COMPILE=0``).
``MMFAST_BENCH_CPU_SIZES=tiny`` (or ``small``) runs one size only.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

import pytest
import torch

import mmfast.models as mm
from mmfast.train.timing import interleaved_medians
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


# ---------------------------------------------------------------------------------------------
# CPU table (MMFAST_BENCH_CPU=1): fused vs eager twin measured side by side in one process.
CPU_BATCH = 8
CPU_SIZES = {"tiny": {}, "small": {"text_len": 40, "img_size": 224}}


def _cpu_pair(arch: str, size: str, mode: str):
    """Step functions of the fused model and its eager twin (same weights, same inputs)."""
    torch.manual_seed(0)
    fused = mm.create_model(f"{arch}_{size}", task=TASK[arch], **CPU_SIZES[size])
    eager = mm.create_model(f"{arch}_{size}", task=TASK[arch], fused=False, **CPU_SIZES[size])
    eager.load_state_dict(fused.state_dict())
    inputs = fused.example_inputs(CPU_BATCH)
    steps = {name: _cpu_step(model, model, inputs, mode) for name, model in (("fused", fused), ("eager", eager))}
    return steps, eager, inputs


def _cpu_step(model, params_owner, inputs, mode: str):
    if mode == "train":
        params_owner.train()
        opt = torch.optim.AdamW(params_owner.parameters(), lr=1e-5)

        def step():
            model(**inputs).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    params_owner.eval()

    def infer():
        with torch.inference_mode():
            model(**inputs)
    return infer


def _rounds(size: str, rounds: int) -> int:
    """Tiny steps take ~10 ms, where one scheduler hiccup moves a median of 5: at least 200 there
    (the five tiny ratios moved by up to 0.1 between runs of 40; by ~0.02 between runs of 200)."""
    return max(rounds, 200) if size == "tiny" else rounds


def _warmup(size: str) -> int:
    return 10 if size == "tiny" else 2


def cpu_table(archs=None, rounds: int = 5, compile_: bool = True, sizes=("tiny", "small")) -> list[dict]:
    archs = archs or list(mm.ARCHS)
    cases = [c for c in [("tiny", 1, "train"), ("small", 2, "train"), ("small", 2, "infer")] if c[0] in sizes]
    rows = []
    for arch in archs:
        row = {"arch": arch}
        for size, threads, mode in cases:
            torch.set_num_threads(threads)
            steps, _, _ = _cpu_pair(arch, size, mode)
            med = interleaved_medians(steps, _rounds(size, rounds), _warmup(size))
            row[f"{size}/{threads}/{mode}"] = med["eager"] / med["fused"]
            row[f"{size}/{threads}/{mode}/ms"] = (med["fused"] * 1e3, med["eager"] * 1e3)
            print(f"  {arch} {size} {threads} thread(s) {mode}: fused {med['fused'] * 1e3:.1f} ms, "
                  f"eager {med['eager'] * 1e3:.1f} ms", flush=True)
        if compile_ and "tiny" in sizes:
            torch.set_num_threads(1)
            steps, eager, inputs = _cpu_pair(arch, "tiny", "train")
            steps["compile"] = _cpu_step(torch.compile(eager), eager, inputs, "train")
            del steps["eager"]
            med = interleaved_medians(steps, _rounds("tiny", rounds), _warmup("tiny"))  # the first calls compile
            row["tiny/1/train/compile"] = med["compile"] / med["fused"]
            print(f"  {arch} tiny 1 thread train: fused {med['fused'] * 1e3:.1f} ms, "
                  f"torch.compile(eager) {med['compile'] * 1e3:.1f} ms", flush=True)
        rows.append(row)
    return rows


def thread_counts(ap, text: str) -> list:
    """The positive integers of a comma-separated --threads argument; ap.error (one line) otherwise."""
    try:
        threads = [int(t) for t in text.split(",") if t]
    except ValueError:
        ap.error(f"argument --threads: expected comma-separated integers, got {text!r}")
    if not threads or min(threads) < 1:
        ap.error(f"argument --threads: expected positive integers, got {text!r}")
    return threads


def emit_row(lines: list, row: str) -> None:
    """Appends a markdown row to a CPU benchmark's table and prints it as soon as it is measured."""
    lines.append(row)
    print(row, flush=True)


def write_table(lines: list, path) -> None:
    """The table to --out (when given), one row a line."""
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_cpu_table(rows: list[dict]) -> None:
    fmt = lambda r, k: f"{r[k]:.2f}x" if k in r else "-"
    print(f"\n{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load average {os.getloadavg()[0]:.1f}; batch {CPU_BATCH}, "
          f"fused speed / eager speed (>1: fused faster), median of interleaved steps\n")
    print("| architecture | tiny train, 1 thread | small train, 2 threads | small inference, 2 threads "
          "| tiny train vs torch.compile(eager), 1 thread |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {fmt(r, 'tiny/1/train')} | {fmt(r, 'small/2/train')} | {fmt(r, 'small/2/infer')} "
              f"| {fmt(r, 'tiny/1/train/compile')} |")


if __name__ == "__main__":
    if os.environ.get("MMFAST_BENCH_CPU") != "1":
        raise SystemExit("run the pytest suite (pytest benchmarks/bench_models.py), or set MMFAST_BENCH_CPU=1 "
                         "for the CPU table")
    sizes = os.environ.get("MMFAST_BENCH_CPU_SIZES", "tiny,small").split(",")
    print_cpu_table(cpu_table(ARCHS, rounds=int(os.environ.get("MMFAST_BENCH_CPU_STEPS", "5")), compile_=COMPILE,
                              sizes=sizes))
