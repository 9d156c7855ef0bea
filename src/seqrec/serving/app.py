"""FastAPI service: ``POST /recommendations`` over a :class:`SessionRecommender`, health and
readiness probes, Prometheus metrics, OpenAPI docs and the embeddable widget.

Start it with ``seqrec-serve EXPORT_DIR [--port 8000] [--num-threads 1]``; the demo shop page is at
``/widget/``, the API docs at ``/docs`` (schema at ``/openapi.json``), metrics at ``/metrics``.
No model logic lives here: everything goes through the predictor, torch is never imported.
"""

# No `from __future__ import annotations`: FastAPI must see the request model class that
# create_app builds locally (string annotations would not resolve).
import argparse
import asyncio
import gc
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints
from pydantic_core import PydanticSerializationError, to_json
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from seqrec import __version__
from seqrec.predictor import (
    VOCAB_FILE,
    NonFiniteScoresError,
    Recommendation,
    RecommendInfo,
    SessionRecommender,
)
from seqrec.serving.logs import log_from_a_thread, stop_log_thread

logger = logging.getLogger("seqrec.serving")

STATIC_DIR = Path(__file__).parent / "static"
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
"""Histogram buckets of the request latency (seconds): fine below the 20 ms target."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


SMALLEST_REQUEST_BODY = b'{"session":[]}'
"""The shortest valid ``POST /recommendations`` body; a smaller body limit refuses every request."""


MAX_LIST_LIMIT = 10_000_000
"""Largest ``max_session_len`` / ``max_filter_items`` (more ids than an 8 MiB body holds; an
int64 bound beyond it broke the request schema with a traceback)."""

DEFAULT_PORTS = {"http": 80, "https": 443}
"""The port a browser leaves out of its Origin header for each scheme."""


def browser_origin(url: str) -> str | None:
    """The Origin header a browser sends from a page at ``url`` (the URL standard's serialised
    origin, https://url.spec.whatwg.org/#concept-origin): scheme and host in lower case, an
    internationalised host name in its ASCII (IDNA, ``xn--``) form, an IP address in its
    shortest form, and the port only when it is not the scheme's default; no user name, path,
    query or fragment. Parsed by the standard library (``urllib.parse``, ``ipaddress``, the
    ``idna`` codec).

    Returns:
        The origin, or None when ``url`` is no http(s) URL with a host and a port of 1-65535.
    """
    try:
        parts = urlsplit(url)
        port, host, scheme = parts.port, parts.hostname, parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or not host or port == 0:
            return None
        try:
            host = ipaddress.ip_address(host).compressed
            host = f"[{host}]" if ":" in host else host
        except ValueError:  # a host name
            host = host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError):  # a port out of range, a host IDNA cannot encode
        return None
    return f"{scheme}://{host}" + ("" if port in (None, DEFAULT_PORTS[scheme]) else f":{port}")


@dataclass(frozen=True)
class ServeSettings:
    """Limits and runtime settings of the service (command-line flags of ``seqrec-serve``).

    Attributes:
        num_threads: onnxruntime intra-op threads of the one shared session (1 per worker).
        max_k: largest ``k`` a request may ask for.
        max_session_len: most item ids a request's session may hold (the model uses the last
            ``max_len`` known ones).
        max_filter_items: most ids in ``allow_items`` / ``deny_items``.
        default_k: ``k`` when a request does not give one.
        log_requests: one structured log line per request.
        state_cache_mb: memory bound (MiB) of the predictor's session-state cache for
            incremental exports (0 = off); see ``SessionRecommender.from_dir``.
        max_body_bytes: largest request body (bytes); a larger one gets 413 before it is read
            whole (at once from ``Content-Length``, or as soon as a chunked body passes the
            bound), and the connection is closed. The default holds the largest request the
            other limits allow even with every id character ``\\u``-escaped (two filter lists
            of 10,000 ids of 64 characters and a 200-id session: about 7.9 MB).
        body_timeout_s: seconds a client has to send a request's whole body (finite); a body
            still incomplete then (a client that declared more bytes than it sends, or a stalled
            chunked upload) gets 408 and the connection is closed (uvicorn itself has no body
            timeout). Request lines and headers are not covered: a client that sends them
            slowly still holds its connection, so in production put a proxy with header
            timeouts in front (as for any uvicorn service).
        cors_origins: origins whose pages may call the API from a browser (CORS headers from
            Starlette's ``CORSMiddleware``: ``GET`` and ``POST`` with a JSON body), for the
            widget embedded in a shop on another origin; empty: same-origin pages only.
        max_batch_size: most requests scored together in one model call. Requests that arrive
            while the model is busy wait and are then scored together (dynamic batching, as
            in NVIDIA Triton's dynamic batcher, without a delay: an idle model starts at once),
            on a model thread of their own, so the event loop parses and answers other requests
            meanwhile; requests with the same ``k`` and filters share one
            ``recommend_batch_with_info`` call. 1: each request is scored on the event loop as
            it arrives (no model thread).
        graceful_shutdown_s: seconds ``seqrec-serve`` waits, after SIGTERM or SIGINT, for the
            requests in flight to finish before it cancels them and exits (uvicorn's
            ``timeout_graceful_shutdown``). Without a bound a client that stalls mid-body held
            the shutdown until its 408 at ``body_timeout_s``; the default ends before a
            Kubernetes pod's 30 s grace period, after which the pod is killed.
    """

    num_threads: int = 1
    max_k: int = 100
    max_session_len: int = 200
    max_filter_items: int = 10_000
    default_k: int = 10
    log_requests: bool = True
    state_cache_mb: float = 256.0
    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout_s: float = 30.0
    cors_origins: tuple[str, ...] = ()
    max_batch_size: int = 64
    graceful_shutdown_s: float = 20.0

    def __post_init__(self) -> None:
        """Refuse limits that would break every request (clear ValueError, before startup)."""
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_k < 1 or not 1 <= self.default_k <= self.max_k:
            raise ValueError(
                f"need 1 <= default_k ({self.default_k}) <= max_k ({self.max_k}); "
                "set --max-k to at least 1 and at least the default k"
            )
        if not 1 <= self.max_session_len <= MAX_LIST_LIMIT:
            raise ValueError(
                f"max_session_len must be in 1..{MAX_LIST_LIMIT:,}, got {self.max_session_len}"
            )
        if not 0 <= self.max_filter_items <= MAX_LIST_LIMIT:
            raise ValueError(
                f"max_filter_items must be in 0..{MAX_LIST_LIMIT:,}, got {self.max_filter_items}"
            )
        if self.max_body_bytes < len(SMALLEST_REQUEST_BODY):
            raise ValueError(
                f"max_body_bytes must be >= {len(SMALLEST_REQUEST_BODY)} (the bytes of the "
                f"smallest request, {SMALLEST_REQUEST_BODY.decode()}), got {self.max_body_bytes};"
                " set --max-body-bytes to at least the largest request body you serve"
            )
        # CORSMiddleware compares a browser's Origin header with each allowed origin as a
        # string, so an origin must be written as browsers send it
        for origin in self.cors_origins:
            if origin == "*":
                continue
            if origin == "null":
                raise ValueError(
                    "cors_origins: 'null' is the Origin header of sandboxed frames and file:// "
                    "pages, so allowing it would let any such page call the API; give the "
                    "shop's scheme://host[:port] (e.g. https://shop.example), or *"
                )
            sent = browser_origin(origin)
            if sent != origin:
                hint = "" if sent is None else f"; a browser sends {sent!r} for it"
                if not origin.isascii():
                    idna = "; browsers send an internationalised host name in its ASCII form"
                    hint = f"{idna} (xn--...){hint}"
                raise ValueError(
                    f"cors_origins: {origin!r} can never match a browser's Origin header; give "
                    "scheme://host[:port] as browsers send it: lower case, without a user name, "
                    "path or trailing slash, with a port of 1-65535 without leading zeros and "
                    "not the default one (:80 for http, :443 for https) (e.g. "
                    f"https://shop.example), or *{hint}"
                )
        if not (math.isfinite(self.body_timeout_s) and self.body_timeout_s > 0):
            raise ValueError(
                f"body_timeout_s must be a finite number of seconds > 0, got {self.body_timeout_s}"
            )
        if not (math.isfinite(self.graceful_shutdown_s) and self.graceful_shutdown_s > 0):
            raise ValueError(
                "graceful_shutdown_s must be a finite number of seconds > 0, got "
                f"{self.graceful_shutdown_s}"
            )


CLIENT_CLOSED_REQUEST = 499
"""Status recorded (metrics, request log) for a request whose client went away before an answer
was sent (nginx's convention): no response is sent, so it is not counted as a server error. The
service notices this while it reads the body; a client that leaves after sending its whole body
is recorded with the status of the answer it did not wait for."""
_REFUSALS = {
    408: "request timeout",
    413: "payload too large",
    415: "unsupported media type",
    503: "service unavailable",
}


_UNION_BRANCHES = {"constrained-str", "int", "str"}
MAX_ID_LENGTH = 64
"""Longest item id the service takes: strings of at most 64 characters, integers of at most 64
digits (a catalog with longer ids is refused at startup)."""
_ITEM_ID_MESSAGE = (
    f"item ids must be strings of 1 to {MAX_ID_LENGTH} characters or integers of at most "
    f"{MAX_ID_LENGTH} digits"
)
_UNICODE_MESSAGE = (
    "not valid Unicode text: a string here holds a lone UTF-16 surrogate escape (such as "
    "\\ud800) without its pair"
)
ItemId = (
    Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_ID_LENGTH)]
    | StrictInt
)


class _IntegerTooLong(ValueError):
    """A JSON integer of more than :data:`MAX_ID_LENGTH` digits in a request body."""


def _bounded_int(text: str) -> int:
    """``json.loads``'s ``parse_int``: integers of at most :data:`MAX_ID_LENGTH` digits. Python
    converts up to 4,300 digits, in time that grows with the square of the length: a body of
    such ids held the event loop for seconds before validation could refuse them."""
    digits = len(text) - text.startswith("-")
    if digits > MAX_ID_LENGTH:
        raise _IntegerTooLong(
            f"an integer has {digits:,} digits; item ids and k have at most {MAX_ID_LENGTH}"
        )
    return int(text)


class _BoundedJsonRequest(Request):
    """A request whose JSON body is parsed with :func:`_bounded_int` (FastAPI reads the body
    through ``Request.json``)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_int=_bounded_int)
        return self._json


class _BoundedJsonRoute(APIRoute):
    """The route class of ``POST /recommendations`` (FastAPI's custom request class pattern)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(_BoundedJsonRequest(request.scope, request.receive))

        return bounded


class RecommendedItem(BaseModel):
    """One recommended item."""

    item_id: str = Field(description="raw item id")
    score: float = Field(description="model score (comparable within one response); 0 for fallback")
    source: Literal["model", "fallback"] = Field(
        description="'model', or 'fallback' (popular items) when no session item is known"
    )


class RecommendationResponse(BaseModel):
    """Recommendations for one session, best first."""

    items: list[RecommendedItem]
    model_version: str = Field(description="model_version of export_meta.json (sha256 prefix)")
    num_known: int = Field(description="session items found in the catalog")
    num_unknown: int = Field(description="session items not in the catalog (skipped)")
    used_fallback: bool = Field(description="no known item: popularity fallback returned")
    num_unknown_filter_items: int = Field(
        description="allow_items / deny_items entries not in the catalog (ignored; an allow-list "
        "of only such items leaves no items)"
    )


def _request_model(settings: ServeSettings) -> type[BaseModel]:
    """The request body schema with this service's limits (they show in the OpenAPI docs)."""

    class RecommendationRequest(BaseModel):
        """A session of raw item ids (oldest first) and what to return."""

        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={
                "examples": [{"session": ["1001", "1002"], "k": 5, "exclude_seen": True}]
            },
        )

        session: list[ItemId] = Field(
            max_length=settings.max_session_len,
            description="raw item ids the shopper viewed, oldest first (may be empty)",
        )
        k: StrictInt = Field(
            default=settings.default_k,
            ge=1,
            le=settings.max_k,
            description=f"number of items wanted, 1..{settings.max_k}",
        )
        exclude_seen: StrictBool = Field(
            default=False, description="never recommend an item of the session"
        )
        allow_items: list[ItemId] | None = Field(
            default=None,
            max_length=settings.max_filter_items,
            description="only these items may be recommended (null: no allow-list)",
        )
        deny_items: list[ItemId] | None = Field(
            default=None,
            max_length=settings.max_filter_items,
            description="items never recommended, e.g. out of stock",
        )

    return RecommendationRequest


class _MetricsAndLogs:
    """Pure ASGI middleware: request count and latency histogram, one JSON log line per request,
    and an ``X-Request-ID`` header (echoed from the request or generated)."""

    def __init__(
        self,
        app: ASGIApp,
        requests: Counter,
        latency: Histogram,
        log_requests: bool,
        routes: list[BaseRoute],
    ) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency
        self.log_requests = log_requests
        self.routes = routes  # the app's routes, to label requests that FastAPI did not route

    def _route_label(self, scope: Scope) -> str:
        """The path template of the route ``scope`` matches (e.g. ``/docs``, ``/widget`` for
        the static files), or ``unmatched`` (404s: one label, however many paths are tried).
        A path that matches only with a trailing slash added (``/widget``, which the router
        redirects to ``/widget/`` with 307) gets that route's label."""
        for candidate in (scope, {**scope, "path": scope.get("path", "") + "/"}):
            for route in self.routes:
                match, _ = route.matches(candidate)
                if match == Match.FULL:
                    return str(getattr(route, "path", "unmatched"))
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # when the app raises (the server error middleware answers 500)
        started = False
        request_id = ""
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:64]
        request_id = request_id or uuid.uuid4().hex

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        # routing rewrites root_path (mounts); keep what the request came with for the label
        original = {"type": "http", "path": scope["path"], "root_path": scope.get("root_path", "")}
        original["method"] = scope.get("method", "")
        try:
            await self.app(scope, receive, send_wrapper)
            if not started:  # the client went away before an answer: nobody got a 5xx
                status = CLIENT_CLOSED_REQUEST
        finally:
            elapsed_s = time.perf_counter() - start
            route = scope.get("route")  # FastAPI's own routes set it
            path = getattr(route, "path", None) or self._route_label(original)
            method = scope.get("method", "")
            self.requests.labels(method=method, path=path, status=str(status)).inc()
            self.latency.labels(method=method, path=path).observe(elapsed_s)
            if self.log_requests:
                logger.info(
                    "request",
                    extra={
                        "request_id": request_id,
                        "method": method,
                        "path": scope.get("path", ""),
                        "route": path,
                        "status": status,
                        "latency_ms": round(elapsed_s * 1e3, 3),
                    },
                )


