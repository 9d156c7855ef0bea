"""Torch-free predictor: parity with eager SASRec, session handling, fallback, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from packaging.version import Version

import seqrec.export as export_mod
from _export_helpers import (
    FALLBACK_ITEMS,
    MAX_LEN,
    NUM_ITEMS,
    TinyExport,
    edit_meta,
    nan_item_rows,
    rehash,
    tiny_export,
    tiny_model,
    tiny_vocab,
)
from seqrec.cli import main as cli_main
from seqrec.export import ExportVariant, export_onnx
from seqrec.filters import filtered_scorer
from seqrec.predictor import (
    ArtifactIntegrityError,
    NonFiniteScoresError,
    Recommendation,
    SessionRecommender,
    file_sha256,
)
from seqrec.sequence import encode_prefix, encode_prefixes

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


@pytest.mark.parametrize(("preset", "telemetry_files"), [(None, False), ("0", True)])
def test_onnxruntime_telemetry_is_off_unless_the_process_chose(
    exported: TinyExport, tmp_path: Path, preset: str | None, telemetry_files: bool
) -> None:
    """onnxruntime >= 1.29 on Linux writes a device id and an upload cache under
    ~/.cache/Microsoft/DeveloperTools/.onnxruntime when it starts, unless
    ORT_DISABLE_TELEMETRY=1. Importing seqrec sets it by default; an explicit choice of the
    process (here ORT_DISABLE_TELEMETRY=0) is kept. HOME is a fresh directory, so what
    onnxruntime writes there is visible."""
    if telemetry_files and Version(ort.__version__) < Version("1.29"):
        pytest.skip(f"onnxruntime {ort.__version__} has no Linux telemetry to observe")
    # onnxruntime also stays quiet on CI machines (it looks for variables such as CI, which
    # .ci/run sets): without them the opt-in case shows what a user's machine does
    ci_markers = {"CI", "GITHUB_ACTIONS", "GITLAB_CI", "TF_BUILD", "JENKINS_URL", "BUILDKITE",
                  "CIRCLECI", "TRAVIS", "TEAMCITY_VERSION"}  # fmt: skip
    env = {
        k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY" and k not in ci_markers
    }
    env["HOME"] = str(tmp_path)
    if preset is not None:
        env["ORT_DISABLE_TELEMETRY"] = preset
    code = (
        "import os; from seqrec.predictor import SessionRecommender; "
        f"SessionRecommender.from_dir({str(exported.export_dir)!r}); "
        "print(os.environ['ORT_DISABLE_TELEMETRY'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == (preset or "1")
    written = sorted(p.name for p in (tmp_path / ".cache").rglob("*") if p.is_file())
    if telemetry_files:  # onnxruntime's default: the check below can see its files
        assert "deviceid" in written, written
    else:
        assert written == [], written


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
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
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


def test_fallback_with_an_allow_list_outside_the_popular_items(rec: SessionRecommender) -> None:
    """An allow-list that the stored popularity list does not cover still fills the strip: its
    known items follow the popular ones, in allow-list order, and pass the other filters."""
    allow = ["1020", "1003", "zzz", "1021", "1022", "1023"]  # "1003" is a fallback item
    got = rec.recommend(["nope"], k=4, allow_items=allow, deny_items=["1021"])
    assert _ids(got) == ["1003", "1020", "1022", "1023"]
    assert all(r.source == "fallback" for r in got)
    assert _ids(rec.recommend([], k=2, allow_items=["1025", "1024"])) == ["1025", "1024"]
    # without an allow-list the strip is the stored popularity list, filtered
    assert _ids(rec.recommend([], k=50, deny_items=FALLBACK_ITEMS[:4])) == FALLBACK_ITEMS[4:]


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


@pytest.mark.parametrize("ids_from", ["numpy array", "tuple"])
def test_top_k_rows_become_recommendations_by_the_documented_rules(
    rec: SessionRecommender, ids_from: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_recommendation_rows`` turns a graph's (B, K) top-k into recommendations with Python
    lists (two ``tolist`` calls): raw ids by item index (gathered from the numpy copy of the
    ids, or looked up one by one where there is none), -inf (excluded) tails dropped, a seen
    set skipped before the first k are kept, and NaN or +inf anywhere refused, -inf alone
    not."""
    assert rec._id_array is not None
    if ids_from == "tuple":
        monkeypatch.setattr(rec, "_id_array", None)
    inf = np.inf
    idx = np.array([[3, 1, 2], [2, 3, 1]], dtype=np.int64)
    scores = np.array([[2.5, 1.0, -inf], [0.5, -1.0, -2.0]], dtype=np.float32)
    rows = rec._recommendation_rows(idx, scores)
    assert [[(r.item_id, r.score, r.source) for r in row] for row in rows] == [
        [("1003", 2.5, "model"), ("1001", 1.0, "model")],
        [("1002", 0.5, "model"), ("1003", -1.0, "model"), ("1001", -2.0, "model")],
    ]
    assert all(type(r) is Recommendation for row in rows for r in row)
    seen_dropped = rec._recommendation_rows(idx, scores, (1, [{3}, {2, 3}]))
    assert [_ids(row) for row in seen_dropped] == [["1001"], ["1001"]]
    two_kept = rec._recommendation_rows(idx, scores, (2, [{3}, set()]))
    assert [_ids(row) for row in two_kept] == [["1001"], ["1002", "1003"]]  # -inf: dropped
    for bad in (np.nan, inf):
        damaged = scores.copy()
        damaged[1, 2] = bad
        with pytest.raises(NonFiniteScoresError):
            rec._recommendation_rows(idx, damaged)
    plus_and_minus = np.array([[inf, -inf, -inf]], dtype=np.float32)
    with pytest.raises(NonFiniteScoresError):
        rec._recommendation_rows(idx[:1], plus_and_minus)
    assert rec._recommendation_rows(idx[:1], np.full((1, 3), -inf, np.float32)) == [[]]


def test_ids_numpy_cannot_hold_are_looked_up_one_by_one(rec: SessionRecommender) -> None:
    """numpy's fixed-width strings drop trailing NUL characters, so a catalog with such an id
    keeps no numpy copy of its ids and still returns every id exactly."""
    ids = [*rec.item_ids]
    ids[2] = "1003\0"
    odd = SessionRecommender(rec._session, ids, rec.meta)
    assert odd._id_array is None and rec._id_array is not None
    idx = np.array([[3, 1]], dtype=np.int64)
    rows = odd._recommendation_rows(idx, np.array([[2.0, 1.0]], dtype=np.float32))
    assert _ids(rows[0]) == ["1003\0", "1001"]
    dropped = odd._recommendation_rows(idx, np.array([[2.0, 1.0]], np.float32), (1, [{1}]))
    assert _ids(dropped[0]) == ["1003\0"]


