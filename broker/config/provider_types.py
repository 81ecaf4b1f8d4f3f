"""Provider types: what a provider block's ``type`` may name, and how each is built.

A provider type is one ``ProviderType``: its name, the pydantic model of its config
block and the factory that builds a provider from that block. Every type, built-in
or third-party, is an entry point of the ``laneway.providers`` group whose object is
a ``ProviderType``; Laneway's own are declared in its ``pyproject.toml`` exactly as a
plugin declares its own::

    [project.entry-points."laneway.providers"]
    mycorp = "mycorp_laneway:PROVIDER_TYPE"

The types are loaded on first use (the first config validated), not on import, so a
plugin module may import any part of Laneway. A plugin that fails to load is
remembered with the reason, and a config naming it is told why instead of being told
the type does not exist.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Annotated, Any, Generic, Literal, TypeVar, Union, get_args, get_origin

from pydantic import Field, GetCoreSchemaHandler
from pydantic_core import CoreSchema

from laneway.broker.config.providers import ProviderConfigBase

__all__ = [
    "ENTRY_POINT_GROUP",
    "AnyProviderConfig",
    "ProviderType",
    "ProviderTypes",
    "provider_types",
]

ENTRY_POINT_GROUP = "laneway.providers"

C = TypeVar("C", bound=ProviderConfigBase)


@dataclass(frozen=True, slots=True)
class ProviderType(Generic[C]):
    """One provider type: the entry point's object."""

    name: str
    """The ``type`` value that selects it in a provider block; also the entry point's name."""
    config: type[C]
    """Pydantic model of its config block; its ``type`` field is ``Literal[name]``."""
    factory: Callable[[str, C], Any]
    """``(provider name, config block) -> Provider`` (``laneway.workers.providers.base``)."""

    def __post_init__(self) -> None:
        annotation = self.config.model_fields["type"].annotation
        if get_origin(annotation) is not Literal or get_args(annotation) != (self.name,):
            raise TypeError(f"{self.config.__name__}.type must be Literal[{self.name!r}], got {annotation!r}")


@dataclass(frozen=True, slots=True)
class ProviderTypes:
    """The provider types this installation has."""

    types: Mapping[str, ProviderType[Any]]
    """Loaded types by name."""
    broken: Mapping[str, str] = field(default_factory=dict)
    """Entry points that failed to load, by name: why."""

    def tagged_union(self) -> Any:
        """``Annotated[A | B | ..., Field(discriminator="type")]`` of every loaded type."""
        members = tuple(t.config for t in self.types.values())
        if not members:
            # No entry points at all: Laneway's own metadata is missing (not installed).
            return ProviderConfigBase
        return Annotated[Union[members], Field(discriminator="type")]  # noqa: UP007


@functools.cache
def provider_types() -> ProviderTypes:
    """Load every entry point of the group, once per process."""
    types: dict[str, ProviderType[Any]] = {}
    broken: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as exc:  # a plugin's import error must not stop the others
            broken[ep.name] = f"{ep.value}: {type(exc).__name__}: {exc}"
            continue
        if not isinstance(loaded, ProviderType):
            broken[ep.name] = f"{ep.value} is a {type(loaded).__name__}, not a ProviderType"
        elif loaded.name != ep.name:
            broken[ep.name] = f"{ep.value} is the type '{loaded.name}', not '{ep.name}'"
        elif ep.name in types:
            broken[ep.name] = f"{ep.value}: the type '{ep.name}' is already defined"
        else:
            types[ep.name] = loaded
    return ProviderTypes(types, broken)


class _RegisteredTypes:
    """Annotation marker: validate as the tagged union of the installed provider types."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return handler.generate_schema(provider_types().tagged_union())

    def tagged_union(self) -> Any:
        return provider_types().tagged_union()

    def broken(self) -> Mapping[str, str]:
        return provider_types().broken


# Typed as the base (what code may rely on); validated as the installed types' union.
AnyProviderConfig = Annotated[ProviderConfigBase, _RegisteredTypes()]
