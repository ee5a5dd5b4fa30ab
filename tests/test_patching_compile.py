"""torch.compile of models patched by mmfast.patch: a training step (forward, loss, backward) of
BertModel, BertForSequenceClassification and BertForMaskedLM, with and without fullgraph=True, checked
against the unpatched float64 twin under the correctness rule (mmfast.testing.assert_close).

The matrix compiles with the "aot_eager" backend (Dynamo capture + AOTAutograd forward/backward graphs:
where patched models used to fail, with a RecursionError in the loss override and a data-dependent guard
on the mask's version counter) through a backend that records the captured graph, to prove mmfast's ops
are inside it; one case runs the default Inductor backend end to end."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")

from test_patching import Twins, bert_config, padded_text, weighted_sum  # noqa: E402
from transformers import BertForMaskedLM, BertForSequenceClassification, BertModel  # noqa: E402

import mmfast  # noqa: E402


class RecordingBackend:
    """A torch.compile backend: remembers the ops of every captured graph, then runs aot_eager."""

    def __init__(self):
        self.targets: list[str] = []
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs += 1
        self.targets += [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        return lookup_backend("aot_eager")(gm, example_inputs)


def _bert_model(m):
    ids, mask = padded_text()
    o = m(ids, attention_mask=mask)
    return {"last_hidden_state": o.last_hidden_state, "pooler": o.pooler_output}, \
        weighted_sum(o.last_hidden_state, o.pooler_output)


def _sequence_classification(m):
    ids, mask = padded_text()
    o = m(ids, attention_mask=mask, labels=torch.tensor([0, 4]))
    return {"loss": o.loss, "logits": o.logits}, o.loss


def _masked_lm(m):
    ids, mask = padded_text()
    labels = torch.full_like(ids, -100)
    labels[:, 1::3] = ids[:, 1::3]
    labels[mask == 0] = -100
    o = m(ids, attention_mask=mask, labels=labels)
    return {"loss": o.loss}, o.loss


MODELS = [
    pytest.param(BertModel, _bert_model, ("attention",), id="BertModel"),
    pytest.param(BertForSequenceClassification, _sequence_classification, ("attention", "cross_entropy"),
                 id="BertForSequenceClassification"),
    pytest.param(BertForMaskedLM, _masked_lm, ("attention", "linear_cross_entropy"), id="BertForMaskedLM"),
]


# The cpu faces by name: ``auto`` runs the reference for the classifier's tiny (2, 5) cross-entropy
# on the CPU (dispatch.CPU_REFERENCE_FASTER), and these tests are about the custom ops inside compiled graphs.
FACES = "cpu"


def _compiled_step(tw: Twins, call, compiled):
    """``call`` with the patched model replaced by its compiled wrapper (same parameters)."""
    return lambda m: call(compiled if m is tw.fast else m)


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph-breaks-allowed", "fullgraph"])
@pytest.mark.parametrize("cls,call,ops", MODELS)
def test_compiled_patched_training_step_matches_eager(cls, call, ops, fullgraph):
    torch._dynamo.reset()
    torch.manual_seed(0)
    tw = Twins(cls(bert_config()).train(), FACES)
    backend = RecordingBackend()
    compiled = torch.compile(tw.fast, backend=backend, fullgraph=fullgraph)
    before = mmfast.patching.fallback_counts()
    torch.manual_seed(1)
    tw.run(_compiled_step(tw, call, compiled), ops={op: None for op in ops})  # the compiled ops ran, and only they
    assert mmfast.patching.fallback_counts() == before, "compiled attention fell back to HF's eager path"
    if fullgraph:
        assert backend.graphs == 1
    captured = " ".join(backend.targets)
    for op in ops:  # mmfast's ops are in the captured graph, not run around it
        assert f"mmfast.{op}" in captured or f"mmfast::{op}" in captured or f"mmfast_{op}" in captured, \
            (op, sorted(set(t for t in backend.targets if "mmfast" in t)))


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") == "avx2",
                    reason="torch 2.14.1 Inductor, AVX2 codegen: the kernel it writes for BERT's embedding sums "
                           "(token-type gather, 11-wide tail) reads an out-of-range token-type index "
                           "('0 <= tmp7 < 2L') in the patched model's graph; the aot_eager matrix above runs there")
def test_inductor_compiles_a_patched_classifier_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    tw = Twins(BertForSequenceClassification(bert_config()).train(), FACES)
    compiled = torch.compile(tw.fast, fullgraph=True)  # the default backend (Inductor)
    tw.run(_compiled_step(tw, _sequence_classification, compiled), ops={"attention": None, "cross_entropy": None})
