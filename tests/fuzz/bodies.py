"""Hypothesis strategies for raw protobuf request bodies, built from message descriptors.

Pure: no IO, no server. ``bodies(descriptor)`` draws the bytes of a request of any
message type, writing the wire format by hand so that it can say what the protobuf
library never would: huge and negative numbers in every integer field, non-canonical
booleans, NaN and infinities, unknown enum values, strings with bad UTF-8 or far too
long, oversized repeated fields, unknown fields, and bodies that are truncated,
corrupted or plain noise. Valid ``seeds`` (e.g. a request that runs a job) are drawn
as they are and with fields drawn over them: protobuf merges a message appended to a
message, so ``seed + fields`` is the seed with those fields replaced.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

__all__ = ["Wire", "bodies", "encode_varint", "message_fields", "render"]

F = FieldDescriptor

_MAX_DEPTH = 4
_MAX_REPEATED = 3
# Field occurrences drawn per message: enough to set several fields (and one twice), few
# enough that drawing a body stays in the milliseconds.
_MAX_OCCURRENCES = 6
# Counts of oversized repeated fields: past the API's limits (1000 jobs a batch, 10,000
# ids a stream) and then some; one drawn element is repeated, so drawing stays cheap.
_OVERSIZED = (1001, 10_001)
# Lengths of long strings: past every limit the API has (64-character names, 256-character
# keys, gRPC's metadata); one top-level string is sometimes _HUGE, past a 1 MiB job and
# NATS's 1 MB message (only there: nested runs of long values multiply).
_LONG = (65, 257, 1025, 10_000, 100_000)
_HUGE = 1_500_000
_HUGE_ODDS = 40
_INT_EDGES = (
    0, 1, -1, 2, 7, 60, 1000, 2**31 - 1, -(2**31), 2**32 - 1, 2**53, 2**63 - 1, -(2**63), 2**64 - 1,
    10**15, -(10**15), 315_576_000_000, 315_576_000_001, -315_576_000_001, 253_402_300_800,
    -62_135_596_801, 999_999_999, 1_000_000_000, -1_000_000_000,
)  # fmt: skip
# A body is cut here (itself a truncated body): nested runs of long values multiply.
_MAX_BODY = 4_000_000
_BAD_UTF8 = (b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80", b"\xfe\xfe")
# One string in this many is bad UTF-8: a body holds a dozen strings, and one bad string
# makes all of it undecodable; most bodies should reach the handlers.
_BAD_STRING_ODDS = 60
_WIRE_VARINT, _WIRE_64, _WIRE_LEN, _WIRE_32 = 0, 1, 2, 5


def encode_varint(value: int) -> bytes:
    """``value`` as a protobuf varint; negative numbers as their 64-bit two's complement."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return encode_varint(number << 3 | wire)


# --- Recipes -----------------------------------------------------------------------
# Strategies draw recipes, not bytes: Hypothesis keeps every drawn value of a test case
# (to mutate it into the next ones), and a body of megabytes kept per case grew the
# fuzzer to gigabytes. A recipe is small however long the bytes it renders.


@dataclass(frozen=True, slots=True)
class Rep:
    """``part`` ``times`` over (a long string, an oversized repeated field)."""

    part: Wire
    times: int


@dataclass(frozen=True, slots=True)
class Cat:
    parts: tuple[Wire, ...]


@dataclass(frozen=True, slots=True)
class Delimited:
    """A length-delimited field: ``key``, then the rendered ``part``'s length and bytes."""

    key: bytes
    part: Wire


@dataclass(frozen=True, slots=True)
class Mangled:
    """``part`` truncated, with a byte flipped, or with ``noise`` inserted, at ``at``/65536
    of its length (the length is known only once rendered)."""

    how: str
    part: Wire
    at: int
    noise: bytes


Wire = bytes | Rep | Cat | Delimited | Mangled
Recipe = st.SearchStrategy[Wire]


def render(wire: Wire) -> bytes:
    """The bytes of a drawn recipe, cut at _MAX_BODY."""
    return _render(wire)[:_MAX_BODY]


