"""The v1 contract's documentation matches the contract: the error-reason table of
docs/api.md lists every ``ErrorReason`` with the status errors.proto gives it, and
the statuses the broker sends agree."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from laneway.broker.server.status import status_for
from laneway.errors import error_for_code
from laneway.v1 import errors_pb2

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "ERROR_REASON_"


def _reasons() -> list[str]:
    names = errors_pb2.ErrorReason.keys()
    return [n.removeprefix(PREFIX) for n in names if n != f"{PREFIX}UNSPECIFIED"]


def _doc_table() -> dict[str, tuple[str, str]]:
    """reason -> (status, retry?) from the "### Error reasons" table of docs/api.md."""
    text = (ROOT / "docs" / "api.md").read_text()
    section = text.split("### Error reasons", 1)[1].split("\n\n", 2)[1]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1], cells[3])
    return rows


def _proto_statuses() -> dict[str, str]:
    """reason -> the status its comment in errors.proto starts with ("// UNAVAILABLE. ...")."""
    text = (ROOT / "protos" / "laneway" / "v1" / "errors.proto").read_text()
    found: dict[str, str] = {}
    for comment, name in re.findall(r"((?:\s*//[^\n]*\n)+)\s*ERROR_REASON_(\w+) = \d+;", text):
        first = comment.strip().splitlines()[0].removeprefix("//").strip()
        found[name] = first.split(".", 1)[0]
    return found


def test_every_error_reason_is_in_the_api_doc_table() -> None:
    table = _doc_table()
    assert sorted(table) == sorted(_reasons()), "docs/api.md's error-reason table and ErrorReason differ"


def test_the_doc_table_gives_each_reason_the_status_the_proto_documents() -> None:
    statuses = _proto_statuses()
    assert set(statuses) == {*_reasons(), "UNSPECIFIED"}
    table = _doc_table()
    wrong = {r: (table[r][0], statuses[r]) for r in table if table[r][0] != statuses[r]}
    assert not wrong, f"doc status != errors.proto status: {wrong}"
    for status in {s for s, _ in table.values()}:
        assert status in grpc.StatusCode.__members__, status


@pytest.mark.parametrize("reason", _reasons())
def test_the_broker_sends_each_reason_with_its_documented_status(reason: str) -> None:
    # The exception class for the documented status, raised with the reason, goes out
    # as that status with ErrorInfo.reason unchanged.
    status = _proto_statuses()[reason]
    cls = error_for_code(grpc.StatusCode[status])
    sent = status_for(cls("x", reason=reason))
    assert sent.code == grpc.StatusCode[status]
    assert reason.encode() in dict(sent.trailing_metadata)["grpc-status-details-bin"]
