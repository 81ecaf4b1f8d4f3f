"""Classification on chat models: the prompt, and reading the label back. Pure."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from broker.model import ErrorClass, JobError
from workers.provider import ProviderError

__all__ = ["classification_prompt", "parse_label"]


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
