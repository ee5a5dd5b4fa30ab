"""TrainConfig: every knob of the training loop, with defaults that suit a small fusion model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class TrainConfig:
    # optimisation
    lr: float = 3e-4
    weight_decay: float = 0.01           # not applied to biases, norms and embeddings' 1-D params
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"             # cosine | linear | constant (after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0            # the schedule decays to lr * min_lr_ratio
    max_steps: int | None = None         # optimizer steps; or give epochs
    epochs: float | None = None
    batch_size: int = 32                 # per process and micro-step; global = batch * accum * world
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0    # None or 0: no clipping
    precision: str = "fp32"              # fp32 | bf16 | fp16 (fp16 uses a GradScaler)
    compile: bool = False
    # evaluation and early stopping
    eval_every: int = 0                  # steps; 0: only at the end (when an eval set is given)
    eval_batch_size: int | None = None
    eval_metric: str = "loss"            # a key of evaluate()'s dict
    eval_mode: str | None = None         # min | max; None: min for *loss, max otherwise
    early_stopping_patience: int = 0     # evaluations without improvement; 0: never stop early
    # checkpoints, logging
    out_dir: str | None = None           # checkpoints + metrics.jsonl; None: nothing written
    checkpoint_every: int = 0            # steps; 0: only at the end (when out_dir is set)
    keep_checkpoints: int = 2
    resume: bool = False                 # continue from out_dir's latest checkpoint
    seed: int = 0
    log_every: int = 10
    num_workers: int = 0
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    progress: bool | None = None         # tqdm bar on rank 0; None: only when stderr is a terminal (else
                                         # one line every log_every steps); False: neither
    tensorboard: bool = False            # also write loss, lr, throughput, eval metrics to out_dir/tensorboard
    max_skipped_steps: int = 20          # fp16: consecutive non-finite steps before giving up

    def __post_init__(self):
        def need(cond, name, expected):
            if not cond:
                raise ValueError(f"TrainConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        need(self.lr > 0, "lr", "> 0")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.schedule in ("cosine", "linear", "constant"), "schedule", "cosine | linear | constant")
        need(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        need(self.max_steps is not None or self.epochs is not None, "max_steps", "max_steps or epochs to be set")
        need(self.max_steps is None or self.max_steps > 0, "max_steps", "> 0")
        need(self.epochs is None or self.epochs > 0, "epochs", "> 0")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.grad_accum >= 1, "grad_accum", ">= 1")
        need(self.precision in ("fp32", "bf16", "fp16"), "precision", "fp32 | bf16 | fp16")
        need(self.eval_every >= 0, "eval_every", ">= 0")
        need(self.eval_mode in (None, "min", "max"), "eval_mode", "min | max | None")
        need(self.early_stopping_patience >= 0, "early_stopping_patience", ">= 0")
        need(self.checkpoint_every >= 0, "checkpoint_every", ">= 0")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1")
        need(self.log_every >= 1, "log_every", ">= 1")
        need(self.num_workers >= 0, "num_workers", ">= 0")
        need(not self.resume or self.out_dir, "resume", "out_dir to be set when resume=True")
        self.betas = tuple(self.betas)

    @property
    def minimize(self) -> bool:
        return self.eval_mode == "min" if self.eval_mode else self.eval_metric.endswith("loss")

    # What decides the trajectory of a run: a resume must not change these silently.
    RESUME_FIXED = ("lr", "weight_decay", "betas", "schedule", "warmup_steps", "min_lr_ratio", "max_steps", "epochs",
                    "batch_size", "grad_accum", "max_grad_norm", "precision", "seed")

    def differences(self, saved: dict) -> list[tuple]:
        """``(name, this value, saved value)`` for each trajectory setting that differs from ``saved`` (a
        checkpoint's ``run.json`` config)."""
        out = []
        for name in self.RESUME_FIXED:
            mine, theirs = getattr(self, name), saved.get(name)
            if isinstance(theirs, list):
                theirs = tuple(theirs)
            if name in saved and mine != theirs:
                out.append((name, mine, theirs))
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
