"""Token classification (NER) data: ``TokenTagJsonl`` reads ``{"tokens": [...], "tags": [...]}`` lines;
``SyntheticNER`` generates BIO-tagged sentences (people, organisations, places) deterministically,
for a runnable NER fine-tuning workflow without downloads. Labels go on each word's first sub-token,
-100 (ignored) on the rest and on special tokens, as Hugging Face's token-classification recipe does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmfast.data.jsonl import load_tokenizer

_FIRST = ["john", "mary", "ahmed", "li", "sofia", "peter", "anna", "carlos", "yuki", "olga", "david", "fatima",
          "james", "elena", "omar", "grace"]
_LAST = ["smith", "garcia", "chen", "müller", "rossi", "kim", "novak", "silva", "brown", "ivanova", "tanaka", "jones"]
_ORG = [["google"], ["siemens"], ["the", "united", "nations"], ["toyota"], ["oxford", "university"], ["nasa"],
        ["the", "red", "cross"], ["microsoft"], ["deutsche", "bank"], ["unicef"], ["airbus"], ["nokia"]]
_LOC = [["paris"], ["new", "york"], ["berlin"], ["tokyo"], ["cairo"], ["lima"], ["south", "africa"], ["oslo"],
        ["buenos", "aires"], ["mumbai"], ["canada"], ["hong", "kong"]]
_TEMPLATES = [
    "{PER} works for {ORG} in {LOC} .",
    "{PER} met {PER} at the {ORG} office .",
    "yesterday {PER} flew from {LOC} to {LOC} .",
    "{ORG} opened a new lab in {LOC} last year .",
    "according to {PER} , {ORG} will hire more people .",
    "the meeting in {LOC} was chaired by {PER} .",
    "{PER} left {ORG} and moved to {LOC} .",
    "shares of {ORG} rose after {PER} spoke in {LOC} .",
]
NER_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]


def _encode_words(tokenizer, words, tags, tag_index, max_length):
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    labels, previous = [], None
    for w in enc.word_ids():
        labels.append(-100 if w is None or w == previous else tag_index[tags[w]])
        previous = w
    return {"input_ids": torch.tensor(enc["input_ids"]), "labels": torch.tensor(labels)}


class SyntheticNER(Dataset):
    """Template sentences with person / organisation / location entities in BIO tags."""

    tags = NER_TAGS

    def __init__(self, size: int, tokenizer, *, split: str = "train", seed: int = 0, max_length: int = 64):
        self.size, self.seed, self.split, self.max_length = size, seed, split, max_length
        self.tokenizer = load_tokenizer(tokenizer)
        self._index = {t: i for i, t in enumerate(NER_TAGS)}

    def __len__(self):
        return self.size

    def example(self, index: int):
        rng = np.random.default_rng([self.seed, {"train": 0, "val": 1, "test": 2}[self.split], index])
        words, tags = [], []
        for piece in _TEMPLATES[int(rng.integers(len(_TEMPLATES)))].split():
            if piece in ("{PER}", "{ORG}", "{LOC}"):
                kind = piece[1:-1]
                if kind == "PER":
                    ent = [_FIRST[int(rng.integers(len(_FIRST)))]] + ([_LAST[int(rng.integers(len(_LAST)))]]
                                                                      if rng.random() < 0.7 else [])
                else:
                    pool = _ORG if kind == "ORG" else _LOC
                    ent = pool[int(rng.integers(len(pool)))]
                words += ent
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(ent) - 1)
            else:
                words.append(piece)
                tags.append("O")
        return words, tags

    def __getitem__(self, index):
        words, tags = self.example(index)
        return _encode_words(self.tokenizer, words, tags, self._index, self.max_length)


class TokenTagJsonl(Dataset):
    """``{"tokens": ["John", "lives", ...], "tags": ["B-PER", "O", ...]}`` per line. ``tags``: the label
    list (default: sorted tags found in the file, "O" first). Errors name the file and line."""

    def __init__(self, path, tokenizer, *, tags=None, max_length: int = 128):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_length = max_length
        self.records = []
        for lineno, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("tokens"), list) or not isinstance(rec.get("tags"), list):
                raise ValueError(f"{self.path}:{lineno}: expected {{\"tokens\": [...], \"tags\": [...]}}")
            if len(rec["tokens"]) != len(rec["tags"]):
                raise ValueError(f"{self.path}:{lineno}: {len(rec['tokens'])} tokens but {len(rec['tags'])} tags")
            self.records.append((rec["tokens"], rec["tags"]))
        found = sorted({t for _, tags in self.records for t in tags} - {"O"})
        self.tags = list(tags) if tags is not None else ["O"] + found
        self._index = {t: i for i, t in enumerate(self.tags)}
        unknown = sorted({t for _, tags in self.records for t in tags} - set(self.tags))
        if unknown:
            raise ValueError(f"{self.path}: tags {unknown} are not in the label list {self.tags}")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        words, tags = self.records[index]
        return _encode_words(self.tokenizer, words, tags, self._index, self.max_length)


def write_jsonl(dataset: SyntheticNER, path) -> None:
    with open(path, "w") as f:
        for i in range(len(dataset)):
            words, tags = dataset.example(i)
            f.write(json.dumps({"tokens": words, "tags": tags}) + "\n")
