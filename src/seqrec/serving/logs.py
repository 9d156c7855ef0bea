"""Structured logs: one JSON object per line (for the service; stdlib only)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
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


def configure_json_logging(level: str = "INFO") -> None:
    """Send every logger (uvicorn's included) to stderr as JSON lines at ``level``.

    The records' thread, process and caller fields, which :class:`JsonFormatter` never writes,
    are not gathered (the logging HOWTO's "Optimization" settings: ``logThreads``,
    ``logProcesses``, ``logMultiprocessing``, ``_srcfile``): the service logs one line per
    request on its event loop.
    """
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup (sys._getframe walk) per record
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
