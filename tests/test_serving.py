"""HTTP service over a real loopback socket: happy path, filters, validation errors, probes,
metrics, docs, structured logs and the seqrec-serve console script."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import gzip
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from _export_helpers import (
    FALLBACK_ITEMS,
    MAX_LEN,
    NUM_ITEMS,
    TinyExport,
    edit_meta,
    nan_item_rows,
    rehash,
    tiny_export,
)
from _serving_helpers import running_server
from seqrec.predictor import NonFiniteScoresError, SessionRecommender
from seqrec.serving.app import (
    MAX_ID_LENGTH,
    SMALLEST_REQUEST_BODY,
    ServeSettings,
    _DynamicBatcher,
    _FastRecommendations,
    build_parser,
    create_app,
)
from seqrec.serving.logs import JsonFormatter

SETTINGS = ServeSettings(max_k=40, max_session_len=40, max_filter_items=50)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory)


@pytest.fixture(scope="module")
def rec(exported: TinyExport) -> SessionRecommender:
    return SessionRecommender.from_dir(exported.export_dir)


@contextlib.contextmanager
def serving(rec: SessionRecommender, settings: ServeSettings) -> Iterator[httpx.Client]:
    """An HTTP client of the service with ``settings``, running on a loopback socket."""
    with (
        running_server(create_app(rec, settings)) as url,
        httpx.Client(base_url=url, timeout=10.0) as http,
    ):
        yield http


@pytest.fixture(scope="module")
def client(rec: SessionRecommender) -> Iterator[httpx.Client]:
    with serving(rec, SETTINGS) as http:
        yield http


def _ids(payload: dict) -> list[str]:
    return [item["item_id"] for item in payload["items"]]


def test_recommendations_happy_path(client: httpx.Client, rec: SessionRecommender) -> None:
    response = client.post("/recommendations", json={"session": ["1001", 1002], "k": 5})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"]
    payload = response.json()
    assert payload["model_version"] == rec.model_version == rec.meta["model_version"]
    assert (payload["num_known"], payload["num_unknown"], payload["used_fallback"]) == (2, 0, False)
    assert payload["num_unknown_filter_items"] == 0
    want = rec.recommend(["1001", "1002"], k=5)
    assert _ids(payload) == [r.item_id for r in want]
    assert [item["score"] for item in payload["items"]] == pytest.approx([r.score for r in want])
    assert {item["source"] for item in payload["items"]} == {"model"}


Request = tuple[list, int, bool, list | None, list | None]


def _batched(
    rec: SessionRecommender, requests: list[Request], max_batch_size: int = 64
) -> tuple[list, list[int]]:
    """Send ``requests`` (session, k, exclude_seen, allow_items, deny_items) to a
    ``_DynamicBatcher`` all at once; returns each request's outcome (answer or exception) and
    the number of requests of each model call."""
    sizes: list[int] = []
    batcher = _DynamicBatcher(rec, max_batch_size, sizes.append)

    async def send_all() -> list:
        return await asyncio.gather(
            *(batcher.recommend(*request) for request in requests), return_exceptions=True
        )

    try:
        return asyncio.run(send_all()), sizes
    finally:
        batcher.close()


def test_dynamic_batcher_scores_waiting_requests_in_one_call_as_one_at_a_time(
    rec: SessionRecommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions = [["1001"], ["1002", "1003"], ["1004", 1005, "1006"], ["9999"], [], ["1007"] * 3]
    requests: list[Request] = [
        *((s, 5, False, None, None) for s in sessions),
        *((s, 3, True, None, ["1008", "1009"]) for s in sessions),
        *((s, 4, False, ["1001", "1002", "1003", "1010"], None) for s in sessions),
    ]
    calls: list[int] = []  # sessions per predictor call: one call per group of alike filters
    batch = rec.recommend_batch_with_info

    def counted(sessions: list, *args: object) -> list:
        calls.append(len(sessions))
        return batch(sessions, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(rec, "recommend_batch_with_info", counted)
    outcomes, sizes = _batched(rec, requests)
    assert sizes == [18] and calls == [6, 6, 6]
    for (session, k, exclude_seen, allow, deny), (recs, info) in zip(
        requests, outcomes, strict=True
    ):
        want, want_info = rec.recommend_with_info(session, k, exclude_seen, allow, deny)
        assert [r.item_id for r in recs] == [r.item_id for r in want]
        np.testing.assert_allclose([r.score for r in recs], [r.score for r in want], atol=1e-5)
        assert [r.source for r in recs] == [r.source for r in want] and info == want_info
    # max_batch_size bounds each call; requests beyond it go into the next call
    assert _batched(rec, requests[:10], max_batch_size=4)[1] == [4, 4, 2]


def test_dynamic_batcher_answers_each_request_its_own_error(
    rec: SessionRecommender, exported: TinyExport, tmp_path: Path
) -> None:
    """A request the predictor refuses fails alone: its group is scored again one request at
    a time, so batch-mates with the same filters, and other groups, get their answers."""
    outcomes, _ = _batched(
        rec, [(["1001"], 0, False, None, None), (["1002"], 3, False, None, None)]
    )
    assert isinstance(outcomes[0], ValueError) and "k must be an integer >= 1" in str(outcomes[0])
    assert [r.item_id for r in outcomes[1][0]] == [r.item_id for r in rec.recommend(["1002"], 3)]
    # item 1005 scores NaN: only the sessions with it fail, not the healthy one beside them
    damaged = SessionRecommender.from_dir(nan_item_rows(exported.export_dir, tmp_path / "nan", [5]))
    requests: list[Request] = [(s, 3, False, None, None) for s in (["1001"], ["1005"], ["1002"])]
    healthy, nan, other = _batched(damaged, requests)[0]
    assert isinstance(nan, NonFiniteScoresError)
    assert len(healthy[0]) == len(other[0]) == 3


def test_dynamic_batcher_skips_requests_whose_client_left(rec: SessionRecommender) -> None:
    sizes: list[int] = []
    batcher = _DynamicBatcher(rec, 64, sizes.append)

    async def one_leaves() -> list:
        tasks = [
            asyncio.create_task(batcher.recommend([f"100{i}"], 3, False, None, None))
            for i in (1, 2, 3)
        ]
        await asyncio.sleep(0)  # all three wait; the model has not started
        tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        first, left, third = asyncio.run(one_leaves())
    finally:
        batcher.close()
    assert isinstance(left, asyncio.CancelledError) and sizes == [2]
    assert [r.item_id for r in third[0]] == [r.item_id for r in rec.recommend(["1003"], 3)]
    assert len(first[0]) == 3


def test_dynamic_batcher_fails_requests_instead_of_hanging_once_closed(
    rec: SessionRecommender,
) -> None:
    """After close() (the app's shutdown) a request gets an error, not a wait forever."""
    batcher = _DynamicBatcher(rec, 64, lambda size: None)
    batcher.close()

    async def one() -> object:
        return await asyncio.wait_for(batcher.recommend(["1001"], 3, False, None, None), 10)

    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        asyncio.run(one())


def test_service_batches_concurrent_requests_and_reports_batch_sizes(
    rec: SessionRecommender,
) -> None:
    """Concurrent requests over a real socket get the answers of one-at-a-time calls, with
    dynamic batching (the default) and without it (--max-batch-size 1); /metrics counts the
    requests of each model call."""
    bodies = [
        {"session": [str(1000 + (i % 20) + 1), str(1000 + (i * 7 % 20) + 1)], "k": 4}
        for i in range(48)
    ]
    want = [[r.item_id for r in rec.recommend(b["session"], k=4)] for b in bodies]
    for max_batch_size in (64, 1):
        settings = ServeSettings(max_batch_size=max_batch_size)
        with running_server(create_app(rec, settings)) as url:

            async def send_all(url: str = url) -> list[httpx.Response]:
                async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
                    return await asyncio.gather(
                        *(http.post("/recommendations", json=body) for body in bodies)
                    )

            replies = asyncio.run(send_all())
            metrics = httpx.get(f"{url}/metrics").text
            ready = httpx.get(f"{url}/readyz").json()
        assert [_ids(r.json()) for r in replies] == want
        assert ready["settings"]["max_batch_size"] == max_batch_size
        count = _sample(metrics, "seqrec_model_batch_size_count")
        total = _sample(metrics, "seqrec_model_batch_size_sum")
        if max_batch_size == 1:  # no model thread, no batches
            assert count == total == 0
        else:
            assert total == len(bodies) and 1 <= count <= len(bodies)


def _sample(metrics_text: str, name: str) -> float:
    """The value of the unlabelled sample ``name`` in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    values = [
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == name
    ]
    assert len(values) == 1, (name, values)
    return values[0]


def test_a_model_that_scores_nan_gets_a_json_500_not_nan(
    exported: TinyExport, tmp_path: Path
) -> None:
    """A model whose item 1005 has NaN weights (it passes the load check, which scores another
    item): its sessions got 200 with "score": NaN, which JSON parsers refuse. Now they get a
    JSON 500 that says why, counted in the metrics; other sessions are served."""
    damaged = SessionRecommender.from_dir(nan_item_rows(exported.export_dir, tmp_path / "nan", [5]))
    with serving(damaged, SETTINGS) as http:
        ok = http.post("/recommendations", json={"session": ["1001"], "k": 3})
        assert ok.status_code == 200 and len(ok.json()["items"]) == 3
        response = http.post("/recommendations", json={"session": ["1001", "1005"], "k": 3})
        assert response.status_code == 500
        body = json.loads(
            response.text, parse_constant=lambda name: pytest.fail(f"not JSON: {name}")
        )
        (error,) = body["detail"]
        assert error["type"] == "non_finite_scores" and error["field"] == "model"
        assert "returned NaN or infinite scores" in error["message"]
        metrics = http.get("/metrics").text
        assert (
            'seqrec_http_requests_total{method="POST",path="/recommendations",status="500"} 1.0'
            in metrics
        )
        # the fast path answered the error with the app's handler: each request scored once
        # (it once replayed a failed request to FastAPI's route, which scored it again)
        assert "seqrec_model_batch_size_count 2.0" in metrics


def test_a_catalog_id_with_a_lone_surrogate_is_answered_escaped(
    exported: TinyExport, tmp_path: Path
) -> None:
    """JSON allows an id such as "\\ud800" (a lone UTF-16 surrogate), and the predictor serves
    it; pydantic-core's encoder refuses such a string, so the answer is then encoded by
    json.dumps (escaped) instead of failing with a plain-text 500, on both paths; /catalog
    too."""
    odd = tmp_path / "odd"
    shutil.copytree(exported.export_dir, odd)
    vocab = json.loads((odd / "item_vocab.json").read_text())
    vocab["item_ids"] = ["\ud800" if i == "1002" else i for i in vocab["item_ids"]]
    (odd / "item_vocab.json").write_text(json.dumps(vocab))
    meta = json.loads((odd / "export_meta.json").read_text())
    fallback = ["\ud800" if i == "1002" else i for i in meta["fallback_items"]]
    edit_meta(rehash(odd, "item_vocab.json"), {"fallback_items": fallback})
    rec = SessionRecommender.from_dir(odd)
    with serving(rec, SETTINGS) as http:
        answers = [
            http.post(
                "/recommendations",
                content=b'{"session": [], "k": 40}',
                headers={"content-type": media},
            )
            for media in ("application/json", "application/json; charset=utf-8")
        ]
        catalog = http.get("/catalog", params={"limit": 40})
    assert answers[0].status_code == answers[1].status_code == 200
    assert answers[0].content == answers[1].content
    assert "\ud800" in _ids(answers[0].json())
    # the widget's product grid too (FastAPI's JSONResponse answered 500)
    assert catalog.status_code == 200 and "\ud800" in catalog.json()["items"]


def test_filters_and_fallback(client: httpx.Client) -> None:
    session = ["1004", "1008"]
    body = {"session": session, "k": NUM_ITEMS, "exclude_seen": True, "deny_items": ["1010"]}
    payload = client.post("/recommendations", json=body).json()
    assert not {*session, "1010"} & set(_ids(payload))
    assert len(payload["items"]) == NUM_ITEMS - 3

    allow = ["1003", "1020", "1021", "9999"]
    payload = client.post(
        "/recommendations", json={"session": session, "k": 10, "allow_items": allow}
    ).json()
    assert set(_ids(payload)) == {"1003", "1020", "1021"}
    assert payload["num_unknown_filter_items"] == 1  # "9999" is not in the catalog
    # an allow-list of only unknown ids leaves nothing, and the reply says why
    payload = client.post(
        "/recommendations",
        json={"session": session, "k": 3, "allow_items": ["9998", "9999"], "deny_items": ["x"]},
    ).json()
    assert (payload["items"], payload["num_unknown_filter_items"]) == ([], 3)

    payload = client.post("/recommendations", json={"session": ["nope"], "k": 3}).json()
    assert payload["used_fallback"] is True
    assert _ids(payload) == FALLBACK_ITEMS[:3]
    assert {item["source"] for item in payload["items"]} == {"fallback"}
    payload = client.post(
        "/recommendations", json={"session": [], "k": 3, "deny_items": [FALLBACK_ITEMS[0]]}
    ).json()
    assert _ids(payload) == FALLBACK_ITEMS[1:4]


def test_long_session_keeps_most_recent_items(
    client: httpx.Client, rec: SessionRecommender
) -> None:
    session = [str(1000 + (i % NUM_ITEMS) + 1) for i in range(3 * MAX_LEN)]
    payload = client.post("/recommendations", json={"session": session, "k": 5}).json()
    assert _ids(payload) == [r.item_id for r in rec.recommend(session[-MAX_LEN:], k=5)]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"session": ["1001"], "k": None}, "body.k", "valid integer"),
        ({"session": ["1001"], "k": ""}, "body.k", "valid integer"),
        ({"session": ["1001"], "k": "5"}, "body.k", "valid integer"),
        ({"session": ["1001"], "k": 0}, "body.k", "greater than or equal to 1"),
        ({"session": ["1001"], "k": 41}, "body.k", "less than or equal to 40"),
        ({"session": "1001 1002"}, "body.session", "valid list"),
        ({"session": [1.5]}, "body.session.0", "strings of 1 to 64 characters or integers"),
        ({"session": [True]}, "body.session.0", "strings of 1 to 64 characters or integers"),
        ({"session": [""]}, "body.session.0", "strings of 1 to 64 characters or integers"),
        ({"session": ["1001"] * 41}, "body.session", "at most 40 items"),
        ({"k": 3}, "body.session", "Field required"),
        ({"session": [], "exclude_seen": "yes"}, "body.exclude_seen", "valid boolean"),
        ({"session": [], "deny_items": ["1"] * 51}, "body.deny_items", "at most 50 items"),
        ({"session": [], "colour": "red"}, "body.colour", "Extra inputs are not permitted"),
    ],
)
def test_validation_errors_are_clear_422s(
    client: httpx.Client, body: dict, field: str, message: str
) -> None:
    response = client.post("/recommendations", json=body)
    assert response.status_code == 422, response.text
    payload = response.json()
    assert payload["error"] == "invalid request"
    (error,) = [e for e in payload["detail"] if e["field"] == field]
    assert message in error["message"]


def test_lone_surrogate_in_a_key_gets_a_message_that_says_so(client: httpx.Client) -> None:
    body = b'{"session": [], "\\ud800": 1}'
    response = client.post(
        "/recommendations", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["field"] == "body" and error["type"] == "string_unicode"
    assert "lone UTF-16 surrogate" in error["message"]


@pytest.mark.parametrize("session", ['["\\ud800"]', '["1001", "a\\udfffb"]', '["\\ud800", 7]'])
def test_lone_surrogate_item_id_gets_its_own_422(client: httpx.Client, session: str) -> None:
    # valid JSON (an escape), but not Unicode text: the message must say so, not "must be a
    # string or integer"
    body = f'{{"session": {session}}}'.encode()
    response = client.post(
        "/recommendations", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    (error,) = [e for e in detail if e["type"] == "item_id_unicode"]
    assert error["field"] == f"body.session.{0 if 'ud800' in session else 1}"
    assert "lone UTF-16 surrogate" in error["message"]
    assert all(e["type"] != "item_id" for e in detail)


def test_malformed_json_and_wrong_method(client: httpx.Client) -> None:
    response = client.post(
        "/recommendations", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    (error,) = response.json()["detail"]
    assert error["field"] == "body" and error["type"] == "json_invalid"
    assert "not valid JSON" in error["message"] and "at character 1" in error["message"]
    wrong_method = client.get("/recommendations")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json() == {
        "error": "method not allowed",
        "detail": [
            {
                "field": "method",
                "message": "Method Not Allowed: GET /recommendations",
                "type": "method_not_allowed",
            }
        ],
    }
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "not found"
    assert missing.json()["detail"][0]["message"] == "Not Found: GET /nope"


@pytest.mark.parametrize(
    ("content", "headers", "status", "error_type", "message"),
    [
        (b'{"session": ["1001"]}', {}, 415, "content_type", "no Content-Type"),
        (b'{"session": ["1001"]}', {"content-type": "text/plain"}, 415, "content_type", "text/plain"),
        (b'{"session": ["\xff\xfe"]}', {"content-type": "application/json"}, 400,
         "body_unreadable", "the body is not UTF-8 text (byte 0xff at offset 14)"),
        ('{"session": ["café"]}'.encode("latin-1"), {"content-type": "application/json"}, 400,
         "body_unreadable", "the body is not UTF-8 text (byte 0xe9 at offset 17); send JSON "
         "encoded as UTF-8"),
        (b"[" * 100_000, {"content-type": "application/json"}, 400, "body_unreadable",
         "the body could not be parsed as JSON text: it is nested too deeply"),
        (b'{"session": [' + b"9" * 5_000 + b"]}", {"content-type": "application/json"}, 400,
         "body_unreadable", "could not be parsed as JSON text: an integer has 5,000 digits; item "
         "ids and k have at most 64"),
        (b'{"session": [-' + b"9" * 65 + b"]}", {"content-type": "application/json"}, 400,
         "body_unreadable", "an integer has 65 digits"),
        (b"", {"content-type": "application/json"}, 400, "body_missing",
         'the request has no body; send a JSON object such as {"session": []}'),
        (b"", {}, 400, "body_missing", "the request has no body"),  # a bare POST
        (b"", {"content-type": "text/plain"}, 415, "content_type", "text/plain"),
        (b'{"session": ["abc', {"content-type": "application/json"}, 400, "json_invalid",
         "the body is not valid JSON: Unterminated string starting at character 13"),
        (b'{"session": ["a\nb"]}', {"content-type": "application/json"}, 400, "json_invalid",
         "the body is not valid JSON: Invalid control character at character 15"),
        (gzip.compress(b'{"session": ["1001"]}'),
         {"content-type": "application/json", "content-encoding": "gzip"}, 415,
         "content_encoding", "Content-Encoding 'gzip', which this service does not decode"),
        (b'{"session": 5}', {"content-type": "application/json", "content-encoding": "br"}, 415,
         "content_encoding", "send the JSON body uncompressed"),
        (b'{"session": []}', {"content-type": "application/json", "content-encoding": "gzip"},
         415, "content_encoding", "Content-Encoding 'gzip'"),  # even when it reads as JSON
        (b'{"session": []}', [("content-type", "application/json"),
                              ("content-encoding", "gzip"), ("content-encoding", "identity")],
         415, "content_encoding", "Content-Encoding 'gzip, identity'"),  # a later one won't undo
    ],
    ids=["no-content-type", "text-plain", "not-utf8", "latin-1", "nested-too-deeply", "huge-integer", "integer-of-65-digits",
         "empty", "bare-post", "empty-text-plain", "unterminated-string", "control-character", "gzip", "brotli-invalid-body",
         "gzip-header-plain-body", "gzip-then-identity"],
)  # fmt: skip
def test_bodies_that_are_not_json_get_clear_errors(
    client: httpx.Client,
    content: bytes,
    headers: dict | list,
    status: int,
    error_type: str,
    message: str,
) -> None:
    response = client.post("/recommendations", content=content, headers=headers)
    assert response.status_code == status, response.text
    (error,) = response.json()["detail"]
    assert error["field"] == "body" and error["type"] == error_type
    assert message in error["message"]
    # a JSON media type with parameters, or a +json type, is JSON
    for media_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        ok = client.post(
            "/recommendations",
            content=b'{"session": ["1001"]}',
            headers={"content-type": media_type},
        )
        assert ok.status_code == 200, ok.text


def test_health_readiness_docs(client: httpx.Client, rec: SessionRecommender) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    for probe in ("/healthz", "/readyz"):  # load balancers may probe with HEAD
        head = client.head(probe)
        assert head.status_code == 200 and head.content == b""
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert ready.json()["model_version"] == rec.model_version
    assert ready.json()["settings"]["num_threads"] == 1
    schema = client.get("/openapi.json").json()
    assert "/recommendations" in schema["paths"]
    # one operationId per operation (OpenAPI requires them unique; GET and HEAD of /healthz
    # and /readyz shared one)
    ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)), sorted(ids)
    assert set(schema["paths"]["/healthz"]) == set(schema["paths"]["/readyz"]) == {"get"}
    for probe in ("/healthz", "/readyz"):  # one route serves both methods: a 405 names both
        refused = client.post(probe)
        assert refused.status_code == 405
        assert sorted(refused.headers["allow"].split(", ")) == ["GET", "HEAD"]
    request_schema = schema["components"]["schemas"]["RecommendationRequest"]
    assert request_schema["properties"]["k"]["maximum"] == 40
    assert client.get("/docs").status_code == 200
    widget = client.get("/widget/")
    assert widget.status_code == 200 and "You may also like" in widget.text
    script = client.get("/widget/widget.js").text  # the widget drops ids the API refuses
    assert f"const MAX_ID_LENGTH = {MAX_ID_LENGTH};" in script
    assert client.get("/", follow_redirects=False).headers["location"] == "/widget/"
    catalog = client.get("/catalog", params={"limit": 7}).json()
    assert catalog["items"][:5] == FALLBACK_ITEMS and len(catalog["items"]) == 7
    assert client.get("/limits").json() == {
        "max_k": 40,
        "default_k": 10,
        "max_session_len": 40,
        "max_filter_items": 50,
        "model_version": rec.model_version,
    }


def test_prometheus_metrics(client: httpx.Client) -> None:
    for _ in range(3):
        client.post("/recommendations", json={"session": ["1001"], "k": 2})
    client.post("/recommendations", json={"session": ["1001"], "k": 0})
    text = client.get("/metrics").text
    lines = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line[:1] != "#"
    }
    ok = 'seqrec_http_requests_total{method="POST",path="/recommendations",status="200"}'
    bad = 'seqrec_http_requests_total{method="POST",path="/recommendations",status="422"}'
    assert lines[ok] >= 3 and lines[bad] >= 1
    count = 'seqrec_http_request_duration_seconds_count{method="POST",path="/recommendations"}'
    assert lines[count] >= 4
    assert 'seqrec_http_request_duration_seconds_bucket{le="0.02",method="POST"' in text


def test_metrics_label_docs_and_widget_by_route(client: httpx.Client) -> None:
    """Routes FastAPI does not label itself (docs, the mounted widget) get their path template;
    unknown paths share one label, so scanners cannot blow up the metric's label set."""
    assert client.get("/docs").status_code == 200
    assert client.get("/widget/").status_code == 200
    assert client.get("/widget/widget.js").status_code == 200
    redirect = client.get("/widget", follow_redirects=False)  # the router adds the slash
    assert (redirect.status_code, redirect.headers["location"].endswith("/widget/")) == (307, True)
    for path in ("/nope-1", "/nope-2"):
        assert client.get(path).status_code == 404
    labels = {
        line.split("{")[1].split("}")[0]
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("seqrec_http_requests_total{")
    }
    assert 'method="GET",path="/docs",status="200"' in labels
    assert 'method="GET",path="/widget",status="200"' in labels
    assert 'method="GET",path="/widget",status="307"' in labels
    unmatched = [label for label in labels if 'path="unmatched"' in label]
    assert unmatched == ['method="GET",path="unmatched",status="404"']


def test_request_log_lines_are_json(client: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="seqrec.serving"):
        client.post(
            "/recommendations", json={"session": [], "k": 1}, headers={"X-Request-ID": "abc123"}
        )
        # the server logs a request once its response is sent (the latency covers the whole
        # response), so the line can come a moment after the client has the reply: wait for it
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            getattr(r, "request_id", None) == "abc123" for r in caplog.records
        ):
            time.sleep(0.01)
    (record,) = [r for r in caplog.records if getattr(r, "request_id", None) == "abc123"]
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "request"
    assert (line["method"], line["route"], line["status"]) == ("POST", "/recommendations", 200)
    assert line["latency_ms"] > 0 and line["level"] == "INFO" and "ts" in line
    # uvicorn passes an ANSI-coloured copy of its messages; JSON lines leave it out
    uvicorn_record = logging.makeLogRecord(
        {"name": "uvicorn.error", "msg": "Started", "color_message": "\x1b[32mStarted\x1b[0m"}
    )
    assert json.loads(JsonFormatter().format(uvicorn_record)).keys() == {
        "ts", "level", "logger", "message"
    }  # fmt: skip