def test_catalog_ids_spelled_like_bools_or_floats_do_not_take_such_ids(
    rec: SessionRecommender,
) -> None:
    """A catalog whose ids include "True" and "1.0": the bool True and the float 1.0 are still
    refused (``str(True) == "True"`` would have found the item), in sessions and in filters,
    while the strings themselves and ints work as usual."""
    ids = [*rec.item_ids]
    ids[0], ids[1] = "True", "1.0"  # indices 1 and 2
    odd = SessionRecommender(rec._session, ids, rec.meta)
    assert odd._encode(["True", "1.0", ids[2]]) == ([1, 2, 3], 0)
    assert odd._encode([1, "1.0"]) == ([2], 1)  # the int 1 is the id "1": not in this catalog
    for bad, named in ((True, "bool True"), (1.0, "float 1.0"), (np.float32(1.0), "float32")):
        for session in ([bad], ["True", bad], [7, bad]):
            with pytest.raises(TypeError, match=rf"^session: .*got {named}"):
                odd.recommend(session)
        with pytest.raises(TypeError, match=rf"^allow_items: .*got {named}.* at position 1"):
            odd.recommend(["True"], allow_items=["1.0", bad])
        with pytest.raises(TypeError, match=rf"^deny_items: .*got {named}.* at position 0"):
            odd.recommend(["True"], deny_items=[bad])
    recs = odd.recommend(["True", np.int64(5)], k=3, deny_items=["1.0", np.str_("True")])
    assert recs and not {"True", "1.0"} & set(_ids(recs))


