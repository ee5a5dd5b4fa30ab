"""The training loop on a small stand-in model (any nn.Module returning a loss): exact resume, crash-safe
checkpoints, 2-process DDP on gloo, early stopping, fp16 loss scaling, NaN handling."""

import json
import os
import socket

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfast.data import ShapesDataset
from mmfast.train import NonFiniteLossError, TrainConfig, Trainer
from mmfast.train import checkpoint as ckpt_io


class StandIn(nn.Module):
    """Bag of words + pooled pixels -> MLP -> answer logits. ``poison_step``: the loss of that forward
    call (1-based) is multiplied by ``poison`` (inf or nan), to test non-finite handling."""

    def __init__(self, vocab=64, num_labels=14, dropout=0.1, image=16, poison_step=None, poison=float("inf")):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.img = nn.Linear(3 * (image // 4) ** 2, 16)
        self.head = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, num_labels))
        self.poison_step, self.poison, self.calls = poison_step, poison, 0

    def forward(self, input_ids, attention_mask, pixel_values, labels=None):
        m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        t = (self.emb(input_ids) * m).sum(1) / m.sum(1)
        i = self.img(F.avg_pool2d(pixel_values, 4).flatten(1))
        logits = self.head(torch.cat([t, i], -1))
        loss = F.cross_entropy(logits.float(), labels)
        if self.training:
            self.calls += 1
            if self.calls == self.poison_step:
                loss = loss * self.poison
        return {"loss": loss, "logits": logits}


def data(n=40, split="train"):
    return ShapesDataset(n, split=split, image_size=16, grid=2, tokenizer="compact", seed=3)


def cfg(**kw):
    base = dict(max_steps=8, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_bit_exact(tmp_path):
    # 12 steps of batch 4 over 20 examples crosses epoch boundaries; dropout exercises the RNG state
    torch.manual_seed(0)
    straight = Trainer(StandIn(), data(20), config=cfg(max_steps=12, out_dir=str(tmp_path / "a"), grad_accum=1))
    straight.fit()

    torch.manual_seed(0)
    first = Trainer(StandIn(), data(20), config=cfg(max_steps=12, out_dir=str(tmp_path / "b")))
    first.fit(until_step=6)
    assert ckpt_io.find_checkpoint(tmp_path / "b").name == "step_000006"
    torch.manual_seed(123)  # a different init and RNG: everything must come from the checkpoint
    second = Trainer(StandIn(), data(20), config=cfg(max_steps=12, out_dir=str(tmp_path / "b"), resume=True))
    assert second.step == 6
    second.fit()
    assert first.losses + second.losses == straight.losses
    a, b = weights(straight.model), weights(second.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the non-weight state is plain tensors/values
    state = torch.load(tmp_path / "b" / "step_000012" / "state.pt", weights_only=True)
    assert state["step"] == 12 and "exp_avg" in state["optimizer"]["state"][0]


def test_resume_with_grad_accum_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    straight = Trainer(StandIn(), data(24), config=cfg(max_steps=6, grad_accum=2, batch_size=3))
    straight.fit()
    torch.manual_seed(0)
    first = Trainer(StandIn(), data(24), config=cfg(max_steps=6, grad_accum=2, batch_size=3, out_dir=str(tmp_path)))
    first.fit(until_step=3)
    second = Trainer(StandIn(), data(24), config=cfg(max_steps=6, grad_accum=2, batch_size=3, out_dir=str(tmp_path),
                                                    resume=True))
    second.fit()
    assert first.losses + second.losses == straight.losses


def test_checkpoint_survives_a_crash_mid_save(tmp_path, monkeypatch):
    torch.manual_seed(0)
    t = Trainer(StandIn(), data(), config=cfg(max_steps=4, out_dir=str(tmp_path)))
    t.fit(until_step=2)
    good = weights(t.model)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # writes half a file, then the process "dies"
        with open(f, "wb") as fh:
            fh.write(b"\x80\x02partial")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt_io.torch, "save", dying_save)
    t.step = 3  # as if one more step had been taken
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint()
    monkeypatch.setattr(ckpt_io.torch, "save", real_save)
    assert (tmp_path / "latest").read_text().strip() == "step_000002"
    assert not (tmp_path / "step_000003").exists()
    found = ckpt_io.find_checkpoint(tmp_path)
    assert found.name == "step_000002"
    fresh = StandIn()
    ckpt_io.load_weights(fresh, found)
    assert all(torch.equal(fresh.state_dict()[k], good[k]) for k in good)
    assert ckpt_io.load_state(found)["step"] == 2
    # the next save cleans the leftovers and succeeds
    assert list(tmp_path.glob(".tmp-*"))
    t.save_checkpoint()
    assert not list(tmp_path.glob(".tmp-*")) and ckpt_io.find_checkpoint(tmp_path).name == "step_000003"


def test_refuses_to_overwrite_a_run(tmp_path):
    Trainer(StandIn(), data(), config=cfg(max_steps=1, out_dir=str(tmp_path))).fit()
    with pytest.raises(FileExistsError, match="resume"):
        Trainer(StandIn(), data(), config=cfg(max_steps=1, out_dir=str(tmp_path)))


def test_early_stopping_triggers(tmp_path):
    calls = []

    def flat_eval(model, loader, device, autocast):  # a metric that never improves after the first eval
        calls.append(1)
        return {"accuracy": 0.5}

    t = Trainer(StandIn(), data(), data(8, "val"), cfg(max_steps=100, eval_every=2, eval_metric="accuracy",
                                                      early_stopping_patience=3, out_dir=str(tmp_path)),
                eval_fn=flat_eval)
    summary = t.fit()
    assert summary["stopped_early"] and summary["steps"] == 8 and len(calls) == 4
    assert summary["best_metric"] == 0.5 and summary["best_step"] == 2
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "early_stop" for e in events)
    assert ckpt_io.find_checkpoint(tmp_path).name == "step_000008"


