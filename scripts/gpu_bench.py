"""S4 of scripts/gpu_check.sh: micro-benchmarks timed with CUDA events (benchmarks/harness.py's timer),
written one JSON line per measurement as it is measured. No pytest-benchmark, no torch.compile, no
autotuning (every mmfast face runs its static configuration).

    python scripts/gpu_bench.py OUT.jsonl

Each row: op, case, mode (fwd | fwd+bwd), dtype, impl, median_ms, tflops or gbps, ratio_to_eager,
ratio_to_best_sdpa (attention), peak_mem_mb, work (the size dispatch buckets by), device. "eager" is
what ``backend="torch"`` runs, i.e. what safe ``auto`` falls back to (for attention on a GPU: SDPA with
mmfast's semantics; "eager-formula" is the matmul-softmax-matmul formula); it is timed first in each
group, then SDPA's backends, then the mmfast faces. GPU_CHECK_DRYRUN=1: CPU, tiny shapes, one repetition.
"""

from __future__ import annotations

import os
import sys

import torch

from gpu_check import DRY, GPU_FACES, ROOT, SKIP_NO_GPU, Jsonl

if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402
import mmfast  # noqa: E402
from mmfast import dispatch, testing  # noqa: E402
from mmfast import reference as ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.float32 if DRY else torch.bfloat16  # the interpreter's bf16 dot is garbage
TARGET_MS = 1.0 if DRY else 150.0  # time spent per measurement


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = {"sdpa": None, "sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
             "sdpa-cudnn": "CUDNN_ATTENTION"}
    return {k: (getattr(SDPBackend, v, None) if v else None) for k, v in names.items()} if DEV == "cuda" else {"sdpa": None}


class Group:
    """One (op, case, mode, dtype): measures impls in order and writes each row as it is measured."""

    def __init__(self, w: Jsonl, op: str, case: str, mode: str, work: int, flops: float = 0.0, nbytes: float = 0.0):
        self.w, self.key = w, dict(op=op, case=case, mode=mode, dtype=str(DT).replace("torch.", ""), work=work)
        self.flops, self.nbytes, self.ms = flops, nbytes, {}

    def time(self, impl: str, fn, unavailable: str | None = None):
        if unavailable:
            return self.w.write(**self.key, impl=impl, skipped=unavailable)
        try:
            fn()  # first call: compiles / loads outside the timing
            harness._sync()
            est = harness.time_ms(fn, warmup=0, reps=1)
            reps = 1 if DRY else max(3, min(50, int(TARGET_MS / max(est, 1e-3))))
            ms = harness.time_ms(fn, warmup=0 if DRY else 2, reps=reps)
            peak = harness.peak_memory_mb(fn)
        except Exception as e:  # noqa: BLE001 - one impl failing must not stop the others
            return self.w.write(**self.key, impl=impl, error=f"{type(e).__name__}: {str(e)[:300]}")
        self.ms[impl] = ms
        sdpa = [v for k, v in self.ms.items() if k.startswith("sdpa")]
        return self.w.write(**self.key, impl=impl, median_ms=ms, reps=reps, peak_mem_mb=peak,
                            tflops=self.flops / ms / 1e9 if self.flops else None,
                            gbps=self.nbytes / ms / 1e6 if self.nbytes else None,
                            ratio_to_eager=self.ms["eager"] / ms if "eager" in self.ms else None,
                            ratio_to_best_sdpa=min(sdpa) / ms if sdpa else None,
                            device=harness.device_name(), dryrun=DRY)


def _faces(op: str) -> dict:
    """mmfast faces to time, with the reason one cannot run here (None when it can)."""
    out = {}
    for face in ("triton", "cuda"):
        if face not in GPU_FACES:
            continue
        why = dispatch.availability(op, face, DEV, DT)
        out[f"mmfast-{face}"] = (face, SKIP_NO_GPU if face == "cuda" and DEV != "cuda" else why and f"skipped: {why}")
    return out


def _step(fwd, inputs, mode):
    """A zero-argument callable: forward, or forward + backward into every input."""
    if mode == "fwd":
        return lambda: fwd()
    up = {}

    def run():
        out = fwd()
        if "g" not in up:
            up["g"] = torch.randn_like(out)
        return torch.autograd.grad(out, inputs, up["g"])

    return run