def test_a_catalog_whose_id_array_would_be_too_large_builds_none(
    rec: SessionRecommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The numpy copy of the ids is sized before it is built (4 bytes per character of the
    longest id, per item): one very long id must not allocate a huge array at load."""
    import seqrec.predictor as predictor_mod

    ids = [*rec.item_ids]
    ids[0] = "x" * 1000
    size = 4 * 1000 * (len(ids) + 1)
    monkeypatch.setattr(predictor_mod, "ID_ARRAY_MAX_BYTES", size - 1)
    assert SessionRecommender(rec._session, ids, rec.meta)._id_array is None
    monkeypatch.setattr(predictor_mod, "ID_ARRAY_MAX_BYTES", size)
    kept = SessionRecommender(rec._session, ids, rec.meta)._id_array
    assert kept is not None and kept.nbytes == size and kept[1] == "x" * 1000


def test_memo_of_sessions_maps_like_the_catalog_dict(
    rec: SessionRecommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_encode`` remembers sessions of string ids, so a next click maps only its newest id;
    what it returns is what the catalog's dict gives (known indices, unknown count) at every
    click, on a reload, after eviction, and never for ids that are not all strings (``1 ==
    1.0`` as tuple keys)."""
    import seqrec.predictor as predictor_mod

    monkeypatch.setattr(predictor_mod, "ENCODING_MEMO_SESSIONS", 3)
    fresh = SessionRecommender(rec._session, rec.item_ids, rec.meta)
    index = dict(fresh._index)

    def by_dict(session: list[str]) -> tuple[list[int], int]:
        known = [index[item] for item in session if item in index]
        return known, len(session) - len(known)

    visit = ["1001", "nope", "1002", "1003", "zzz", "1001", "1004"]
    for n in range(1, len(visit) + 1):
        assert fresh._encode(visit[:n]) == by_dict(visit[:n])
        assert fresh._encode(visit[:n]) == by_dict(visit[:n])  # the same request again
        assert len(fresh._encoding_memo) == 1  # each click replaced its previous one
    # a next click reads the earlier items from the memo, not from the dict
    fresh._index = {"1005": index["1005"]}
    assert fresh._encode([*visit, "1005"]) == by_dict([*visit, "1005"])
    assert fresh._encode([*visit, "1005", "zzz"]) == by_dict([*visit, "1005", "zzz"])
    fresh._index = index
    others = [[f"{1001 + i}", f"{1002 + i}"] for i in range(5)]
    for other in others:
        assert fresh._encode(other) == by_dict(other)
    assert len(fresh._encoding_memo) == 3  # bounded: the oldest went first
    assert tuple(others[-1]) in fresh._encoding_memo and tuple(visit) not in fresh._encoding_memo
    assert fresh._encode(visit) == by_dict(visit)  # evicted: from the dict again
    per_id = predictor_mod.MEMO_BYTES_PER_ID

    def size(key: tuple[str, ...]) -> int:
        return per_id * len(key) + sum(map(len, key))

    assert fresh._memo_bytes == sum(map(size, fresh._encoding_memo))  # grown click by click too
    # bounded in bytes too: long sessions or long ids push out the oldest, whatever their number
    long_visit = [f"{1001 + i % 9}" for i in range(7)]
    monkeypatch.setattr(predictor_mod, "ENCODING_MEMO_BYTES", size(tuple(long_visit)))
    assert fresh._encode(long_visit) == by_dict(long_visit)
    assert list(fresh._encoding_memo) == [tuple(long_visit)]
    assert fresh._memo_bytes == size(tuple(long_visit))
    long_ids = ["x" * 10_000, "1001"]
    assert fresh._encode(long_ids) == by_dict(long_ids)  # larger than the bound: not kept
    assert not fresh._encoding_memo and fresh._memo_bytes == 0
    fresh._encode(long_visit)
    fresh.clear_state_cache()  # forgets the memo too
    assert not fresh._encoding_memo and fresh._memo_bytes == 0
    # ids that are not all strings: never remembered, so 1001.0 cannot pass as 1001
    assert fresh._encode([1001, 1002]) == ([index["1001"], index["1002"]], 0)
    assert (1001, 1002) not in fresh._encoding_memo
    with pytest.raises(TypeError, match="float"):
        fresh._encode([1001.0, 1002])
    with pytest.raises(TypeError, match="float"):
        fresh.recommend(["1001", 1002.0])

    class UnhashableType(type):  # instances are fine; their type cannot go in a set
        __hash__ = None  # type: ignore[assignment]

    odd = UnhashableType("Odd", (), {})()
    with pytest.raises(TypeError, match=r"^session: .*got Odd .* at position 1"):
        fresh.recommend(["1001", odd])


def _copy_export(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("model.onnx", "item_vocab.json", "export_meta.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_from_dir_errors_name_the_file(exported: TinyExport, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="export directory not found"):
        SessionRecommender.from_dir(tmp_path / "missing")
    for empty in ("", "  "):  # not the working directory, which Path("") means
        with pytest.raises(FileNotFoundError, match=r"export directory not given \(the path is"):
            SessionRecommender.from_dir(empty)
    model_file = exported.export_dir / "model.onnx"  # the model file instead of its directory
    with pytest.raises(FileNotFoundError, match=r"model\.onnx is a file; pass the directory"):
        SessionRecommender.from_dir(model_file)

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
    with pytest.raises(ArtifactIntegrityError, match=r"item_vocab.json has sha256"):
        SessionRecommender.from_dir(mismatch)
    with pytest.raises(ValueError, match=r"item_vocab.json has 29 items .* num_items=30"):
        SessionRecommender.from_dir(mismatch, verify_integrity=False)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_len", 0, "max_len is 0, expected an integer >= 1"),
        ("max_len", "abc", "max_len is 'abc', expected an integer >= 1"),
        ("max_len", True, "max_len is True, expected an integer >= 1"),
        ("num_items", 2.5, "num_items is 2.5, expected an integer >= 1"),
        ("pad_idx", 1, "pad_idx is 1, expected 0"),
        ("pad_idx", 0.0, "pad_idx is 0.0, expected 0"),
        ("fallback_items", None, "fallback_items is None, expected a list of item ids"),
        ("fallback_items", [1.5], r"fallback_items is \[1.5\], expected a list of item ids"),
        ("input_name", 7, "input_name is 7, expected a string"),
        ("variant", [], r"variant is \[\], expected an object"),
        ("empty_score_mask", "yes", "empty_score_mask is 'yes', expected true or false"),
        ("top_k_block_size", 1, "top_k_block_size is 1, expected null or an integer >= 2"),
        ("top_k_block_size", "40", "top_k_block_size is '40', expected null or an integer >= 2"),
        ("format_version", "2", "format_version is '2', expected an integer >= 1"),
        ("incremental", "yes", "incremental is 'yes', expected an object"),
        ("max_len", 10**12, "max_len is 1000000000000, expected at most 65,536"),
        ("max_len", MAX_LEN - 1, f"max_len is {MAX_LEN - 1}, but .*model.onnx also scores "
         f"sessions of {MAX_LEN} items"),
        ("model_version", {"a": 1}, r"model_version is \{'a': 1\}, expected a string of 1 to 64"),
        ("model_version", "v" * 65, "model_version is 'v+', expected a string of 1 to 64"),
        ("int8_saturation_safe", "true", "int8_saturation_safe is 'true', expected true or false"),
    ],
)  # fmt: skip
def test_from_dir_refuses_metadata_values_it_cannot_use(
    exported: TinyExport, tmp_path: Path, key: str, value: object, message: str
) -> None:
    bad = edit_meta(_copy_export(exported.export_dir, tmp_path / "bad"), {key: value})
    with pytest.raises(ValueError, match=rf"export_meta.json: {message}"):
        SessionRecommender.from_dir(bad)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_layers": "x"}, "n_layers is 'x', expected an integer >= 1"),
        ({"d_model": 0}, "d_model is 0, expected an integer >= 1"),
        ({"format_version": 99}, "format_version is 99, expected at most 2: the export was "
         "written by a newer seqrec; upgrade seqrec"),
        ({"variant.top_k_in_graph": "false"}, "variant.top_k_in_graph is 'false', expected true "
         "or false"),
        ({"variant.incremental": 1}, "variant.incremental is 1, expected true or false"),
        ({"variant.precision": "int4"}, r"variant.precision is 'int4', expected one of \['fp32', "
         r"'fp16', 'int8', 'int8_catalog'\]"),
        ({"variant.graph_optimization_level": ["all"]}, r"variant.graph_optimization_level is "
         r"\['all'\], expected one of \['disable'"),
        ({"variant.graph_optimization_level": {"a": 1}}, "variant.graph_optimization_level is "
         "{'a': 1}, expected one of"),
        ({"incremental": {}}, "incremental.step_file is None, expected a file name"),
        ({"variant.incremental": True}, "incremental is None, expected an object naming the step "
         r"graph \(variant.incremental is true\)"),
        ({"incremental": {"step_file": "export_meta.json", "step_input_names": []}},
         "incremental.step_file is 'export_meta.json', expected the file name of the step graph "
         r"in the export directory \(no path; not export_meta.json"),
        ({"incremental": {"step_file": {"a": "b" * 200}, "step_input_names": []}},
         r"incremental.step_file is \{'a': 'b+, expected a file name$"),
        ({"incremental": {"step_file": "s.onnx", "step_input_names": [1]}},
         r"incremental.step_input_names is \[1\], expected a list of strings"),
    ],
)  # fmt: skip
def test_from_dir_refuses_variant_and_incremental_values_it_cannot_use(
    exported: TinyExport, tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    """Every value the predictor reads is checked, nested keys included (named with a dot):
    before, ``top_k_in_graph: "false"`` counted as true, ``incremental: {}`` served a plain
    graph, an unknown precision or a newer format loaded, and a list as the optimisation level
    raised ``TypeError: unhashable type`` with a traceback."""
    bad = edit_meta(_copy_export(exported.export_dir, tmp_path / "bad"), changes)
    with pytest.raises(ValueError, match=rf"export_meta.json: {message}"):
        SessionRecommender.from_dir(bad)


def test_from_dir_refuses_output_names_that_differ_from_the_graph(
    exported: TinyExport, tmp_path: Path
) -> None:
    bad = edit_meta(
        _copy_export(exported.export_dir, tmp_path / "bad"),
        {"output_names": ["scores", "present_kv"]},
    )
    with pytest.raises(
        ValueError,
        match=r"model.onnx: graph has inputs \['item_ids'\] / outputs \['scores'\], but .* "
        r"\(output_names \['scores', 'present_kv'\]\)",
    ):
        SessionRecommender.from_dir(bad)


def test_a_model_that_scores_nan_is_refused_at_load_and_never_emits_nan(
    exported: TinyExport,
    top_k_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Damaged weights (hash updated, so the integrity check passes) gave "score": NaN in the
    CLI's JSON, which is not JSON. All rows NaN: the load check refuses the model (CLI exit 2).
    One item's row NaN (the load check scores another item): loads, and a session with that
    item raises NonFiniteScoresError (CLI exit 1) in both the numpy and the in-graph top-k
    layouts, while other sessions are served."""
    all_nan = nan_item_rows(exported.export_dir, tmp_path / "all_nan", slice(None))
    with pytest.raises(ValueError, match=r"model.onnx: the model .* returned NaN or infinite"):
        SessionRecommender.from_dir(all_nan)
    assert cli_main([str(all_nan), "1001", "--json"]) == 2
    assert "returned NaN or infinite scores" in capsys.readouterr().err

    for name, src in (("plain", exported.export_dir), ("top_k", top_k_dir)):
        one_row = SessionRecommender.from_dir(nan_item_rows(src, tmp_path / name, [5]))
        healthy = SessionRecommender.from_dir(src)
        assert _ids(one_row.recommend(["1001", "1002"], k=3)) == _ids(
            healthy.recommend(["1001", "1002"], k=3)
        )
        with pytest.raises(NonFiniteScoresError, match=r"returned NaN or infinite scores"):
            one_row.recommend(["1001", "1005"], k=3)
        with pytest.raises(NonFiniteScoresError):
            one_row.recommend_batch([["1001"], ["1005"]], k=3)
    assert cli_main([str(tmp_path / "plain"), "1005", "--json"]) == 1
    captured = capsys.readouterr()
    assert "NaN" not in captured.out and "returned NaN or infinite scores" in captured.err


def _as_unprivileged_user(command: list[str]) -> list[str]:
    """``command`` run as user nobody when the tests run as root (root reads any file), else
    as is."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without util-linux's setpriv: cannot drop read permission")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *command]


