"""Classification on chat models: the prompts (one text, or several in one call) and
reading the labels back. Pure."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from typing import Any

from laneway.broker.core.model import ErrorClass, JobError
from laneway.workers.providers.base import ProviderError

__all__ = [
    "BATCH_SYSTEM_PROMPT",
    "batch_request",
    "classification_prompt",
    "parse_batch_labels",
    "parse_label",
]


def classification_prompt(labels: tuple[str, ...]) -> str:
    """The system prompt of a classification call."""
    listed = ", ".join(json.dumps(label) for label in labels)
    return (
        f"Classify the user's text into exactly one of these labels: {listed}. "
        'Reply with only a JSON object of the form {"label": "<label>"}, '
        "the label written exactly as listed."
    )


def _first_json_object(text: str) -> Any:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        with contextlib.suppress(ValueError):
            return decoder.raw_decode(text, match.start())[0]
    return None


def parse_label(provider: str, text: str, labels: tuple[str, ...]) -> str:
    """The label a classification answer names, read leniently: models wrap the JSON in
    prose or code fences, change case, or answer with the bare label."""
    by_fold = {label.casefold(): label for label in labels}
    found = _first_json_object(text)
    if isinstance(found, dict) and isinstance(found.get("label"), str):
        candidate: str = found["label"]
    else:
        candidate = text
        # No JSON: a prose answer naming exactly one label is still an answer.
        named = [
            label for label in labels if re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text, re.IGNORECASE)
        ]
        if len(named) == 1:
            return named[0]
    label = by_fold.get(candidate.strip().strip("\"'`.").strip().casefold())
    if label is None:
        # Transient, not permanent: the text itself is fine and models are not deterministic
        # (even at temperature 0), so another attempt may well name a valid label; the
        # attempt budget bounds the cost if it never does.
        message = f"{provider}: the answer {text[:100]!r} names none of the labels {list(labels)}"
        raise ProviderError(JobError("invalid_label", message, ErrorClass.TRANSIENT, 200))
    return label


# --- several texts in one call -------------------------------------------------------

BATCH_SYSTEM_PROMPT = (
    "You classify texts. The user sends a JSON object whose `items` each have an `id`, "
    "a `text` and its allowed `labels`. Classify every item into exactly one of its own "
    'labels. Reply with only a JSON object {"labels": [<label of item 0>, <label of item 1>, ...]}, '
    "one label per item in item order, each written exactly as listed."
)


def batch_request(requests: Sequence[tuple[str, tuple[str, ...]]]) -> str:
    """The user message of a batched classification call: (text, labels) per item."""
    items = [{"id": i, "text": text, "labels": list(labels)} for i, (text, labels) in enumerate(requests)]
    return json.dumps({"items": items}, ensure_ascii=False)


def parse_batch_labels(
    provider: str, text: str, requests: Sequence[tuple[str, tuple[str, ...]]]
) -> list[str | ProviderError] | None:
    """Each item's label from a batched answer; an item whose label is not one of its own
    is an ``invalid_label`` error (never a guess). None when the answer has not the
    expected shape at all, so the caller falls back to one call per item."""
    found = _first_json_object(text)
    answers = found.get("labels") if isinstance(found, dict) else None
    if not isinstance(answers, list) or len(answers) != len(requests):
        return None
    out: list[str | ProviderError] = []
    for answer, (_text, labels) in zip(answers, requests, strict=True):
        by_fold = {label.casefold(): label for label in labels}
        label = by_fold.get(answer.strip().casefold()) if isinstance(answer, str) else None
        if label is None:
            message = f"{provider}: batched answer {answer!r} is none of the labels {list(labels)}"
            out.append(ProviderError(JobError("invalid_label", message, ErrorClass.TRANSIENT, 200)))
        else:
            out.append(label)
    return out
