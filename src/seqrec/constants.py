"""Names shared by every stage: the padding index and the canonical column names."""

from typing import Final

PAD_IDX: Final[int] = 0
"""Item index reserved for left padding; never a real item, never recommended."""

FORMAT_VERSION: Final[int] = 2
"""Version of the export directory layout and ``export_meta.json`` schema (2: variants, sha256);
the predictor refuses a newer one."""
PRECISIONS: Final[tuple[str, ...]] = ("fp32", "fp16", "int8", "int8_catalog")
"""Export precisions (``seqrec.export.ExportVariant.precision``)."""
GRAPH_OPTIMIZATION_LEVELS: Final[tuple[str, ...]] = ("disable", "basic", "extended", "all")
"""onnxruntime graph optimisation levels by name (``ORT_DISABLE_ALL`` ... ``ORT_ENABLE_ALL``)."""
INT8_PRECISIONS: Final[tuple[str, ...]] = ("int8", "int8_catalog")
"""Export precisions whose graphs multiply 8-bit integers (``seqrec.export.ExportVariant``)."""
INT8_SCORE_ATOL: Final[float] = 0.05
"""Step-versus-prefill score tolerance of int8 catalogs: a hidden state that differs in the last
float32 bit between the two graphs may round one of its D values to the next int8 step, which
moves scores by about one step of that row's scale (a few 1e-3); larger differences mean a wrong
table, scale or column. Used by the export's validation and the predictor's load check."""

INT8_SATURATION_SAFE: Final[str] = "int8_saturation_safe"
"""``export_meta.json`` key, true in int8 exports whose integer products no CPU kernel saturates:
x86 kernels without VNNI (AVX2's ``vpmaddubsw``) add two u8 x s8 products in a saturating int16,
so seqrec keeps one side at 7 bits (``int8_catalog``: the hidden states; ``int8``: the weights,
``reduce_range``). Int8 exports without the key were made before and may score wrongly there."""

# Canonical event / session frame columns.
VISITOR_ID: Final[str] = "visitor_id"
"""Raw visitor id (str); sessions are cut per visitor."""
SESSION_ID: Final[str] = "session_id"
"""Session id (str), unique within a dataset."""
ITEM_ID: Final[str] = "item_id"
"""Raw item id from the source (str)."""
TS_MS: Final[str] = "ts_ms"
"""Event time, integer milliseconds since the Unix epoch (int64)."""
EVENT_TYPE: Final[str] = "event_type"
"""Event kind from the source, e.g. ``view``, ``addtocart``, ``transaction`` (str)."""

# Evaluation example frame columns (one row per prefix -> next item).
PREFIX_ITEM_IDS: Final[str] = "prefix_item_ids"
"""Raw item ids seen so far in the session, oldest first (list[str])."""
NEXT_ITEM_ID: Final[str] = "next_item_id"
"""Raw id of the item to predict (str)."""

BLOCK_TOP_K_MIN_WIDTH: Final[int] = 20_000
"""Smallest catalog ``seqrec.incremental.block_top_k`` rewrites for. On the 2-core AMD VM (1 thread, k = 20,
the ``TopK`` alone) the rewrite cost more than it saved at 10,000 items (0.028 instead of 0.015
ms for one session, no gain at batch 64) and won at 37,000 (1.0 instead of 2.8 ms at batch 64)
and 235,000 (3.5 instead of 12.1 ms at batch 64, 0.05 instead of 0.28 ms for one); sizes in
between were not measured, and the floor is set between the two. The predictor checks the
weights of every export of this size for NaN at load (``SessionRecommender.from_dir``)."""