def test_default_eval_reports_loss_and_accuracy():
    t = Trainer(StandIn(), data(), data(10, "val"), cfg(max_steps=2, eval_batch_size=4))
    m = t.evaluate()
    assert set(m) == {"loss", "accuracy"} and 0 <= m["accuracy"] <= 1 and m["loss"] > 0


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = StandIn(poison_step=5, poison=float("nan"))
    t = Trainer(model, data(), config=cfg(max_steps=10, out_dir=str(tmp_path), checkpoint_every=2))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5\b.*step_000004"):
        t.fit()
    assert t.step == 4 and ckpt_io.find_checkpoint(tmp_path).name == "step_000004"
    # the weights are those of the last good step (= the checkpoint)
    saved = StandIn()
    ckpt_io.load_weights(saved, ckpt_io.find_checkpoint(tmp_path))
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in t.model.state_dict().items())


def test_fp16_loss_scaling_skips_an_inf_step():
    torch.manual_seed(0)
    model = StandIn(poison_step=3, poison=float("inf"), dropout=0.0)
    t = Trainer(model, data(), config=cfg(max_steps=6, precision="fp16"))
    scale0 = t.scaler.get_scale()
    t.fit(until_step=2)
    w2 = weights(t.model)
    t.fit(until_step=3)  # the poisoned step: skipped, the scale halves, the weights stay
    assert t.step == 3 and t.losses[2] == float("inf")
    assert all(torch.equal(w2[k], v) for k, v in t.model.state_dict().items())
    assert t.scaler.get_scale() == scale0 / 2
    t.fit()  # and training goes on
    assert t.step == 6 and all(torch.isfinite(torch.tensor(t.losses[3:])))
    assert any(not torch.equal(w2[k], v) for k, v in t.model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.manual_seed(rank)  # different inits: DDP must broadcast rank 0's weights
    try:
        t = Trainer(StandIn(dropout=0.0), data(), config=cfg(max_steps=6, batch_size=4, device="cpu",
                                                             out_dir=out_dir, checkpoint_every=3))
        t.fit()
        torch.save({"losses": t.losses, "weights": weights(t.model)}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_gloo_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["losses"] == r1["losses"]
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])
    # one process, the same global batch (2 x 4), from rank 0's initial weights
    torch.manual_seed(0)
    single = Trainer(StandIn(dropout=0.0), data(), config=cfg(max_steps=6, batch_size=8))
    single.fit()
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(r0["weights"][k], v, rtol=1e-4, atol=1e-6)
    # only rank 0 wrote; the checkpoint says 2 processes
    assert ckpt_io.load_state(ckpt_io.find_checkpoint(tmp_path / "ddp"))["world_size"] == 2


def test_config_validation():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(max_steps=1, precision="fp8")
    with pytest.raises(ValueError, match="max_steps or epochs"):
        TrainConfig()
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        Trainer(StandIn(), data(3), config=cfg(batch_size=4))


