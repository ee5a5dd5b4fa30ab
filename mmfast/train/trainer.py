"""A lean training loop, readable top to bottom.

    trainer = Trainer(model, train_dataset, eval_dataset, TrainConfig(max_steps=1000, out_dir="run"))
    summary = trainer.fit()       # {"seconds", "samples_per_s", "tokens_per_s", "peak_memory_mb", "best_metric", ...}
    metrics = trainer.evaluate()  # {"loss", "accuracy" (when the model returns class logits), ...}

The model is any ``nn.Module`` whose ``forward(**batch)`` returns an object or dict with ``loss``
(mmfast's zoo, Hugging Face models, your own). What the loop does, in order, per optimizer step:
``grad_accum`` micro-batches under autocast (bf16/fp16) -> loss scaled (fp16) and backpropagated
(DDP syncs gradients on the last micro-batch only) -> the loss is checked to be finite -> gradients
unscaled and clipped -> AdamW step -> LR schedule step -> log / eval / early stop / checkpoint.

Distributed: launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), the trainer joins the
process group (NCCL on GPUs, gloo on CPU), wraps the model in DistributedDataParallel and shards the
data with a DistributedSampler; a zoo model's contrastive (itc) loss gathers the features of every
rank, so it sees the global batch's negatives; every rank evaluates the whole eval set (so early
stopping agrees without communication) and only rank 0 logs and saves.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from mmfast.data.collate import collate
from mmfast.train import checkpoint as ckpt_io
from mmfast.train.config import TrainConfig


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) became NaN/inf; the weights were not updated by that step."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived: the optimizer step under way was finished, a checkpoint written
    (``checkpoint``; None without ``out_dir``), and training stopped. ``exit_code``: 128 + the signal
    number, what a shell reports for a process the signal ended (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no out_dir)"
        super().__init__(f"{self.signal_name} at step {step}: {where}")


class _StopSignals:
    """While training: the first SIGINT/SIGTERM only asks the loop to stop after the optimizer step
    under way (a half-applied step cannot be checkpointed); the previous handlers come back at once,
    so a second Ctrl-C stops immediately."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        self._restore()

    def _restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()
        return False