def _render(wire: Wire) -> bytes:
    if isinstance(wire, bytes):
        return wire
    if isinstance(wire, Rep):
        return _render(wire.part) * wire.times
    if isinstance(wire, Cat):
        return b"".join(_render(p) for p in wire.parts)
    if isinstance(wire, Delimited):
        payload = _render(wire.part)
        return wire.key + encode_varint(len(payload)) + payload
    body = _render(wire.part)
    if not body:
        return wire.noise
    at = wire.at * len(body) // 65536
    if wire.how == "truncate":
        return body[:at]
    if wire.how == "flip":
        return body[:at] + bytes([body[at] ^ (wire.noise[0] | 1)]) + body[at + 1 :]
    return body[:at] + wire.noise + body[at:]


def _integers() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(_INT_EDGES), st.integers(0, 100), st.integers(-(2**63), 2**64 - 1))


def _strings(vocabulary: Sequence[str], small: bool) -> Recipe:
    """UTF-8 (valid or not) of a string field: known words, text, long text, bad bytes
    (``small``: no long text, for the elements of oversized runs)."""
    text: Recipe = st.text(max_size=24).map(lambda s: s.encode("utf-8", "surrogatepass"))
    long: Recipe = st.builds(
        Rep, st.sampled_from([c.encode() for c in ("a", "é", "\U0001f600", "-", "0")]), st.sampled_from(_LONG)
    )
    bad: Recipe = st.tuples(st.sampled_from(_BAD_UTF8), st.sampled_from((b"", b"chat", b"x" * 70))).map(
        lambda t: t[1] + t[0]
    )
    choices = [text] * 4 + ([] if small else [long])
    if vocabulary:
        choices += [st.sampled_from([w.encode() for w in vocabulary])] * 4
    good = st.one_of(*choices)
    return st.integers(0, _BAD_STRING_ODDS - 1).flatmap(lambda n: bad if n == 0 else good)


def _scalar(
    field: FieldDescriptor, vocabulary: Sequence[str], small: bool = False
) -> st.SearchStrategy[tuple[int, Wire]]:
    """(wire type, value) for one non-message value of ``field``; a length-delimited
    value without its length."""
    t = field.type
    if t == F.TYPE_STRING:
        return _strings(vocabulary, small).map(lambda w: (_WIRE_LEN, w))
    if t == F.TYPE_BYTES:
        return st.binary(max_size=64).map(lambda b: (_WIRE_LEN, b))
    if t in (F.TYPE_DOUBLE, F.TYPE_FIXED64, F.TYPE_SFIXED64):
        return st.binary(min_size=8, max_size=8).map(lambda b: (_WIRE_64, b)) | st.floats().map(
            lambda x: (_WIRE_64, struct.pack("<d", x))
        )
    if t in (F.TYPE_FLOAT, F.TYPE_FIXED32, F.TYPE_SFIXED32):
        return st.binary(min_size=4, max_size=4).map(lambda b: (_WIRE_32, b)) | st.floats(width=32).map(
            lambda x: (_WIRE_32, struct.pack("<f", x))
        )
    if t == F.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        numbers = st.one_of(st.sampled_from(known), st.sampled_from(known), _integers())
        return numbers.map(lambda n: (_WIRE_VARINT, encode_varint(n)))
    if t in (F.TYPE_SINT32, F.TYPE_SINT64):
        return _integers().map(lambda n: (_WIRE_VARINT, encode_varint((n << 1) ^ (n >> 63))))
    # int32, int64, uint32, uint64, bool: any varint (a bool of 2**64-1 included).
    return _integers().map(lambda n: (_WIRE_VARINT, encode_varint(n)))


def _field(number: int, wire_type: int, value: Wire) -> Wire:
    if wire_type == _WIRE_LEN:
        return Delimited(_key(number, wire_type), value)
    return Cat((_key(number, wire_type), value))