def test_epochs_and_linear_schedule():
    t = Trainer(StandIn(), data(16), config=cfg(max_steps=None, epochs=2, batch_size=4, schedule="linear",
                                                warmup_steps=0))
    assert t.max_steps == 8
    t.fit()
    assert t.step == 8 and (t.epoch, t.batch_in_epoch) == (1, 4) and t.scheduler.get_last_lr()[0] == 0.0


class _SignalAt(StandIn):
    """StandIn that sends this process ``signum`` during its ``at``-th training forward."""

    def __init__(self, at, signum, **kw):
        super().__init__(**kw)
        self.at, self.signum = at, signum

    def forward(self, *args, **kwargs):
        if self.training and self.calls + 1 == self.at:
            os.kill(os.getpid(), self.signum)
        return super().forward(*args, **kwargs)


def _train_rows(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "event" not in r]


def test_sigterm_finishes_the_step_checkpoints_and_resume_is_exact(tmp_path):
    import signal

    from mmfast.train.trainer import TrainingInterrupted

    torch.manual_seed(0)
    straight = Trainer(StandIn(), data(20), config=cfg(max_steps=10, out_dir=str(tmp_path / "a")))
    straight.fit()

    torch.manual_seed(0)
    first = Trainer(_SignalAt(4, signal.SIGTERM), data(20), config=cfg(max_steps=10, out_dir=str(tmp_path / "b")))
    with pytest.raises(TrainingInterrupted) as stop:
        first.fit()
    assert stop.value.exit_code == 143 and stop.value.step == 4 and stop.value.signal_name == "SIGTERM"
    assert stop.value.checkpoint == tmp_path / "b" / "step_000004"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
    second = Trainer(StandIn(), data(20), config=cfg(max_steps=10, out_dir=str(tmp_path / "b"), resume=True))
    summary = second.fit()
    assert first.losses + second.losses == straight.losses
    assert summary["steps"] == 6 and summary["global_step"] == 10 and summary["resumed_from"] == 4


def test_metrics_keep_one_row_per_step_after_a_crash_and_resume(tmp_path):
    out = tmp_path / "run"
    torch.manual_seed(0)
    crashing = Trainer(StandIn(poison_step=7, poison=float("nan")), data(20),
                       config=cfg(max_steps=10, out_dir=str(out), checkpoint_every=4))
    with pytest.raises(NonFiniteLossError):
        crashing.fit()  # rows for steps 1..6 are written, the last checkpoint is step 4
    assert [r["step"] for r in _train_rows(out)] == [1, 2, 3, 4, 5, 6]
    for _ in range(2):  # any number of resumes
        Trainer(StandIn(), data(20), config=cfg(max_steps=10, out_dir=str(out), resume=True)).fit()
    assert [r["step"] for r in _train_rows(out)] == list(range(1, 11))


def test_resume_refuses_changed_hyper_parameters(tmp_path):
    Trainer(StandIn(), data(20), config=cfg(max_steps=4, out_dir=str(tmp_path))).fit()
    with pytest.raises(ValueError, match=r"lr 0\.1 \(checkpoint: 0\.003\); max_steps 8 \(checkpoint: 4\)"):
        Trainer(StandIn(), data(20), config=cfg(max_steps=8, lr=0.1, out_dir=str(tmp_path), resume=True))


def test_checkpoint_errors_name_the_file_and_never_fall_back_silently(tmp_path):
    Trainer(StandIn(), data(20), config=cfg(max_steps=4, out_dir=str(tmp_path), checkpoint_every=2)).fit()
    (tmp_path / "step_000004" / "state.pt").unlink()
    with pytest.raises(ckpt_io.CheckpointError, match=r"latest: names 'step_000004', which is not a complete "
                                                      r"checkpoint \(missing state\.pt\)"):
        ckpt_io.find_checkpoint(tmp_path)
    (tmp_path / "latest").unlink()  # without `latest`: the older complete one, with a warning naming both
    with pytest.warns(RuntimeWarning, match="step_000004 is incomplete.*using step_000002"):
        assert ckpt_io.find_checkpoint(tmp_path).name == "step_000002"
    (tmp_path / "step_000002" / "state.pt").write_bytes(b"not a pickle")
    with pytest.raises(ckpt_io.CheckpointError, match=r"step_000002/state\.pt: cannot be loaded"):
        ckpt_io.load_state(tmp_path / "step_000002")


