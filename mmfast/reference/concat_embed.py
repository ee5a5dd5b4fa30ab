"""Reference feature concatenation: add position and modality-type embeddings to each
modality's tokens, concatenate along the sequence, LayerNorm, dropout; concatenate the masks."""

import torch
import torch.nn.functional as F


def concat_embed(features, *, type_embeddings=None, pos_embeddings=None, ln_weight=None, ln_bias=None,
                 eps=1e-12, dropout_p=0.0, masks=None):
    parts = []
    for m, f in enumerate(features):
        x = f
        if pos_embeddings is not None and pos_embeddings[m] is not None:
            x = x + pos_embeddings[m][: f.shape[1]]
        if type_embeddings is not None:
            x = x + type_embeddings[m]
        parts.append(x)
    out = torch.cat(parts, dim=1)
    if ln_weight is not None:
        out = F.layer_norm(out, (out.shape[-1],), ln_weight, ln_bias, eps)
    out = F.dropout(out, dropout_p, training=dropout_p > 0)
    mask = None
    if masks is not None:
        B = features[0].shape[0]
        mask = torch.cat([
            mk.bool() if mk is not None else torch.ones(B, f.shape[1], dtype=torch.bool, device=f.device)
            for mk, f in zip(masks, features)
        ], dim=1)
    return out, mask