def bench_attention(w: Jsonl):
    cases = [("cross B2 H2 7x13 D16 mask", 2, 2, 7, 13, 16, True)] if DRY else [
        ("cross B64 H12 40x197 D64 mask", 64, 12, 40, 197, 64, True),
        ("self B8 H12 L2048 D64", 8, 12, 2048, 2048, 64, False),
        ("self B8 H12 L2048 D128", 8, 12, 2048, 2048, 128, False)]
    import torch.nn.functional as F

    for label, B, H, Lq, Lk, D, masked in cases:
        mask = (torch.arange(Lk, device=DEV)[None] < torch.randint(1, Lk + 1, (B, 1), device=DEV)) if masked else None
        sdpa_mask = None if mask is None else mask[:, None, None, :]
        for p in ((0.0,) if DRY else (0.0, 0.1)):
            q, k, v = (testing.randn(B, H, L, D, dtype=DT, device=DEV, seed=s).requires_grad_()
                       for s, L in ((1, Lq), (2, Lk), (3, Lk)))
            for mode in ("fwd", "fwd+bwd"):
                flops = 4 * B * H * Lq * Lk * D * (1 if mode == "fwd" else 3.5)
                g = Group(w, "attention", f"{label}" + (f" p{p}" if p else ""), mode, B * H * Lq * Lk, flops=flops)
                ctx = torch.no_grad() if mode == "fwd" else torch.enable_grad()
                with ctx:
                    g.time("eager", _step(lambda: mmfast.ops.attention(q, k, v, key_padding_mask=mask, dropout_p=p,
                                                                       backend="torch"), [q, k, v], mode))
                    g.time("eager-formula", _step(lambda: ref.attention(q, k, v, key_padding_mask=mask, dropout_p=p),
                                                  [q, k, v], mode))
                    for impl, be in _sdpa_backends().items():
                        def sdpa(be=be):
                            if be is None:
                                return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, dropout_p=p)
                            from torch.nn.attention import sdpa_kernel

                            with sdpa_kernel([be]):
                                return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, dropout_p=p)
                        g.time(impl, _step(sdpa, [q, k, v], mode),
                               None if be is not None or impl == "sdpa" else "skipped: this torch lacks the backend")
                    for impl, (face, why) in _faces("attention").items():
                        g.time(impl, _step(lambda face=face: mmfast.ops.attention(
                            q, k, v, key_padding_mask=mask, dropout_p=p, backend=face), [q, k, v], mode), why)


def bench_cross_entropy(w: Jsonl):
    N, C = (16, 97) if DRY else (16384, 30522)
    x = testing.randn(N, C, dtype=DT, device=DEV, seed=1, scale=3.0).requires_grad_()
    t = torch.randint(0, C, (N,), device=DEV)
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
        liger_why = None if DEV == "cuda" else SKIP_NO_GPU
    except ImportError:
        liger_cross_entropy, liger_why = None, "skipped: liger-kernel not carried"
    elt = x.element_size()
    for mode in ("fwd", "fwd+bwd"):
        g = Group(w, "cross_entropy", f"N{N} C{C}", mode, N * C, nbytes=N * C * elt * (1 if mode == "fwd" else 2))
        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
            g.time("eager", _step(lambda: mmfast.ops.cross_entropy(x, t, backend="torch"), [x], mode))
            for impl, (face, why) in _faces("cross_entropy").items():
                g.time(impl, _step(lambda face=face: mmfast.ops.cross_entropy(x, t, backend=face), [x], mode), why)
            g.time("liger", _step(lambda: liger_cross_entropy(x, t), [x], mode), liger_why)


def bench_concat_embed(w: Jsonl):
    B, Ls, D = (2, (3, 5), 64) if DRY else (64, (40, 197), 768)
    feats = [testing.randn(B, L, D, dtype=DT, device=DEV, seed=L).requires_grad_() for L in Ls]
    te = testing.randn(2, D, device=DEV, seed=3).requires_grad_()
    lw, lb = testing.randn(D, device=DEV, seed=4).requires_grad_(), testing.randn(D, device=DEV, seed=5).requires_grad_()
    ins = [*feats, te, lw, lb]
    n = B * sum(Ls) * D
    for mode in ("fwd", "fwd+bwd"):
        g = Group(w, "concat_embed", f"B{B} ({','.join(map(str, Ls))}) D{D} LN", mode, n,
                  nbytes=n * feats[0].element_size() * (2 if mode == "fwd" else 4))
        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
            for impl, face, why in [("eager", "torch", None)] + [(i, f, y) for i, (f, y) in _faces("concat_embed").items()]:
                g.time(impl, _step(lambda face=face: mmfast.ops.concat_embed(
                    feats, type_embeddings=te, ln_weight=lw, ln_bias=lb, eps=1e-12, backend=face)[0], ins, mode), why)