def test_json_logs_are_written_by_a_listener_thread_and_drained_at_exit() -> None:
    """After log_from_a_thread (seqrec-serve calls it when it starts serving) records are
    queued to a listener thread, which builds the JSON and writes it; the lines still queued
    when the process exits are written (3,000 records logged
    as fast as possible, then exit at once). The threads that formatted them are printed at
    the very end (an exit handler registered before seqrec's runs after it)."""
    code = (
        "import atexit, threading; formatted = set(); "
        "atexit.register(lambda: print(sorted(formatted))); "
        "import logging; from seqrec.serving import logs; "
        "logs.configure_json_logging('INFO'); logs.log_from_a_thread(); "
        "fmt = logs.JsonFormatter.format; "
        "logs.JsonFormatter.format = lambda self, r: "
        "(formatted.add(threading.current_thread().name), fmt(self, r))[1]; "
        "log = logging.getLogger('seqrec.test'); "
        "[log.info('line', extra={'n': n}) for n in range(3000)]"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert [json.loads(line)["n"] for line in proc.stderr.splitlines()] == list(range(3000))
    names = ast.literal_eval(proc.stdout.strip())
    assert names and "MainThread" not in names  # the listener's thread formatted every line
    # once the thread is stopped (the service's lifespan ends), records are written directly
    code = (
        "import logging; from seqrec.serving import logs; logs.configure_json_logging('INFO'); "
        "logs.log_from_a_thread(); log = logging.getLogger('seqrec.test'); log.info('queued'); "
        "logs.stop_log_thread(); log.info('after')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert [json.loads(line)["message"] for line in proc.stderr.splitlines()] == ["queued", "after"]


def test_concurrent_requests_match_sequential(client: httpx.Client) -> None:
    from concurrent.futures import ThreadPoolExecutor

    bodies = [
        {"session": [str(1001 + i % NUM_ITEMS), str(1001 + (i * 7) % NUM_ITEMS)], "k": 4}
        for i in range(24)
    ]
    expected = [client.post("/recommendations", json=b).json()["items"] for b in bodies]
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(
            pool.map(lambda b: client.post("/recommendations", json=b).json()["items"], bodies)
        )
    assert got == expected


def _serve_script() -> str:
    """Path of the ``seqrec-serve`` console script of this environment."""
    return shutil.which("seqrec-serve") or str(Path(sys.executable).parent / "seqrec-serve")


def _serve_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``seqrec-serve ARGS`` to completion (for the runs that refuse to start)."""
    return subprocess.run([_serve_script(), *args], capture_output=True, text=True, timeout=timeout)


def _start_serve(
    args: list[str], preexec_fn: Callable[[], object] | None = None
) -> tuple[subprocess.Popen, int]:
    """Start ``seqrec-serve ARGS --port P`` on a free loopback port; wait until /readyz is 200.
    ``preexec_fn`` runs in the child before the script starts (e.g. to ignore a signal)."""
    import socket

    script = _serve_script()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [script, *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=preexec_fn,
    )
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)


@pytest.mark.slow
def test_integers_of_64_digits_are_ids_and_bodies_of_long_integers_are_cheap(
    client: httpx.Client,
) -> None:
    """Integer ids are bounded like string ids (64): Python converts up to 4,300 digits in
    quadratic time, and a body of 1,800 such ids held the event loop for over a second before
    validation refused it. The body is now refused at its first long integer (400)."""
    for session in ([int("9" * 64)], [-int("9" * 64)]):
        ok = client.post("/recommendations", json={"session": session, "k": 2})
        assert ok.status_code == 200 and ok.json()["num_unknown"] == 1
    body = b'{"session": [], "deny_items": [' + b",".join([b"9" * 4_299] * 100) + b"]}"
    refused = client.post(
        "/recommendations", content=body, headers={"content-type": "application/json"}
    )
    assert refused.status_code == 400
    assert "an integer has 4,299 digits" in refused.json()["detail"][0]["message"]


def test_console_script_refuses_a_damaged_model_or_unnameable_ids_in_one_line(
    exported: TinyExport, tmp_path: Path
) -> None:
    """A model scoring NaN for a popular item passes from_dir's check (it scores another
    item) but failed the service's warm-up with a traceback (exit 1); catalog ids longer than a
    request may name would give items the widget cannot send back (422)."""
    damaged = nan_item_rows(exported.export_dir, tmp_path / "nan", [3])  # item 1003: fallback
    proc = _serve_cli(str(damaged), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "returned NaN or infinite scores" in proc.stderr and "Traceback" not in proc.stderr

    long_ids = tmp_path / "long_ids"
    shutil.copytree(exported.export_dir, long_ids)
    vocab = json.loads((long_ids / "item_vocab.json").read_text())
    vocab["item_ids"][7] = "x" * 65
    (long_ids / "item_vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=r"1 catalog item id\(s\) are longer than 64 characters"):
        create_app(SessionRecommender.from_dir(long_ids, verify_integrity=False))
    rehash(long_ids, "item_vocab.json")
    proc = _serve_cli(str(long_ids), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"error: {long_ids / 'item_vocab.json'}: 1 catalog item id(s) are longer than 64 "
        f"characters, which requests cannot name (e.g. an id of 65 characters starting "
        f"'{'x' * 64}')"
    )
    # an unknown --host, an address of another machine, a port in use: named in one line before
    # the model loads (uvicorn logged "Name or service not known" or "[Errno 99] ..." in JSON
    # after loading it, and exited 3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        for host, port, reason in [
            ("999.1.1.1", 8000, "Name or service not known"),
            ("192.0.2.1", 8000, "Cannot assign requested address"),
            ("127.0.0.1", busy_port, "Address already in use"),
        ]:
            proc = _serve_cli(str(exported.export_dir), "--host", host, "--port", str(port))
            assert proc.returncode == 2
            prefix = f"error: cannot listen on --host {host!r} --port {port}: "
            assert proc.stderr.startswith(prefix) and proc.stderr.count("\n") == 1, proc.stderr
            assert reason in proc.stderr and "loaded" not in proc.stderr, proc.stderr


def test_console_script_serves_and_refuses_bad_dirs(exported: TinyExport, tmp_path: Path) -> None:
    bad = _serve_cli(str(tmp_path / "missing"))
    assert bad.returncode == 2 and "export directory not found" in bad.stderr
    empty = _serve_cli("")  # said "missing export file: export_meta.json" (the working directory)
    assert empty.returncode == 2 and "error: export directory not given" in empty.stderr

    # a --max-k below the default k (10) lowers the default instead of refusing to start
    proc, port = _start_serve([str(exported.export_dir), "--num-threads", "1", "--max-k", "3"])
    try:
        url = f"http://127.0.0.1:{port}/recommendations"
        response = httpx.post(url, json={"session": ["1001"], "k": 2})
        assert response.status_code == 200 and len(response.json()["items"]) == 2
        assert len(httpx.post(url, json={"session": ["1001"]}).json()["items"]) == 3
        assert httpx.post(url, json={"session": ["1001"], "k": 4}).status_code == 422
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    log_lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(line.get("route") == "/recommendations" for line in log_lines)
    assert any(line["message"] == "serving" for line in log_lines)
    # the startup objects (modules, routes, the catalog) are frozen before serving
    (frozen,) = [line for line in log_lines if line["message"] == "froze startup objects"]
    assert frozen["gc_frozen_objects"] > 10_000


@pytest.mark.parametrize(
    ("sig", "ignored_at_start"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["sigterm", "sigint-as-background-job"],
)
def test_console_script_stops_on_the_first_signal_right_after_readiness(
    exported: TinyExport, sig: signal.Signals, ignored_at_start: bool
) -> None:
    """One SIGTERM (what process managers send) or SIGINT stops the server with exit 0, even
    sent the moment /readyz first answers 200 and even when the process started with SIGINT
    ignored, as a non-interactive shell starts its background jobs (Python then installs no
    KeyboardInterrupt handler; uvicorn's own handler must still take the signal). A review
    once saw a first SIGINT go unanswered in that setting; not reproduced since."""
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored_at_start else None
    proc, _port = _start_serve([str(exported.export_dir), "--no-request-logs"], ignore)
    proc.send_signal(sig)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still serving 30 s after one {sig.name}") from None
    assert proc.returncode == 0, stderr[-2000:]
    messages = [json.loads(x)["message"] for x in stderr.splitlines() if x.startswith("{")]
    assert "Shutting down" in messages and messages[-1].startswith("Finished server process")


def test_a_client_stalled_mid_body_holds_the_shutdown_only_for_the_graceful_bound(
    exported: TinyExport,
) -> None:
    """A client that sent half its body kept a SIGTERM'd server waiting until its 408 at the
    body timeout (30 s by default, a Kubernetes pod's whole grace period). With
    ``--graceful-shutdown-s 1`` the server stops waiting after 1 s, while the body timeout
    (120 s here) has not come: the client gets the service's JSON 503 (uvicorn's cancellation
    gave a plain-text 500, logged as an exception and counted as a server error), the request
    is logged with 503, and the server exits 0."""
    import socket

    proc, port = _start_serve(
        [str(exported.export_dir), "--body-timeout-s", "120", "--graceful-shutdown-s", "1"]
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as stalled:
        stalled.sendall(
            b"POST /recommendations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"session": ['
        )
        time.sleep(0.5)  # the server is now reading this body
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("a stalled client still held the shutdown after 60 s") from None
        answer = b""
        while chunk := stalled.recv(65536):
            answer += chunk
    assert proc.returncode == 0, stderr[-2000:]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer[:300]
    assert b"connection: close" in head.lower()
    detail = json.loads(body)["detail"][0]
    assert detail["type"] == "shutting_down" and "13 bytes arrived" in detail["message"]
    lines = [json.loads(x) for x in stderr.splitlines() if x.startswith("{")]
    messages = [line["message"] for line in lines]
    assert messages[-1].startswith("Finished server process"), messages[-5:]
    assert not any("Exception in ASGI application" in m for m in messages)
    logged = [line for line in lines if line["message"] == "request" and line["method"] == "POST"]
    assert [(line["status"], line["route"]) for line in logged] == [(503, "/recommendations")]


def test_freezing_startup_objects_empties_the_full_collections_work() -> None:
    """After ``freeze_startup_objects`` a full collection walks none of the objects made while
    loading (gc.get_objects lists what collections walk; frozen objects are not in it). Run in a
    subprocess: freezing pytest's own objects would keep their garbage cycles for the session."""
    code = (
        "import gc, json, seqrec.serving.app as app; "
        "before = len(gc.get_objects()); frozen = app.freeze_startup_objects(); "
        "print(json.dumps([before, frozen, gc.get_freeze_count(), len(gc.get_objects())]))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    before, frozen, count, after = json.loads(out.stdout.splitlines()[-1])
    assert before > 10_000 and frozen == count >= before - 1_000
    assert after < 100


def test_serving_processes_with_a_model_thread_switch_the_gil_every_millisecond() -> None:
    """Dynamic batching runs a model thread beside the event loop: seqrec-serve's processes
    shorten the GIL switch interval (5 ms by default), the per-request path keeps it. Run in a
    subprocess: the setting is process-wide."""
    code = (
        "import json, sys, seqrec.serving.app as app; before = sys.getswitchinterval(); "
        "app.share_the_gil_often(app.ServeSettings(max_batch_size=1)); "
        "alone = sys.getswitchinterval(); app.share_the_gil_often(app.ServeSettings()); "
        "print(json.dumps([before, alone, sys.getswitchinterval()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    before, alone, batching = json.loads(out.stdout.splitlines()[-1])
    assert before == alone == pytest.approx(0.005) and batching == pytest.approx(0.001)


def test_service_module_loads_no_torch() -> None:
    code = (
        "import sys, seqrec.serving.app; "
        "bad = [m for m in ('torch', 'pandas', 'lightning', 'pytorch_lightning', 'hydra') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_console_script_with_two_workers(exported: TinyExport, tmp_path: Path) -> None:
    bad = _serve_cli(str(exported.export_dir), "--workers", "0")
    assert bad.returncode == 2 and "--workers must be in 1.." in bad.stderr
    # a huge count started worker processes without end; refused before any starts
    huge = _serve_cli(str(exported.export_dir), "--workers", "99999999999999999999")
    assert huge.returncode == 2 and "--workers must be in 1.." in huge.stderr

    proc, port = _start_serve([str(exported.export_dir), "--workers", "2"])
    try:
        want = SessionRecommender.from_dir(exported.export_dir).recommend(["1001", "1002"], k=3)
        for _ in range(8):  # new connections: spread over both workers
            reply = httpx.post(
                f"http://127.0.0.1:{port}/recommendations",
                json={"session": ["1001", "1002"], "k": 3},
            )
            assert reply.status_code == 200
            assert [i["item_id"] for i in reply.json()["items"]] == [r.item_id for r in want]
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    loads = [
        line
        for line in (json.loads(x) for x in stderr.splitlines() if x.startswith("{"))
        if line["message"].startswith("loaded ")
    ]
    assert len(loads) == 3  # the main process checks the export, then each worker loads it
    frozen = [json.loads(x) for x in stderr.splitlines() if '"froze startup objects"' in x]
    # in each worker (the main process does not serve), each line naming its process
    assert len({line["pid"] for line in frozen}) == 2 and proc.pid not in {
        line["pid"] for line in frozen
    }
    # each worker's last lines, queued by its log thread, are written before uvicorn ends the
    # worker with the signal it raises again (no exit handlers run there)
    messages = [json.loads(x)["message"] for x in stderr.splitlines() if x.startswith("{")]
    for pid in {line["pid"] for line in frozen}:
        assert f"Finished server process [{pid}]" in messages, messages[-12:]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_k": 0}, "default_k"),
        ({"max_k": 5}, "default_k"),
        ({"max_session_len": 0}, "max_session_len"),
        ({"max_filter_items": -1}, "max_filter_items"),
        ({"num_threads": 0}, "num_threads"),
        ({"max_body_bytes": 13}, "max_body_bytes must be >= 14"),
        ({"body_timeout_s": 0}, "body_timeout_s must be a finite number of seconds > 0, got 0"),
        ({"cors_origins": ("http://localhost:8080/",)}, "'http://localhost:8080/' can never match"),
        ({"cors_origins": ("localhost:9999",)}, "'localhost:9999' can never match"),
        # browsers leave out the default port and write the host in lower case
        ({"cors_origins": ("https://shop.example:443",)}, "not the default one"),
        ({"cors_origins": ("http://shop.example:80",)}, "'http://shop.example:80' can never"),
        ({"cors_origins": ("https://Shop.example",)}, "'https://Shop.example' can never match"),
        ({"cors_origins": ("http://shop.example:080",)}, "without leading zeros"),
        ({"cors_origins": ("http://localhost:",)}, "'http://localhost:' can never match"),
        ({"cors_origins": ("http://localhost:99999",)}, "a port of 1-65535"),
        ({"cors_origins": ("http://user@shop.example",)}, "without a user name"),
        ({"cors_origins": ("https://bücher.example",)}, r"in its ASCII form \(xn--\.\.\.\)"),
        ({"cors_origins": ("null",)}, "'null' is the Origin header of sandboxed frames"),
        # the message gives the form a browser sends (an IPv6 address in its shortest form)
        (
            {"cors_origins": ("http://[0:0:0:0:0:0:0:1]:8080",)},
            r"; a browser sends 'http://\[::1\]:8080' for it$",
        ),
        ({"body_timeout_s": float("nan")}, "seconds > 0, got nan"),
        ({"body_timeout_s": float("inf")}, "seconds > 0, got inf"),
    ],
)
def test_settings_that_break_every_request_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServeSettings(**kwargs)


def test_origins_as_browsers_send_them_are_accepted() -> None:
    origins = (
        "*",
        "http://localhost:8080",
        "https://shop.example",
        "https://shop.example:8443",
        "http://127.0.0.1:3000",
        "http://[::1]:8080",
        "https://xn--bcher-kva.example",
        "https://my-shop.example:65535",
    )
    assert ServeSettings(cors_origins=origins).cors_origins == origins


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "99999"], "--port must be in 0..65535"),
        (["--max-k", "0"], "--max-k must be >= 1, got 0"),  # 5 is allowed: it lowers the default k
        (["--log-level", "loud"], "argument --log-level: invalid choice: 'loud' (choose from"),
        # settings refused by ServeSettings or from_dir are named by the flag the user typed
        # (the messages said max_filter_items, body_timeout_s, ...: names no flag has)
        (
            ["--max-filter-items", "-1"],
            "error: --max-filter-items must be in 0..10,000,000, got -1\n",
        ),
        (["--max-session-len", "0"], "error: --max-session-len must be in 1..10,000,000, got 0\n"),
        # beyond int64 these broke the request schema with a traceback (exit 1)
        (["--max-session-len", "9" * 20], "error: --max-session-len must be in 1..10,000,000"),
        (["--max-filter-items", "9" * 20], "error: --max-filter-items must be in 0..10,000,000"),
        (["--num-threads", "0"], "error: --num-threads must be >= 1, got 0\n"),
        (["--max-body-bytes", "1"], "error: --max-body-bytes must be >= 14 (the bytes of"),
        (
            ["--body-timeout-s", "-1"],
            "error: --body-timeout-s must be a finite number of seconds > 0, got -1.0\n",
        ),
        (["--state-cache-mb", "nan"], "error: --state-cache-mb must be a finite number >= 0"),
        (["--cors-origin", "http://a/"], "error: --cors-origin: 'http://a/' can never match"),
        (["--max-batch-size", "0"], "error: --max-batch-size must be >= 1, got 0\n"),
        (
            ["--graceful-shutdown-s", "inf"],
            "error: --graceful-shutdown-s must be a finite number of seconds > 0, got inf\n",
        ),
    ],
)
def test_console_script_refuses_bad_limits(
    exported: TinyExport, flags: list[str], message: str
) -> None:
    bad = _serve_cli(str(exported.export_dir), *flags)
    assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def test_smallest_body_limit_serves_the_smallest_request(rec: SessionRecommender) -> None:
    with serving(rec, ServeSettings(max_body_bytes=len(SMALLEST_REQUEST_BODY))) as http:
        json_type = {"content-type": "application/json"}
        smallest = http.post("/recommendations", content=SMALLEST_REQUEST_BODY, headers=json_type)
        assert smallest.status_code == 200, smallest.text
        assert all(item["source"] == "fallback" for item in smallest.json()["items"])
        one_more = http.post("/recommendations", content=b'{"session": []}', headers=json_type)
        assert one_more.status_code == 413, one_more.text


