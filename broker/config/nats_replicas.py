"""``queue.replicas``, the old name of ``nats.replicas``, checked on the raw file.

Replicas moved to the ``nats`` block because they apply to every stream and bucket,
not to the job queue alone. The old key keeps working (the model reads it as
``nats.replicas``); here, where the lines are known, it is logged as deprecated, and
a file that sets both is refused naming both keys and their lines, since either
value could be the one meant.
"""

from __future__ import annotations

from typing import Any

import structlog

from laneway.broker.config.errors import ConfigProblem, YamlDocument

__all__ = ["replicas_alias_problems"]

log = structlog.get_logger("laneway.config")


def replicas_alias_problems(data: dict[str, Any], doc: YamlDocument) -> list[ConfigProblem]:
    queue, nats = data.get("queue"), data.get("nats")
    if not isinstance(queue, dict) or "replicas" not in queue:
        return []
    old_line = doc.line_of(("queue", "replicas"))
    if isinstance(nats, dict) and "replicas" in nats:
        new_line = doc.line_of(("nats", "replicas"))
        return [
            doc.problem(
                ("queue", "replicas"),
                f"both queue.replicas (line {old_line}) and nats.replicas (line {new_line}) are set; "
                "queue.replicas is the deprecated name of nats.replicas: keep nats.replicas only",
            )
        ]
    log.warning(
        "queue.replicas is deprecated: rename it nats.replicas",
        source=doc.source,
        line=old_line,
    )
    return []