class _Builder:
    """Strategies per message type and depth, built once (descriptors can nest deeply).
    A ``small`` builder draws the elements of oversized runs: no long strings and no
    oversized runs inside them, or a body would grow to gigabytes."""

    def __init__(self, vocabulary: Sequence[str], *, small: bool = False) -> None:
        self._vocabulary = tuple(vocabulary)
        self._small = small
        self._cache: dict[tuple[str, int], Recipe] = {}
        self._small_builder = self if small else _Builder(vocabulary, small=True)

    def message(self, descriptor: Descriptor, depth: int = 0) -> Recipe:
        key = (descriptor.full_name, depth)
        if key not in self._cache:
            # Deferred: a message type may contain itself.
            self._cache[key] = st.deferred(lambda: self._message(descriptor, depth))
        return self._cache[key]

    def _message(self, descriptor: Descriptor, depth: int) -> Recipe:
        if depth >= _MAX_DEPTH or not descriptor.fields:
            return st.just(b"")
        occurrences = [self._occurrence(f, depth) for f in descriptor.fields]
        unused = max(descriptor.fields_by_number) + 1
        unknown = st.tuples(st.integers(unused, 2**29 - 1), _scalar_any()).map(
            lambda t: _field(t[0], t[1][0], t[1][1])
        )
        parts = st.lists(st.one_of(*occurrences) | unknown, max_size=_MAX_OCCURRENCES)
        return parts.map(lambda ps: Cat(tuple(ps)))

    def _occurrence(self, field: FieldDescriptor, depth: int) -> Recipe:
        """One field's bytes: a value, a repeated run, or an oversized run."""
        one = self._value(field, depth)
        if not field.is_repeated:
            return one
        run = st.lists(one, min_size=1, max_size=_MAX_REPEATED).map(lambda ws: Cat(tuple(ws)))
        choices = [run]
        if not self._small:
            small_one = self._small_builder._value(field, depth)
            choices += [run] * 14 + [st.builds(Rep, small_one, st.sampled_from(_OVERSIZED))]
        if field.type not in (F.TYPE_MESSAGE, F.TYPE_STRING, F.TYPE_BYTES):
            # proto3 packs repeated scalars: one length-delimited run of values.
            packed = st.lists(_scalar(field, self._vocabulary, self._small), max_size=_MAX_REPEATED).map(
                lambda vs: Delimited(_key(field.number, _WIRE_LEN), Cat(tuple(v for _, v in vs)))
            )
            choices.append(packed)
        return st.one_of(*choices)

    def _value(self, field: FieldDescriptor, depth: int) -> Recipe:
        if field.message_type is not None:
            inner = self.message(field.message_type, depth + 1)
            return inner.map(lambda w: Delimited(_key(field.number, _WIRE_LEN), w))
        return _scalar(field, self._vocabulary, self._small).map(lambda tv: _field(field.number, *tv))


def _scalar_any() -> st.SearchStrategy[tuple[int, Wire]]:
    return st.one_of(
        _integers().map(lambda n: (_WIRE_VARINT, encode_varint(n))),
        st.binary(max_size=16).map(lambda b: (_WIRE_LEN, b)),
        st.binary(min_size=8, max_size=8).map(lambda b: (_WIRE_64, b)),
    )


def message_fields(descriptor: Descriptor, vocabulary: Sequence[str] = ()) -> Recipe:
    """Well-formed wire format of ``descriptor`` (values anything the wire allows)."""
    return _Builder(vocabulary).message(descriptor)


def bodies(descriptor: Descriptor, *, seeds: Sequence[bytes] = (), vocabulary: Sequence[str] = ()) -> Recipe:
    """Request bodies for ``descriptor`` (recipes: ``render`` makes the bytes): drawn
    fields, seeds with drawn fields over them, each maybe truncated or corrupted; and
    now and then plain noise."""
    fields = message_fields(descriptor, vocabulary)
    whole = [fields]
    if seeds:
        seed = st.sampled_from(list(seeds))
        whole += [seed, st.tuples(seed, fields).map(Cat)] * 2
    drawn = st.one_of(*whole)
    strings = [f for f in descriptor.fields if f.type == F.TYPE_STRING]
    if strings:
        # Rarely (a megabyte and a half each): a top-level string past every size limit.
        huge = st.sampled_from(strings).map(lambda f: Delimited(_key(f.number, _WIRE_LEN), Rep(b"h", _HUGE)))
        with_huge = st.tuples(drawn, huge).map(Cat)
        drawn = st.integers(0, _HUGE_ODDS - 1).flatmap(lambda n: with_huge if n == 0 else st.one_of(*whole))
    # Weighted by repetition: mostly whole bodies, some mangled, a few plain noise.
    mangled = st.builds(
        Mangled,
        st.sampled_from(("truncate", "flip", "insert")),
        drawn,
        st.integers(0, 65535),
        st.binary(min_size=1, max_size=8),
    )
    return st.one_of(*([drawn] * 6), mangled, st.binary(max_size=48))