def _replaying(message: Message, receive: Receive) -> Receive:
    """An ASGI ``receive`` that returns ``message`` (a body already read) once, then reads on
    from ``receive`` (e.g. the client's disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return message
        return await receive()

    return replay


def _json_response(payload: Any) -> Response:
    """A compact JSON answer: pydantic-core's encoder (12 microseconds for a 20-item answer,
    against 58 for ``json.dumps``), or ``json.dumps`` for what it refuses: a string holding a
    lone UTF-16 surrogate (a catalog id ``"\\ud800"`` is legal JSON), which ``json.dumps``
    writes escaped (FastAPI's ``JSONResponse`` failed on it with a 500). Floats must be finite
    (the predictor refuses NaN / inf scores)."""
    try:
        body = to_json(payload)
    except PydanticSerializationError:
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    return Response(body, media_type="application/json")


class _BodyLimit:
    """Pure ASGI middleware that reads a request's body before the app does, within bounds:

    * a body over ``max_bytes`` gets 413 without being read whole (a ``Content-Length`` above
      the bound at once; a chunked body as soon as it passes the bound);
    * a body not received completely within ``timeout_s`` gets 408;
    * a body sent with a ``Content-Encoding`` (gzip, br, ...) gets 415, whatever it holds: the
      service does not decode compressed bodies;
    * a body still incomplete when a shutdown's grace period (``--graceful-shutdown-s``) ends
      and uvicorn cancels the request gets 503 (uvicorn's plain-text 500 otherwise, counted as
      a server error).

    Refusals carry the service's JSON error body and ``Connection: close`` (the rest of the
    body is not read, so the connection cannot carry another request). A client that
    disconnects while its body is read gets nothing (counted with status 499). The body read here
    is replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    @staticmethod
    async def _refuse(
        scope: Scope, receive: Receive, send: Send, status: int, message: str, kind: str
    ) -> None:
        response = _error_response(
            status,
            _REFUSALS[status],
            "body",
            message,
            kind,
            headers={"connection": "close"},
        )
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        declared = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if not chunked and declared in (None, b"0"):
            await self.app(scope, receive, send)  # no body
            return
        # every Content-Encoding header counts (a later "identity" does not undo a "gzip")
        encodings = [v for k, v in scope.get("headers", ()) if k == b"content-encoding"]
        encoding = b", ".join(encodings).decode("latin-1").strip()
        if any(v.strip().lower() not in (b"", b"identity") for v in encodings):
            message = (
                f"the body is sent with Content-Encoding {encoding!r}, which this service does "
                "not decode; send the JSON body uncompressed (no Content-Encoding header)"
            )
            await self._refuse(scope, receive, send, 415, message, "content_encoding")
            return

        def too_large(size: str) -> str:
            return f"the request body ({size}) is larger than the limit of {self.max_bytes} bytes"

        # uvicorn has already refused a malformed Content-Length
        if declared is not None and int(declared) > self.max_bytes:
            message = too_large(f"{int(declared)} bytes")
            await self._refuse(scope, receive, send, 413, message, "body_too_large")
            return
        chunks: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                expected = f" of {int(declared)}" if declared is not None else " of a chunked body"
                text = (
                    f"the request body was not received within {self.timeout_s:g} s "
                    f"({size} bytes{expected} arrived)"
                )
                await self._refuse(scope, receive, send, 408, text, "body_timeout")
                return
            except asyncio.CancelledError:  # shutdown: --graceful-shutdown-s ran out meanwhile
                text = (
                    "the service is shutting down and stopped waiting for this request's body "
                    f"({size} bytes arrived); send the request again"
                )
                await self._refuse(scope, receive, send, 503, text, "shutting_down")
                return  # the request ends here (answered), as its task was asked to
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                text = too_large(f"over {self.max_bytes} bytes, chunked")
                await self._refuse(scope, receive, send, 413, text, "body_too_large")
                return
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replaying(whole, receive), send)


