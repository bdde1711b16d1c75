"""Structured logging: one JSON object per line on stderr.

Each record looks like::

    {"ts": "2026-11-29T08:00:00.123Z", "level": "info", "subsystem": "proxy", "msg": "...",
     "endpoint-id": "my-endpoint"}

``configure(level, subsystems)`` sets the minimum level (debug < info < warn < error);
subsystems listed in ``subsystems`` (exact match) log at every level. Records from
Python's stdlib ``logging`` (aiohttp, asyncio, ...) at warning and above are routed into
the same format with the stdlib logger name as the subsystem.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import orjson

__all__ = ["LEVELS", "Logger", "RateLimited", "configure", "get_logger"]

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40

LEVELS: dict[str, int] = {"debug": DEBUG, "info": INFO, "warn": WARN, "error": ERROR}
_ALIASES = {"warning": "warn", "err": "error"}
_NAMES = {v: k for k, v in LEVELS.items()}

# Module state, read on every call (kept as plain globals so the disabled path is cheap).
_min_level: int = INFO
_verbose: frozenset[str] = frozenset()
_stream: TextIO | None = None
_lock = threading.Lock()


def _level_value(level: str) -> int:
    name = level.strip().lower()
    name = _ALIASES.get(name, name)
    try:
        return LEVELS[name]
    except KeyError:
        raise ValueError(f"invalid log level {level!r} (use debug, info, warn or error)") from None


def _timestamp(now: float) -> str:
    secs = int(now)
    ms = int((now - secs) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"


def _default(value: Any) -> Any:
    if isinstance(value, BaseException):
        text = str(value)
        return f"{type(value).__name__}: {text}" if text else type(value).__name__
    if isinstance(value, set | frozenset):
        return sorted(map(str, value))
    return str(value)


def _encode(record: dict[str, Any]) -> str:
    try:
        return orjson.dumps(record, default=_default, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        # e.g. integers beyond 64 bits, or deeply nested values.
        return json.dumps(record, default=_default, ensure_ascii=False)


def _write(line: str) -> None:
    stream = _stream if _stream is not None else sys.stderr
    with _lock:
        try:
            stream.write(line + "\n")
        except (OSError, ValueError):
            pass  # closed stream (e.g. during interpreter shutdown); nothing useful to do


class Logger:
    """A logger for one subsystem. Cheap to create; level checks happen before any work."""

    __slots__ = ("_fields", "subsystem")

    def __init__(self, subsystem: str, fields: dict[str, Any] | None = None) -> None:
        self.subsystem = subsystem
        self._fields = fields

    def enabled(self, level: str) -> bool:
        """Whether a record at ``level`` would be written (for guarding expensive fields)."""
        value = LEVELS.get(level)
        if value is None:
            value = _level_value(level)
        return value >= _min_level or self.subsystem in _verbose

    def bind(self, **fields: object) -> Logger:
        """A logger for the same subsystem that adds ``fields`` to every record."""
        merged = dict(self._fields or {})
        merged.update({k.replace("_", "-"): v for k, v in fields.items()})
        return Logger(self.subsystem, merged)

    def debug(self, msg: str, /, **fields: object) -> None:
        """Log at debug level."""
        if _min_level <= DEBUG or self.subsystem in _verbose:
            self._emit("debug", msg, fields)

    def info(self, msg: str, /, **fields: object) -> None:
        """Log at info level."""
        if _min_level <= INFO or self.subsystem in _verbose:
            self._emit("info", msg, fields)

    def warn(self, msg: str, /, **fields: object) -> None:
        """Log at warn level."""
        if _min_level <= WARN or self.subsystem in _verbose:
            self._emit("warn", msg, fields)

    warning = warn

    def warn_throttled(self, msg: str, /, **fields: object) -> None:
        """Log at warn level at most once a minute for this subsystem and `msg` (a
        `RateLimited` per subsystem, with `msg` as the reason).

        For what a peer controls (bad input, floods): `msg` must be a constant. A record
        carries `suppressed`, how many were dropped since the last one written.
        """
        limiter = _throttles.get(self.subsystem)
        if limiter is None:
            limiter = _throttles.setdefault(self.subsystem, RateLimited(get_logger(self.subsystem)))
        limiter.warn(msg, msg, **fields)

    def error(self, msg: str, /, **fields: object) -> None:
        """Log at error level."""
        if _min_level <= ERROR or self.subsystem in _verbose:
            self._emit("error", msg, fields)

    def log(self, level: str, msg: str, /, **fields: object) -> None:
        """Log at a level given by name (debug, info, warn, error)."""
        if self.enabled(level):
            self._emit(level, msg, fields)

    def _emit(self, level: str, msg: str, fields: dict[str, object]) -> None:
        record: dict[str, Any] = {
            "ts": _timestamp(time.time()),
            "level": level,
            "subsystem": self.subsystem,
            "msg": msg,
        }
        if self._fields:
            for key, value in self._fields.items():
                record[key if key not in _CORE else "field-" + key] = value
        for key, value in fields.items():
            key = key.replace("_", "-")
            record[key if key not in _CORE else "field-" + key] = value
        _write(_encode(record))

    def __repr__(self) -> str:
        return f"Logger({self.subsystem!r})"


_CORE = frozenset({"ts", "level", "subsystem", "msg"})
# Throttled warnings: at most one per (subsystem, message) per interval; the time of the last
# one written and how many were suppressed since. Keys are constant messages: bounded.
_throttles: dict[str, RateLimited] = {}
_loggers: dict[str, Logger] = {}


class RateLimited:
    """Warnings about what peers send, at most one record per reason per `interval` seconds.

    Bad input must be visible, but a peer must not be able to fill the disk with it: the first
    report of a reason is written, later ones within `interval` are only counted, and their
    number goes out as `suppressed` with the next record of that reason. `counts` holds every
    report by reason, for metrics. Reasons are bounded by `max_reasons` (they are often built
    from peer input); past it new ones are counted as "other".
    """

    __slots__ = (
        "_clock",
        "_next",
        "_suppressed",
        "counts",
        "interval",
        "level",
        "logger",
        "max_reasons",
    )

    def __init__(
        self,
        logger: Logger,
        *,
        interval: float = 60.0,
        max_reasons: int = 64,
        clock: Callable[[], float] = time.monotonic,
        level: str = "warn",
    ) -> None:
        self.logger = logger
        self.level = level  # what the records are written at
        self.interval = interval
        self.max_reasons = max_reasons
        self._clock = clock
        self.counts: dict[str, int] = {}
        self._next: dict[str, float] = {}  # reason -> when it may be written again
        self._suppressed: dict[str, int] = {}

    def warn(self, reason: str, msg: str, /, **fields: object) -> bool:
        """Count a report of `reason`; write `msg` (at `level`, warn unless told) unless one
        was written within the interval. Returns whether a record was written."""
        if reason not in self.counts and len(self.counts) >= self.max_reasons:
            reason = "other"
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = self._clock()
        if now < self._next.get(reason, now):
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return False
        self._next[reason] = now + self.interval
        suppressed = self._suppressed.pop(reason, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        if reason != msg:
            fields["reason"] = reason
        self.logger.log(self.level, msg, **fields)
        return True


def get_logger(subsystem: str) -> Logger:
    """The logger for ``subsystem`` (e.g. "proxy", "gossip", "cluster")."""
    logger = _loggers.get(subsystem)
    if logger is None:
        logger = _loggers.setdefault(subsystem, Logger(subsystem))
    return logger


class _StdlibHandler(logging.Handler):
    """Routes stdlib ``logging`` records into the JSON format."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.levelno >= logging.ERROR:
                level = "error"
            elif record.levelno >= logging.WARNING:
                level = "warn"
            elif record.levelno >= logging.INFO:
                level = "info"
            else:
                level = "debug"
            logger = get_logger(record.name)
            if not logger.enabled(level):
                return
            fields: dict[str, object] = {}
            if record.exc_info and record.exc_info[0] is not None:
                fields["exception"] = "".join(traceback.format_exception(*record.exc_info))
            logger._emit(level, record.getMessage(), fields)
        except Exception:
            self.handleError(record)


_handler: _StdlibHandler | None = None


def configure(
    level: str = "info", subsystems: Sequence[str] = (), stream: TextIO | None = None
) -> None:
    """Set the minimum level, the always-logged subsystems and the output stream.

    ``stream`` None means ``sys.stderr`` looked up at write time. Also installs a handler on
    the stdlib root logger so warnings and errors from libraries use the same format.
    Raises ``ValueError`` for an unknown level.
    """
    global _min_level, _verbose, _stream, _handler
    _min_level = _level_value(level)
    _verbose = frozenset(subsystems)
    _stream = stream
    root = logging.getLogger()
    if _handler is None:
        _handler = _StdlibHandler(logging.WARNING)
    if _handler not in root.handlers:
        root.addHandler(_handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
