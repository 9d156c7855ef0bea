"""Shared tiny model + ONNX export for test_export.py and test_predictor.py.

pytest only auto-loads ``conftest.py``, so the test modules import this helper and wrap
:func:`tiny_export` in their own fixtures. The dynamo export (several seconds) runs once per session.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from seqrec.data.vocab import ItemVocab
from seqrec.export import export_onnx
from seqrec.models.sasrec import SASRec, SASRecConfig
from seqrec.predictor import file_sha256

NUM_ITEMS = 30
MAX_LEN = 12
FALLBACK_ITEMS = ["1003", "1001", "1007", "1002", "1010"]


@dataclass(frozen=True)
class TinyExport:
    """An exported tiny model and what it was exported from."""

    model: SASRec
    vocab: ItemVocab
    export_dir: Path


def tiny_vocab(num_items: int = NUM_ITEMS) -> ItemVocab:
    """Raw ids "1001", "1002", ... (index i <-> str(1000 + i))."""
    return ItemVocab([str(1000 + i) for i in range(1, num_items + 1)])


def tiny_model(num_items: int = NUM_ITEMS, seed: int = 0) -> SASRec:
    """A small random SASRec in eval mode, with weights scaled up so scores are well spread."""
    torch.manual_seed(seed)
    cfg = SASRecConfig(num_items=num_items, max_len=MAX_LEN, d_model=16, n_heads=2, n_layers=1)
    model = SASRec(cfg).eval()
    with torch.no_grad():
        model.item_emb.weight.mul_(20.0)
        model.item_emb.weight[0].zero_()
    return model


_CACHE: dict[str, TinyExport] = {}


def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    """Export the default tiny model once per test session (dynamo exporter, opset 18)."""
    if "default" not in _CACHE:
        torch.set_num_threads(1)
        model, vocab = tiny_model(), tiny_vocab()
        out_dir = tmp_path_factory.mktemp("tiny_export") / "export"
        export_onnx(
            model,
            vocab,
            out_dir,
            opset=18,
            fallback_items=FALLBACK_ITEMS,
            extra_meta={"dataset": "tiny", "source_checkpoint": "none", "test_metrics": None},
        )
        _CACHE["default"] = TinyExport(model, vocab, out_dir)
    return _CACHE["default"]


def nan_item_rows(src: Path, dst: Path, rows: slice | list[int], graph: str = "model.onnx") -> Path:
    """Copy the export directory ``src`` to ``dst`` with the given rows of the input item
    embedding (``model.item_emb.weight``, index = row) of ``graph`` set to NaN, and its sha256
    updated so that the integrity check passes: a model damaged the way a bad training run or a
    broken copy with a regenerated hash would be."""
    shutil.copytree(src, dst)
    model = onnx.load(dst / graph)
    (table,) = [i for i in model.graph.initializer if i.name == "model.item_emb.weight"]
    weights = numpy_helper.to_array(table).copy()
    weights[rows] = np.nan
    table.CopyFrom(numpy_helper.from_array(weights, table.name))
    onnx.save(model, dst / graph)
    return rehash(dst, graph)


def rehash(directory: Path, *names: str) -> Path:
    """Record the current sha256 of ``directory``'s files ``names`` in its ``export_meta.json``
    (a file replaced or edited with its hash regenerated: the integrity check passes). Returns
    ``directory``."""
    meta = json.loads((directory / "export_meta.json").read_text())
    hashes = {name: file_sha256(directory / name) for name in names}
    return edit_meta(directory, {"sha256": {**meta["sha256"], **hashes}})


def edit_meta(directory: Path, changes: dict[str, object]) -> Path:
    """Set keys of ``directory``'s ``export_meta.json``; ``"variant.precision"`` names a key of
    a section. Returns ``directory``."""
    meta = json.loads((directory / "export_meta.json").read_text())
    for key, value in changes.items():
        section, _, sub_key = key.partition(".")
        if sub_key:
            meta[section][sub_key] = value
        else:
            meta[key] = value
    (directory / "export_meta.json").write_text(json.dumps(meta))
    return directory
