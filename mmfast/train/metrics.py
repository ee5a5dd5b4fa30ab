"""Task metrics for evaluation: classification report (per-answer precision/recall/F1), retrieval
recall@k, caption exact match. Plain PyTorch, no scikit-learn."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.data import DataLoader

from mmfast.data.collate import collate


def _get(out, key):
    return out.get(key) if isinstance(out, dict) else getattr(out, key, None)


def classification_report(preds, labels, names=None) -> dict:
    """Accuracy, macro F1 and per-class precision/recall/F1/support (classes that occur in labels or
    predictions). ``names``: class index -> name."""
    preds, labels = torch.as_tensor(preds), torch.as_tensor(labels)
    keep = labels != -100
    preds, labels = preds[keep], labels[keep]
    classes = sorted(set(labels.tolist()) | set(preds.tolist()))
    per_class = {}
    for c in classes:
        tp = ((preds == c) & (labels == c)).sum().item()
        fp = ((preds == c) & (labels != c)).sum().item()
        fn = ((preds != c) & (labels == c)).sum().item()
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        per_class[names[c] if names else str(c)] = {"precision": p, "recall": r,
                                                    "f1": 2 * p * r / (p + r) if p + r else 0.0,
                                                    "support": (labels == c).sum().item()}
    supported = [v for v in per_class.values() if v["support"]]
    return {"accuracy": (preds == labels).float().mean().item() if len(labels) else 0.0,
            "macro_f1": sum(v["f1"] for v in supported) / max(1, len(supported)), "per_class": per_class,
            "n": len(labels)}


def format_report(report: dict) -> str:
    lines = [f"{'answer':<14} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for name, v in report["per_class"].items():
        lines.append(f"{name:<14} {v['precision']:>9.3f} {v['recall']:>9.3f} {v['f1']:>9.3f} {v['support']:>8}")
    lines.append(f"{'accuracy':<14} {'':>9} {'':>9} {report['accuracy']:>9.3f} {report['n']:>8}")
    lines.append(f"{'macro f1':<14} {'':>9} {'':>9} {report['macro_f1']:>9.3f}")
    return "\n".join(lines)


@torch.no_grad()
def predict(model, dataset, batch_size=64, device="cpu", autocast=contextlib.nullcontext, keys=None):
    """Runs the model in eval mode over the dataset; yields (batch, output) pairs."""
    was = model.training
    model.eval()
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
            batch = {k: v.to(device) for k, v in batch.items() if keys is None or k in keys}
            with autocast():
                yield batch, model(**batch)
    finally:
        model.train(was)


def evaluate_classification(model, dataset, names=None, batch_size=64, device="cpu") -> dict:
    preds, labels, loss_sum = [], [], 0.0
    for batch, out in predict(model, dataset, batch_size, device):
        preds.append(_get(out, "logits").float().argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
        if _get(out, "loss") is not None:
            loss_sum += _get(out, "loss").float().item() * len(batch["labels"])
    preds, labels = torch.cat(preds), torch.cat(labels)
    # label -100: an answer outside the model's answer set (e.g. a held-out answer never seen in training).
    # The model cannot give it, so the example counts as wrong; dropping it would inflate the accuracy.
    unseen = labels == -100
    report = classification_report(preds, labels, names)
    report["accuracy"] = (preds == labels).float().mean().item()
    report["n"] = len(labels)
    report["unseen_answers"] = int(unseen.sum())
    report["loss"] = loss_sum / len(labels)
    report["predictions"] = preds.tolist()
    return report


def evaluate_retrieval(model, dataset, batch_size=64, device="cpu", ks=(1, 5)) -> dict:
    """Text->image and image->text recall@k over the whole eval set from the model's normalised
    ``text_embeds``/``image_embeds``. When the dataset can say each example's text (``text(i)``),
    an image whose text equals the query's counts as a hit (synthetic captions repeat)."""
    t_emb, i_emb, loss_sum, n = [], [], 0.0, 0
    for batch, out in predict(model, dataset, batch_size, device):
        t_emb.append(_get(out, "text_embeds").float().cpu())
        i_emb.append(_get(out, "image_embeds").float().cpu())
        if _get(out, "loss") is not None:
            loss_sum, n = loss_sum + _get(out, "loss").float().item() * len(t_emb[-1]), n + len(t_emb[-1])
    t, i = torch.cat(t_emb), torch.cat(i_emb)
    sim = t @ i.T  # (texts, images)
    N = len(t)
    if hasattr(dataset, "text"):
        texts = [dataset.text(j) for j in range(N)]
        ids = {s: k for k, s in enumerate(dict.fromkeys(texts))}
        group = torch.tensor([ids[s] for s in texts])
    else:
        group = torch.arange(N)
    same = group[:, None] == group[None, :]
    out = {"n": N, "loss": loss_sum / max(n, 1)}
    for k in ks:
        k_ = min(k, N)
        top_t2i = sim.topk(k_, dim=1).indices
        top_i2t = sim.T.topk(k_, dim=1).indices
        out[f"t2i_recall@{k}"] = same.gather(1, top_t2i).any(1).float().mean().item()
        out[f"i2t_recall@{k}"] = same.gather(1, top_i2t).any(1).float().mean().item()
    chance = same.float().sum(1).mean().item() / N
    out["chance_recall@1"] = chance
    return out


def evaluate_captions(model, dataset, tokenizer, batch_size=64, device="cpu", max_new_tokens=24, show=5) -> dict:
    """Greedy captions (``model.generate``) vs the references: exact match and word accuracy."""
    exact, word_hits, words, n, loss_sum, samples = 0, 0, 0, 0, 0.0, []
    for batch, out in predict(model, dataset, batch_size, device):
        loss_sum += _get(out, "loss").float().item() * len(batch["input_ids"])
        gen = model.generate(batch["pixel_values"], max_new_tokens=max_new_tokens)
        for row, ref_ids in zip(gen.tolist(), batch["input_ids"].tolist()):
            hyp, ref = tokenizer.decode(row), tokenizer.decode(ref_ids)
            exact += hyp == ref
            h, r = hyp.split(), ref.split()
            word_hits += sum(a == b for a, b in zip(h, r))
            words += max(len(h), len(r))
            n += 1
            if len(samples) < show:
                samples.append({"generated": hyp, "reference": ref})
    return {"n": n, "loss": loss_sum / max(n, 1), "exact_match": exact / max(n, 1),
            "word_accuracy": word_hits / max(words, 1), "samples": samples}