_FAST_PATH_MAX_BYTES = 64 * 1024
"""Largest body the fast path parses: a widget request is a few hundred bytes, and a large
invalid body would otherwise be parsed twice (pydantic, then FastAPI's route) on the event loop:
an 8 MiB one took 3.9 s instead of 1.7."""
_LONG_DIGIT_RUN = re.compile(rb"[0-9]{%d}" % (MAX_ID_LENGTH + 1))
"""More digits in a row than any item id or ``k`` may have (the fast path leaves such bodies to
FastAPI's, which refuses their integers before converting them)."""


class _FastRecommendations:
    """Pure ASGI fast path of ``POST /recommendations`` for valid requests; everything else goes
    to the FastAPI app, unchanged.

    FastAPI reads a body with ``json.loads``, solves the endpoint's dependencies and validates
    the resulting dict with the request model, about half the event loop's time per request on
    the 2-core AMD VM. Here a plain ``application/json`` body is parsed and validated in one
    call of pydantic's ``model_validate_json`` (the same model, in JSON mode) and given to the
    same endpoint function. A body it refuses for any reason, a body with a run of more than
    :data:`MAX_ID_LENGTH` digits (FastAPI's parser refuses such integers cheaply; this one would
    convert them first), a body over :data:`_FAST_PATH_MAX_BYTES` and any other content type go
    to FastAPI's route with the body replayed, so every refusal (400, 415, 422) is FastAPI's own.
    An exception of the endpoint is answered by the app's handler for it (``exception_handlers``,
    e.g. the JSON 500 of ``NonFiniteScoresError``), as FastAPI's route would, without running the
    request again; one without a handler propagates (Starlette's 500). It sets
    ``scope["route"]`` as FastAPI's router does, for the metrics' route label.
    """

    def __init__(
        self,
        app: ASGIApp,
        route: BaseRoute,
        request_model: type[BaseModel],
        endpoint: Callable[[Any], Awaitable[Response]],
        exception_handlers: dict[Any, Callable[..., Any]],
    ) -> None:
        self.app = app
        self.route = route
        self.request_model = request_model
        self.endpoint = endpoint
        self.exception_handlers = exception_handlers  # the app's own dict (read per exception)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != "/recommendations"
            or scope.get("method") != "POST"
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        content_types = [v for k, v in scope["headers"] if k == b"content-type"]
        if content_types != [b"application/json"]:
            await self.app(scope, receive, send)
            return
        message = await receive()  # the whole body: _BodyLimit, outside, has read it
        body = message.get("body", b"") if message["type"] == "http.request" else None
        request = None
        if (
            body is not None
            and not message.get("more_body")
            and len(body) <= _FAST_PATH_MAX_BYTES
            and not _LONG_DIGIT_RUN.search(body)
        ):
            try:
                request = self.request_model.model_validate_json(body)
            except ValueError:  # pydantic's ValidationError: FastAPI's route says why
                request = None
        if request is None:
            await self.app(scope, _replaying(message, receive), send)
            return
        scope["route"] = self.route
        try:
            response = await self.endpoint(request)
        except Exception as exc:
            handler = next(
                (
                    self.exception_handlers[c]
                    for c in type(exc).__mro__
                    if c in self.exception_handlers
                ),
                None,
            )
            if handler is None:
                raise
            response = await handler(Request(scope, receive), exc)
        await response(scope, receive, send)


