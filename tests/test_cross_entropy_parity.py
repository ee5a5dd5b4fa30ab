"""Training parity (Liger-Kernel's convergence test, for an encoder): a tiny BERT masked-LM trained
30 steps with torch's loss and with mmfast's losses, for every backend available here, from the
same initialisation on the same batches, gives the same loss curve (float32)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast import dispatch, testing

transformers = pytest.importorskip("transformers")

BACKENDS = testing.cpu_faces("cross_entropy")  # raises when a face that should exist does not load
STEPS, B, L, V = 30, 8, 16, 1000




def _model():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(cfg).float().train()


def _batches():
    # Learnable data: a few fixed batches over a 60-token sub-vocabulary, cycled.
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        ids = torch.randint(5, 60, (B, L), generator=gen)
        labels = torch.full((B, L), -100)
        mask = torch.rand(B, L, generator=gen) < 0.15
        mask[:, 0] = True  # never an all-ignored batch
        labels[mask] = ids[mask]
        ids = ids.masked_fill(mask, 4)  # [MASK]
        out.append((ids, labels))
    return [out[k % len(out)] for k in range(STEPS)]


def _train(model, batches, loss_of):
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for ids, labels in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, ids, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def _torch_loss(model, ids, labels):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))


def _module_loss(backend):
    crit = mmfast.nn.CrossEntropyLoss(backend=backend)

    def loss_of(model, ids, labels):
        logits = model(input_ids=ids).logits
        return crit(logits.reshape(-1, V), labels.reshape(-1))

    return loss_of


def _fused_head_loss(backend):
    crit = mmfast.nn.LinearCrossEntropyLoss(backend=backend)

    def loss_of(model, ids, labels):
        seq = model.bert(input_ids=ids).last_hidden_state
        head = model.cls.predictions
        hidden = head.transform(seq)  # dense + GELU + LayerNorm; then the tied decoder, fused with the loss
        return crit(hidden, head.decoder.weight, labels, head.decoder.bias)

    return loss_of


@pytest.fixture(scope="module")
def reference_run():
    base = _model()
    batches = _batches()
    losses = _train(copy.deepcopy(base), batches, _torch_loss)
    assert losses[-1] < losses[0] - 0.5, f"the reference run did not learn: {losses.tolist()}"
    return base, batches, losses


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["CrossEntropyLoss", "LinearCrossEntropyLoss"])
def test_training_parity(reference_run, backend, kind):
    base, batches, ref = reference_run
    loss_of = _module_loss(backend) if kind == "CrossEntropyLoss" else _fused_head_loss(backend)
    model = copy.deepcopy(base)
    losses = _train(model, batches, loss_of)
    diff = (losses - ref).abs() / ref.abs()
    # float32 reassociation differences compound through 30 AdamW steps; 1e-3 relative per step
    # still separates a correct kernel from any real bug (a wrong gradient shifts the curve by >1e-2).
    assert diff.max() < 1e-3, f"{kind}/{backend}: max relative deviation {diff.max():.2e}\n{losses}\n{ref}"
