"""The trainer's itc path under DDP: one training step of a tiny dual_encoder on 2 gloo processes
(half the batch each) against one process on the whole batch.

Four runs of the same step through the Trainer, from the same initial weights on the same 6 examples:
  ddp      the fused model, 2 ranks x 3 examples (spawned; the itc loss must gather)
  single   the fused model, 1 process x 6 examples
  ref      the eager twin in float64 (the rule's reference), 1 process x 6
  eager    the eager twin in float32 (the rule's baseline), 1 process x 6
The loss and every parameter gradient the optimizer sees, of ddp and of single, pass the rule
against ref with eager as baseline; their parameter updates agree where AdamW's first step does not
amplify rounding noise (the one-process step; float32 weights
round the float64 step by an ulp of the weight). A companion test shows the loss check cannot pass with the local-only loss."""

import copy
import os
import socket

import pytest
import torch

from mmfast.data.collate import collate
from mmfast.models import create_model
from mmfast.testing import assert_close, assert_face_ran, faces_run, finite_magnitude
from mmfast.train import TrainConfig, Trainer
from mmfast.train.workflows import build_data, data_specs

N_LOCAL, WORLD = 3, 2  # odd local batch; the global batch is 6


def _data_and_overrides():
    train, _, overrides = data_specs("shapes", "itc", "dual_encoder_tiny", train_size=4 * N_LOCAL * WORLD, seed=5)
    return build_data(train), overrides


def _model(fused=True):
    """dual_encoder_tiny (itc) with the same initial weights in every run and process (DDP also
    broadcasts rank 0's); the eager twin gets them through the state_dict."""
    _, overrides = _data_and_overrides()
    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny", task="itc", fused=True, **overrides)
    if fused:
        return model
    twin = create_model("dual_encoder_tiny", task="itc", fused=False, **overrides)
    twin.load_state_dict(model.state_dict())
    return twin


def _cfg(batch_size):
    return TrainConfig(max_steps=1, batch_size=batch_size, lr=1e-3, device="cpu", progress=False, seed=2)


def _one_step(model, batch_size, collate_fn=collate):
    """(loss, {name: gradient the optimizer saw}, {name: parameter update}) of one Trainer step."""
    data, _ = _data_and_overrides()
    t = Trainer(model, data, config=_cfg(batch_size), collate_fn=collate_fn)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    grads = {}
    t.optimizer.register_step_pre_hook(lambda *_: grads.update(
        {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}))
    t.fit()
    update = {k: p.detach() - before[k] for k, p in model.named_parameters()}
    return torch.tensor(t.losses[0], dtype=next(model.parameters()).dtype), grads, update


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        model = _model()
        batches = []  # what this rank trained on, for the local-only loss below
        model.register_forward_pre_hook(lambda m, args, kwargs: batches.append(kwargs), with_kwargs=True)
        with faces_run() as faces:
            loss, grads, update = _one_step(model, N_LOCAL)
        assert_face_ran(faces, "contrastive_loss", "torch")  # the gathered loss's face (gather=True)
        # the local-only loss of this rank's half batch, from the initial weights (not what the trainer may use)
        start = _model()
        start.train()
        local = start(**batches[0]).loss.detach().double()
        tokens = batches[0]["input_ids"].numel() + N_LOCAL * (model.vision_encoder.patch_embed.num_patches + 1)
        torch.save({"loss": loss, "grads": grads, "update": update, "local": local, "tokens": tokens},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _double(batch):
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    assert "WORLD_SIZE" not in os.environ  # the one-process runs below must not join a group
    mp.start_processes(_ddp_worker, args=(_free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    eager = _model(fused=False)
    ref = copy.deepcopy(eager).double()
    return {"ranks": ranks, "tokens": sum(r["tokens"] for r in ranks), "single": _one_step(_model(), N_LOCAL * WORLD),
            "ref": _one_step(ref, N_LOCAL * WORLD, lambda items: _double(collate(items))),
            "eager": _one_step(eager, N_LOCAL * WORLD)}


def test_ddp_itc_step_matches_one_process_over_the_global_batch(runs):
    r0, r1 = runs["ranks"]
    assert r0["loss"] == r1["loss"]  # the trainer logs the mean over ranks
    assert all(torch.equal(r0["grads"][k], r1["grads"][k]) for k in r0["grads"])  # DDP's all-reduced gradients
    ref_loss, ref_grads, _ = runs["ref"]
    eager_loss, eager_grads, _ = runs["eager"]
    reduction = (64, runs["tokens"])  # the widest Linear input, the token rows a weight gradient sums over
    magnitude = max(finite_magnitude(g) for g in ref_grads.values())  # one gradient vector (see test_models)
    for name, (loss, grads) in (("ddp", (r0["loss"], r0["grads"])), ("single", runs["single"][:2])):
        assert_close(loss, ref_loss, eager_loss, name=f"{name} loss", reduction=reduction)
        assert set(grads) == set(ref_grads)
        for k in ref_grads:
            assert_close(grads[k], ref_grads[k], eager_grads[k], grad=True, name=f"{name} grad {k}",
                         reduction=reduction, magnitude=magnitude)
    # AdamW's first step moves each weight by about lr * sign(gradient): compare it with the one-process
    # step where the gradient is clearly non-zero (gradients that are zero in exact arithmetic, e.g.
    # attention key biases, come out as rounding noise whose sign is arbitrary)
    single_update = runs["single"][2]
    compared = 0
    for k, g in ref_grads.items():
        clear = g.abs() > 1e-4 * magnitude
        torch.testing.assert_close(r0["update"][k][clear], single_update[k][clear].float(), rtol=1e-4, atol=1e-7,
                                   msg=lambda m: f"update of {k}: {m}")
        compared += int(clear.sum())
    assert compared > 0.9 * sum(g.numel() for g in ref_grads.values())


def test_the_local_only_loss_would_fail_the_loss_check(runs):
    """The loss check above can fail: the mean of the ranks' local-only itc losses (each over its own
    3 examples, 3 negatives) is not the global-batch loss (6 negatives)."""
    local_mean = (runs["ranks"][0]["local"] + runs["ranks"][1]["local"]) / 2
    with pytest.raises(AssertionError, match="loss"):
        assert_close(local_mean.float(), runs["ref"][0], runs["eager"][0], name="local-only loss",
                     reduction=(64, runs["tokens"]))
