"""C++ CPU faces of two builds of the extension side by side, in one run (issue #15: the stable-ABI
port must be as fast as the build it replaces).

    .venv/bin/python scripts/compare_extension_speed.py OLD.so NEW.so [--rounds 3]

For each build a worker process (one per round, builds alternating, so machine noise hits both)
loads that library alone (MMFAST_EXTENSION), checks the face against eager once, then times with one
thread the CPU face and the eager formula on the same inputs: cross_entropy forward+backward and
concat_embed forward and forward+backward. It reports per case the median time of each build and
its ratio to eager measured in the same process (eager / face: > 1 means faster than eager); the
ratio is what to compare, since it cancels most of the load other processes put on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _median_ms(fn, reps):
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cases():
    import torch
    import torch.nn.functional as F

    from bench_concat_embed import _eager_params, _inputs

    from mmfast.ops import concat_embed, cross_entropy
    from mmfast.reference import concat_embed as concat_ref

    def ce(N, C, dtype):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(N, C, generator=g) * 3).to(dtype).requires_grad_()
        t = torch.randint(0, C, (N,), generator=g)

        def run(backend):
            def step():
                loss = (cross_entropy(x, t, backend="cpu") if backend == "cpu" else F.cross_entropy(x.float(), t))
                return torch.autograd.grad(loss, x)[0]
            return step
        return f"cross_entropy fwd+bwd N={N} C={C} {str(dtype)[6:]}", run

    def cat(B, Ls, D, dtype, mode):  # the inputs of benchmarks/bench_concat_embed.py
        (feats, params, grad), = _inputs(B, Ls, D, dtype, 1)
        leaves = feats + [params["type_embeddings"], *params["pos_embeddings"], params["ln_weight"], params["ln_bias"]]

        def run(backend):
            def out():
                if backend == "cpu":
                    return concat_embed(feats, **params, eps=1e-12, backend="cpu")[0]
                return concat_ref(feats, **_eager_params(params, dtype), eps=1e-12)[0]

            def step():
                if mode == "fwd":
                    with torch.no_grad():
                        return out()
                return torch.autograd.grad(out(), leaves, grad)
            return step
        return f"concat_embed {mode} B={B} L={'+'.join(map(str, Ls))} D={D} {str(dtype)[6:]}", run

    return [ce(4096, 1000, torch.float32), ce(256, 30522, torch.float32), ce(256, 30522, torch.bfloat16),
            cat(8, (40, 197), 768, torch.float32, "fwd"), cat(8, (40, 197), 768, torch.float32, "fwd+bwd"),
            cat(8, (40, 197), 768, torch.bfloat16, "fwd+bwd")]


def worker(reps):
    import torch

    torch.set_num_threads(1)
    from mmfast import _extension

    assert _extension.load(), f"the library does not load: {_extension.load_error()}"
    assert os.environ.get("MMFAST_EXTENSION"), "worker runs only with MMFAST_EXTENSION set"
    results = {}
    for name, run in _cases():
        face, eager = run("cpu"), run("eager")
        # Check before timing: the face computes what eager computes (the output, or the first
        # gradient; bf16 eager's own parameter-gradient sums are too coarse to compare against).
        got, ref = face(), eager()
        first = lambda r: r[0] if isinstance(r, (list, tuple)) else r
        torch.testing.assert_close(first(got).float(), first(ref).float(), atol=2e-2, rtol=2e-2)
        t_face, t_eager = _median_ms(face, reps), _median_ms(eager, reps)
        results[name] = {"face_ms": t_face, "eager_ms": t_eager}
    print(json.dumps(results))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.reps)
    libs = {"old": os.path.abspath(a.old), "new": os.path.abspath(a.new)}
    runs = {k: [] for k in libs}
    for r in range(a.rounds):
        for k in (["old", "new"] if r % 2 == 0 else ["new", "old"]):
            # CPU only (the benchmarks' input helpers pick the GPU when one is visible).
            env = dict(os.environ, MMFAST_EXTENSION=libs[k], OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                       PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "benchmarks")]))
            out = subprocess.run([sys.executable, __file__, a.old, a.new, "--worker", "--reps", str(a.reps)],
                                 env=env, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"{k} worker failed:\n{out.stderr[-3000:]}")
            runs[k].append(json.loads(out.stdout.strip().splitlines()[-1]))
    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from harness import device_name

    print(f"machine: {device_name()} (shared with other processes), one thread; "
          f"torch {torch.__version__}; {a.rounds} rounds x {a.reps} reps, medians")
    print(f"old: {libs['old']}\nnew: {libs['new']}")
    print(f"{'case':58s} {'old ms':>8s} {'new ms':>8s} {'old eager/face':>15s} {'new eager/face':>15s} {'new/old ratio':>14s}")
    for name in runs["old"][0]:
        med = {k: {f: statistics.median(r[name][f] for r in runs[k]) for f in ("face_ms", "eager_ms")} for k in libs}
        ratio = {k: statistics.median(r[name]["eager_ms"] / r[name]["face_ms"] for r in runs[k]) for k in libs}
        print(f"{name:58s} {med['old']['face_ms']:8.2f} {med['new']['face_ms']:8.2f} {ratio['old']:15.2f} "
              f"{ratio['new']:15.2f} {ratio['new'] / ratio['old']:14.2f}")


if __name__ == "__main__":
    main()