class _ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start mid-epoch: ``start`` samples of this rank are skipped, so a
    resumed run sees exactly the data it would have seen without stopping."""

    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return max(0, super().__len__() - self.start)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under torch.compile and DDP wrappers (their state_dict keys get prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _get(out, key):
    if isinstance(out, dict):
        return out.get(key)
    return getattr(out, key, None)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # CPU: the peak resident set of this process (the whole process, not only tensors)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    def __init__(self, model: torch.nn.Module, train_dataset, eval_dataset=None, config: TrainConfig | None = None,
                 *, collate_fn=collate, run_info: dict | None = None, eval_fn=None):
        """``run_info``: what rebuilds the model (name, task, ...), saved with every checkpoint.
        ``eval_fn(model, loader, device, autocast) -> dict`` replaces the default evaluation."""
        self.config = cfg = config or TrainConfig(max_steps=100)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.collate_fn, self.run_info, self.eval_fn = collate_fn, dict(run_info or {}), eval_fn

        # --- processes and device ----------------------------------------------------------------
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
        self.rank = dist.get_rank() if self.world_size > 1 else 0
        self.is_main = self.rank == 0
        if cfg.device == "auto":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device={cfg.device!r}: torch sees no CUDA GPU here; use 'cpu' or 'auto'")
        if self.device.type == "cuda" and self.device.index is None:  # set_device needs an index
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision='bf16': this GPU does not support bfloat16; use fp16 or fp32")
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]

        # --- model, optimizer, schedule, loss scaler -------------------------------------------------
        self.model = model.to(self.device)  # the user's module: what gets saved and evaluated
        self._forward_keys = self._accepted_keys(self.model)
        train_model = self.model
        if self.world_size > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(
                train_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.train_model = torch.compile(train_model) if cfg.compile else train_model
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = self._steps_per_epoch()
        self.max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")

        # --- loop state (all of it goes into checkpoints) -----------------------------------------
        self.step = 0               # optimizer steps done
        self.epoch = 0              # data epoch of the next micro-batch
        self.batch_in_epoch = 0     # micro-batches of this epoch already consumed (this rank)
        self.best_metric, self.best_step, self.bad_evals = None, None, 0
        self.losses: list[float] = []  # per optimizer step, this process's run only
        self.last_checkpoint: Path | None = None  # rank 0 only
        self._saved_step = None  # every rank: the step of the newest checkpoint
        self.stopped_early = False
        torch.manual_seed(cfg.seed + self.rank)  # dropout etc.; differs per rank, like the data
        if cfg.resume:
            self._resume()
        elif cfg.out_dir and ckpt_io.find_checkpoint(cfg.out_dir) is not None:  # every rank: all stop alike
            raise FileExistsError(f"out_dir {cfg.out_dir} already holds a checkpoint: resume it (resume=True, "
                                  "--resume) or choose another directory")
        # after a resume: events of replayed steps (after the checkpoint) are purged, like metrics.jsonl rows
        self._tensorboard = self._open_tensorboard() if cfg.tensorboard and self.is_main else None

    # ----------------------------------------------------------------------------------- set-up
    def _open_tensorboard(self):
        if not self.config.out_dir:
            raise ValueError("TrainConfig.tensorboard: needs out_dir (the event files go to out_dir/tensorboard)")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("TrainConfig.tensorboard (--tensorboard): the tensorboard package is not installed; "
                             "pip install tensorboard, or leave it off (metrics.jsonl has the same numbers)") from None
        return SummaryWriter(str(Path(self.config.out_dir) / "tensorboard"), purge_step=self.step or None)

    @staticmethod
    def _accepted_keys(model):
        params = inspect.signature(model.forward).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None  # forward(**kwargs): pass the whole batch
        return {p.name for p in params}

    def _make_optimizer(self):
        cfg = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        # nanoGPT's rule: decay matrices (linear/embedding weights), not biases and norm scales
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        try:  # the fused kernel exists for CUDA (and CPU in recent torch); fall back to foreach
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
        except (RuntimeError, ValueError, TypeError):
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)

    def _lr_factor(self, step: int) -> float:
        cfg = self.config
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, self.max_steps - cfg.warmup_steps))
        if cfg.schedule == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif cfg.schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 1.0
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay

    def _make_sampler(self, dataset):
        return _ResumableSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                 seed=self.config.seed)

    def _steps_per_epoch(self) -> int:
        per_rank = len(self._make_sampler(self.train_dataset))
        micro = per_rank // self.config.batch_size
        if micro < self.config.grad_accum:
            raise ValueError(f"train_dataset: {len(self.train_dataset)} examples are fewer than one optimizer step "
                             f"needs (batch_size {self.config.batch_size} x grad_accum {self.config.grad_accum} "
                             f"x {self.world_size} processes)")
        return micro // self.config.grad_accum

    def _micro_batches(self):
        """Yields training micro-batches forever, keeping (epoch, batch_in_epoch) exact for resume."""
        cfg = self.config
        sampler = self._make_sampler(self.train_dataset)
        while True:
            sampler.set_epoch(self.epoch)
            sampler.start = self.batch_in_epoch * cfg.batch_size
            loader = DataLoader(self.train_dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                collate_fn=self.collate_fn, num_workers=cfg.num_workers,
                                pin_memory=self.device.type == "cuda",
                                # its own generator: a new loader iterator must not draw from the global
                                # RNG (that would shift dropout masks after a resume)
                                generator=torch.Generator().manual_seed(cfg.seed + self.epoch))
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _to_device(self, batch: dict) -> dict:
        if self._forward_keys is not None:
            batch = {k: v for k, v in batch.items() if k in self._forward_keys}
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def _global_contrastive(self):
        """Under DDP a zoo model's contrastive (itc) loss takes its negatives from every process's batch
        (``contrastive_loss(gather=True)``): the mean over ranks of the loss and DDP's averaged gradients
        are then one process's over the global batch. Training forwards only: every rank evaluates the
        whole eval set, where gathering would count it world_size times."""
        kernels = getattr(self.model, "kernels", None)
        if self.world_size == 1 or not hasattr(kernels, "gather_contrastive"):
            yield
            return
        kernels.gather_contrastive = True
        try:
            yield
        finally:
            kernels.gather_contrastive = False

    # ------------------------------------------------------------------------------- the loop
    def fit(self, until_step: int | None = None) -> dict:
        """Train to ``max_steps`` (or stop after ``until_step`` optimizer steps: the schedule still
        follows ``max_steps``, so a later resume continues the same run). Returns the summary."""
        cfg = self.config
        stop_at = min(self.max_steps, until_step or self.max_steps)
        batches = self._micro_batches()
        samples_per_step = cfg.batch_size * cfg.grad_accum * self.world_size
        bar = None
        # the bar only on a terminal: in a log file its carriage-return updates pile up (~100 KB a run)
        show_bar = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        log_lines = self.is_main and not show_bar and cfg.progress is None
        if show_bar and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        self.train_model.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        signals = _StopSignals()
        with signals:
            self._loop(stop_at, batches, samples_per_step, bar, log_lines, signals)
        return self._finish(bar)

    def _loop(self, stop_at, batches, samples_per_step, bar, log_lines, signals):
        cfg = self.config
        t_start = time.perf_counter()
        t_window, window_steps, window_tokens, window_loss = t_start, 0, 0.0, 0.0
        self._run_steps, self._run_tokens, skipped = 0, 0.0, 0
        self._run_seconds = lambda: time.perf_counter() - t_start  # training only: pauses are shifted out
        while self.step < stop_at and not self.stopped_early:
            # forward/backward over grad_accum micro-batches; DDP all-reduces on the last one only
            # [sum of micro-batch losses, text tokens, "a stop signal arrived" on this rank]
            stats = torch.zeros(3, device=self.device)
            for micro in range(cfg.grad_accum):
                batch = self._to_device(next(batches))
                last = micro == cfg.grad_accum - 1
                no_sync = self.world_size > 1 and not last
                with (self.train_model.no_sync() if no_sync else contextlib.nullcontext()), self._autocast(), \
                        self._global_contrastive():
                    loss = _get(self.train_model(**batch), "loss")
                if loss is None:
                    raise TypeError("the model's output has no 'loss': pass labels in the batch or return a loss")
                self.scaler.scale(loss.float() / cfg.grad_accum).backward()
                stats[0] += loss.detach().float()
                mask = batch.get("attention_mask")
                stats[1] += mask.sum() if mask is not None else batch.get("input_ids", torch.empty(0)).numel()
            stats[2] = signals.received is not None
            if self.world_size > 1:
                dist.all_reduce(stats)  # sum over ranks: every rank sees the global mean loss and any stop
            loss_value = stats[0].item() / (cfg.grad_accum * self.world_size)
            step_tokens = stats[1].item()

            # a NaN/inf loss: fp16 lets the scaler skip the step; otherwise stop with the weights intact
            if not math.isfinite(loss_value) and not self.scaler.is_enabled():
                self._stop_non_finite(f"loss is {loss_value}")
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm or float("inf"))
            if not torch.isfinite(grad_norm) and not self.scaler.is_enabled():
                self._stop_non_finite(f"gradient norm is {grad_norm.item()} (loss {loss_value})")
            scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)  # skipped by the scaler when fp16 gradients are not finite
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if scale_before is not None and self.scaler.get_scale() < scale_before:
                skipped += 1
                self._log({"step": self.step + 1, "event": "skipped_step", "loss": loss_value,
                           "loss_scale": self.scaler.get_scale()})
                if skipped >= cfg.max_skipped_steps:
                    self._stop_non_finite(f"{skipped} consecutive fp16 steps had non-finite gradients")
            else:
                skipped = 0
            self.scheduler.step()
            self.step += 1
            self.losses.append(loss_value)

            # bookkeeping: progress bar, metrics.jsonl, eval + early stopping, checkpoints
            self._run_steps, self._run_tokens = self._run_steps + 1, self._run_tokens + step_tokens
            window_steps, window_tokens, window_loss = window_steps + 1, window_tokens + step_tokens, window_loss + loss_value
            if self.step % cfg.log_every == 0 or self.step == stop_at:
                dt = max(time.perf_counter() - t_window, 1e-9)
                record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3),
                          "loss": window_loss / window_steps,
                          "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          "samples_per_s": window_steps * samples_per_step / dt, "tokens_per_s": window_tokens / dt,
                          "train_s": time.perf_counter() - t_start}
                self._log(record)
                self._tensorboard_scalars("train", record, ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"))
                if log_lines:
                    print(f"[train] step {self.step}/{self.max_steps}: loss {record['loss']:.4f}, lr {record['lr']:.3g}, "
                          f"{record['samples_per_s']:.0f} samples/s", file=sys.stderr, flush=True)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.0f}",
                                    tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                t_window, window_steps, window_tokens, window_loss = time.perf_counter(), 0, 0.0, 0.0
            if bar is not None:
                bar.update(1)
            t_pause = time.perf_counter()  # evaluation and checkpoints do not count as training time
            if self.eval_dataset is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                self._eval_and_maybe_stop()
            if cfg.out_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            stop = stats[2].item() > 0 if self.world_size > 1 else signals.received is not None
            if stop:  # every rank sees the same all-reduced flag, so all stop after the same step
                self._interrupt(signals.received or signal.SIGTERM, bar)
            paused = time.perf_counter() - t_pause
            t_window, t_start = t_window + paused, t_start + paused

    def _interrupt(self, signum, bar):
        self._log({"step": self.step, "event": "interrupted", "signal": signal.Signals(signum).name})
        path = None
        if self.config.out_dir:
            if self._saved_step != self.step:
                self.save_checkpoint()
            path = self.last_checkpoint
        if bar is not None:
            bar.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        raise TrainingInterrupted(signum, self.step, path)

    def _finish(self, bar) -> dict:
        cfg = self.config
        seconds = self._run_seconds()
        final_eval = None
        if self.eval_dataset is not None and not (cfg.eval_every and self.step % cfg.eval_every == 0):
            final_eval = self._eval_and_maybe_stop()
        elif self.eval_dataset is not None:
            final_eval = self._last_eval
        if cfg.out_dir and self._saved_step != self.step:
            self.save_checkpoint()
        if bar is not None:
            bar.close()
        samples_per_step = cfg.batch_size * cfg.grad_accum * self.world_size
        # steps, seconds and throughput of this process's run (since it started or resumed); global_step: where
        # the run now stands
        summary = {"steps": self._run_steps, "global_step": self.step, "resumed_from": self._resumed_from,
                   "epochs": round(self.step / self.steps_per_epoch, 3), "seconds": seconds,
                   "samples_per_s": self._run_steps * samples_per_step / max(seconds, 1e-9),
                   "tokens_per_s": self._run_tokens / max(seconds, 1e-9),
                   "peak_memory_mb": _peak_memory_mb(self.device), "final_loss": self.losses[-1] if self.losses else None,
                   "best_metric": self.best_metric, "best_step": self.best_step, "eval_metric": cfg.eval_metric,
                   "stopped_early": self.stopped_early, "final_eval": final_eval, "world_size": self.world_size,
                   "device": str(self.device), "precision": cfg.precision}
        self._log({"event": "summary", "step": self.step, **summary})
        if self._tensorboard is not None:
            self._tensorboard.close()
        return summary

    def _stop_non_finite(self, what: str):
        where = self.last_checkpoint or (ckpt_io.find_checkpoint(self.config.out_dir) if self.config.out_dir else None)
        msg = (f"{what} at step {self.step + 1}: training stopped before the optimizer step, so the weights are "
               f"those after step {self.step}. Last good checkpoint: {where or 'none written yet'}. "
               "Try a lower lr, gradient clipping, or precision bf16/fp32.")
        self._log({"step": self.step + 1, "event": "non_finite", "message": msg})
        self.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(msg)

    # ----------------------------------------------------------------------- evaluation
    _last_eval = None

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss over the eval set, plus ``accuracy`` when the model returns class logits for
        per-example labels (``eval_fn`` replaces this)."""
        if self.eval_dataset is None:
            raise ValueError("evaluate: no eval_dataset was given to the Trainer")
        cfg = self.config
        loader = DataLoader(self.eval_dataset, batch_size=cfg.eval_batch_size or cfg.batch_size, shuffle=False,
                            collate_fn=self.collate_fn, num_workers=cfg.num_workers)
        was_training = self.model.training
        self.model.eval()
        try:
            if self.eval_fn is not None:
                return self.eval_fn(self.model, loader, self.device, self._autocast)
            loss_sum, n, correct, counted = 0.0, 0, 0, 0
            for batch in loader:
                batch = self._to_device(batch)
                with self._autocast():
                    out = self.model(**batch)
                bs = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
                loss = _get(out, "loss")
                if loss is not None:
                    loss_sum, n = loss_sum + loss.float().item() * bs, n + bs
                logits, labels = _get(out, "logits"), batch.get("labels")
                if logits is not None and labels is not None and labels.dim() == 1 and logits.dim() == 2:
                    keep = labels != -100
                    correct += (logits.argmax(-1)[keep] == labels[keep]).sum().item()
                    counted += keep.sum().item()
            metrics = {"loss": loss_sum / max(n, 1)} if n else {}
            if counted:
                metrics["accuracy"] = correct / counted
            return metrics
        finally:
            self.model.train(was_training)

    def _eval_and_maybe_stop(self) -> dict:
        cfg = self.config
        metrics = self.evaluate()
        self._last_eval = metrics
        self._log({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        self._tensorboard_scalars("eval", metrics, metrics)
        if self.is_main and cfg.progress is not False:
            from tqdm.auto import tqdm

            # next to the progress bar (stderr), so stdout stays clean for machine-readable output
            tqdm.write(f"step {self.step:>6}: " + "  ".join(f"eval {k} {v:.4f}" for k, v in metrics.items()
                                                           if isinstance(v, (int, float))), file=sys.stderr)
        value = metrics.get(cfg.eval_metric)
        if value is None:
            raise KeyError(f"TrainConfig.eval_metric={cfg.eval_metric!r} is not among the eval metrics {sorted(metrics)}")
        better = self.best_metric is None or (value < self.best_metric if cfg.minimize else value > self.best_metric)
        if better:
            self.best_metric, self.best_step, self.bad_evals = value, self.step, 0
        else:
            self.bad_evals += 1
            if cfg.early_stopping_patience and self.bad_evals >= cfg.early_stopping_patience:
                self.stopped_early = True
                self._log({"step": self.step, "event": "early_stop", "best_metric": self.best_metric,
                           "best_step": self.best_step})
        return metrics

    # ------------------------------------------------------------------- checkpoints, logs
    def _log(self, record: dict) -> None:
        if self.is_main and self.config.out_dir:
            Path(self.config.out_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(self.config.out_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record, default=str) + "\n")

    def _tensorboard_scalars(self, group: str, values: dict, keys) -> None:
        if self._tensorboard is not None:
            for k in keys:
                if isinstance(values.get(k), (int, float)) and not isinstance(values.get(k), bool):
                    self._tensorboard.add_scalar(f"{group}/{k}", values[k], self.step)

    def state_dict(self) -> dict:
        """Everything but the weights; only tensors and plain values (``torch.load(weights_only=True)``)."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": ckpt_io.rng_state(),
                "best_metric": self.best_metric, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "world_size": self.world_size}

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes ``out_dir/step_N`` atomically; every rank waits for it."""
        if not self.config.out_dir:
            raise ValueError("save_checkpoint: TrainConfig.out_dir is not set")
        path = None
        if self.is_main:
            run_info = {"config": self.config.to_dict(), **self.run_info}
            path = ckpt_io.save_checkpoint(self.config.out_dir, self.step, _unwrap(self.model), self.state_dict(),
                                           run_info, keep=self.config.keep_checkpoints)
            self.last_checkpoint, self._saved_step = path, self.step
        self._saved_step = self.step
        if self.world_size > 1:
            dist.barrier()
        return path

    _resumed_from = None

    def _resume(self) -> None:
        path = ckpt_io.find_checkpoint(self.config.out_dir)
        if path is None:
            raise FileNotFoundError(f"resume: no checkpoint in {self.config.out_dir}")
        saved = ckpt_io.load_run_info(path).get("config", {})
        differ = self.config.differences(saved)
        if differ:
            listed = "; ".join(f"{name} {mine} (checkpoint: {theirs})" for name, mine, theirs in differ)
            raise ValueError(f"resume: {path} was trained with other settings: {listed}. Resume with the checkpoint's "
                             "values, or train into a new out_dir")
        ckpt_io.load_weights(_unwrap(self.model), path)
        state = ckpt_io.load_state(path)
        if state["world_size"] != self.world_size:
            raise ValueError(f"resume: {path} was written by {state['world_size']} processes, this run has "
                             f"{self.world_size}: the data position would not carry over exactly")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt_io.set_rng_state(state["rng"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_metric, self.best_step, self.bad_evals = state["best_metric"], state["best_step"], state["bad_evals"]
        self.last_checkpoint, self._saved_step, self._resumed_from = path, self.step, self.step
        if self.is_main:
            self._forget_metrics_after(self.step)

    def _forget_metrics_after(self, step: int) -> None:
        """metrics.jsonl rows written after the checkpoint we resume from describe steps that will be
        replayed: drop them, so the file keeps one row per step however often a run resumes."""
        path = Path(self.config.out_dir) / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                row_step = json.loads(line).get("step", 0)
            except json.JSONDecodeError:  # a line cut short by a kill: it belongs to a lost step
                continue
            if row_step <= step:
                keep.append(line + "\n")
        ckpt_io.write_text_atomic(path, "".join(keep))
