"""Datasets and batching for mmfast training: ``ShapesDataset`` (synthetic, learnable on a CPU in
minutes), ``ImageTextJsonl`` (your own image-text pairs) and ``collate`` (``packed=True``, or
``pack_batch`` / ``unpack_batch``: packed text + cu_seqlens for the zoo's packed models)."""

from mmfast.data.collate import collate, pack_batch, unpack_batch
from mmfast.data.jsonl import ImageTextJsonl, load_tokenizer
from mmfast.data.ner import NER_TAGS, SyntheticNER, TokenTagJsonl
from mmfast.data.shapes import ANSWERS, QUESTION_TYPES, ShapesDataset, ShapesTokenizer

__all__ = ["ANSWERS", "NER_TAGS", "QUESTION_TYPES", "ImageTextJsonl", "ShapesDataset", "ShapesTokenizer", "SyntheticNER",
           "TokenTagJsonl", "collate", "load_tokenizer", "pack_batch", "unpack_batch"]