class _StateCacheCollector:
    """Prometheus view of the recommender's session-state cache (read at scrape time)."""

    def __init__(self, recommender: SessionRecommender) -> None:
        self._recommender = recommender

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        info = self._recommender.state_cache_info()
        if info is None:
            return
        yield CounterMetricFamily(
            "seqrec_state_cache_hits",
            "requests scored from a cached session state (only the newest item computed)",
            value=info["hits"],
        )
        yield CounterMetricFamily(
            "seqrec_state_cache_misses",
            "requests whose session minus its newest item was not cached (whole session run)",
            value=info["misses"],
        )
        yield GaugeMetricFamily(
            "seqrec_state_cache_entries", "cached states", value=info["entries"]
        )
        yield GaugeMetricFamily(
            "seqrec_state_cache_bytes", "memory held by cached states", value=info["bytes"]
        )


def _error_response(
    status: int,
    error: str,
    field: str,
    message: str,
    kind: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The service's error body, ``{"error", "detail": [{"field", "message", "type"}]}``."""
    detail = [{"field": field, "message": message, "type": kind}]
    return JSONResponse(
        status_code=status, content={"error": error, "detail": detail}, headers=headers
    )


def _unreadable_body_message(exc: StarletteHTTPException) -> str:
    """Why FastAPI could not parse a request body as JSON text, from the error it chained
    (``raise HTTPException(400) from error``)."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"the body is not UTF-8 text (byte 0x{cause.object[cause.start]:02x} at offset "
            f"{cause.start}); send JSON encoded as UTF-8"
        )
    if isinstance(cause, RecursionError):
        return "the body could not be parsed as JSON text: it is nested too deeply"
    if isinstance(cause, _IntegerTooLong):
        return f"the body could not be parsed as JSON text: {cause}"
    return f"the body could not be parsed as JSON text ({exc.detail})"


BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Bucket bounds of the ``seqrec_model_batch_size`` histogram (requests per model call)."""

_Filters = tuple[int, bool, tuple[Any, ...] | None, tuple[Any, ...] | None]


_Outcome = tuple[list[Recommendation], RecommendInfo] | Exception
"""What one request of a model call gets: its recommendations and info, or its error."""


class _Waiting(NamedTuple):
    """One request waiting for the model: its session, its filters and where its answer goes."""

    filters: _Filters  # (k, exclude_seen, allow_items, deny_items): requests alike share a call
    session: list[Any]
    answer: asyncio.Future[tuple[list[Recommendation], RecommendInfo]]


class _DynamicBatcher:
    """Scores the requests of one process in batches on one model thread.

    ``recommend`` queues a request; when the model is idle a drain task starts at once (no
    waiting for a batch to fill), and each time a model call ends, every request that arrived
    meanwhile (up to ``max_batch_size``) goes into the next call. So under light load each
    request is scored alone, and under heavy load the model's fixed cost per call (and the
    predictor's per-call Python) is shared by many requests: the continuous form of dynamic
    batching (NVIDIA Triton Inference Server's dynamic batcher with no queue delay; Crankshaw
    et al., "Clipper", NSDI 2017, adaptive batching). The model runs on its own thread, which
    holds the GIL only for the predictor's Python (onnxruntime releases it), so on two cores
    the event loop parses and answers other requests while the model computes.
    """

    def __init__(
        self, recommender: SessionRecommender, max_batch_size: int, on_call: Callable[[int], None]
    ) -> None:
        self._recommender = recommender
        self._max_batch_size = max_batch_size
        self._on_call = on_call  # told each model call's number of requests (metrics)
        self._waiting: list[_Waiting] = []
        self._drain_task: asyncio.Task[None] | None = None  # the running drain, if any
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seqrec-model")

    async def recommend(
        self,
        session: list[Any],
        k: int,
        exclude_seen: bool,
        allow_items: list[Any] | None,
        deny_items: list[Any] | None,
    ) -> tuple[list[Recommendation], RecommendInfo]:
        """``recommender.recommend_with_info(session, k, ...)``, scored with the requests
        that wait at the same time (same results, up to float32 rounding of the batched
        product; a session's scores never depend on its batch-mates otherwise).

        Raises:
            Whatever the predictor raises for this request's group (e.g.
            ``NonFiniteScoresError``).
        """
        loop = asyncio.get_running_loop()
        filters = (
            k,
            exclude_seen,
            None if allow_items is None else tuple(allow_items),
            None if deny_items is None else tuple(deny_items),
        )
        answer: asyncio.Future[tuple[list[Recommendation], RecommendInfo]] = loop.create_future()
        self._waiting.append(_Waiting(filters, session, answer))
        if self._drain_task is None or self._drain_task.done():  # kept: the loop holds weak refs
            self._drain_task = loop.create_task(self._drain())
        return await answer

    async def _drain(self) -> None:
        """Run model calls until no request waits (one drain task at a time)."""
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch = self._waiting[: self._max_batch_size]
            del self._waiting[: self._max_batch_size]
            batch = [w for w in batch if not w.answer.done()]  # clients that left
            if not batch:
                continue
            self._on_call(len(batch))
            groups: dict[_Filters, list[_Waiting]] = {}
            for waiting in batch:
                groups.setdefault(waiting.filters, []).append(waiting)
            try:
                outcomes = await loop.run_in_executor(self._executor, self._score, groups)
            except Exception as exc:  # no model thread to run it (closed): fail, not hang
                outcomes = [[exc] * len(group) for group in groups.values()]
            for group, group_outcomes in zip(groups.values(), outcomes, strict=True):
                for waiting, outcome in zip(group, group_outcomes, strict=True):
                    if waiting.answer.done():  # cancelled meanwhile
                        continue
                    if isinstance(outcome, BaseException):
                        waiting.answer.set_exception(outcome)
                    else:
                        waiting.answer.set_result(outcome)

    def _score(self, groups: dict[_Filters, list[_Waiting]]) -> list[list[_Outcome]]:
        """One ``recommend_batch_with_info`` call per group of alike requests (model thread).
        When a call raises (e.g. ``NonFiniteScoresError`` for one session of a damaged model),
        its requests are scored again one by one, so each gets its own answer or error and a
        request is never failed by a batch-mate. Exceptions are returned, not raised."""
        recommend = self._recommender.recommend_batch_with_info
        outcomes: list[list[_Outcome]] = []
        for (k, exclude_seen, allow_items, deny_items), group in groups.items():
            sessions = [w.session for w in group]
            try:
                outcomes.append(recommend(sessions, k, exclude_seen, allow_items, deny_items))
                continue
            except Exception as exc:  # answered to the request(s), not raised
                if len(group) == 1:
                    outcomes.append([exc])
                    continue
            alone: list[_Outcome] = []
            for session in sessions:
                try:
                    alone.append(recommend([session], k, exclude_seen, allow_items, deny_items)[0])
                except Exception as exc:
                    alone.append(exc)
            outcomes.append(alone)
        return outcomes

    def close(self) -> None:
        """Stop the model thread (after the calls already started)."""
        self._executor.shutdown(wait=True)


def create_app(recommender: SessionRecommender, settings: ServeSettings | None = None) -> FastAPI:
    """Build the service around a loaded recommender.

    Args:
        recommender: shared by every request (it is thread-safe).
        settings: limits; ``None`` = :class:`ServeSettings` defaults.

    Returns:
        The FastAPI app (its own Prometheus registry, so several apps can live in one process).

    Raises:
        ValueError: the catalog has item ids longer than :data:`MAX_ID_LENGTH` characters
            (requests could not name them).
        NonFiniteScoresError: the warm-up request scored NaN (a damaged model).
    """
    too_long = [i for i in recommender.item_ids if len(i) > MAX_ID_LENGTH]
    if too_long:
        raise ValueError(
            f"{len(too_long)} catalog item id(s) are longer than {MAX_ID_LENGTH} characters, "
            f"which requests cannot name (e.g. an id of {len(too_long[0]):,} characters "
            f"starting {too_long[0][:MAX_ID_LENGTH]!r})"
        )
    settings = settings or ServeSettings()
    request_model = _request_model(settings)
    registry = CollectorRegistry()
    requests = Counter(
        "seqrec_http_requests",
        "HTTP requests served, by method, route and status",
        ["method", "path", "status"],
        registry=registry,
    )
    latency = Histogram(
        "seqrec_http_request_duration_seconds",
        "HTTP request latency (seconds), by method and route",
        ["method", "path"],
        buckets=LATENCY_BUCKETS_S,
        registry=registry,
    )
    fallbacks = Counter(
        "seqrec_fallback_responses",
        "recommendation responses served from the popularity fallback",
        registry=registry,
    )
    registry.register(_StateCacheCollector(recommender))
    batch_sizes = Histogram(
        "seqrec_model_batch_size",
        "requests scored together in one model call (dynamic batching; max_batch_size)",
        buckets=BATCH_SIZE_BUCKETS,
        registry=registry,
    )
    batcher = (
        _DynamicBatcher(recommender, settings.max_batch_size, batch_sizes.observe)
        if settings.max_batch_size > 1
        else None
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if batcher is not None:  # uvicorn has answered every request by now
            batcher.close()
        # log lines queued by seqrec-serve's log thread are written now: a --workers N worker
        # ends with the signal uvicorn raises again, where exit handlers do not run
        stop_log_thread()

    app = FastAPI(
        lifespan=lifespan,
        title="seqrec recommendations",
        version=__version__,
        description=(
            "Session-based next-item recommendations from a SASRec ONNX export. "
            f"Model version {recommender.model_version}, {recommender.num_items} items."
        ),
    )
    state: dict[str, Any] = {"ready": False}

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and request.method == "POST":  # the body could not be decoded
            return _error_response(
                400, "invalid request", "body", _unreadable_body_message(exc), "body_unreadable"
            )
        phrase = HTTPStatus(exc.status_code).phrase
        field = {404: "path", 405: "method"}.get(exc.status_code, "request")
        message = f"{exc.detail}: {request.method} {request.url.path}"
        kind = phrase.lower().replace(" ", "_")
        return _error_response(
            exc.status_code, phrase.lower(), field, message, kind, headers=exc.headers
        )

    @app.exception_handler(NonFiniteScoresError)
    async def non_finite_scores(request: Request, exc: NonFiniteScoresError) -> JSONResponse:
        # a damaged model: answered as JSON (NaN is not JSON) and logged as an error
        logger.error("non-finite model scores", extra={"error": str(exc)})
        return _error_response(500, "internal error", "model", str(exc), "non_finite_scores")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";")[0].strip().lower()
        no_body = any(
            err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",)
            for err in exc.errors()
        )
        bare_post = no_body and not content_type  # say what is missing, not the media type
        if (
            request.method == "POST"
            and not bare_post
            and not (media_type == "application/json" or media_type.endswith("+json"))
        ):
            message = (
                "send the body as JSON with the header Content-Type: application/json "
                f"(got {content_type or 'no Content-Type'!r})"
            )
            return _error_response(415, "unsupported media type", "body", message, "content_type")
        for err in exc.errors():
            if err.get("type") == "json_invalid":  # loc is ("body", character offset)
                loc = err.get("loc", ())
                reason = (err.get("ctx") or {}).get("error", err.get("msg", ""))
                # Python's messages such as "Unterminated string starting at" end in "at"
                reason = reason.removesuffix(" at")
                where = f" at character {loc[1]}" if len(loc) > 1 else ""
                message = f"the body is not valid JSON: {reason}{where}"
                return _error_response(400, "invalid request", "body", message, "json_invalid")
        if no_body:
            message = 'the request has no body; send a JSON object such as {"session": []}'
            return _error_response(400, "invalid request", "body", message, "body_missing")
        errors: dict[str, dict[str, str]] = {}
        for err in exc.errors():
            loc = [str(part) for part in err.get("loc", ())]
            is_unicode = err.get("type") == "string_unicode"  # JSON "\ud800": a lone surrogate
            if loc and loc[-1] in _UNION_BRANCHES:  # an item id that is neither str nor int
                field = ".".join(loc[:-1])
                if is_unicode or field not in errors:  # the str branch's error says the most
                    kind, message = (
                        ("item_id_unicode", _UNICODE_MESSAGE)
                        if is_unicode
                        else ("item_id", _ITEM_ID_MESSAGE)
                    )
                    errors[field] = {"field": field, "message": message, "type": kind}
            else:
                field = ".".join(loc)
                message = _UNICODE_MESSAGE if is_unicode else err.get("msg", "")
                errors.setdefault(
                    field, {"field": field, "message": message, "type": err.get("type", "")}
                )
        return JSONResponse(
            status_code=422,
            content={"error": "invalid request", "detail": list(errors.values())},
        )

    async def recommendations(body: request_model) -> Response:  # type: ignore[valid-type]
        request = (
            body.session,  # type: ignore[attr-defined]
            body.k,  # type: ignore[attr-defined]
            body.exclude_seen,  # type: ignore[attr-defined]
            body.allow_items,  # type: ignore[attr-defined]
            body.deny_items,  # type: ignore[attr-defined]
        )
        if batcher is not None:  # scored with the requests waiting alongside, on the model thread
            recs, info = await batcher.recommend(*request)
        else:  # max_batch_size 1: on the event loop, as the request arrives
            recs, info = recommender.recommend_with_info(*request)
        payload = {
            "items": [{"item_id": r.item_id, "score": r.score, "source": r.source} for r in recs],
            "model_version": recommender.model_version,
            "num_known": info.num_known,
            "num_unknown": info.num_unknown,
            "used_fallback": info.used_fallback,
            "num_unknown_filter_items": info.num_unknown_filter_items,
        }
        # Serialised here (the shape is RecommendationResponse, which documents it): FastAPI's
        # response-model validation would cost about as much as the top-k.
        response = _json_response(payload)
        if info.used_fallback:
            fallbacks.inc()
        return response

    # app.post, with the route class that bounds JSON integers (only add_api_route takes one)
    app.router.add_api_route(
        "/recommendations",
        recommendations,
        methods=["POST"],
        route_class_override=_BoundedJsonRoute,
        response_model=RecommendationResponse,
        summary="Recommend the next items for a session",
        responses={
            400: {
                "description": "the body is not valid UTF-8 JSON text (or holds an integer of "
                "more than 64 digits)"
            },
            408: {"description": "the body did not arrive within the service's body timeout"},
            413: {"description": "the body is larger than the service's max_body_bytes"},
            415: {"description": "the body is not sent as uncompressed application/json"},
            422: {"description": "invalid request: the body names the field and why"},
        },
    )

    # HEAD too: some load balancers probe with it. Each probe is served by one GET + HEAD route
    # (so a 405 says "Allow: GET, HEAD") kept out of /openapi.json, where a route of two methods
    # gives both operations one operationId, which OpenAPI forbids; a GET route registered after
    # it (never reached) documents the probe.
    def probe(path: str, summary: str, **doc: Any) -> Callable[[Any], Any]:
        def register(endpoint: Any) -> Any:
            app.api_route(path, methods=["GET", "HEAD"], include_in_schema=False)(endpoint)
            return app.get(path, summary=summary, **doc)(endpoint)

        return register

    @probe("/healthz", "Liveness: the process answers (GET or HEAD)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @probe(
        "/readyz",
        "Readiness: the model is loaded and answered a warm-up request (GET or HEAD)",
        responses={503: {"description": "not ready"}},
    )
    async def readyz() -> JSONResponse:
        if not state["ready"]:
            return JSONResponse(status_code=503, content={"status": "not ready"})
        return JSONResponse(
            content={
                "status": "ready",
                "model_version": recommender.model_version,
                "num_items": recommender.num_items,
                "max_len": recommender.max_len,
                "variant": recommender.meta.get("variant"),
                "settings": asdict(settings),
            }
        )

    @app.get("/limits", summary="Request limits of this service (the widget reads them)")
    async def limits() -> dict[str, Any]:
        return {
            "max_k": settings.max_k,
            "default_k": settings.default_k,
            "max_session_len": settings.max_session_len,
            "max_filter_items": settings.max_filter_items,
            "model_version": recommender.model_version,
        }

    @app.get(
        "/catalog",
        summary="Items for the demo shop grid: popular first, then the vocab",
        response_model=dict[str, Any],
    )
    async def catalog(
        limit: Annotated[int, Query(ge=1, le=1000, description="number of item ids")] = 24,
    ) -> Response:
        items = list(dict.fromkeys(recommender.fallback_items[:limit] + recommender.item_ids))
        return _json_response({"items": items[:limit], "model_version": recommender.model_version})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(url="/widget/")

    app.mount("/widget", StaticFiles(directory=STATIC_DIR, html=True), name="widget")
    # inner to outer: the fast path of valid recommendation requests, the body limit, CORS (so a
    # 413 carries its headers), then metrics and logs (which count all)
    (route,) = [r for r in app.routes if getattr(r, "path", None) == "/recommendations"]
    app.add_middleware(
        _FastRecommendations,
        route=route,
        request_model=request_model,
        endpoint=recommendations,
        exception_handlers=app.exception_handlers,
    )
    app.add_middleware(
        _BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    if settings.cors_origins:  # answers preflights; inside the metrics, outside the body limit
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type"],
        )
    app.add_middleware(
        _MetricsAndLogs,
        requests=requests,
        latency=latency,
        log_requests=settings.log_requests,
        routes=app.routes,
    )

    # Warm-up: the first onnxruntime run of each graph allocates; readiness waits for it. Two
    # new two-item sessions run the whole-session graph; with an incremental export, one new
    # two-item session runs the states graph and the step graph, and one item the step graph (a
    # first click). The states and counts they leave are not a visitor's, so the cache starts
    # empty. (A recommender from SessionRecommender.from_dir has run the prefill and step graphs
    # once already, in its load check, but not the states graph; this also warms one built
    # otherwise, for a few milliseconds at startup.)
    warm = recommender.fallback_items[:2]
    if len(warm) > 1:
        recommender.recommend_batch([warm, warm[::-1]], k=1)
        recommender.clear_state_cache()
        recommender.recommend(warm, k=1)
    recommender.recommend(warm[:1], k=1)
    recommender.clear_state_cache()
    state["ready"] = True
    return app


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


_SETTING_FLAGS = {
    "num_threads": "--num-threads",
    "max_session_len": "--max-session-len",
    "max_filter_items": "--max-filter-items",
    "max_body_bytes": "--max-body-bytes",
    "body_timeout_s": "--body-timeout-s",
    "state_cache_mb": "--state-cache-mb",
    "cors_origins": "--cors-origin",
    "max_batch_size": "--max-batch-size",
    "graceful_shutdown_s": "--graceful-shutdown-s",
}
"""The ``seqrec-serve`` flag of each setting whose refusal names the setting first."""


def _flag_message(message: str) -> str:
    """A refusal of ``ServeSettings`` or ``SessionRecommender.from_dir`` as the command line
    speaks: ``max_session_len must be >= 1, got 0`` -> ``--max-session-len must be >= 1, got
    0``. Other messages (they name a file, or already a flag) are returned unchanged."""
    for setting, flag in _SETTING_FLAGS.items():
        if re.match(rf"{setting}\b", message):
            return flag + message[len(setting) :]
    return message


def _log_level(value: str) -> str:
    """``--log-level`` in any case, as the upper-case name ``logging`` takes.

    Raises:
        argparse.ArgumentTypeError: not one of :data:`_LOG_LEVELS` (the message echoes the
            value as typed).
    """
    if value.upper() not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {value!r} (choose from {', '.join(_LOG_LEVELS)}, any case)"
        )
    return value.upper()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of :func:`main`."""
    defaults = ServeSettings()
    parser = argparse.ArgumentParser(
        prog="seqrec-serve",
        description="Serve next-item recommendations from an ONNX export over HTTP.",
    )
    parser.add_argument("export_dir", help="directory written by scripts/export_onnx.py")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=defaults.num_threads,
        help="onnxruntime intra-op threads (default 1 per worker)",
    )
    limits = {  # ServeSettings field -> help; each flag's default is the field's default
        "max_k": f"largest k a request may ask for; a request without k gets "
        f"min({defaults.default_k}, max-k)",
        "max_session_len": "most item ids a request's session may hold; the model reads the "
        "most recent max_len of them",
        "max_filter_items": "most ids in allow_items / deny_items",
        "max_body_bytes": "largest request body in bytes; larger ones get 413",
    }
    for field, text in limits.items():
        default = getattr(defaults, field)
        parser.add_argument(
            "--" + field.replace("_", "-"),
            type=int,
            default=default,
            help=f"{text} (default {default})",
        )
    parser.add_argument(
        "--body-timeout-s",
        type=float,
        default=defaults.body_timeout_s,
        help="seconds a client has to send a request's whole body; later gets 408 "
        f"(default {defaults.body_timeout_s:g})",
    )
    parser.add_argument(
        "--graceful-shutdown-s",
        type=float,
        default=defaults.graceful_shutdown_s,
        help="seconds to let requests in flight finish after SIGTERM/SIGINT before they are "
        f"cancelled and the server exits (default {defaults.graceful_shutdown_s:g})",
    )
    parser.add_argument(
        "--graph-optimization-level",
        choices=["disable", "basic", "extended", "all"],
        default=None,
        help="onnxruntime level (default: the one recorded at export)",
    )
    parser.add_argument(
        "--state-cache-mb",
        type=float,
        default=defaults.state_cache_mb,
        help="MiB of session states kept so a session's next click computes only the new item "
        f"(incremental exports; 0 = off; default {defaults.state_cache_mb:g})",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=defaults.max_batch_size,
        help="most requests scored together in one model call: requests that arrive while the "
        "model is busy are scored together on a model thread (dynamic batching, no added delay);"
        f" 1 = each request on the event loop as it arrives (default {defaults.max_batch_size})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (default 1); each loads the model and keeps its own state cache",
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default="INFO",
        metavar="{DEBUG,INFO,WARNING,ERROR}",
        help="log level, any case (default INFO)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",  # one origin per flag: nargs="+" swallowed an export dir given after it
        default=[],
        metavar="ORIGIN",
        help="origin allowed to call the API from a browser page it serves (CORS), e.g. "
        "https://shop.example; repeatable; default none (the widget on the service's own origin)",
    )
    parser.add_argument(
        "--no-request-logs", action="store_true", help="no log line per request (load tests)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Load the export, build the app and run uvicorn until interrupted.

    One SIGINT (Ctrl-C) or SIGTERM (what process managers send) stops the server gracefully:
    it stops accepting connections, finishes the requests in flight and exits.

    Returns:
        0 after a clean shutdown (with one worker or several); 2 for an unusable export
        directory or a bad flag (message on stderr).
    """
    import uvicorn

    from seqrec.serving.logs import configure_json_logging

    args = build_parser().parse_args(argv)
    configure_json_logging(args.log_level)
    most_workers = 8 * (os.cpu_count() or 1)
    if not 1 <= args.workers <= most_workers:  # each worker process loads the model
        print(
            f"error: --workers must be in 1..{most_workers} (8 per core of this machine), "
            f"got {args.workers}",
            file=sys.stderr,
        )
        return 2
    if args.max_k < 1:  # before ServeSettings, whose message speaks of default_k (no flag)
        print(f"error: --max-k must be >= 1, got {args.max_k}", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"error: --port must be in 0..65535, got {args.port}", file=sys.stderr)
        return 2
    try:  # before loading the model, the way uvicorn binds (it exits 3 with a JSON log line)
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except (OSError, UnicodeError) as exc:  # unknown host, not this machine's, port in use
        print(
            f"error: cannot listen on --host {args.host!r} --port {args.port}: {exc}",
            file=sys.stderr,
        )
        return 2
    try:
        settings = ServeSettings(
            num_threads=args.num_threads,
            max_k=args.max_k,
            default_k=max(1, min(ServeSettings.default_k, args.max_k)),  # --max-k 3 lowers it
            max_session_len=args.max_session_len,
            max_filter_items=args.max_filter_items,
            log_requests=not args.no_request_logs,
            state_cache_mb=args.state_cache_mb,
            max_body_bytes=args.max_body_bytes,
            body_timeout_s=args.body_timeout_s,
            cors_origins=tuple(args.cors_origin),
            max_batch_size=args.max_batch_size,
            graceful_shutdown_s=args.graceful_shutdown_s,
        )
    except ValueError as exc:
        print(f"error: {_flag_message(str(exc))}", file=sys.stderr)
        return 2
    try:
        recommender = _load(args.export_dir, args.graph_optimization_level, settings)
    except (OSError, ValueError) as exc:  # OSError: missing or unreadable files
        print(f"error: {_flag_message(str(exc))}", file=sys.stderr)
        return 2
    if not recommender.incremental:  # report the cache actually in use
        settings = replace(settings, state_cache_mb=0.0)
    try:
        app = create_app(recommender, settings)
    except NonFiniteScoresError as exc:  # a damaged model
        print(f"error: {args.export_dir}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # an unusable catalog
        print(f"error: {Path(args.export_dir) / VOCAB_FILE}: {exc}", file=sys.stderr)
        return 2
    logger.info(
        "serving",
        extra={
            "export_dir": str(args.export_dir),
            "model_version": recommender.model_version,
            "url": f"http://{args.host}:{args.port}/widget/",
            **asdict(settings),
        },
    )
    if args.workers == 1:
        prepare_to_serve(settings)
        # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the
        # handler it found: the default one killed the process (exit 143) where SIGINT and
        # --workers N exit 0; as an interrupt, uvicorn.run returns after the shutdown
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=settings.graceful_shutdown_s,
        )
        return 0
    # several processes: uvicorn starts each from an import string; they rebuild the same app
    os.environ[_WORKER_ENV] = json.dumps(
        {
            "export_dir": str(args.export_dir),
            "graph_optimization_level": args.graph_optimization_level,
            "log_level": args.log_level,
            "settings": asdict(settings),
        }
    )
    uvicorn.run(
        "seqrec.serving.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        workers=args.workers,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
    )
    return 0


