#!/usr/bin/env python
"""Mutation check: does the test suite notice small deliberate bugs?

Each mutant below is a one-line change located by an exact source string (which must occur
exactly once: a refactor that removes or duplicates it is reported as "pattern not found", a
failure, never a silent pass). Each is applied to a temporary copy of the working tree, the tests
that should catch it run there, and the mutant is *killed* when they fail. C++ mutants are built
in a cached CPU-only copy (incremental: only the mutated file recompiles, MAX_JOBS=1).

    .venv/bin/python scripts/mutants.py                # all mutants (~30-60 min on 2 cores)
    .venv/bin/python scripts/mutants.py -k triton      # the mutants whose name contains "triton"
    .venv/bin/python scripts/mutants.py --list

Prints the table mutant / tests run / killed / by which test; exits 1 unless every mutant selected
is killed. Not run in CI (time)."""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MMFAST_MUTANTS_CACHE", Path(tempfile.gettempdir()) / "mmfast-mutants-build"))


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # exact text, found exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids / files (with optional "-k expr" pairs)
    why: str = ""

    @property
    def cpp(self) -> bool:
        return self.path.startswith("csrc/")


T_ATT = "tests/test_attention.py"
T_CE = "tests/test_cross_entropy.py"
T_LCE = "tests/test_cross_entropy_fused.py"
T_CAT = "tests/test_concat_embed.py"
T_PATCH = "tests/test_patching.py"

