"""Torch-free predictor: parity with eager SASRec, session handling, fallback, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import seqrec.export as export_mod
from _export_helpers import (
    FALLBACK_ITEMS,
    MAX_LEN,
    NUM_ITEMS,
    TinyExport,
    tiny_export,
    tiny_model,
    tiny_vocab,
)
from seqrec.cli import main as cli_main
from seqrec.export import export_onnx
from seqrec.predictor import Recommendation, SessionRecommender
from seqrec.sequence import encode_prefix

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory)


@pytest.fixture(scope="module")
def rec(exported: TinyExport) -> SessionRecommender:
    return SessionRecommender.from_dir(exported.export_dir)


def _eager_top_k(exported: TinyExport, session: list[str], k: int) -> tuple[list[str], np.ndarray]:
    """Reference ranking straight from SASRec.score_last (PAD masked, known items only)."""
    idxs = [i for i in exported.vocab.encode(session).tolist() if i != 0]
    item_ids = torch.from_numpy(encode_prefix(idxs, MAX_LEN)).unsqueeze(0)  # (1, L)
    with torch.inference_mode():
        scores = exported.model.score_last(item_ids)[0].numpy()  # (C,)
    order = np.argsort(-scores[1:], kind="stable")[:k] + 1
    return exported.vocab.decode(order), scores[order]


def _ids(recs: list[Recommendation]) -> list[str]:
    return [r.item_id for r in recs]


def test_import_loads_neither_torch_nor_pandas() -> None:
    code = (
        "import sys, seqrec.predictor, seqrec.cli; "
        "bad = [m for m in ('torch', 'pandas', 'lightning', 'pytorch_lightning', 'hydra') "
        "if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_properties(rec: SessionRecommender) -> None:
    assert (rec.num_items, rec.max_len) == (NUM_ITEMS, MAX_LEN)
    assert rec.meta["fallback_items"] == FALLBACK_ITEMS
    rec.meta["max_len"] = -1  # a copy: callers cannot change the recommender
    assert rec.meta["max_len"] == MAX_LEN


@pytest.mark.parametrize(
    "session",
    [["1005"], ["1001", "1002", "1003"], [str(1000 + i) for i in range(1, MAX_LEN + 1)]],
)
def test_parity_with_eager_model(
    exported: TinyExport, rec: SessionRecommender, session: list[str]
) -> None:
    want_ids, want_scores = _eager_top_k(exported, session, k=10)
    recs = rec.recommend(session, k=10)
    assert _ids(recs) == want_ids
    np.testing.assert_allclose([r.score for r in recs], want_scores, rtol=0, atol=1e-4)
    assert all(r.source == "model" for r in recs)
    assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)


def test_k_is_respected(rec: SessionRecommender) -> None:
    assert len(rec.recommend(["1001"], k=1)) == 1
    assert len(rec.recommend(["1001"], k=7)) == 7
    everything = rec.recommend(["1001"], k=1000)
    assert len(everything) == NUM_ITEMS
    assert len(set(_ids(everything))) == NUM_ITEMS
    for bad_k in (0, -3):
        with pytest.raises(ValueError, match="k must be >= 1"):
            rec.recommend(["1001"], k=bad_k)


def test_exclude_seen(rec: SessionRecommender) -> None:
    session = ["1004", "1008", "1015", "1004"]
    recs = rec.recommend(session, k=NUM_ITEMS, exclude_seen=True)
    assert not set(_ids(recs)) & set(session)
    assert len(recs) == NUM_ITEMS - 3
    kept = [r for r in rec.recommend(session, k=NUM_ITEMS) if r.item_id not in session]
    assert recs == kept  # excluding changes nothing else


def test_unknown_ids_are_skipped(rec: SessionRecommender) -> None:
    recs, info = rec.recommend_with_info(["x", 1003, "9999", "1007"], k=5)
    assert (info.num_known, info.num_unknown, info.used_fallback) == (2, 2, False)
    assert recs == rec.recommend(["1003", "1007"], k=5)  # ints are converted with str()


@pytest.mark.parametrize("session", [[], ["nope", "9999"]])
def test_empty_or_unknown_session_gets_fallback(rec: SessionRecommender, session: list) -> None:
    recs, info = rec.recommend_with_info(session, k=3)
    assert info.used_fallback and info.num_known == 0
    assert _ids(recs) == FALLBACK_ITEMS[:3]
    assert all(r.source == "fallback" and r.score == 0.0 for r in recs)
    assert _ids(rec.recommend(session, k=50, exclude_seen=True)) == FALLBACK_ITEMS


def test_long_session_uses_last_max_len_items(rec: SessionRecommender) -> None:
    rng = np.random.default_rng(0)
    session = [str(1000 + i) for i in rng.integers(1, NUM_ITEMS + 1, size=3 * MAX_LEN)]
    recs, info = rec.recommend_with_info(session, k=10)
    assert info.num_known == 3 * MAX_LEN
    assert recs == rec.recommend(session[-MAX_LEN:], k=10)
    # unknown ids do not count towards max_len: the last max_len *known* items are used
    with_unknown = session[:-MAX_LEN] + [x for s in session[-MAX_LEN:] for x in (s, "??")]
    assert _ids(rec.recommend(with_unknown, k=10)) == _ids(recs)


def test_recommend_batch_equals_single(rec: SessionRecommender) -> None:
    sessions: list[list[str | int]] = [
        ["1001"],
        [],
        ["1002", "1003", 1004],
        ["unknown"],
        [str(1000 + (i % NUM_ITEMS) + 1) for i in range(2 * MAX_LEN)],
        ["1030", "1029"],
    ]
    batch = rec.recommend_batch(sessions, k=6, exclude_seen=True)
    assert len(batch) == len(sessions)
    for session, recs in zip(sessions, batch, strict=True):
        single = rec.recommend(session, k=6, exclude_seen=True)
        assert _ids(recs) == _ids(single)
        np.testing.assert_allclose([r.score for r in recs], [r.score for r in single], atol=1e-5)
    assert rec.recommend_batch([], k=3) == []


def test_threads_give_the_same_answers(rec: SessionRecommender) -> None:
    sessions = [[str(1000 + i), str(1000 + (i * 7) % NUM_ITEMS + 1)] for i in range(1, 21)]
    expected = [rec.recommend(s, k=5) for s in sessions]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda s: rec.recommend(s, k=5), sessions))
    assert got == expected


def test_pad_is_never_returned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The legacy exporter is enough for a 3-item catalog and keeps the test under a second.
    monkeypatch.delitem(export_mod._EXPORTERS, "dynamo")
    out = export_onnx(
        tiny_model(num_items=3), tiny_vocab(3), tmp_path / "three", fallback_items=["1002"]
    )
    small = SessionRecommender.from_dir(out)
    catalog = {"1001", "1002", "1003"}
    for session in (["1001"], ["1003", "1003"], ["1002", "1001", "1003"]):
        recs = small.recommend(session, k=10)
        assert len(recs) == 3 and set(_ids(recs)) == catalog
        assert small.recommend(session, k=10, exclude_seen=True) == [
            r for r in recs if r.item_id not in session
        ]
    assert small.recommend(["1001", "1002", "1003"], k=10, exclude_seen=True) == []


def _copy_export(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("model.onnx", "item_vocab.json", "export_meta.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_from_dir_errors_name_the_file(exported: TinyExport, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="export directory not found"):
        SessionRecommender.from_dir(tmp_path / "missing")

    no_meta = _copy_export(exported.export_dir, tmp_path / "no_meta")
    (no_meta / "export_meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="export_meta.json"):
        SessionRecommender.from_dir(no_meta)

    no_key = _copy_export(exported.export_dir, tmp_path / "no_key")
    meta = json.loads((no_key / "export_meta.json").read_text())
    del meta["max_len"]
    (no_key / "export_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"export_meta.json: missing keys \['max_len'\]"):
        SessionRecommender.from_dir(no_key)

    mismatch = _copy_export(exported.export_dir, tmp_path / "mismatch")
    tiny_vocab(NUM_ITEMS - 1).save(mismatch / "item_vocab.json")
    with pytest.raises(ValueError, match=r"item_vocab.json has 29 items .* num_items=30"):
        SessionRecommender.from_dir(mismatch)


def test_cli_prints_ranked_table(exported: TinyExport, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([str(exported.export_dir), "1001", "1002", "--k", "4"]) == 0
    out = capsys.readouterr().out
    expected = _ids(
        SessionRecommender.from_dir(exported.export_dir).recommend(["1001", "1002"], k=4)
    )
    for rank, item_id in enumerate(expected, start=1):
        assert f"{rank:>4}  {item_id}" in out


def test_cli_json(exported: TinyExport, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli_main([str(exported.export_dir), "1001", "zzz", "--k", "3", "--exclude-seen", "--json"])
        == 0
    )
    payload = json.loads(capsys.readouterr().out)
    assert (payload["num_known"], payload["num_unknown"]) == (1, 1)
    assert [r["rank"] for r in payload["recommendations"]] == [1, 2, 3]
    assert "1001" not in [r["item_id"] for r in payload["recommendations"]]


def test_cli_missing_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([str(tmp_path / "nope"), "1001"]) == 2
    err = capsys.readouterr().err
    assert "export directory not found" in err and "Traceback" not in err


def test_recommend_script_runs(exported: TinyExport) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "recommend.py"),
            str(exported.export_dir),
            "1001",
            "1005",
            "--k",
            "3",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert len([line for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]) == 3


def test_single_string_session_is_rejected(rec: SessionRecommender) -> None:
    with pytest.raises(TypeError, match="single string"):
        rec.recommend("1001", k=3)  # type: ignore[arg-type]