def test_unreadable_export_files_get_a_one_line_error(exported: TinyExport) -> None:
    """A file of the export the user may not read (chmod 000) gave a PermissionError traceback
    (the CLIs caught only FileNotFoundError and ValueError): now exit 2 and one line naming it."""
    probe = subprocess.run(
        _as_unprivileged_user([sys.executable, "-c", "import seqrec.cli"]),
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:  # e.g. a checkout under a directory only root may enter
        pytest.skip(f"user nobody cannot import seqrec from this checkout: {probe.stderr[-200:]}")
    with tempfile.TemporaryDirectory() as tmp:  # in /tmp, which every user may enter
        export_dir = _copy_export(exported.export_dir, Path(tmp) / "export")
        for path in (Path(tmp), export_dir, *export_dir.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        scripts = Path(sys.executable).parent
        for name in ("export_meta.json", "model.onnx", "item_vocab.json"):
            (export_dir / name).chmod(0)
            for command in (
                [str(scripts / "seqrec-recommend"), str(export_dir), "1001"],
                [str(scripts / "seqrec-serve"), str(export_dir), "--port", "0"],
            ):
                proc = subprocess.run(
                    _as_unprivileged_user(command), capture_output=True, text=True, timeout=120
                )
                assert proc.returncode == 2, proc.stderr
                assert f"error: [Errno 13] Permission denied: '{export_dir / name}'" in proc.stderr
                assert "Traceback" not in proc.stderr
            (export_dir / name).chmod(0o644)


def test_vocabulary_ids_and_file_kinds_are_checked(exported: TinyExport, tmp_path: Path) -> None:
    """item_vocab.json ids that are not non-empty strings or integers were loaded as "None",
    "1.5", "" ...; a JSON integer of more than 4,300 digits gave Python's message without the
    file; a directory, a FIFO or a symlink loop in place of a file were all "missing"."""
    vocab = json.loads((exported.export_dir / "item_vocab.json").read_text())
    for position, bad in ((3, None), (0, ""), (5, 1.5), (2, True), (1, {"a": [1]})):
        directory = _copy_export(exported.export_dir, tmp_path / f"vocab{position}")
        ids = list(vocab["item_ids"])
        ids[position] = bad
        (directory / "item_vocab.json").write_text(json.dumps({**vocab, "item_ids": ids}))
        with pytest.raises(
            ValueError,
            match=rf"item_vocab.json: item_ids\[{position}\] is .*, expected a non-empty",
        ):
            SessionRecommender.from_dir(directory, verify_integrity=False)
    as_list = _copy_export(exported.export_dir, tmp_path / "as_list")  # the ids without the object
    (as_list / "item_vocab.json").write_text(json.dumps(vocab["item_ids"]))
    with pytest.raises(
        ValueError, match=r"item_vocab.json: expected a JSON object with pad_idx and item_ids, got "
        r"list \['1001'"
    ):  # fmt: skip
        SessionRecommender.from_dir(as_list, verify_integrity=False)
    # a repeated id is named with both positions; the int 1001 and the string "1001" are one id
    repeated = _copy_export(exported.export_dir, tmp_path / "repeated")
    ids = vocab["item_ids"]
    for repeat, where in (
        ([*ids[:4], ids[1], *ids[5:]], r"\[1\] and item_ids\[4\]"),
        ([1001, *ids[1:-1], "1001"], r"\[0\] and item_ids\[29\]"),
    ):
        (repeated / "item_vocab.json").write_text(json.dumps({**vocab, "item_ids": repeat}))
        with pytest.raises(
            ValueError, match=rf"item_vocab.json: duplicate item id '\d+' at item_ids{where}"
        ):
            SessionRecommender.from_dir(repeated, verify_integrity=False)
    pad_false = _copy_export(exported.export_dir, tmp_path / "pad_false")
    (pad_false / "item_vocab.json").write_text(json.dumps({**vocab, "pad_idx": False}))
    with pytest.raises(ValueError, match=r"item_vocab.json: pad_idx is False, expected 0"):
        SessionRecommender.from_dir(pad_false, verify_integrity=False)
    (pad_false / "item_vocab.json").write_text(json.dumps({**vocab, "pad_idx": 0.0}))
    with pytest.raises(ValueError, match=r"item_vocab.json: pad_idx is 0.0, expected 0"):
        SessionRecommender.from_dir(pad_false, verify_integrity=False)

    huge = _copy_export(exported.export_dir, tmp_path / "huge")
    text = (huge / "export_meta.json").read_text()
    (huge / "export_meta.json").write_text(
        text.replace('"max_len": 12', '"max_len": ' + "9" * 5000)
    )
    with pytest.raises(ValueError, match=r"export_meta.json: not valid JSON \(Exceeds the limit"):
        SessionRecommender.from_dir(huge)

    kinds = _copy_export(exported.export_dir, tmp_path / "kinds")
    (kinds / "model.onnx").unlink()
    (kinds / "model.onnx").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model.onnx is a directory, expected a file"):
        SessionRecommender.from_dir(kinds)
    (kinds / "model.onnx").rmdir()
    os.mkfifo(kinds / "model.onnx")
    with pytest.raises(FileNotFoundError, match=r"model.onnx is not a regular file"):
        SessionRecommender.from_dir(kinds)
    (kinds / "model.onnx").unlink()
    (kinds / "model.onnx").symlink_to(kinds / "model.onnx")  # a loop
    with pytest.raises(FileNotFoundError, match=r"model.onnx is a symbolic link to no regular"):
        SessionRecommender.from_dir(kinds)
    (kinds / "model.onnx").unlink()
    (kinds / "model.onnx").symlink_to("/dev/zero")
    with pytest.raises(FileNotFoundError, match=r"to no regular file \(broken, looping, or to a"):
        SessionRecommender.from_dir(kinds)
    nan = edit_meta(_copy_export(exported.export_dir, tmp_path / "nan"), {})
    text = (nan / "export_meta.json").read_text()
    (nan / "export_meta.json").write_text(text.replace('"pad_idx": 0', '"pad_idx": NaN'))
    with pytest.raises(ValueError, match=r"export_meta.json: not valid JSON \(NaN is not a JSON"):
        SessionRecommender.from_dir(nan)  # it made the service's /readyz answer 500


def test_integer_ids_too_long_for_str_are_named(rec: SessionRecommender) -> None:
    """``str(10**5000)`` raises Python's bare "Exceeds the limit (4300 digits)" ValueError."""
    with pytest.raises(ValueError, match=r"session: the item id at position 1 is an integer of "):
        rec.recommend(["1001", 10**5000])
    with pytest.raises(ValueError, match=r"^deny_items: the item id at position 0"):
        rec.recommend(["1001"], deny_items=[10**5000])
    with pytest.raises(ValueError, match=r"^allow_items: the item id at position 1"):
        rec.recommend(["1001"], allow_items=["1002", 10**5000])


def test_from_dir_checks_that_the_metadata_fits_its_graphs(
    exported: TinyExport, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Metadata that passes the type checks but does not fit the graph fails at load with a
    ValueError (CLI: exit 2), not later as an onnxruntime error (HTTP 500): a max_len above the
    model's context (its position table has MAX_LEN rows), a variant naming other inputs (a
    top-k graph for this plain export). The load check runs quietly: onnxruntime's own coloured
    error line (written to the stderr file descriptor) no longer precedes the message."""

    def damaged(name: str, **changes: object) -> Path:
        return edit_meta(_copy_export(exported.export_dir, tmp_path / name), changes)

    too_long = damaged("too_long", max_len=MAX_LEN * 3)
    with pytest.raises(
        ValueError, match=r"does not fit its graphs: scoring a session of max_len=36"
    ):
        SessionRecommender.from_dir(too_long)
    assert cli_main([str(too_long), "1001"]) == 2
    err = capfd.readouterr().err
    assert "does not fit its graphs" in err and "idx=12 must be within" in err
    assert "[E:onnxruntime" not in err
    meta = json.loads((exported.export_dir / "export_meta.json").read_text())
    other_inputs = damaged("other_inputs", variant={**meta["variant"], "top_k_in_graph": True})
    with pytest.raises(ValueError, match=r"does not fit its graphs: .*Invalid input name: k"):
        SessionRecommender.from_dir(other_inputs)
    deep = _copy_export(exported.export_dir, tmp_path / "deep")
    (deep / "export_meta.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ValueError, match=r"export_meta.json: not valid JSON \(nested too deeply"):
        SessionRecommender.from_dir(deep)
    for step_file in ("/etc/passwd", "../model.onnx", ".."):
        escaped = damaged(
            "escaped" + str(len(step_file)),
            incremental={"step_file": step_file, "step_input_names": []},
        )
        with pytest.raises(ValueError, match=r"incremental.step_file is .*expected the file name"):
            SessionRecommender.from_dir(escaped)
    level = damaged("level", variant={**meta["variant"], "graph_optimization_level": "turbo"})
    with pytest.raises(ValueError, match=r"export_meta.json: variant.graph_optimization_level"):
        SessionRecommender.from_dir(level)
    with pytest.raises(
        ValueError,
        match=r"num_threads=1000000 is more than \d+ \(64, or 8 per core of this machine if that is more\)",
    ):
        SessionRecommender.from_dir(exported.export_dir, num_threads=1_000_000)
    with pytest.raises(ValueError, match=r"graph_optimization_level must be one of .*got ''"):
        SessionRecommender.from_dir(exported.export_dir, graph_optimization_level="")


def test_cli_output_into_a_closed_pipe_is_not_an_error(exported: TinyExport) -> None:
    """``seqrec-recommend ... | head -1``: the reader leaves early; no BrokenPipeError
    traceback (the pipe is closed here before the CLI has loaded the model and printed)."""
    script = Path(sys.executable).parent / "seqrec-recommend"
    proc = subprocess.Popen(
        [str(script), str(exported.export_dir), "1001", "--k", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    # output that cannot be written (a full disk; stdout closed): one line, exit 1
    command = [str(script), str(exported.export_dir), "1001", "--k", "5"]
    with open("/dev/full", "w") as full:
        failed = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True)
    closed = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            pass_fds=(), preexec_fn=lambda: os.close(1))  # fmt: skip
    for result in (failed, closed):
        assert result.returncode == 1, result.stderr
        assert "error: cannot write the recommendations" in result.stderr
        assert "Traceback" not in result.stderr


def test_from_dir_refuses_damaged_files_with_a_value_error(
    exported: TinyExport, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_utf8 = _copy_export(exported.export_dir, tmp_path / "not_utf8")
    (not_utf8 / "export_meta.json").write_bytes(b'{"max_len": "\xff"}')
    with pytest.raises(ValueError, match=r"export_meta.json: not UTF-8 text"):
        SessionRecommender.from_dir(not_utf8)
    # a damaged model whose hash was recorded for it (integrity cannot catch it): onnxruntime's
    # InvalidProtobuf becomes a ValueError naming the file, and the CLI exits 2 with one line
    damaged = _copy_export(exported.export_dir, tmp_path / "damaged")
    model = damaged / "model.onnx"
    model.write_bytes(model.read_bytes()[:200])
    rehash(damaged, "model.onnx")
    with pytest.raises(
        ValueError, match=r"model\.onnx: onnxruntime .* cannot load this model \(InvalidProtobuf"
    ) as error:
        SessionRecommender.from_dir(damaged)
    assert type(error.value) is ValueError
    assert cli_main([str(damaged), "1001"]) == 2
    err = capsys.readouterr().err
    assert "cannot load this model" in err and "Traceback" not in err


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


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--k", "abc"], "argument --k: expected a positive integer, got 'abc'"),
        (["--k", "0"], "argument --k: must be >= 1, got 0"),
        (
            ["--num-threads", "1.5"],
            "argument --num-threads: expected a positive integer, got '1.5'",
        ),
    ],
)
def test_cli_bad_numbers_name_the_value(
    exported: TinyExport, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main([str(exported.export_dir), "1001", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "_positive_int" not in err


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


# ------------------------------------------------------------------------------ hardening


@pytest.fixture(scope="module")
def top_k_dir(tmp_path_factory: pytest.TempPathFactory, exported: TinyExport) -> Path:
    """The same tiny model exported with top-k in the graph (legacy exporter: fast)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delitem(export_mod._EXPORTERS, "dynamo")
        return export_onnx(
            exported.model,
            exported.vocab,
            tmp_path_factory.mktemp("top_k") / "export",
            fallback_items=FALLBACK_ITEMS,
            variant=ExportVariant(top_k_in_graph=True),
        )


@pytest.fixture(scope="module")
def rec_top_k(top_k_dir: Path) -> SessionRecommender:
    return SessionRecommender.from_dir(top_k_dir)


def _random_sessions(count: int, length: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [
        [str(1000 + i) for i in rng.integers(1, NUM_ITEMS + 1, size=length)] for _ in range(count)
    ]


@pytest.mark.parametrize("layout", ["exported", "top_k_dir"])
def test_a_vocabulary_from_another_export_is_named(
    layout: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A vocabulary one item short of the graph (its hash and num_items updated to match) failed
    in the load check with onnxruntime's bare "Got: 30 Expected: 31" (top-k graph) or loaded and
    never recommended the last item (plain graph)."""
    src = request.getfixturevalue(layout)
    src = getattr(src, "export_dir", src)
    short = _copy_export(src, tmp_path / "short")
    vocab = json.loads((short / "item_vocab.json").read_text())
    vocab["item_ids"] = vocab["item_ids"][:-1]
    (short / "item_vocab.json").write_text(json.dumps(vocab))
    edit_meta(rehash(short, "item_vocab.json"), {"num_items": NUM_ITEMS - 1})
    with pytest.raises(
        ValueError,
        match=rf"short/model.onnx scores {NUM_ITEMS} items \(and the padding index 0\), but "
        rf".*short/item_vocab.json lists {NUM_ITEMS - 1}: the two files come from different",
    ):
        SessionRecommender.from_dir(short)


def test_output_name_must_be_the_graphs_first_output(top_k_dir: Path, tmp_path: Path) -> None:
    """output_name naming the graph's second output (top_idx) was accepted."""
    bad = edit_meta(_copy_export(top_k_dir, tmp_path / "bad"), {"output_name": "top_idx"})
    with pytest.raises(
        ValueError,
        match=r"outputs \['top_scores', 'top_idx'\], but .* names "
        r"\['item_ids', 'score_mask', 'k'\] -> 'top_idx'",
    ):
        SessionRecommender.from_dir(bad)


@pytest.mark.parametrize(("batch", "length"), [(1, 1), (1, MAX_LEN), (3, 7), (64, MAX_LEN)])
def test_batch_parity_with_eager_for_both_layouts(
    exported: TinyExport,
    rec: SessionRecommender,
    rec_top_k: SessionRecommender,
    batch: int,
    length: int,
) -> None:
    sessions = _random_sessions(batch, length, seed=batch * 100 + length)
    # the top-k graph ends in Concat(PAD, scores) -> TopK: unfiltered calls send no mask rows
    assert rec_top_k.meta["empty_score_mask"] is True and not rec.meta["empty_score_mask"]
    for recommender in (rec, rec_top_k):
        got = recommender.recommend_batch(sessions, k=10)
        for session, recs in zip(sessions, got, strict=True):
            want_ids, want_scores = _eager_top_k(exported, session, k=10)
            assert _ids(recs) == want_ids
            np.testing.assert_allclose([r.score for r in recs], want_scores, atol=1e-4)


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"exclude_seen": True},
        {"deny_items": ["1003", "1017", "nope"]},
        {"allow_items": ["1002", "1005", "1011", "1029", "unknown"]},
        {"exclude_seen": True, "allow_items": ["1001", "1002", "1030"], "deny_items": ["1030"]},
        {"allow_items": []},
    ],
)
def test_top_k_graph_and_numpy_top_k_agree_under_filters(
    rec: SessionRecommender, rec_top_k: SessionRecommender, filters: dict
) -> None:
    sessions = [*_random_sessions(5, 4, seed=7), [], ["unknown"], ["1001", "1002"]]
    full = rec.recommend_batch(sessions, k=8, **filters)
    in_graph = rec_top_k.recommend_batch(sessions, k=8, **filters)
    for a, b in zip(full, in_graph, strict=True):
        assert _ids(a) == _ids(b)
        np.testing.assert_allclose([r.score for r in a], [r.score for r in b], atol=1e-5)


def test_batch_rows_with_and_without_excluded_slots(
    rec: SessionRecommender, rec_top_k: SessionRecommender
) -> None:
    """k = catalog - 1 with exclude_seen: a session of one distinct item fills all k slots, one
    of three leaves two -inf slots that must not come back; both kinds of row in one batch."""
    sessions = [["1004"], ["1004", "1008", "1012"], ["1009", "1009"]]
    k = NUM_ITEMS - 1
    got = rec_top_k.recommend_batch(sessions, k=k, exclude_seen=True)
    assert [len(recs) for recs in got] == [k, k - 2, k]
    want = rec.recommend_batch(sessions, k=k, exclude_seen=True)  # numpy top-k, row by row
    for a, b, session in zip(got, want, sessions, strict=True):
        assert _ids(a) == _ids(b) and not set(_ids(a)) & set(session)
        assert all(isinstance(r.item_id, str) and r.source == "model" for r in a)
        np.testing.assert_allclose([r.score for r in a], [r.score for r in b], atol=1e-5)


def test_allow_and_deny_lists(rec: SessionRecommender) -> None:
    session = ["1004", "1008"]
    everything = rec.recommend(session, k=NUM_ITEMS)
    denied = rec.recommend(session, k=NUM_ITEMS, deny_items=["1004", 1010, "zzz"])
    assert denied == [r for r in everything if r.item_id not in {"1004", "1010"}]
    allowed = rec.recommend(session, k=NUM_ITEMS, allow_items=["1012", "1004", "1001"])
    assert allowed == [r for r in everything if r.item_id in {"1012", "1004", "1001"}]
    both = rec.recommend(
        session, k=2, exclude_seen=True, allow_items=["1012", "1004", "1001"], deny_items=["1001"]
    )
    assert _ids(both) == ["1012"]
    assert rec.recommend(session, k=5, allow_items=[]) == []
    assert rec.recommend(session, k=5, allow_items=["not-in-catalog"]) == []
    # the fallback obeys the same filters
    assert _ids(rec.recommend([], k=3, deny_items=FALLBACK_ITEMS[:2])) == FALLBACK_ITEMS[2:5]
    assert _ids(rec.recommend(["?"], k=9, allow_items=FALLBACK_ITEMS[3:])) == FALLBACK_ITEMS[3:]
    with pytest.raises(TypeError, match="not a string"):
        rec.recommend(session, k=3, deny_items="1001")  # type: ignore[arg-type]


def test_offline_filters_equal_serving_filters(
    exported: TinyExport, rec: SessionRecommender
) -> None:
    """pipeline.evaluate wraps scorers with filtered_scorer; the predictor masks identically."""
    sessions = _random_sessions(6, 5, seed=11)
    allow, deny = ["1002", "1005", "1007", "1011", "1020", "1021", "1029"], ["1005", "1021"]
    prefixes = [exported.vocab.encode(s) for s in sessions]

    def eager(batch: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return exported.model.score_last(
                torch.from_numpy(encode_prefixes(batch, MAX_LEN))
            ).numpy()

    score = filtered_scorer(eager, True, exported.vocab.encode(allow), exported.vocab.encode(deny))
    offline = score(prefixes)  # (B, C) with -inf for excluded items
    served = rec.recommend_batch(
        sessions, k=NUM_ITEMS, exclude_seen=True, allow_items=allow, deny_items=deny
    )
    for row, recs in enumerate(served):
        keep = np.flatnonzero(np.isfinite(offline[row]))
        order = keep[np.argsort(-offline[row, keep], kind="stable")]
        assert _ids(recs) == exported.vocab.decode(order)


def test_thread_settings_are_visible_on_the_session(exported: TinyExport) -> None:
    default = SessionRecommender.from_dir(exported.export_dir)
    assert default.session_options.intra_op_num_threads == 1
    assert default.session_options.inter_op_num_threads == 1
    two = SessionRecommender.from_dir(
        exported.export_dir, num_threads=2, graph_optimization_level="basic"
    )
    assert two.session_options.intra_op_num_threads == 2
    assert "BASIC" in str(two.session_options.graph_optimization_level)
    with pytest.raises(ValueError, match="num_threads"):
        SessionRecommender.from_dir(exported.export_dir, num_threads=0)


@pytest.mark.parametrize("layout", ["rec", "rec_top_k"])
def test_many_threads_on_one_session_match_sequential(
    request: pytest.FixtureRequest, layout: str
) -> None:
    recommender: SessionRecommender = request.getfixturevalue(layout)
    calls = [
        (session, {"k": 1 + i % 9, "exclude_seen": bool(i % 2), "deny_items": [session[0]]})
        for i, session in enumerate(_random_sessions(60, 1 + MAX_LEN // 2, seed=3))
    ]
    expected = [recommender.recommend(s, **kw) for s, kw in calls]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda call: recommender.recommend(call[0], **call[1]), calls * 3))
    assert got == expected * 3
    batches = [[s for s, _ in calls[i : i + 7]] for i in range(0, len(calls), 7)]
    expected_batches = [recommender.recommend_batch(b, k=5) for b in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got_batches = list(pool.map(lambda b: recommender.recommend_batch(b, k=5), batches))
    assert got_batches == expected_batches


def test_integrity_refuses_a_model_from_another_export(
    exported: TinyExport, tmp_path: Path
) -> None:
    meta = json.loads((exported.export_dir / "export_meta.json").read_text())
    assert meta["sha256"] == {
        "model.onnx": file_sha256(exported.export_dir / "model.onnx"),
        "item_vocab.json": file_sha256(exported.export_dir / "item_vocab.json"),
    }
    assert meta["model_version"] == meta["sha256"]["model.onnx"][:12]
    swapped = _copy_export(exported.export_dir, tmp_path / "swapped")
    other = tiny_model(seed=5)
    with pytest.MonkeyPatch.context() as patch:
        patch.delitem(export_mod._EXPORTERS, "dynamo")
        other_dir = export_onnx(other, exported.vocab, tmp_path / "other")
    (swapped / "model.onnx").write_bytes((other_dir / "model.onnx").read_bytes())
    with pytest.raises(
        ArtifactIntegrityError, match=r"model.onnx has sha256 .* not from the same export"
    ):
        SessionRecommender.from_dir(swapped)

    no_hashes = _copy_export(exported.export_dir, tmp_path / "no_hashes")
    meta = json.loads((no_hashes / "export_meta.json").read_text())
    del meta["sha256"]
    (no_hashes / "export_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactIntegrityError, match="no 'sha256' section"):
        SessionRecommender.from_dir(no_hashes)


def test_cli_reports_integrity_errors(
    exported: TinyExport, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _copy_export(exported.export_dir, tmp_path / "broken")
    tiny_vocab(NUM_ITEMS).save(broken / "item_vocab.json")
    (broken / "item_vocab.json").write_text((broken / "item_vocab.json").read_text() + "\n")
    assert cli_main([str(broken), "1001"]) == 2
    assert "artifact integrity check failed" in capsys.readouterr().err


def test_cli_filters(exported: TinyExport, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(exported.export_dir), "1001", "--k", "3", "--json"]
    assert cli_main([*args, "--allow", "1002", "1003", "1004", "--deny", "1003"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert {r["item_id"] for r in payload["recommendations"]} == {"1002", "1004"}
    # a repeated --deny / --allow adds to the list (it silently replaced the earlier one)
    allow = ["--allow", "1002", "1003", "--allow", "1004"]
    assert cli_main([*args, *allow, "--deny", "1003", "--deny", "1004"]) == 0
    assert [r["item_id"] for r in json.loads(capsys.readouterr().out)["recommendations"]] == [
        "1002"
    ]
    assert payload["num_unknown_filter_items"] == 0
    # unknown filter ids are counted, not silently dropped (table and JSON)
    assert cli_main([*args[:-1], "--allow", "9998", "9999"]) == 0
    table = capsys.readouterr().out
    assert table.rstrip().endswith("(no item left after --allow)")  # the filters given
    assert cli_main([*args[:-1], "--allow", "9998", "9999"]) == 0
    assert (
        "2 --allow/--deny item(s) not in the catalog (ignored; an --allow list of only such ids allows nothing)"
        in (capsys.readouterr().out)
    )
    assert cli_main([*args, "--allow", "9998", "--deny", "1002", "zz"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert (payload["recommendations"], payload["num_unknown_filter_items"]) == ([], 2)
    # before the items, "--" ends the deny-list (documented in --help and the README)
    directory = str(exported.export_dir)
    assert cli_main([directory, "--k", "3", "--json", "--deny", "1002", "--", "1001"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert cli_main([directory, "1001", "--deny", "1002", "--k", "3", "--json"]) == 0
    assert before == json.loads(capsys.readouterr().out) and "1002" not in str(before)
    # an option after "--" would be read as an item: refused, not silently scored as an unknown id
    with pytest.raises(SystemExit) as exited:
        cli_main([directory, "--deny", "1002", "--", "1001", "--k", "3"])
    assert exited.value.code == 2
    assert "'--k' is among the session items: after -- every argument is an item" in (
        capsys.readouterr().err
    )
    # --allow took every id: the message says why no item is left
    with pytest.raises(SystemExit) as exited:
        cli_main([directory, "--allow", "1002", "1001"])
    assert exited.value.code == 2
    assert "required: ITEM (--allow and --deny take every id after them" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        cli_main([directory])
    assert "required: ITEM\n" in capsys.readouterr().err  # no hint without --allow/--deny
    assert (
        payload["model_version"]
        == json.loads((exported.export_dir / "export_meta.json").read_text())["model_version"]
    )


def test_argument_types_are_named(rec: SessionRecommender, exported: TinyExport) -> None:
    with pytest.raises(TypeError, match="exclude_seen must be a bool"):
        rec.recommend(["1001"], exclude_seen="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a session must be a sequence of item ids, got None"):
        rec.recommend(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sessions must be a sequence of sessions, got None"):
        rec.recommend_batch(None)  # type: ignore[arg-type]
    assert rec.recommend(["1001"], exclude_seen=np.bool_(True))
    # ids are strings or integers: a float id (e.g. a pandas column with NaN) is refused, not
    # silently turned into the unknown id "1001.0"
    bad_ids = [(1001.0, "float 1001.0"), (b"1001", "bytes b'1001'"), (None, "NoneType None"),
               (True, "bool True"), (np.float64(1002.0), "float64")]  # fmt: skip
    for bad, named in bad_ids:
        with pytest.raises(TypeError, match=rf"session: .*got {named}.* at position 1"):
            rec.recommend(["1001", bad])  # type: ignore[list-item]
        with pytest.raises(TypeError, match=r"^deny_items: .* at position 0"):
            rec.recommend(["1001"], deny_items=[bad])  # type: ignore[list-item]
        with pytest.raises(TypeError, match=r"^allow_items: .* at position 0"):
            rec.recommend(["1001"], allow_items=[bad])  # type: ignore[list-item]
    # in a batch of several sessions the error also says which session
    with pytest.raises(TypeError, match=r"^sessions\[2\]: session: .*got float 2.0 at position 1"):
        rec.recommend_batch([["1001"], ["1002"], ["1003", 2.0]])
    with pytest.raises(ValueError, match=r"^sessions\[1\]: session: the item id at position 0"):
        rec.recommend_batch([["1001"], [10**5000]])
    for bad_session in (None, 5, "1001", np.array("1001")):  # a whole session of the wrong kind
        with pytest.raises(TypeError, match=r"^sessions\[2\]: a session must be a sequence of"):
            rec.recommend_batch([["1001"], ["1002"], bad_session])  # type: ignore[list-item]
    # a 0-d numpy array has __iter__ but cannot be iterated: named, not numpy's bare message
    with pytest.raises(TypeError, match=r"^a session must be a sequence of item ids, got arr"):
        rec.recommend(np.array(1001))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^allow_items must be a collection of item ids, got a"):
        rec.recommend(["1001"], allow_items=np.array(1002))  # type: ignore[arg-type]
    ok = rec.recommend_with_info([1001, np.int64(1002), np.str_("1003")], k=3)
    assert ok[1].num_known == 3 and ok[1].num_unknown == 0
    # a set or dict has no "oldest first": refused rather than ranked in hash order
    for unordered in ({"1001", "1002"}, {"1001": 1, "1002": 2}):
        with pytest.raises(
            TypeError, match=r"a session must be a sequence of item ids, got .* no order"
        ):
            rec.recommend(unordered)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sessions must be a sequence of sessions"):
        rec.recommend_batch({("1001",)})  # type: ignore[arg-type]
    # generators are read once: the same answers as lists (fallback rows and filters included)
    lists = rec.recommend_batch(
        [["1001", "1002"], ["zz"]], k=3, exclude_seen=True, deny_items=["1003"]
    )
    generated = rec.recommend_batch(
        (iter(s) for s in [["1001", "1002"], ["zz"]]), k=3, exclude_seen=True,
        deny_items=(i for i in ["1003"]),
    )  # fmt: skip
    assert generated == lists
    with pytest.raises(TypeError, match="^deny_items must be a collection of item ids"):
        rec.recommend(["1001"], deny_items=1003)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^allow_items must be a sequence of item ids, not a str"):
        rec.recommend(["1001"], allow_items="1002")
    with pytest.raises(TypeError, match="not a mapping"):  # its keys are not meant as ids
        rec.recommend(["1001"], allow_items={"1002": 1})  # type: ignore[arg-type]
    # a flat list of ids given as a batch: the message says what a batch is, not "no order"
    with pytest.raises(
        TypeError,
        match=r"got 1001 \(a session is a list of ids; recommend_batch takes a list of sessions\)",
    ):
        rec.recommend_batch([1001, 1002])  # type: ignore[list-item]
    for bad_threads in ("2", None, 2.5, True):
        with pytest.raises(ValueError, match="num_threads must be an integer >= 1"):
            SessionRecommender.from_dir(exported.export_dir, num_threads=bad_threads)  # type: ignore[arg-type]
    assert SessionRecommender.from_dir(exported.export_dir, num_threads=np.int64(1))
    # numpy numbers are numbers
    assert SessionRecommender.from_dir(exported.export_dir, state_cache_mb=np.int64(4))


def test_reused_score_mask_carries_nothing_from_one_request_to_the_next(
    rec: SessionRecommender, rec_top_k: SessionRecommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The top-k layout keeps one zero score mask per thread and takes each request's
    exclusions back out: a sequence of different filters and batch sizes in one thread, and a
    request whose graph call fails, leave no -inf behind (checked against the numpy top-k,
    which builds its masks fresh)."""
    rng = np.random.default_rng(5)
    filter_kinds = [
        {"exclude_seen": True},
        {"allow_items": ["1002", "1005", "1011"]},
        {"deny_items": ["1003", "1017"]},
        {"exclude_seen": True, "deny_items": ["1001"]},
        {},
    ]
    for step in range(25):
        sessions = _random_sessions(int(rng.integers(1, 6)), int(rng.integers(1, 8)), seed=step)
        filters = filter_kinds[step % len(filter_kinds)]
        got = rec_top_k.recommend_batch(sessions, k=NUM_ITEMS, **filters)
        want = rec.recommend_batch(sessions, k=NUM_ITEMS, **filters)
        assert [_ids(a) for a in got] == [_ids(b) for b in want], (step, filters)

    def fail(*args: object) -> None:
        raise RuntimeError("graph failed")

    monkeypatch.setattr(rec_top_k, "_run_top_k", fail)
    with pytest.raises(RuntimeError, match="graph failed"):
        rec_top_k.recommend(["1004", "1008"], k=5, allow_items=["1001"])  # excludes all but one
    monkeypatch.undo()
    session = ["1004", "1008"]
    assert _ids(rec_top_k.recommend(session, k=NUM_ITEMS, exclude_seen=True)) == _ids(
        rec.recommend(session, k=NUM_ITEMS, exclude_seen=True)
    )
