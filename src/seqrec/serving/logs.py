"""Structured logs: one JSON object per line (for the service; stdlib only)."""

from __future__ import annotations

import atexit
import json
import logging
import queue
import sys
from datetime import UTC, datetime
from logging.handlers import QueueHandler, QueueListener
from typing import Any

# color_message: uvicorn's copy of its message with ANSI colour codes (noise in a JSON log)
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """Format a record as ``{"ts", "level", "logger", "message", ...extra fields}``.

    Fields passed with ``logger.info("...", extra={"path": "/x", "status": 200})`` become keys of
    the JSON object; exceptions go to ``exc_info`` as text.
    """

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class _RecordQueueHandler(QueueHandler):
    """A :class:`~logging.handlers.QueueHandler` that enqueues the record itself: the listener
    runs in the same process, so the record need not be formatted and stripped for pickling
    first (the logging docs' advice for ``prepare``), and the JSON is built on the listener's
    thread, not the caller's."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


_listener: QueueListener | None = None
_queue_handler: _RecordQueueHandler | None = None


def stop_log_thread() -> None:
    """Give the listener's handlers back to the root logger, then write the lines still queued
    and stop the thread started by :func:`log_from_a_thread`; later records are written by the
    caller again. Called when the service's lifespan ends (a ``--workers N`` worker is then
    ended by the signal uvicorn raises again, so exit handlers do not run there), at interpreter
    exit, and before a new configuration; nothing happens without a thread."""
    global _listener, _queue_handler
    if _listener is None:
        return
    listener, handler, _listener, _queue_handler = _listener, _queue_handler, None, None
    root = logging.getLogger()
    if root.handlers == [handler]:  # not replaced by someone else since
        root.handlers[:] = list(listener.handlers)
    listener.stop()


def configure_json_logging(level: str = "INFO") -> None:
    """Send every logger (uvicorn's included) to stderr as JSON lines at ``level``.

    The records' thread, process and caller fields, which :class:`JsonFormatter` never writes,
    are not gathered (the logging HOWTO's "Optimization" settings: ``logThreads``,
    ``logProcesses``, ``logMultiprocessing``, ``_srcfile``): the service logs one line per
    request on its event loop. Lines are written by the calling thread, in order with what the
    process prints; :func:`log_from_a_thread` moves the writing off it once the service serves.
    """
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup (sys._getframe walk) per record
    stop_log_thread()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # the service's own request log replaces uvicorn's access lines (uvicorn turns them off with
    # access_log=False, but a worker process configures logging after it)
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False


def log_from_a_thread() -> None:
    """Hand the root logger's handlers to a listener thread: records go through a queue to the
    thread, which formats and writes them (the logging cookbook's "Dealing with handlers that
    block": ``QueueHandler`` + ``QueueListener``). A serving process calls this just before it
    serves, so that its event loop, which logs one line per request, neither builds the JSON
    nor waits for the write (about 0.1 ms of its time per request on the 2-core AMD VM). The
    lines still queued are written by :func:`stop_log_thread`, which the service's lifespan
    calls when it ends and which also runs at interpreter exit; a killed process loses them (a
    few milliseconds of lines). A line is written a moment after it is logged, so a process that
    prints to stderr as well (``seqrec-serve``'s startup errors) calls this only after it
    printed."""
    global _listener, _queue_handler
    stop_log_thread()
    root = logging.getLogger()
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = QueueListener(records, *root.handlers)
    _listener.start()
    _queue_handler = _RecordQueueHandler(records)
    root.handlers[:] = [_queue_handler]


atexit.register(stop_log_thread)
