"""YAML with line numbers, and config problems that point at them.

Split from ``laneway.broker.config.model`` so the models there stay readable. This module knows
YAML nodes, environment interpolation and pydantic error locations; it learns the
schema only from the model class it is handed, so a new provider model needs no
change here.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from laneway.broker.core.errors import ConfigError

__all__ = [
    "ConfigProblem",
    "ConfigValidationError",
    "KeyPath",
    "YamlDocument",
    "format_key",
    "problems_from_validation_error",
    "suggest",
]

KeyPath = tuple[Any, ...]
"""Keys and list indices from the document root down to one value."""

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
# `$${` is the escape for a literal `${`, so a value can still contain one.
_ENV_REF = re.compile(r"\$(\$?)\{([^}]*)\}")
_ENV_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_DUPLICATE_KEY = re.compile(r'found duplicate key "(.*?)"')


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config file, located well enough to fix without searching."""

    file: str
    line: int
    """1-based; for a missing key, the line of the mapping that should hold it."""
    key: str
    """Dotted path such as ``routes.chat.targets[0].provider``; empty for whole-file problems."""
    message: str
    suggestion: str | None = None
    """A close valid spelling, shown as ``(did you mean 'x'?)``."""

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}" if self.key else self.message
        hint = f" (did you mean '{self.suggestion}'?)" if self.suggestion else ""
        return f"{self.file}:{self.line}: {text}{hint}"


class ConfigValidationError(ConfigError):
    """Every problem found in one config file, one line each, sorted by line."""

    problems: tuple[ConfigProblem, ...]

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        unique = dict.fromkeys(problems)
        self.problems = tuple(sorted(unique, key=lambda p: (p.file, p.line, p.key, p.message)))
        super().__init__("\n".join(str(p) for p in self.problems))

    def __reduce__(self) -> tuple[type[ConfigValidationError], tuple[tuple[ConfigProblem, ...]]]:
        # The default reduce would call __init__ with the joined message instead of the problems.
        return type(self), (self.problems,)


def format_key(path: Sequence[Any]) -> str:
    """``("routes", "chat", "targets", 0)`` -> ``routes.chat.targets[0]``.

    Keys that are not plain tokens are quoted so that ``providers['a.b']`` cannot be
    misread as two levels.
    """
    out = ""
    for item in path:
        if isinstance(item, int) and not isinstance(item, bool):
            out += f"[{item}]"
        elif isinstance(item, str) and _PLAIN_KEY.match(item):
            out += f".{item}" if out else item
        else:
            out += f"[{str(item)!r}]"
    return out


