"""Crash-safe checkpoints.

Layout of a run directory::

    out_dir/latest                 name of the newest complete checkpoint (replaced atomically)
    out_dir/step_000100/model.safetensors   weights (safetensors; tied weights handled)
    out_dir/step_000100/state.pt            optimizer, scheduler, scaler, RNG, step, data position
    out_dir/step_000100/run.json            the training config and what built the model

A checkpoint is written into a temporary folder, flushed to disk, then renamed into place, and only
then does ``latest`` (itself written to a temporary file and ``os.replace``d) point at it. A process
killed at any moment leaves either the old or the new checkpoint complete, never a mix; leftovers of
an interrupted save are removed by the next save. ``state.pt`` holds only tensors and plain Python
values, so it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, cut short or not what it should be; the message names the file."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir, step: int, model: torch.nn.Module, state: dict, run_info: dict,
                    keep: int = 2) -> Path:
    """Write ``out_dir/step_<step>`` atomically and point ``latest`` at it; returns its path."""
    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final, tmp = out_dir / name, out_dir / f".tmp-{name}-{os.getpid()}"
    for stale in out_dir.glob(".tmp-step_*"):  # leftovers of a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "run.json").write_text(json.dumps(run_info, indent=1, default=str))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # saving the same step again (e.g. the end of a resumed, finished run)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    write_text_atomic(out_dir / "latest", name + "\n")
    steps = sorted(p for p in out_dir.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


_FILES = ("model.safetensors", "state.pt", "run.json")


def _missing(ckpt: Path) -> list[str]:
    return [f for f in _FILES if not (ckpt / f).is_file()]


def find_checkpoint(path) -> Path | None:
    """The checkpoint folder for ``path``: a checkpoint folder itself, or a run directory (the folder
    its ``latest`` names, else its newest complete ``step_*``). None when there is none.

    Never falls back silently to an older step: ``latest`` naming an incomplete folder raises
    :class:`CheckpointError`; without ``latest``, newer incomplete folders are skipped with a warning
    naming both."""
    path = Path(path)
    if path.is_dir() and (path.name.startswith("step_") or (path / "model.safetensors").is_file()):
        if _missing(path):
            raise CheckpointError(f"{path}: not a complete checkpoint (missing {', '.join(_missing(path))})")
        return path
    latest = path / "latest"
    if latest.is_file():
        ckpt = path / latest.read_text().strip()
        if ckpt.name.startswith("step_") and ckpt.is_dir() and not _missing(ckpt):
            return ckpt
        what = f"missing {', '.join(_missing(ckpt))}" if ckpt.is_dir() else "no such folder"
        raise CheckpointError(f"{latest}: names {ckpt.name!r}, which is not a complete checkpoint ({what}); pass an "
                              f"older step_* folder explicitly if you want it")
    steps = sorted(p for p in path.glob("step_*") if p.is_dir())
    complete = [p for p in steps if not _missing(p)]
    if complete and complete[-1] != steps[-1]:
        warnings.warn(f"{path}: newest checkpoint folder {steps[-1].name} is incomplete (missing "
                      f"{', '.join(_missing(steps[-1]))}); using {complete[-1].name}", RuntimeWarning, stacklevel=2)
    return complete[-1] if complete else None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_weights(model: torch.nn.Module, ckpt: Path, strict: bool = True) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    file = Path(ckpt) / "model.safetensors"
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:  # e.g. a file cut short
        raise CheckpointError(f"{file}: cannot be read as safetensors weights ({_first_line(e)})") from None
    if strict and (missing or unexpected):
        raise RuntimeError(f"checkpoint {ckpt} does not fit the model: missing keys {sorted(missing)[:10]}, "
                           f"unexpected keys {sorted(unexpected)[:10]}")


def load_state(ckpt: Path) -> dict:
    file = Path(ckpt) / "state.pt"
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise CheckpointError(f"{file}: cannot be loaded ({_first_line(e)})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{file}: not a trainer state (no 'step')")
    return state


def load_run_info(ckpt: Path) -> dict:
    file = Path(ckpt) / "run.json"
    try:
        info = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(info).__name__}")
    return info