def test_without_a_terminal_no_bar_but_a_line_every_log_every_steps(capsys):
    Trainer(StandIn(), data(20), config=cfg(max_steps=6, log_every=3, progress=None)).fit()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split(":")[0] for line in err.splitlines()] == ["[train] step 3/6", "[train] step 6/6"]


def test_tensorboard_writes_loss_lr_throughput_and_eval(tmp_path, monkeypatch):
    import sys
    import types

    written = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def close(self):
            written.append(("closed", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    t = Trainer(StandIn(), data(20), data(8, "val"), config=cfg(max_steps=4, log_every=2, eval_every=2,
                                                               out_dir=str(tmp_path), tensorboard=True))
    t.fit()
    assert t._tensorboard.log_dir == str(tmp_path / "tensorboard")
    tags = {tag for tag, _ in written}
    assert {"train/loss", "train/lr", "train/samples_per_s", "eval/loss", "eval/accuracy", "closed"} <= tags
    assert sorted(step for tag, step in written if tag == "train/loss") == [2, 4]

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match="tensorboard package is not installed; pip install tensorboard"):
        Trainer(StandIn(), data(20), config=cfg(out_dir=str(tmp_path / "x"), tensorboard=True))


def test_threads_default_to_physical_cores(monkeypatch):
    from mmfast.train import threads

    cpus = sorted(os.sched_getaffinity(0))
    pairs = set()
    for cpu in cpus:
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        pairs.add((open(topo + "physical_package_id").read(), open(topo + "core_id").read()))
    assert threads.physical_cores() == len(pairs) <= len(cpus)
    before = torch.get_num_threads()
    try:
        assert threads.choose_threads(None) == len(pairs) == torch.get_num_threads()
        assert threads.choose_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_fp16_resume_restores_the_loss_scaler(tmp_path):
    """An inf step halves the fp16 loss scale before the checkpoint: the resumed run goes on with that
    scale and growth tracker, exactly as the uninterrupted run does."""
    kw = dict(max_steps=8, precision="fp16")
    torch.manual_seed(0)
    straight = Trainer(StandIn(poison_step=3, dropout=0.0), data(), config=cfg(**kw))
    straight.fit()
    torch.manual_seed(0)
    first = Trainer(StandIn(poison_step=3, dropout=0.0), data(), config=cfg(out_dir=str(tmp_path), **kw))
    first.fit(until_step=5)
    assert first.scaler.get_scale() < Trainer(StandIn(), data(), config=cfg(**kw)).scaler.get_scale()
    torch.manual_seed(123)
    second = Trainer(StandIn(dropout=0.0), data(), config=cfg(out_dir=str(tmp_path), resume=True, **kw))
    assert second.scaler.state_dict() == first.scaler.state_dict()
    second.fit()
    assert first.losses + second.losses == straight.losses
    assert second.scaler.state_dict() == straight.scaler.state_dict()  # scale and growth tracker


def test_bf16_compiled_training_clips_gradients(monkeypatch):
    """precision='bf16' with compile=True trains (finite losses) and every optimizer step sees the
    gradients clipped to max_grad_norm, which the raw gradients exceed."""
    # aot_eager: the trainer's compile path (wrapping, autocast and backward through the graph) without
    # inductor's C++ build, which takes ~100 s on this 2-core machine
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **{"backend": "aot_eager", **kw}))
    torch.manual_seed(0)
    t = Trainer(StandIn(dropout=0.0), data(), config=cfg(max_steps=3, precision="bf16", compile=True,
                                                           max_grad_norm=0.05))
    assert t.autocast_dtype == torch.bfloat16 and t.train_model is not t.model
    norm = lambda params: float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params
                                                                      if p.grad is not None])))
    raw, at_step = [], []
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *a, **k):
        params = list(params)
        raw.append(norm(params))
        return real_clip(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    real_step = t.optimizer.step

    def step(*a, **k):
        at_step.append(norm(t.model.parameters()))
        return real_step(*a, **k)

    monkeypatch.setattr(t.optimizer, "step", step)
    t.fit()
    assert t.step == 3 and all(torch.isfinite(torch.tensor(t.losses)))
    assert len(at_step) == len(raw) == 3 and min(raw) > 0.05, raw
    assert all(n <= 0.05 * (1 + 1e-4) for n in at_step), at_step
