"""Every public .proto sets the language options (buf lint's STANDARD rules don't check
them): code generated for Go, Java, C#, PHP, Ruby or Objective-C lands in the same,
predictable package whatever file it comes from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PROTOS = sorted((Path(__file__).resolve().parent.parent / "protos" / "laneway" / "v1").glob("*.proto"))
# The value every file shares; java_outer_classname is per file.
SHARED = {
    "go_package": '"github.com/laneway-dev/laneway/gen/go/laneway/v1;lanewayv1"',
    "java_package": '"dev.laneway.v1"',
    "java_multiple_files": "true",
    "csharp_namespace": '"Laneway.V1"',
    "php_namespace": '"Laneway\\\\V1"',
    "ruby_package": '"Laneway::V1"',
    "objc_class_prefix": '"LWY"',
}
# A file option: its name and its value, a quoted string (which may hold ';') or a bare word.
OPTION = re.compile(r'^option\s+(\w+)\s*=\s*("(?:[^"\\]|\\.)*"|[\w.]+)\s*;', re.MULTILINE)


def _options(proto: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in OPTION.findall(proto.read_text()):
        assert name not in found, f"{proto.name}: option {name} set twice"
        found[name] = value
    return found


def test_there_are_protos() -> None:
    assert len(PROTOS) >= 5, PROTOS


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_proto_sets_every_language_option(proto: Path) -> None:
    options = _options(proto)
    for name, value in SHARED.items():
        assert options.get(name) == value, f"{proto.name}: option {name} = {options.get(name)}, want {value}"
    # BrokerServiceProto for broker_service.proto: the file name in UpperCamelCase, plus Proto.
    classname = "".join(part.capitalize() for part in proto.stem.split("_")) + "Proto"
    assert options.get("java_outer_classname") == f'"{classname}"', proto.name