def bench_zoo_step(w: Jsonl):
    """One training step (forward, backward, AdamW) of a base-size model: fused (Triton faces) vs its eager twin."""
    import mmfast.models as mm

    name, batch = ("cross_attention_tiny", 2) if DRY else ("cross_attention_base", 32)
    torch.manual_seed(0)
    with torch.device(DEV):
        fused = mm.create_model(name, task="pretrain", backend="triton")
        eager = mm.create_model(name, task="pretrain", fused=False)
    eager.load_state_dict(fused.state_dict())
    inputs = fused.example_inputs(batch_size=batch)
    g = Group(w, "train_step", f"{name} pretrain B{batch}", "fwd+bwd+adamw", batch)
    for impl, model in (("eager", eager), ("mmfast-triton", fused)):
        g.time(impl, _train_step(model, inputs))


def bench_packed_step(w: Jsonl):
    """Issue #19's packed cases (benchmarks/bench_packed.py on the GPU): a training step of the zoo's
    cross_attention model padded vs packed=True on the length-skewed text set, and NER
    (BertForTokenClassification, MiniLM's shape) through mmfast.patch padded vs unpad=True. Each
    pair is first checked to give the same loss (eval mode, no dropout) before it is timed."""
    import bench_packed
    import bench_unpad
    import mmfast.models as mm
    from mmfast.data import collate

    name, batch = ("cross_attention_tiny", 4) if DRY else ("cross_attention_small", 64)
    torch.manual_seed(0)
    with torch.device(DEV):
        padded = mm.create_model(name, backend="triton")
        packed = mm.create_model(name, backend="triton", packed=True)
    packed.load_state_dict(padded.state_dict())
    items = bench_packed.text_items(padded, bench_packed.skewed_lengths(batch))
    to_dev = lambda b: {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
    batches = {"padded": to_dev(collate(items)), "packed": to_dev(collate(items, packed=True))}
    tokens = int(batches["packed"]["input_ids"].numel())
    models = {"padded": padded, "packed": packed}
    _check_same_loss(models, batches, "cross_attention packed")
    g = Group(w, "packed_step", f"{name} pretrain B{batch} skewed text ({tokens} tokens)", "fwd+bwd+adamw", tokens)
    for impl in ("padded", "packed"):
        g.time(f"mmfast-{impl}", _train_step(models[impl], batches[impl]))

    stock, inputs, tokens, case = bench_unpad.ner_case(4 if DRY else 64, smoke=DRY, device=DEV)
    ner = bench_unpad.variants(stock)
    ner_models = {"padded": ner["mmfast"], "packed": ner["mmfast-unpad"]}
    _check_same_loss(ner_models, {"padded": inputs, "packed": inputs}, "NER unpad")
    g = Group(w, "packed_step", f"NER {case} ({tokens} tokens)", "fwd+bwd+adamw", tokens)
    for impl in ("padded", "packed"):
        g.time(f"mmfast-{impl}", _train_step(ner_models[impl], inputs))


def _check_same_loss(models: dict, batches: dict, what: str) -> None:
    losses = {}
    for impl, m in models.items():
        m.eval()
        with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16, enabled=not DRY):
            losses[impl] = float(m(**batches[impl]).loss)
        m.train()
    a, b = losses["padded"], losses["packed"]
    tol = 1e-5 if DRY else 2e-2  # bf16 autocast: packing changes summation orders
    if not (abs(a - b) <= tol * max(1.0, abs(a))):
        raise AssertionError(f"{what}: packed loss {b} differs from padded loss {a}")


def _train_step(model, batch: dict):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=not DRY):
            loss = model(**batch).loss
        loss.float().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def main(path: str) -> int:
    w = Jsonl(path)
    try:
        steps = (bench_zoo_step, bench_packed_step) if "triton" in GPU_FACES else ()  # the zoo's Triton faces
        for fn in (bench_attention, bench_cross_entropy, bench_concat_embed, *steps):
            try:
                fn(w)
            except Exception as e:  # noqa: BLE001 - the next benchmark still runs
                w.write(op=fn.__name__.replace("bench_", ""), impl="*", error=f"{type(e).__name__}: {str(e)[:300]}")
    except KeyboardInterrupt:
        w.write(op="*", impl="*", skipped="stopped at the stage deadline")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