_WORKER_ENV = "SEQREC_SERVE_WORKER_CONFIG"


def app_from_env() -> FastAPI:
    """The app of one ``seqrec-serve --workers N`` worker process, from the JSON that
    :func:`main` puts in ``$SEQREC_SERVE_WORKER_CONFIG`` (export dir, settings, log level)."""
    from seqrec.serving.logs import configure_json_logging

    config = json.loads(os.environ[_WORKER_ENV])
    configure_json_logging(config["log_level"])
    settings = ServeSettings(**config["settings"])
    recommender = _load(config["export_dir"], config["graph_optimization_level"], settings)
    app = create_app(recommender, settings)
    prepare_to_serve(settings)
    return app


def prepare_to_serve(settings: ServeSettings) -> None:
    """What a ``seqrec-serve`` process does once its app is built, just before it serves (the
    one process, or each ``--workers N`` worker): freeze the startup objects, set the GIL switch
    interval, and move log writing to a thread (after any startup error was printed)."""
    freeze_startup_objects()
    share_the_gil_often(settings)
    log_from_a_thread()


SWITCH_INTERVAL_S = 0.001
"""GIL switch interval (seconds) of a serving process with a model thread (Python's default is
0.005)."""


def share_the_gil_often(settings: ServeSettings) -> None:
    """With dynamic batching (``max_batch_size`` > 1), set this process's GIL switch interval to
    :data:`SWITCH_INTERVAL_S`: the event loop and the model thread each hold the GIL for their
    Python, and a thread that wants it waits up to one interval for the other to let go. Measured
    on the 2-core AMD VM at 200 requests/s (widget workload, two 20 s rounds): p99 14.1 and
    21.4 ms with the default 5 ms, 11.4 and 13.8 ms with 1 ms. Process-wide, so it is set
    here, in ``seqrec-serve``'s own processes, not by :func:`create_app`."""
    if settings.max_batch_size > 1:
        sys.setswitchinterval(SWITCH_INTERVAL_S)