MUTANTS = [
    # ---- C++ CPU faces ------------------------------------------------------------------------
    Mutant("cpp_ce_no_label_smoothing", "csrc/cpu/cross_entropy.cpp",
           "  if (p.eps != 0.f) loss += p.eps / p.C * static_cast<float>(p.weight_total * static_cast<double>(lse) - sum_wx);",
           "", (T_CE, "-k", "cpu and (rule_small_vocab or bert)"), "label-smoothing term dropped from the loss"),
    Mutant("cpp_ce_row_stride_is_C", "csrc/cpu/cross_entropy.cpp",
           "const scalar_t* x = x_base + i * x_stride;", "const scalar_t* x = x_base + i * C;",
           (T_CE, "-k", "strided"), "row-strided logits (big[:, :C]) read as if contiguous"),
    Mutant("cpp_ce_ignore_index_grad", "csrc/cpu/cross_entropy.cpp",
           "        if (g) std::fill(g, g + C, scalar_t(0));", "",
           (T_CE, "-k", "cpu and rule_small_vocab"), "ignored rows leave their gradient unwritten"),
    Mutant("cpp_concat_no_ln_bias", "csrc/cpu/concat_embed.cpp",
           "x[j] = x[j] * rstd * p.w[j] + p.bias[j];", "x[j] = x[j] * rstd * p.w[j];",
           (T_CAT, "-k", "cpu"), "LayerNorm bias skipped"),
    # ---- Triton kernels (interpreter) ------------------------------------------------------------
    Mutant("triton_attn_causal_lt", "mmfast/triton/attention.py",
           "ok = ok & (cols[None, :] <= rows[:, None] + (Lk - Lq))",
           "ok = ok & (cols[None, :] < rows[:, None] + (Lk - Lq))",
           (T_ATT, "-k", "triton_interpreter or block_edges"), "causal mask excludes the diagonal"),
    Mutant("triton_attn_fwd_causal_bound_one_block_short", "mmfast/triton/attention.py",
           "    if CAUSAL:  # the last key any row of this block sees is (last row) + Lk - Lq\n"
           "        hi = tl.minimum(Lk, tl.maximum((pid_m + 1) * BLOCK_M + Lk - Lq, 0))",
           "    if CAUSAL:  # the last key any row of this block sees is (last row) + Lk - Lq\n"
           "        hi = tl.minimum(Lk, tl.maximum(pid_m * BLOCK_M + Lk - Lq, 0))",
           (T_ATT, "-k", "block_edges"), "issue #12 survivor 1"),
    Mutant("triton_attn_dq_causal_bound_one_block_short", "mmfast/triton/attention.py",
           "    if CAUSAL:\n        hi = tl.minimum(Lk, tl.maximum((pid_m + 1) * BLOCK_M + Lk - Lq, 0))",
           "    if CAUSAL:\n        hi = tl.minimum(Lk, tl.maximum(pid_m * BLOCK_M + Lk - Lq, 0))",
           (T_ATT, "-k", "block_edges"), "the dQ kernel's causal bound one block short"),
    Mutant("triton_attn_dkdv_causal_start_late", "mmfast/triton/attention.py",
           "        lo = (lo // BLOCK_M) * BLOCK_M", "        lo = (lo // BLOCK_M + 1) * BLOCK_M",
           (T_ATT, "-k", "block_edges"), "the dK/dV kernel skips the first query block it needs"),
    Mutant("triton_ce_chunks_not_rescaled", "mmfast/triton/cross_entropy.py",
           "s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)",
           "s = s + tl.sum(tl.exp(x - m_safe[:, None]), 1)",
           (T_CE, "-k", "triton and (class_chunks or wide_vocab)"), "issue #12 survivor 2"),
    Mutant("triton_ce_smoothing_grad", "mmfast/triton/cross_entropy.py",
           "            g -= (eps / C) * scale[:, None]", "            g -= (eps / C)",
           (T_CE, "-k", "triton and rule_small_vocab"), "smoothing gradient not scaled (mean reduction)"),
    Mutant("triton_concat_no_ln_weight", "mmfast/triton/concat_embed.py",
           "x = xc * rstd[:, None] * tl.load(W + cols, mask=cmask, other=0.0)[None, :]", "x = xc * rstd[:, None]",
           (T_CAT, "-k", "triton"), "LayerNorm weight skipped"),
    # ---- Python ops -------------------------------------------------------------------------------
    Mutant("ops_attention_scale_ignored", "mmfast/ops/attention.py",
           "scale = float(q.shape[-1] ** -0.5 if scale is None else scale)\n    causal, dropout_p = bool(causal), float(dropout_p)",
           "scale = float(q.shape[-1] ** -0.5)\n    causal, dropout_p = bool(causal), float(dropout_p)",
           (T_ATT, "-k", "custom_scale"), "a custom scale is ignored by the fused faces"),
    Mutant("ops_ce_column_strided_logits", "mmfast/ops/cross_entropy.py",
           "    if logits2d.shape[1] > 1 and logits2d.stride(1) != 1:\n        logits2d = logits2d.contiguous()",
           "    if False:\n        logits2d = logits2d.contiguous()",
           (T_CE, "-k", "strided"), "column-strided logits passed to kernels that need a unit class stride"),
    Mutant("ops_ce_mean_denominator_ignores_weight", "mmfast/ops/cross_entropy.py",
           "    return (weight.gather(0, target.clamp(0, max(C - 1, 0))) * valid).sum(dtype=torch.float32)",
           "    return valid.sum().to(torch.float32)",
           (T_CE, "-k", "cpu and rule_small_vocab"), "weighted mean divides by the row count"),
    Mutant("ops_contrastive_column_term", "mmfast/ops/cross_entropy.py",
           "    loss = ((loss_r.sum() + loss_c.sum()) / (2 * N)).to(_loss_dtype(img))",
           "    loss = ((loss_r.sum() + loss_r.sum()) / (2 * N)).to(_loss_dtype(img))",
           (T_LCE, "-k", "contrastive"), "the text->image direction dropped"),
    Mutant("ops_concat_masks_order", "mmfast/ops/concat_embed.py",
           "                      for mk, f in zip(masks, features)], dim=1)",
           "                      for mk, f in zip(masks[::-1], features)], dim=1)",
           (T_CAT, "-k", "masks_with_none"), "modality masks concatenated in the wrong order"),
    # ---- dispatch ---------------------------------------------------------------------------------
    Mutant("dispatch_explicit_backend_runs_reference", "mmfast/dispatch.py",
           "        if reason is None:\n            return backend",
           "        if reason is None:\n            return \"torch\"",
           (T_CE, "-k", "extreme_logits"), "issue #12 survivor 5: a face silently runs the torch reference"),
    Mutant("dispatch_auto_cpu_is_reference", "mmfast/dispatch.py",
           "    if device_type == \"cpu\" and why_not(\"cpu\") is None:",
           "    if False and device_type == \"cpu\" and why_not(\"cpu\") is None:",
           ("tests/test_foundation.py",), "auto on the CPU never picks the C++ face"),
    # ---- patching ---------------------------------------------------------------------------------
    Mutant("patch_timm_vit_noop", "mmfast/patching/timm_vit.py",
           "        B, N, _ = x.shape\n        try:",
           "        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)\n        B, N, _ = x.shape\n        try:",
           (T_PATCH, "-k", "timm and auto"), "issue #12 survivor 4: the ViT swap does nothing, the report still lists it"),
    Mutant("patch_hf_no_mask_interface", "mmfast/patching/hf_attention.py",
           "    AttentionMaskInterface.register(NAME, mmfast_mask)", "    pass",
           (T_PATCH, "-k", "bert_model_padded and auto"), "HF passes no mask: padding silently attended to"),
    Mutant("patch_loss_head_left_eager", "mmfast/patching/losses.py",
           "    loss = ops.cross_entropy(lg, tg, backend=_backend(self))",
           "    loss = torch.nn.functional.cross_entropy(lg, tg)",
           (T_PATCH, "-k", "token_classification and auto"), "the loss head reported as swapped still runs eager"),
    # ---- zoo --------------------------------------------------------------------------------------
    Mutant("zoo_fused_attention_never_causal", "mmfast/models/kernels.py",
           "return cpu_attention(q, k, v, key_padding_mask, causal, scale, dropout_p)",
           "return cpu_attention(q, k, v, key_padding_mask, False, scale, dropout_p)",
           ("tests/test_models.py", "-k", "twin and captioner"), "the captioner's decoder sees future tokens"),
    # ---- trainer ----------------------------------------------------------------------------------
    Mutant("trainer_scaler_not_restored", "mmfast/train/trainer.py",
           "        self.scaler.load_state_dict(state[\"scaler\"])", "        pass",
           ("tests/test_train.py", "-k", "resume"), "fp16 resume restarts the loss scale"),
    Mutant("trainer_no_clipping", "mmfast/train/trainer.py",
           "cfg.max_grad_norm or float(\"inf\"))", "float(\"inf\"))",
           ("tests/test_train.py", "-k", "clips"), "max_grad_norm ignored"),
]


