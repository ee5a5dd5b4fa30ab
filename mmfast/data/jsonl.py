"""ImageTextJsonl: image-text pairs from a JSON-lines file and images on disk."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset


def load_tokenizer(tokenizer):
    """A Hugging Face tokenizer from a local directory (never the hub), or the object given."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = Path(tokenizer)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer: {path} is not a directory (expected a local tokenizer directory, "
                                "e.g. mmfast.pretrained.minilm_path())")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class ImageTextJsonl(Dataset):
    """One example per JSON line: ``{"image": path, "text": str, "answer": str | "label": int}``.

    Image paths are relative to the JSON file's folder unless absolute. Images are read with PIL and
    transformed with timm's eval transform (resize, centre crop, normalise). Every line and every
    image is checked when the dataset is built: a malformed line, a missing or an unreadable image
    raises a ``ValueError`` naming the file and line, or, with ``skip_bad=True``, is dropped with a
    warning.

    Args:
        path: the ``.jsonl`` file.
        tokenizer: a local tokenizer directory or a tokenizer object (callable text -> {"input_ids"}).
        task: ``vqa`` (labels = index of ``answer`` in ``answers``), ``classification`` / ``itm``
            (labels = int ``label``), ``caption`` (labels = input_ids), ``itc`` (no labels).
        answers: answer vocabulary (list) for ``vqa``; default: sorted answers found in the file.
            Answers not in a given vocabulary map to label -100 (ignored by the loss).
        image_size, mean, std: the image transform (``transform`` overrides it).
        max_length: text is truncated to this many tokens.
    """

    def __init__(self, path, tokenizer, *, task: str = "vqa", answers=None, image_size: int = 224,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), max_length: int = 40, skip_bad: bool = False,
                 transform=None):
        if task not in ("vqa", "classification", "itm", "caption", "itc"):
            raise ValueError(f"task: expected vqa|classification|itm|caption|itc, got {task!r}")
        self.path, self.task, self.max_length = Path(path), task, max_length
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        self.tokenizer = load_tokenizer(tokenizer)
        if transform is None:
            from timm.data import create_transform

            transform = create_transform(input_size=(3, image_size, image_size), is_training=False,
                                         mean=tuple(mean), std=tuple(std), crop_pct=1.0)
        self.transform = transform
        self.records = []  # (line number, image path, record)
        for lineno, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            problem = None
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                rec, problem = None, f"invalid JSON ({e.msg})"
            if rec is not None:
                problem = self._check_record(rec)
            if problem is None:
                image = Path(rec["image"]) if Path(rec["image"]).is_absolute() else self.path.parent / rec["image"]
                problem = _check_image(image)
            if problem is not None:
                message = f"{self.path}:{lineno}: {problem}"
                if not skip_bad:
                    raise ValueError(message + " (skip_bad=True, or --skip-bad on the command line, drops bad "
                                               "lines with a warning)")
                warnings.warn("skipping " + message, stacklevel=2)
                continue
            self.records.append((lineno, image, rec))
        if not self.records:
            raise ValueError(f"{self.path}: no usable examples")
        if task == "vqa":
            self.answers = list(answers) if answers is not None else sorted({str(r["answer"]) for _, _, r in self.records})
            self._answer_index = {a: i for i, a in enumerate(self.answers)}
            self.num_labels = len(self.answers)
        else:
            self.answers = None
            self.num_labels = (max(int(r["label"]) for _, _, r in self.records) + 1) if task in ("classification", "itm") else None

    def _check_record(self, rec) -> str | None:
        if not isinstance(rec, dict):
            return f"expected a JSON object, got {type(rec).__name__}"
        need = ["image", "text"] + (["answer"] if self.task == "vqa" else ["label"] if self.task in ("classification", "itm") else [])
        missing = [k for k in need if k not in rec]
        if missing:
            return f"missing field(s) {missing} for task {self.task!r} (has {sorted(rec)})"
        if not isinstance(rec["text"], str):
            return f"'text' must be a string, got {type(rec['text']).__name__}"
        if "label" in need and not isinstance(rec["label"], int):
            return f"'label' must be an integer, got {rec['label']!r}"
        return None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        lineno, image, rec = self.records[index]
        from PIL import Image

        try:
            with Image.open(image) as im:
                pixels = self.transform(im.convert("RGB"))
        except Exception as e:  # the file changed since it was checked
            raise ValueError(f"{self.path}:{lineno}: cannot read image {image}: {e}") from e
        ids = self.tokenizer(rec["text"], truncation=True, max_length=self.max_length)["input_ids"]
        item = {"input_ids": torch.tensor(ids, dtype=torch.long), "pixel_values": pixels}
        if self.task == "vqa":
            item["labels"] = torch.tensor(self._answer_index.get(str(rec["answer"]), -100))
        elif self.task in ("classification", "itm"):
            item["labels"] = torch.tensor(int(rec["label"]))
        elif self.task == "caption":
            item["labels"] = item["input_ids"].clone()
        return item


def _check_image(image: Path) -> str | None:
    if not image.is_file():
        return f"image not found: {image}"
    from PIL import Image

    try:
        with Image.open(image) as im:
            im.verify()  # reads the whole file: catches truncated and corrupt images
    except Exception as e:
        return f"corrupt or unreadable image {image}: {type(e).__name__}: {e}"
    return None