def freeze_startup_objects() -> int:
    """Collect garbage once, then move every object the garbage collector tracks at that point
    (modules, FastAPI's routes and schemas, the predictor's containers) to its permanent
    generation (``gc.freeze``), so that later full collections no longer walk them. A server
    process with the 37,000-item benchmark export froze about 64,500 objects (56,700 come from
    the imports alone); a full collection over them took about 65 ms on the 2-core AMD benchmark
    VM, a pause that every request waiting at that moment sees in its latency; right after the
    freeze it takes well under a millisecond. Strings and numpy arrays (the catalog's ids, the
    tables) are not tracked and were never walked. Objects made later are collected as usual,
    so the pauses grow back with what the process keeps: each cached session state adds about
    six tracked objects (a full state cache of about 6,800 states: pauses of roughly 35-40 ms).
    Called by ``seqrec-serve`` in each serving process just before it serves; nothing unfreezes
    them (the process serves until it exits).

    Returns:
        ``gc.get_freeze_count()`` afterwards: every object frozen so far in this process (also
        logged, with the process id).
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("froze startup objects", extra={"gc_frozen_objects": frozen, "pid": os.getpid()})
    return frozen


def _load(export_dir: str, level: str | None, settings: ServeSettings) -> SessionRecommender:
    """The recommender of one server process (raises as ``SessionRecommender.from_dir``)."""
    return SessionRecommender.from_dir(
        export_dir,
        num_threads=settings.num_threads,
        graph_optimization_level=level,
        state_cache_mb=settings.state_cache_mb,
    )


if __name__ == "__main__":
    raise SystemExit(main())