def suggest(word: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to a misspelt ``word``, if any is close enough."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


class YamlDocument:
    """A parsed YAML mapping that still knows the line of every key."""

    def __init__(self, root: CommentedMap, source: str) -> None:
        self.root = root
        self.source = source

    @classmethod
    def parse(cls, text: str, source: str) -> YamlDocument:
        """Parse ``text``; syntax errors, an empty file or a non-mapping raise at once,
        since nothing else can be checked without a mapping."""
        try:
            root = YAML(typ="rt").load(text)
        except MarkedYAMLError as exc:
            raise ConfigValidationError([_syntax_problem(exc, source)]) from None
        except YAMLError as exc:
            raise ConfigValidationError([ConfigProblem(source, 1, "", f"invalid YAML: {exc}")]) from None
        if root is None:
            message = "config is empty: expected a mapping with 'providers' and 'routes'"
            raise ConfigValidationError([ConfigProblem(source, 1, "", message)])
        if not isinstance(root, CommentedMap):
            kind = "a list" if isinstance(root, CommentedSeq) else f"a scalar ({root!r})"
            raise ConfigValidationError(
                [ConfigProblem(source, 1, "", f"top level must be a mapping of sections, got {kind}")]
            )
        return cls(root, source)

    def line_of(self, path: Sequence[Any]) -> int:
        """Line of the deepest key of ``path`` present in the file (1 for the root)."""
        node: Any = self.root
        line = 1
        for item in path:
            child = _child_line(node, item)
            if child is None:
                break
            line, node = child, node[item]
        return line

    def problem(self, path: Sequence[Any], message: str, suggestion: str | None = None) -> ConfigProblem:
        return ConfigProblem(self.source, self.line_of(path), format_key(path), message, suggestion)

    def to_data(self, env: Mapping[str, str]) -> tuple[dict[str, Any], list[ConfigProblem]]:
        """Plain Python data with ``${VAR}`` / ``${VAR:-default}`` expanded in string values.

        ruamel's round-trip scalars (ScalarFloat, ScalarBoolean, which is an int) are
        turned into builtins so pydantic sees ordinary YAML types.
        """
        problems: list[ConfigProblem] = []
        data = self._plain(self.root, (), 1, env, problems)
        assert isinstance(data, dict)
        return data, problems

    def _plain(
        self, node: Any, path: KeyPath, line: int, env: Mapping[str, str], problems: list[ConfigProblem]
    ) -> Any:
        if isinstance(node, CommentedMap):
            return {
                _plain_key(k): self._plain(v, (*path, k), _child_line(node, k) or line, env, problems)
                for k, v in node.items()
            }
        if isinstance(node, CommentedSeq):
            return [
                self._plain(v, (*path, i), _child_line(node, i) or line, env, problems)
                for i, v in enumerate(node)
            ]
        if isinstance(node, str):
            return self._interpolate(str(node), path, line, env, problems)
        if isinstance(node, ScalarBoolean):
            return bool(node)
        if isinstance(node, bool):
            return node
        if isinstance(node, int):
            return int(node)
        if isinstance(node, float):
            return float(node)
        return node

    def _interpolate(
        self, text: str, path: KeyPath, line: int, env: Mapping[str, str], problems: list[ConfigProblem]
    ) -> str:
        if "${" not in text:
            return text

        def report(message: str) -> None:
            problems.append(ConfigProblem(self.source, line, format_key(path), message))

        out: list[str] = []
        pos = 0
        for match in _ENV_REF.finditer(text):
            out.append(text[pos : match.start()])
            pos = match.end()
            escaped, body = match.group(1), match.group(2)
            if escaped:
                out.append("${" + body + "}")
                continue
            ref = _ENV_BODY.fullmatch(body)
            if ref is None:
                report(f"malformed reference '${{{body}}}': write ${{VAR}} or ${{VAR:-default}}")
                continue
            name, default = ref.group(1), ref.group(2)
            value = env.get(name)
            # Shell semantics: `:-` also replaces a variable that is set but empty.
            if value is None or (value == "" and default is not None):
                if default is None:
                    report(
                        f"environment variable '{name}' is not set (${{{name}:-default}} gives a fallback)"
                    )
                    value = ""
                else:
                    value = default
            out.append(value)
        tail = text[pos:]
        if "${" in tail:
            report("unterminated '${': close it with '}', or write '$${' for a literal '${'")
        out.append(tail)
        return "".join(out)


def _plain_key(key: Any) -> Any:
    if isinstance(key, str):
        return str(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return int(key)
    return key


def _child_line(node: Any, item: Any) -> int | None:
    """1-based line of ``node[item]``'s key (or list item), None when absent."""
    if isinstance(node, CommentedMap):
        if not _hashable(item) or item not in node:
            return None
        try:
            return int(node.lc.key(item)[0]) + 1
        except (KeyError, TypeError, IndexError):
            # Keys pulled in by a `<<` merge have no position of their own.
            return int(node.lc.line) + 1
    if isinstance(node, CommentedSeq) and type(item) is int and 0 <= item < len(node):
        return int(node.lc.item(item)[0]) + 1
    return None


def _hashable(item: Any) -> bool:
    try:
        hash(item)
    except TypeError:
        return False
    return True


def _syntax_problem(exc: MarkedYAMLError, source: str) -> ConfigProblem:
    mark = exc.problem_mark or exc.context_mark
    line = int(mark.line) + 1 if mark is not None else 1
    problem = str(exc.problem or exc.context or "invalid YAML")
    duplicate = _DUPLICATE_KEY.search(problem) if isinstance(exc, DuplicateKeyError) else None
    if duplicate is not None:
        # ruamel's own text echoes both values, which may be secrets.
        return ConfigProblem(source, line, "", f"duplicate key '{duplicate.group(1)}'")
    context_mark = exc.context_mark
    if exc.problem and exc.context:
        if context_mark is not None and mark is not None and context_mark.line != mark.line:
            problem += f" ({exc.context} started on line {int(context_mark.line) + 1})"
        else:
            problem += f" ({exc.context})"
    return ConfigProblem(source, line, "", f"YAML syntax error: {problem}")


@dataclass(frozen=True)
class _Where:
    """What a pydantic ``loc`` means in the YAML tree."""

    path: KeyPath
    """Only keys and indices: union tags and ``[key]`` markers pydantic inserts are dropped."""
    allowed: tuple[str, ...]
    """Field names of the model holding the last key (empty when not a model)."""
    union: _Union | None
    """The tagged union ``loc`` ends at, if it does."""
    on_key: bool
    """The error is about a mapping key (a name), not its value."""


@dataclass(frozen=True)
class _Union:
    """A tagged union as the config file sees it."""

    discriminator: str
    by_tag: dict[str, Any]
    """Tag -> model."""
    broken: Mapping[str, str]
    """Tags whose model could not be loaded (a provider plugin's import failed): why."""


def _discriminated(tp: Any, broken: Mapping[str, str] | None = None) -> _Union | None:
    if get_origin(tp) is not Annotated:
        return None
    base, *metadata = get_args(tp)
    for meta in metadata:
        # An annotation whose union is only known at run time (the installed provider types).
        tagged_union = getattr(meta, "tagged_union", None)
        if callable(tagged_union):
            return _discriminated(tagged_union(), meta.broken())
        if isinstance(meta, FieldInfo) and isinstance(meta.discriminator, str):
            disc = meta.discriminator
            members = get_args(base) if get_origin(base) in (Union, types.UnionType) else (base,)
            by_tag: dict[str, Any] = {}
            for member in members:
                field = member.model_fields[disc] if _is_model(member) else None
                if field is not None and get_origin(field.annotation) is Literal:
                    by_tag.update({str(tag): member for tag in get_args(field.annotation)})
            return _Union(disc, by_tag, broken or {})
    return _discriminated(base, broken)


def _strip(tp: Any) -> Any:
    """Drop Annotated metadata and ``| None`` so the container or model shows."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
            continue
        if get_origin(tp) in (Union, types.UnionType):
            members = [m for m in get_args(tp) if m is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _step(tp: Any, item: Any) -> tuple[Any, tuple[str, ...]]:
    """The type found under key/index ``item`` of ``tp``, and ``tp``'s field names."""
    if _is_model(tp):
        fields = tp.model_fields
        info = fields.get(item) if isinstance(item, str) else None
        return (info.annotation if info is not None else None), tuple(fields)
    origin, args = get_origin(tp), get_args(tp)
    if origin in (dict, Mapping) and len(args) == 2:
        return args[1], ()
    if origin in (list, Sequence) and args:
        return args[0], ()
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0], ()
        if isinstance(item, int) and 0 <= item < len(args):
            return args[item], ()
    return None, ()


def _resolve_loc(loc: Sequence[Any], model: type[BaseModel]) -> _Where:
    path: list[Any] = []
    allowed: tuple[str, ...] = ()
    on_key = False
    tp: Any = model
    for item in loc:
        if item == "[key]":
            on_key = True
            continue
        union = _discriminated(tp)
        if union is not None:
            # Pydantic puts the chosen tag in loc; it is not a key in the file.
            tp = union.by_tag.get(item) if isinstance(item, str) else None
            continue
        tp = _strip(tp)
        if get_origin(tp) in (Union, types.UnionType):
            # A plain union names the member it tried (`int`, `str`...): not a key either.
            tp = None
            continue
        path.append(item)
        tp, allowed = _step(tp, item)
    return _Where(tuple(path), allowed, _discriminated(tp), on_key)


def problems_from_validation_error(
    exc: ValidationError,
    doc: YamlDocument,
    model: type[BaseModel],
    *,
    skip_types: Iterable[str] = (),
) -> list[ConfigProblem]:
    """One located problem per pydantic error; ``skip_types`` are checked elsewhere."""
    skipped = frozenset(skip_types)
    problems = []
    for err in exc.errors(include_url=False):
        if err["type"] in skipped or _is_echo_of_item_errors(err):
            continue
        problems.append(_problem_for(err, doc, model))
    return problems


def _is_echo_of_item_errors(err: ErrorDetails) -> bool:
    # A tuple with min_length counts only the items that validated, so one bad item in a
    # one-item tuple also yields "too short": the item's own error says it better.
    if err["type"] != "too_short":
        return False
    given = err["input"]
    minimum = (err.get("ctx") or {}).get("min_length", 0)
    return isinstance(given, Sized) and len(given) >= minimum


def _problem_for(err: ErrorDetails, doc: YamlDocument, model: type[BaseModel]) -> ConfigProblem:
    where = _resolve_loc(err["loc"], model)
    path = list(where.path)
    kind = err["type"]
    ctx = err.get("ctx") or {}
    message = err["msg"]
    suggestion: str | None = None
    if kind == "extra_forbidden" and path:
        key = str(path[-1])
        message = f"unknown key '{key}'"
        suggestion = suggest(key, where.allowed)
        if suggestion is None and where.allowed:
            message += "; expected one of: " + ", ".join(where.allowed)
    elif kind in ("union_tag_invalid", "union_tag_not_found") and where.union is not None:
        disc, by_tag = where.union.discriminator, where.union.by_tag
        known = ", ".join(f"'{tag}'" for tag in by_tag)
        path.append(disc)
        tag = str(ctx.get("tag", ""))
        if kind == "union_tag_invalid" and tag in where.union.broken:
            message = f"{disc} '{tag}' is installed but failed to load: {where.union.broken[tag]}"
        elif kind == "union_tag_invalid":
            message = f"unknown {disc} '{tag}'; known: {known}"
            suggestion = suggest(tag, by_tag)
        else:
            message = f"required key is missing; one of: {known}"
    elif where.on_key and path:
        detail = f"must match {ctx['pattern']}" if kind == "string_pattern_mismatch" else message
        message = f"invalid name '{path[-1]}': {detail}"
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "too_short" and ctx.get("min_length") == 1:
        message = "must not be empty"
    elif kind == "value_error" and "error" in ctx:
        # Our validators' own text; pydantic would prefix "Value error, ".
        message = str(ctx["error"])
    return doc.problem(path, message, suggestion)
