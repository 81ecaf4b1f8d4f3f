"""Laneway's configuration: one YAML file, validated into frozen pydantic models.

Every field carries an attribute docstring; ``use_attribute_docstrings`` turns them
into JSON-schema descriptions, so ``config_json_schema()`` documents the file for
editors and the docs without a second copy.

Loading reports every problem at once, each as ``<file>:<line>: <key.path>: <message>``,
because fixing a config one error per run is slow. String values may use
``${VAR}`` and ``${VAR:-default}``; they are expanded before validation, so
``concurrency: ${MOCK_CONCURRENCY:-64}`` works for numbers too.

Provider blocks are validated by the model of the type they name, among the types
installed (``laneway.broker.config.provider_types``); loading and error reporting
pick a new type up from there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from laneway.broker.config.autoscale import AutoscaleConfig
from laneway.broker.config.errors import (
    ConfigProblem,
    ConfigValidationError,
    YamlDocument,
    problems_from_validation_error,
    suggest,
)
from laneway.broker.config.gateway import GatewayConfig
from laneway.broker.config.nats_replicas import replicas_alias_problems
from laneway.broker.config.pipelines import PipelineConfig, pipeline_config_problems, pipeline_problems
from laneway.broker.config.provider_types import AnyProviderConfig
from laneway.broker.config.providers import CircuitConfig, ConfigModel, LimitsConfig
from laneway.broker.config.routes import BatchConfig, RouteConfig, RouteTarget
from laneway.broker.config.sections import (
    BrokerConfig,
    DeadLetterConfig,
    FakeProviderProcessConfig,
    Lane,
    LanesConfig,
    MetricsConfig,
    Name,
    NatsConfig,
    QueueConfig,
    WorkersConfig,
)
from laneway.broker.config.security import AuthConfig, TenantConfig
from laneway.broker.config.webhooks import WebhooksConfig
from laneway.broker.core.errors import ConfigError
from laneway.broker.core.model import LANES, NAME_PATTERN

__all__ = [
    "LANES",
    "NAME_PATTERN",
    "BatchConfig",
    "BrokerConfig",
    "CircuitConfig",
    "ConfigProblem",
    "ConfigValidationError",
    "DeadLetterConfig",
    "FakeProviderProcessConfig",
    "Lane",
    "LanesConfig",
    "LanewayConfig",
    "LimitsConfig",
    "MetricsConfig",
    "NatsConfig",
    "ProviderConfig",
    "QueueConfig",
    "RouteConfig",
    "RouteTarget",
    "WorkersConfig",
    "config_json_schema",
    "default_config",
    "load_config",
    "parse_config",
]


# Code sees the base every type shares; validation picks the model of the block's `type`.
ProviderConfig = AnyProviderConfig


class LanewayConfig(ConfigModel):
    """The whole Laneway configuration file."""

    # Built on first use, so the provider types (entry points) load then, not on
    # import, and a plugin module may import this one.
    model_config = ConfigDict(defer_build=True)

    nats: NatsConfig = Field(default_factory=NatsConfig)
    """Connection to NATS."""
    auth: AuthConfig = Field(default_factory=AuthConfig)
    """API keys and roles (off unless enabled)."""
    tenants: dict[Name, TenantConfig] = {}  # noqa: RUF012 (pydantic copies it)
    """Per-tenant quotas, by tenant name."""
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    """gRPC server settings and request limits."""
    queue: QueueConfig = Field(default_factory=QueueConfig)
    """JetStream retention, replication and redelivery."""
    lanes: LanesConfig = Field(default_factory=LanesConfig)
    """Priority lanes."""
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    """Worker retries and shutdown."""
    dlq: DeadLetterConfig = Field(default_factory=DeadLetterConfig)
    """Dead-letter retention and redrive pace."""
    batch: BatchConfig = Field(default_factory=BatchConfig)
    """Default batching of embedding jobs (routes may override it)."""
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    """Prometheus metrics endpoints (off unless a port is set)."""
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    """The HTTP gateway (JSON, SSE, WebSocket) that ``laneway up`` starts."""
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
    """Signed webhooks: secrets, address guard exceptions, retries, route subscriptions."""
    autoscale: AutoscaleConfig = Field(default_factory=AutoscaleConfig)
    """Worker-pool autoscaler bounds and signals (``laneway up --workers auto``)."""
    fake_provider: FakeProviderProcessConfig | None = None
    """Development only: ``laneway up`` also starts ``laneway fake-provider`` with these
    settings. Unset: it does not."""
    providers: Annotated[dict[Name, ProviderConfig], Field(min_length=1)]
    """Provider instances by name (1-64 of A-Z a-z 0-9 _ -); each runs its own worker pool."""
    routes: Annotated[dict[Name, RouteConfig], Field(min_length=1)]
    """Routes by name (1-64 of A-Z a-z 0-9 _ -); a job names the route it goes to."""
    pipelines: dict[Name, PipelineConfig] = {}  # noqa: RUF012 (pydantic copies it)
    """Pipelines by name: chains of steps that ``StartPipeline`` runs (docs/pipelines.md)."""

    @model_validator(mode="after")
    def _apply_replicas_alias(self) -> Self:
        # Loading from YAML reports a conflict with lines (replicas_alias_problems) and
        # logs the deprecation; this applies the old key for configs built in code too.
        old = self.queue.replicas
        if old is None:
            return self
        if "replicas" in self.nats.model_fields_set:
            raise PydanticCustomError(
                "replicas_conflict",
                "queue.replicas ({old}) and nats.replicas ({new}) are both set: keep nats.replicas only",
                {"old": old, "new": self.nats.replicas},
            )
        # Frozen models: set once here, during validation, before anyone can see it.
        object.__setattr__(self, "nats", self.nats.model_copy(update={"replicas": old}))
        return self

    @model_validator(mode="after")
    def _check_route_providers(self) -> Self:
        # Loading from YAML reports this with lines via _unknown_provider_problems; this
        # guard is for configs built in code.
        for name, route in self.routes.items():
            for index, target in enumerate(route.targets):
                if target.provider not in self.providers:
                    raise PydanticCustomError(
                        "unknown_provider",
                        "routes.{route}.targets[{index}].provider: unknown provider '{provider}'",
                        {"route": name, "index": index, "provider": target.provider},
                    )
        return self

    @model_validator(mode="after")
    def _check_pipelines(self) -> Self:
        # Loading from YAML reports these with lines (parse_config); this guard is for
        # configs built in code.
        for problem in pipeline_problems(self.pipelines, list(self.routes), list(self.webhooks.secrets)):
            where = ".".join(str(p) for p in problem.path)
            raise PydanticCustomError(
                "pipeline", "{where}: {message}", {"where": where, "message": problem.message}
            )
        return self

    def route_primary(self, route: str) -> RouteTarget:
        """The first (preferred) target of ``route``; KeyError if there is no such route."""
        return self.routes[route].targets[0]

    def routes_of(self, provider: str) -> dict[str, str]:
        """Route -> model for every route ``provider`` is a target of, in config order."""
        return {
            name: target.model
            for name, route in self.routes.items()
            for target in route.targets
            if target.provider == provider
        }


def default_config() -> LanewayConfig:
    """Defaults everywhere, one ``mock`` provider and a ``chat`` route to it."""
    return LanewayConfig.model_validate(
        {
            "providers": {"mock": {"type": "mock"}},
            "routes": {"chat": {"targets": [{"provider": "mock", "model": "mock-chat"}]}},
        }
    )


def config_json_schema() -> dict[str, Any]:
    """JSON schema of the config file, with each field's docstring as its description."""
    return LanewayConfig.model_json_schema()


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> LanewayConfig:
    """Read and validate a YAML config file.

    ``env`` replaces ``os.environ`` for ``${VAR}`` expansion. Raises ConfigError; for
    problems inside the file, the ConfigValidationError subclass with ``problems``.
    """
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: config file is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return parse_config(text, source=source, env=env)


