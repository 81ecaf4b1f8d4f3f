"""protobuf ``Timestamp`` <-> ``datetime``, exactly as protobuf converts them, faster.

``Timestamp.FromDatetime`` and ``ToDatetime`` are pure Python; several timestamps go
into every event on the hot path. Integer arithmetic on timedeltas (done in C)
gives the same values (a property test compares both) in a third of the time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

__all__ = ["set_timestamp", "to_datetime"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def set_timestamp(dt: datetime | None, out: Timestamp) -> None:
    """Write ``dt`` into ``out`` (None leaves it unset); a naive ``dt`` is UTC."""
    if dt is not None:
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        micros = (dt - _EPOCH) // _MICROSECOND
        out.seconds, rest = divmod(micros, 1_000_000)
        out.nanos = rest * 1000


def to_datetime(ts: Timestamp) -> datetime:
    """``ts`` as an aware UTC datetime (microsecond precision, like protobuf's)."""
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)
