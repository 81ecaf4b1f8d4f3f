"""The client's public surface (modelled on httpx's ``test_exported_members``): what
``import laneway`` exports is exactly ``laneway.__all__``, all of it client-facing;
``Client`` and ``AsyncClient`` are twins method for method. No broker needed."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing

import pytest

import laneway
import laneway.errors

# Server side, and generated code (its own modules, no __all__).
NOT_CLIENT = {"broker", "workers", "v1", "internal"}
CLIENT_MODULES = sorted(
    name
    for _, name, _ in pkgutil.iter_modules(laneway.__path__, "laneway.")
    if name.split(".")[1] not in NOT_CLIENT and not name.split(".")[1].startswith("_")
)
# Exports that are values, not classes or functions, and the module defining each.
VALUES = {
    "FINAL_STATES": "laneway.streams",
    "JobInput": "laneway.inputs",
    "JobState": "laneway.v1.job_pb2",
    "OnDisconnect": "laneway.calls",
    "PipelineRunState": "laneway.v1.pipeline_pb2",
}


def test_exported_members() -> None:
    for name in laneway.__all__:
        member = getattr(laneway, name)
        if inspect.isclass(member) or inspect.isfunction(member):
            assert member.__module__.startswith("laneway."), (name, member.__module__)
        else:
            assert getattr(importlib.import_module(VALUES[name]), name) is member, name
    assert set(VALUES) <= set(laneway.__all__)


def test_every_public_attribute_is_in_all() -> None:
    public = {n for n, v in vars(laneway).items() if not n.startswith("_") and not inspect.ismodule(v)}
    assert public == set(laneway.__all__)
    assert len(laneway.__all__) == len(set(laneway.__all__))


def test_every_client_error_is_exported_and_no_server_error() -> None:
    raised = {
        name
        for name, value in vars(laneway.errors).items()
        if inspect.isclass(value) and issubclass(value, laneway.LanewayError)
    }
    assert raised <= set(laneway.__all__)
    assert {"AlreadyExists", "Aborted", "DeadlineExceeded", "FailedPrecondition", "Cancelled"} <= raised
    for server_only in ("ConfigError", "TopologyError"):
        assert not hasattr(laneway, server_only)
        assert not hasattr(laneway.errors, server_only)


@pytest.mark.parametrize("module", CLIENT_MODULES)
def test_each_client_module_declares_its_surface(module: str) -> None:
    loaded = importlib.import_module(module)
    assert isinstance(getattr(loaded, "__all__", None), list), f"{module} has no __all__"
    for name in loaded.__all__:
        assert hasattr(loaded, name), f"{module}.__all__ names {name}, which it lacks"


def _methods(cls: type) -> dict[str, typing.Any]:
    """Public methods, those mixed in too (the pipeline ones come from ``laneway.pipelines``)."""
    return {
        n: f
        for klass in reversed(cls.__mro__[:-1])
        for n, f in vars(klass).items()
        if inspect.isfunction(f) and (n == "__init__" or n[0] != "_")
    }


def test_client_and_async_client_are_twins() -> None:
    sync, aio = _methods(laneway.Client), _methods(laneway.AsyncClient)
    assert sync.keys() == aio.keys()
    assert {"run", "run_stream", "get_server_info", "submit", "wait", "stream_pipeline_run"} <= sync.keys()
    for name in sync:
        s, a = inspect.signature(sync[name]), inspect.signature(aio[name])
        assert list(s.parameters) == list(a.parameters), name
        for p, q in zip(s.parameters.values(), a.parameters.values(), strict=True):
            assert (p.kind, p.default) == (q.kind, q.default), (name, p.name)
            # The mixed-in pipeline methods annotate self with what they use of each client.
            if p.name not in ("channel", "self"):
                assert p.annotation == q.annotation, (name, p.name)
        if name != "__init__":
            assert sync[name].__doc__ and aio[name].__doc__, f"{name} lacks a docstring"
            assert inspect.iscoroutinefunction(aio[name]) or inspect.isasyncgenfunction(aio[name]), name
            if name != "close":
                assert "timeout" in s.parameters and "call_metadata" in s.parameters, name


def test_job_options_are_the_keywords_of_job() -> None:
    keywords = {n for n, p in inspect.signature(laneway.job).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert set(laneway.JobOptions.__annotations__) == keywords
    hints, options = typing.get_type_hints(laneway.job), typing.get_type_hints(laneway.JobOptions)
    assert {n: hints[n] for n in keywords} == options