def parse_config(
    text: str, *, source: str = "<string>", env: Mapping[str, str] | None = None
) -> LanewayConfig:
    """Validate YAML ``text``; ``source`` names it in error messages."""
    doc = YamlDocument.parse(text, source)
    data, env_problems = doc.to_data(os.environ if env is None else env)
    problems = [
        *env_problems,
        *_unknown_provider_problems(data, doc),
        *replicas_alias_problems(data, doc),
        *pipeline_config_problems(data, doc),
    ]
    try:
        config = LanewayConfig.model_validate(data)
    except ValidationError as exc:
        # A value whose variable is unset was replaced by "", so its type error is noise.
        unset = {p.key for p in env_problems}
        found = problems_from_validation_error(
            exc, doc, LanewayConfig, skip_types={"unknown_provider", "replicas_conflict", "pipeline"}
        )
        problems += [p for p in found if p.key not in unset]
    else:
        if not problems:
            return config
    raise ConfigValidationError(problems)


def _unknown_provider_problems(data: dict[str, Any], doc: YamlDocument) -> list[ConfigProblem]:
    """Route targets naming a missing provider, checked on the raw data so they are
    reported alongside schema errors, not only once those are fixed."""
    providers, routes = data.get("providers"), data.get("routes")
    if not isinstance(providers, dict) or not isinstance(routes, dict):
        return []
    known = [name for name in providers if isinstance(name, str)]
    problems: list[ConfigProblem] = []
    for route_name, route in routes.items():
        targets = route.get("targets") if isinstance(route, dict) else None
        if not isinstance(targets, list):
            continue
        for index, target in enumerate(targets):
            provider = target.get("provider") if isinstance(target, dict) else None
            if isinstance(provider, str) and provider and provider not in providers:
                listed = ", ".join(f"'{name}'" for name in known) or "none"
                problems.append(
                    doc.problem(
                        ("routes", route_name, "targets", index, "provider"),
                        f"unknown provider '{provider}'; known: {listed}",
                        suggest(provider, known),
                    )
                )
    return problems