def test_bodies_over_the_size_limit_get_413_without_being_read(rec: SessionRecommender) -> None:
    settings = ServeSettings(max_body_bytes=1_000)
    ok_body = json.dumps({"session": ["1001", "1002"], "k": 3}).encode()
    big = json.dumps({"session": ["1001"], "deny_items": ["1002"] * 400}).encode()  # 3.2 kB
    assert len(ok_body) < 1_000 < len(big)
    with serving(rec, settings) as http:
        json_type = {"content-type": "application/json"}
        want = http.post("/recommendations", content=ok_body, headers=json_type)
        assert want.status_code == 200, want.text
        # a declared length over the bound: refused from the header, connection closed
        response = http.post("/recommendations", content=big, headers=json_type)
        assert response.status_code == 413, response.text
        assert response.headers["connection"] == "close"
        (error,) = response.json()["detail"]
        assert error == {
            "field": "body",
            "message": f"the request body ({len(big)} bytes) is larger than the limit of 1000 bytes",
            "type": "body_too_large",
        }
        # chunked transfer (no Content-Length): read up to the bound, then refused
        chunks = (big[i : i + 100] for i in range(0, len(big), 100))
        response = http.post("/recommendations", content=chunks, headers=json_type)
        assert response.status_code == 413, response.text
        assert "over 1000 bytes, chunked" in response.json()["detail"][0]["message"]
        # a chunked body under the bound is served as if sent in one piece
        pieces = iter([ok_body[:7], ok_body[7:20], ok_body[20:]])
        chunked = http.post("/recommendations", content=pieces, headers=json_type)
        assert chunked.status_code == 200 and chunked.json()["items"] == want.json()["items"]
        assert http.get("/healthz").status_code == 200  # bodiless requests pass untouched
        # a client that announces a large body and waits (Expect: 100-continue style) gets the
        # 413 and a closed connection, not a server reading its next request as body bytes
        host, port = http.base_url.host, http.base_url.port
        with socket.create_connection((host, port), timeout=10) as raw:
            raw.sendall(
                b"POST /recommendations HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                b"\r\ncontent-length: 5000000\r\n\r\n"
            )
            reply = b""
            while chunk := raw.recv(65536):  # ends when the server closes the connection
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 413 ") and b"body_too_large" in reply
        metrics = http.get("/metrics").text
        assert 'path="/recommendations",status="413"} 3.0' in metrics
    with pytest.raises(ValueError, match="max_body_bytes must be >= 1"):
        ServeSettings(max_body_bytes=0)


