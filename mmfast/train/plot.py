"""``mmfast plot RUN``: one PNG of a run's metrics.jsonl: training loss, the eval metrics, learning rate."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run) -> list[dict]:
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"RUN: no metrics.jsonl at {path} (expected a run directory written by mmfast train)")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
    return rows


def plot_run(run, out=None) -> Path:
    """Writes the PNG (default ``RUN/metrics.png``) and returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = read_metrics(run)
    train = [r for r in rows if "loss" in r and "event" not in r and "step" in r]
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    if not train and not evals:
        raise ValueError(f"RUN: {run} has no training or eval rows in metrics.jsonl yet")
    eval_keys = sorted({k for r in evals for k in r if k.startswith("eval_") and isinstance(r[k], (int, float))})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(title="training loss", xlabel="step")
    for k in eval_keys:
        pts = [(r["step"], r[k]) for r in evals if k in r]
        axes[1].plot(*zip(*pts), marker="o", label=k[5:])
    axes[1].set(title="eval", xlabel="step")
    if eval_keys:
        axes[1].legend()
    axes[2].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[2].set(title="learning rate", xlabel="step")
    fig.suptitle(str(run))
    fig.tight_layout()
    out = Path(out) if out else (Path(run) if Path(run).is_dir() else Path(run).parent) / "metrics.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
