"""What the fake provider's two API shapes (``fake_openai``, ``fake_anthropic``)
share: a parsed chat call, the reply to render, and the ``Dialect`` seam that
``laneway.workers.fakes.server`` drives; and its admin surface's pure half: the call log
and the parsing of control requests. Pure: dicts and bytes, no IO."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from laneway.workers.fakes.simulation import RateSnapshot, check_error_rates

__all__ = [
    "BadRequest",
    "CallLog",
    "CallRecord",
    "ChatCall",
    "Control",
    "Dialect",
    "Reply",
    "ScriptedAnswer",
    "StepKind",
    "message_text",
    "optional_int",
    "parse_control",
    "sse",
]


StepKind = Literal["ok", "error", "malformed", "truncate", "stall"]
"""How a scripted answer goes: normal, an error status, or broken in one of three ways."""


class BadRequest(Exception):
    """The request body is not one the real API would accept (answered 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class ChatCall:
    """A chat request, whichever API shape it came in."""

    model: str
    prompt: str
    """Every message's text (and the system prompt), for token counts."""
    last_user: str
    """What ``output="echo"`` answers with."""
    max_tokens: int | None
    stream: bool
    include_usage: bool = False
    """OpenAI ``stream_options.include_usage``: a usage chunk before ``[DONE]``."""


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to a chat call, before it is shaped for one API."""

    call: ChatCall
    id_hex: str
    created: int
    text: str
    truncated: bool
    prompt_tokens: int
    completion_tokens: int


def sse(data: object, event: str | None = None) -> bytes:
    """One server-sent event; ``data`` is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def message_text(content: object) -> str:
    """A message's text: a plain string, or the ``text`` parts of a content list
    (both APIs accept either)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


class Dialect(Protocol):
    """One provider API's wire shapes."""

    name: str
    request_id_header: str

    def authorized(self, headers: Mapping[str, str], api_key: str) -> bool: ...

    def error_body(
        self, status: int, message: str, *, code: str = "", param: str | None = None, limited_by: str = ""
    ) -> dict[str, Any]: ...

    def rate_headers(self, snapshot: RateSnapshot, *, now: float) -> dict[str, str]: ...

    def parse_chat(self, body: Mapping[str, Any]) -> ChatCall: ...

    def chat_body(self, reply: Reply) -> dict[str, Any]: ...

    def stream_head(self, reply: Reply) -> list[bytes]: ...

    def stream_token(self, reply: Reply, token: str) -> bytes: ...

    def stream_tail(self, reply: Reply) -> list[bytes]: ...

    def malformed_stream(self, reply: Reply) -> bytes: ...

    def models_body(self, models: list[str], created: int) -> dict[str, Any]: ...


def optional_int(body: Mapping[str, Any], key: str, *, required: bool = False) -> int | None:
    """A positive integer field (bools are not integers here, unlike in Python)."""
    value = body.get(key)
    if value is None:
        if required:
            raise BadRequest(f"{key}: Field required", key)
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"Invalid '{key}': expected an integer >= 1, got {value!r}", key)
    return value


# --- admin surface: what the fake answered, and runtime control ---------------------------


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One model call (chat, messages, embeddings) as the fake answered it.

    Times are unix seconds (``time.time()``), so a harness in another process can line
    them up with its own clock and with other fakes' logs on the same machine."""

    seq: int
    """1 for the first call the fake received, +1 for each later one."""
    path: str
    arrived: float
    answered: float
    """When the handler finished (for a stream: when its last byte was written)."""
    status: int
    """HTTP status; 499 when the handler ended without an answer (client gone, shutdown)."""
    retry_after: str | None = None
    """The Retry-After header sent, if any."""

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "seq": self.seq,
            "path": self.path,
            "arrived": self.arrived,
            "answered": self.answered,
            "status": self.status,
        }
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body


class CallLog:
    """Every model call with its status, and counters by status."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self.by_status: Counter[int] = Counter()
        self._last_seq = 0

    def add(self, path: str, arrived: float, answered: float, status: int, retry_after: str | None) -> None:
        self._last_seq += 1
        self.records.append(CallRecord(self._last_seq, path, arrived, answered, status, retry_after))
        self.by_status[status] += 1

    def clear(self) -> None:
        """Forget the calls so far; sequence numbers go on, so a reader's cursor stays valid."""
        self.records = []
        self.by_status.clear()

    def stats(self) -> dict[str, Any]:
        return {
            "calls": len(self.records),
            "ok": self.by_status[200],
            "by_status": {str(status): n for status, n in sorted(self.by_status.items())},
            "first_arrived": self.records[0].arrived if self.records else None,
            "last_arrived": self.records[-1].arrived if self.records else None,
            "last_seq": self._last_seq,
        }

    def after(self, seq: int, limit: int) -> list[CallRecord]:
        """Up to ``limit`` records with a sequence number above ``seq``, oldest first."""
        if not self.records:
            return []
        # Records are numbered consecutively from the first one kept.
        start = max(0, seq - self.records[0].seq + 1)
        return self.records[start : start + limit]