def _raw_exchange(http: httpx.Client, request: bytes, close_after_s: float | None = None) -> bytes:
    """Send ``request`` bytes on a new connection and read until the server closes it, or close
    it ourselves after ``close_after_s`` seconds (a client that goes away); returns the reply."""
    with socket.create_connection((http.base_url.host, http.base_url.port), timeout=10) as raw:
        raw.sendall(request)
        if close_after_s is not None:
            time.sleep(close_after_s)
            return b""
        reply = b""
        while chunk := raw.recv(65536):
            reply += chunk
        return reply


def _status_count(http: httpx.Client, status: int) -> float:
    """``seqrec_http_requests_total`` of POST /recommendations with ``status`` (0 if none)."""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("seqrec_http_requests_total{") and (
            f'status="{status}"' in line and 'path="/recommendations"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_bodies_that_never_finish_get_408_and_vanished_clients_count_as_499(
    rec: SessionRecommender,
) -> None:
    """A body shorter than its Content-Length, or a chunked body that stalls, gets 408 after
    body_timeout_s and a closed connection; a client that disconnects mid-body gets nothing and
    is counted as 499 (client closed request), not as a server error. (The timeout leaves the
    server 1.9 s to notice a disconnect 0.1 s in, on a loaded CI machine too.)"""
    head = b"POST /recommendations HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    with serving(rec, ServeSettings(body_timeout_s=2.0)) as http:
        start = time.monotonic()
        short = _raw_exchange(http, head + b"content-length: 100\r\n\r\n" + b'{"session": [')
        assert time.monotonic() - start < 10  # answered after about 2 s, not held open
        assert short.startswith(b"HTTP/1.1 408 ") and b"connection: close" in short.lower()
        error = json.loads(short.split(b"\r\n\r\n", 1)[1])["detail"][0]
        assert error == {
            "field": "body",
            "message": "the request body was not received within 2 s (13 bytes of 100 arrived)",
            "type": "body_timeout",
        }
        stalled = _raw_exchange(http, head + b'transfer-encoding: chunked\r\n\r\n5\r\n{"ses\r\n')
        assert stalled.startswith(b"HTTP/1.1 408 ")
        assert b"(5 bytes of a chunked body arrived)" in stalled
        before = _status_count(http, 499)
        _raw_exchange(http, head + b'transfer-encoding: chunked\r\n\r\n5\r\n{"ses\r\n', 0.1)
        _raw_exchange(http, head + b"content-length: 100\r\n\r\n{", 0.1)
        deadline = time.monotonic() + 10  # the server notices the disconnects on its own time
        while _status_count(http, 499) < before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _status_count(http, 499) == before + 2
        assert _status_count(http, 500) == 0
        assert _status_count(http, 408) == 2
        # a complete body sent slowly but within the timeout is served
        ok = _raw_exchange(
            http,
            head + b"content-length: 14\r\nconnection: close\r\n\r\n" + SMALLEST_REQUEST_BODY,
        )
        assert ok.startswith(b"HTTP/1.1 200 ")