def _tree_files(src: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=src, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    files = [f for f in out if f and (src / f).is_file()]
    files += [str(p.relative_to(src)) for p in (src / "mmfast").glob("_C*.so")]
    files += [f for f in ("mmfast/_build_info.json",) if (src / f).exists()]
    return files


def _sync(src: Path, dst: Path, files: list[str]) -> None:
    """Copies the files that differ (keeping unchanged ones' timestamps, so builds stay incremental)."""
    for f in files:
        a, b = src / f, dst / f
        if b.exists() and filecmp.cmp(a, b, shallow=False):
            continue
        b.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(a, b)


def _env(root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", MAX_JOBS="1", MMFAST_BUILD_CUDA="0")
    env.pop("MMFAST_BACKEND", None)
    return env


def _build(root: Path) -> None:
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=root, env=_env(root),
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"build failed in {root}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def _apply(root: Path, m: Mutant) -> str:
    """Writes the mutant into ``root``; returns the original text (None-safe for restoring)."""
    path = root / m.path
    if not path.exists():
        raise LookupError(f"pattern not found: {m.path} does not exist")
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise LookupError(f"pattern not found: {m.path} holds the exact source string {n} times (expected once)")
    path.write_text(text.replace(m.old, m.new))
    return text


def _run_tests(root: Path, m: Mutant) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", "-rfE",
           "-n", "0", *m.tests]
    r = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True)
    out = r.stdout + r.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    if r.returncode == 0:
        return False, "-"
    if r.returncode == 5:
        return False, "no test collected"
    return True, (failed[0] if failed else f"pytest exit {r.returncode}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="run only mutants whose name contains this")
    ap.add_argument("--only", choices=("cpp", "python"), help="only the C++ mutants, or only the others")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--check", action="store_true", help="only check that every pattern is found exactly once")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if args.k in m.name and (args.only is None or m.cpp == (args.only == "cpp"))]
    if args.list:
        for m in chosen:
            print(f"{m.name:48s} {m.path:34s} {m.why}")
        return 0
    if args.check:
        bad = 0
        for m in chosen:
            n = (ROOT / m.path).read_text().count(m.old) if (ROOT / m.path).exists() else 0
            bad += n != 1
            print(f"{m.name:48s} {'ok' if n == 1 else f'pattern not found ({n} matches)'}")
        return 1 if bad else 0
    files = _tree_files(ROOT)
    rows = []
    cpp = [m for m in chosen if m.cpp]
    if cpp:
        CACHE.mkdir(parents=True, exist_ok=True)
        _sync(ROOT, CACHE, files)
        print(f"[mutants] C++ build cache {CACHE}: building (CPU only) ...", flush=True)
        _build(CACHE)
    for m in chosen:
        t0 = time.time()
        if m.cpp:
            root, tmp = CACHE, None
        else:
            tmp = Path(tempfile.mkdtemp(prefix="mmfast-mutant-"))
            _sync(ROOT, tmp, files)
            root = tmp
        try:
            original = _apply(root, m)
        except LookupError as e:
            rows.append((m, False, str(e), time.time() - t0))
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            continue
        try:
            if m.cpp:
                _build(root)
            killed, by = _run_tests(root, m)
        except RuntimeError as e:
            killed, by = False, f"build failed: {str(e).splitlines()[0]}"
        finally:
            (root / m.path).write_text(original)
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        rows.append((m, killed, by, time.time() - t0))
        print(f"[mutants] {m.name}: {'killed' if killed else 'SURVIVED'} ({by}) {time.time() - t0:.0f}s", flush=True)
    if cpp:
        _build(CACHE)  # leave the cache built from the unmutated sources
    print()
    print("| mutant | file | tests run | killed | by |")
    print("|---|---|---|---|---|")
    for m, killed, by, _ in rows:
        print(f"| {m.name} | {m.path} | {' '.join(m.tests)} | {'yes' if killed else 'NO'} | {by} |")
    survivors = [m.name for m, killed, _, _ in rows if not killed]
    print(f"\n{len(rows) - len(survivors)}/{len(rows)} killed" + (f"; not killed: {survivors}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
