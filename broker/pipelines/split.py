"""The split step: text into overlapping chunks, deterministically.

Deterministic because a chunk is never stored: the driver splits again whenever it
needs a chunk (to enqueue the job of item ``i`` of a map step, on any broker, after
any crash), and each time must get the same chunk ``i``.
"""

from __future__ import annotations

from laneway.broker.config.pipelines import SplitStep

__all__ = ["split_text"]


def split_text(text: str, step: SplitStep) -> list[str]:
    """Chunks of at most ``step.size`` units (characters, or whitespace-separated
    tokens re-joined by one space), each starting ``size - overlap`` units after the
    one before; the last chunk ends at the end of the text. Empty text: no chunk."""
    units: list[str] = list(text) if step.by == "characters" else text.split()
    if not units:
        return []
    joiner = "" if step.by == "characters" else " "
    stride = step.size - step.overlap  # the config keeps overlap below size
    chunks: list[str] = []
    start = 0
    while True:
        chunks.append(joiner.join(units[start : start + step.size]))
        if start + step.size >= len(units):
            return chunks
        start += stride