def test_cors_lets_the_listed_shop_origins_call_the_api(rec: SessionRecommender) -> None:
    """The widget embedded in a shop on another origin (widget.js's header shows apiBase
    "https://api.example") needs CORS: without it the browser blocked GET /limits and the
    preflight of POST /recommendations (405), and the strip said "unavailable" (helper-31)."""
    shop, other = "https://shop.example", "https://evil.example"
    args = build_parser().parse_args(["dir", "--cors-origin", shop, "--cors-origin", other])
    assert args.cors_origin == [shop, other]  # seqrec-serve passes them as cors_origins
    # the export dir may follow the flag (nargs="+" took it as a second origin)
    args = build_parser().parse_args(["--cors-origin", shop, "dir"])
    assert (args.cors_origin, args.export_dir) == ([shop], "dir")
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    with serving(rec, ServeSettings()) as http:  # default: same-origin pages only
        assert (
            http.options("/recommendations", headers={"Origin": shop, **preflight}).status_code
            == 405
        )
        plain = http.post("/recommendations", json={"session": ["1001"]}, headers={"Origin": shop})
        assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
    with serving(rec, ServeSettings(cors_origins=(shop,))) as http:
        allowed = http.options("/recommendations", headers={"Origin": shop, **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == shop
        assert "POST" in allowed.headers["access-control-allow-methods"]
        posted = http.post("/recommendations", json={"session": ["1001"]}, headers={"Origin": shop})
        assert posted.status_code == 200 and posted.headers["access-control-allow-origin"] == shop
        limits = http.get("/limits", headers={"Origin": shop})
        assert limits.headers["access-control-allow-origin"] == shop
        refused = http.options("/recommendations", headers={"Origin": other, **preflight})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        too_large = http.post(
            "/recommendations",
            content=b"{" + b" " * (ServeSettings().max_body_bytes + 1) + b"}",
            headers={"Origin": shop, "content-type": "application/json"},
        )  # the browser can read the 413 too
        assert too_large.status_code == 413
        assert too_large.headers["access-control-allow-origin"] == shop


def test_max_k_below_one_is_named_as_the_flag(exported: TinyExport) -> None:
    """--max-k 0 said "need 1 <= default_k (1) <= max_k (0)", naming a setting without a flag."""
    proc = _serve_cli(str(exported.export_dir), "--max-k", "0")
    assert proc.returncode == 2 and proc.stderr == "error: --max-k must be >= 1, got 0\n"


# bodies of every kind: valid ones (answered by the fast path) and refused ones (FastAPI's route)
_PARITY_BODIES = [
    b'{"session": ["1001", "1002"], "k": 5}',
    b'{"session": [1001, "1003", 1004], "k": 3, "exclude_seen": true}',
    b'{"session": ["1001"], "allow_items": ["1002", 1005, "nope"], "deny_items": [1002]}',
    b'{"session": ["1001"], "allow_items": []}',
    b'{"session": [], "k": 4}',  # the fallback
    b'{"session": ["unknown", "1002"]}',
    b' {"session": ["1002"], "k": 2, "k": 7} ',  # whitespace; a repeated key: the last counts
    b'{"session": ["1001"], "allow_items": null, "deny_items": null}',
    b'{"session": [-0, 1001]}',
    b'{"session": ["1001"], "k": 41}',  # over max_k
    b'{"session": ["1001"], "k": 0}',
    b'{"session": ["1001"], "k": 5.0}',
    b'{"session": ["1001"], "k": NaN}',
    b'{"session": ["1001"], "exclude_seen": 1}',
    b'{"session": [true]}',
    b'{"session": [1.5]}',
    b'{"session": ""}',
    b'{"session": "1001"}',
    b'{"session": ["' + b"x" * 65 + b'"]}',
    b'{"session": [' + b"9" * 64 + b"]}",  # 64 digits: an id
    b'{"session": [' + b"9" * 65 + b"]}",  # 65 digits: refused by FastAPI's parser
    b'{"session": [], "k": ' + b"1" * 70 + b"}",
    b'{"session": ["\\ud800"]}',  # a lone surrogate
    b'{"session": ["\\u00e9t\\u00e9"]}',
    '{"session": ["été"]}'.encode(),
    b'{"session": ["\xff"]}',  # not UTF-8
    b'\xef\xbb\xbf{"session": ["1001"]}',  # a byte-order mark: FastAPI's parser takes it
    b'{"session": ["1001"], "extra": 1}',
    b'{"session": ["1001"],}',
    b'{"session": ["1001"]',
    b"[]",
    b"null",
    b"",
    json.dumps({"session": ["1001"] * 41}).encode(),  # over max_session_len
    json.dumps({"session": ["1001"], "deny_items": ["1002"] * 51}).encode(),
    b'{"session": ["1001"]' + b" " * 70_000 + b"}",  # over 64 KiB: FastAPI's route only
]


def test_fast_path_answers_exactly_as_fastapis_route(
    rec: SessionRecommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Valid ``application/json`` requests are answered by ``_FastRecommendations`` (pydantic's
    JSON-mode validation, no FastAPI dependency solving); every body gets the same status, bytes
    and metrics label as through FastAPI's route, which ``application/json; charset=utf-8``
    still takes (the fast path takes the plain media type only)."""
    from prometheus_client.parser import text_string_to_metric_families

    app = create_app(rec, SETTINGS)
    (fast,) = [m for m in app.user_middleware if m.cls is _FastRecommendations]
    model = fast.kwargs["request_model"]
    validated: list[bytes] = []
    original = model.model_validate_json

    def counting(data: bytes, *args, **kwargs):
        validated.append(data)
        return original(data, *args, **kwargs)

    monkeypatch.setattr(model, "model_validate_json", counting)
    answered = 0
    with running_server(app) as url, httpx.Client(base_url=url, timeout=10.0) as http:
        for body in _PARITY_BODIES:
            got = {}
            for media in ("application/json", "application/json; charset=utf-8"):
                response = http.post(
                    "/recommendations", content=body, headers={"content-type": media}
                )
                got[media] = (
                    response.status_code,
                    response.headers["content-type"],
                    response.content,
                )
            plain, charset = got.values()
            assert plain == charset, body
            answered += plain[0] == 200
        metrics = http.get("/metrics").text
    # valid bodies (200) went through the fast path; the 65-digit runs and the body over 64 KiB
    # never reached pydantic
    assert answered == 14 and len(validated) == len(_PARITY_BODIES) - 3
    assert sum(b"9" * 65 in body or b"1" * 70 in body for body in _PARITY_BODIES) == 2
    requests = {
        (sample.labels["path"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "seqrec_http_requests_total"
    }
    assert requests[("/recommendations", "200")] == 2 * answered
    assert not any(path == "unmatched" for path, _ in requests)