@dataclass(frozen=True, slots=True)
class ScriptedAnswer:
    """A control request's scripted answer, ``repeat`` times (``fakes.server.Step``'s fields)."""

    status: int = 200
    kind: StepKind = "ok"
    retry_after_s: float | None = None
    error_code: str = ""
    repeat: int = 1


@dataclass(frozen=True, slots=True)
class Control:
    """A parsed ``POST /_laneway/control`` body; None leaves that setting as it is."""

    error_rates: dict[int, float] | None = None
    """Replaces the injected error rates ({} stops injecting)."""
    latency_ms: float | None = None
    latency_jitter_ms: float | None = None
    script: tuple[ScriptedAnswer, ...] = ()
    """Appended to the scripted answers (after ``clear_script`` when both are given)."""
    clear_script: bool = False
    reset_log: bool = False
    """Forget the call log and its counters (sequence numbers go on)."""


_STEP_KINDS = ("ok", "error", "malformed", "truncate", "stall")
_CONTROL_KEYS = {"error_rates", "latency_ms", "latency_jitter_ms", "script", "clear_script", "reset_log"}
_SCRIPT_KEYS = {"status", "kind", "retry_after_s", "error_code", "repeat"}


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise BadRequest(f"{name}: expected a number >= 0, got {value!r}", name)
    return float(value)


def _scripted(item: object, index: int) -> ScriptedAnswer:
    where = f"script[{index}]"
    if not isinstance(item, dict):
        raise BadRequest(f"{where}: expected an object", where)
    unknown = set(item) - _SCRIPT_KEYS
    if unknown:
        raise BadRequest(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_SCRIPT_KEYS)}", where)
    status = item.get("status", 200)
    repeat = item.get("repeat", 1)
    kind = item.get("kind", "ok" if status == 200 else "error")
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise BadRequest(f"{where}.status: expected an HTTP status, got {status!r}", where)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= 100_000:
        raise BadRequest(f"{where}.repeat: expected an integer 1-100000, got {repeat!r}", where)
    if kind not in _STEP_KINDS:
        raise BadRequest(f"{where}.kind: expected one of {list(_STEP_KINDS)}, got {kind!r}", where)
    retry_after = item.get("retry_after_s")
    code = item.get("error_code", "")
    if not isinstance(code, str):
        raise BadRequest(f"{where}.error_code: expected a string", where)
    return ScriptedAnswer(
        status=status,
        kind=kind,
        retry_after_s=None if retry_after is None else _number(retry_after, f"{where}.retry_after_s"),
        error_code=code,
        repeat=repeat,
    )


def parse_control(body: object) -> Control:
    """Validate a control request (``BadRequest`` naming the key on anything unexpected)."""
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object")
    unknown = set(body) - _CONTROL_KEYS
    if unknown:
        raise BadRequest(f"unknown keys {sorted(unknown)}; allowed: {sorted(_CONTROL_KEYS)}")
    rates: dict[int, float] | None = None
    if "error_rates" in body:
        raw = body["error_rates"]
        if not isinstance(raw, dict):
            raise BadRequest('error_rates: expected an object such as {"503": 0.5}', "error_rates")
        try:
            rates = {int(k): _number(v, f"error_rates.{k}") for k, v in raw.items()}
            check_error_rates(rates)
        except ValueError as err:  # int() of a bad key, or the rates' own checks
            raise BadRequest(f"error_rates: {err}", "error_rates") from None
    script = body.get("script", [])
    if not isinstance(script, list):
        raise BadRequest("script: expected a list of answers", "script")
    flags = {k: body.get(k, False) for k in ("clear_script", "reset_log")}
    for key, flag in flags.items():
        if not isinstance(flag, bool):
            raise BadRequest(f"{key}: expected true or false", key)
    latency = {k: _number(body[k], k) if k in body else None for k in ("latency_ms", "latency_jitter_ms")}
    return Control(
        error_rates=rates,
        latency_ms=latency["latency_ms"],
        latency_jitter_ms=latency["latency_jitter_ms"],
        script=tuple(_scripted(item, i) for i, item in enumerate(script)),
        clear_script=flags["clear_script"],
        reset_log=flags["reset_log"],
    )
