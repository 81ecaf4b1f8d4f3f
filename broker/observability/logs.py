"""structlog setup: JSON lines for machines, readable lines on a terminal.

Every line logged inside a span carries its ``trace_id`` and ``span_id`` (the
worker also binds ``trace_id`` with job_id, route, lane, provider and attempt on
each job's lines). Secrets are never written: values under secret-like keys are
blanked, and every string a line carries is passed through ``redact_text`` (URL
credentials, ``token=...``-like pairs, nkey seeds) as a safety net behind the callers
that show URLs with ``redact_url``. Prompt text only with ``LANEWAY_LOG_PROMPTS=1``
(a debugging aid: prompts are often personal data).
"""

from __future__ import annotations

import logging
import os
import sys

import structlog
from opentelemetry import trace

from laneway.broker.core.redact import redact_text

__all__ = ["add_trace_context", "configure_logging", "redact", "redact_secrets"]

# Keys a log call must never write out as given. Nothing logs them today; this
# keeps a future debug line from leaking credentials or a user's prompt.
_SECRET_KEYS = frozenset(
    {"api_key", "authorization", "credentials", "jwt", "nkey", "password", "secret", "token"}
)
_PROMPT_KEYS = frozenset({"prompt", "prompts", "messages", "input", "inputs", "text", "texts"})
_REDACTED = "[redacted]"
_hidden = _SECRET_KEYS | _PROMPT_KEYS


def add_trace_context(
    logger: object, method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Add the current span's trace and span ids (a bound trace_id is kept)."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        if not event_dict.get("trace_id"):
            event_dict["trace_id"] = trace.format_trace_id(span_context.trace_id)
        event_dict.setdefault("span_id", trace.format_span_id(span_context.span_id))
    return event_dict


def redact(logger: object, method: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """Blank secrets always, prompt text unless ``LANEWAY_LOG_PROMPTS=1`` was set at start."""
    for key in _hidden.intersection(event_dict):
        event_dict[key] = _REDACTED
    return event_dict


def _scrub(value: object) -> object:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact_secrets(
    logger: object, method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Mask credentials inside every string of the line, the formatted exception too."""
    for key, value in event_dict.items():
        event_dict[key] = _scrub(value)
    return event_dict


def configure_logging(level: str | None = None) -> None:
    """Configure structlog once per process; ``LANEWAY_LOG_LEVEL`` sets the default level."""
    global _hidden
    prompts = os.environ.get("LANEWAY_LOG_PROMPTS", "") == "1"
    _hidden = _SECRET_KEYS if prompts else _SECRET_KEYS | _PROMPT_KEYS
    name = (level or os.environ.get("LANEWAY_LOG_LEVEL", "info")).upper()
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_trace_context,
            redact,
            structlog.processors.format_exc_info,
            redact_secrets,  # after format_exc_info: a traceback may quote a URL
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(name, logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
