"""Config loading: the example file, defaults, and errors that name file, line and key."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel, ValidationError

from laneway.broker.config.model import (
    LANES,
    CircuitConfig,
    ConfigProblem,
    ConfigValidationError,
    Lane,
    LanewayConfig,
    LimitsConfig,
    RouteConfig,
    RouteTarget,
    config_json_schema,
    default_config,
    load_config,
    parse_config,
)
from laneway.broker.core.errors import ConfigError
from laneway.workers.fakes.mock import MockProviderConfig
from laneway.workers.providers.openai import OpenAIProviderConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "laneway.example.yaml"

MINIMAL = """\
providers:
  mock:
    type: mock
routes:
  chat:
    targets:
      - provider: mock
        model: mock-chat
"""


def problems_of(text: str, env: dict[str, str] | None = None) -> tuple[ConfigProblem, ...]:
    with pytest.raises(ConfigValidationError) as info:
        parse_config(textwrap.dedent(text), source="test.yaml", env=env or {})
    return info.value.problems


def only_problem(text: str, env: dict[str, str] | None = None) -> ConfigProblem:
    problems = problems_of(text, env)
    assert len(problems) == 1, problems
    return problems[0]


def test_example_file_loads() -> None:
    config = load_config(EXAMPLE, env={})
    assert config.nats.url == ""
    assert set(config.providers) == {"mock", "mock-embed", "fake-openai"}
    assert config.providers["mock"].latency_ms == 30
    assert config.providers["mock"].latency_jitter_ms == 10
    assert config.providers["mock-embed"].latency_ms == 5
    assert set(config.routes) == {"chat", "embed", "classify", "chat-http"}
    assert config.route_primary("chat") == RouteTarget(provider="mock", model="mock-chat")
    assert config.route_primary("embed") == RouteTarget(provider="mock-embed", model="mock-embedding")
    assert config.route_primary("classify") == RouteTarget(provider="mock", model="mock-chat")
    fake = config.providers["fake-openai"]
    assert fake.type == "openai" and fake.base_url == "http://127.0.0.1:18089/v1"  # type: ignore[union-attr]
    assert config.fake_provider is not None and config.fake_provider.port == 18089


def test_example_file_shows_every_field() -> None:
    config = load_config(EXAMPLE, env={})
    explicit = config.model_fields_set
    assert explicit == set(LanewayConfig.model_fields)
    for section in (
        "nats",
        "broker",
        "queue",
        "lanes",
        "workers",
        "dlq",
        "batch",
        "metrics",
        "gateway",
        "webhooks",
        "fake_provider",
    ):
        model: BaseModel = getattr(config, section)
        # queue.replicas is the deprecated name of nats.replicas: the example shows the new one.
        shown = set(type(model).model_fields) - ({"replicas"} if section == "queue" else set())
        assert model.model_fields_set == shown, section
    assert config.providers["mock"].model_fields_set == set(MockProviderConfig.model_fields)
    http = config.providers["fake-openai"]
    assert isinstance(http, OpenAIProviderConfig)
    assert http.limits.model_fields_set == set(LimitsConfig.model_fields)
    assert http.circuit.model_fields_set == set(CircuitConfig.model_fields)
    assert config.routes["chat"].targets[0].model_fields_set == set(RouteTarget.model_fields)
    assert config.routes["chat"].model_fields_set == set(RouteConfig.model_fields)


def test_defaults() -> None:
    config = default_config()
    assert config.nats.url == ""
    assert config.nats.connect_timeout_s == 5.0
    assert config.broker.grpc_addr == "127.0.0.1:50051"
    assert config.broker.max_payload_bytes == 1_048_576
    assert config.broker.max_batch_jobs == 1000
    assert config.queue.events_max_age_s == 86_400
    assert config.nats.replicas == 1
    assert config.queue.replicas is None  # the deprecated name of nats.replicas
    assert config.queue.ack_wait_s == 10.0
    assert config.queue.max_deliver == 50
    assert (config.dlq.max_age_s, config.dlq.redrive_rate_per_s) == (1_209_600, 10.0)
    assert config.lanes.default == "normal"
    assert config.lanes.guaranteed_share == {"high": 0.0, "normal": 0.1, "low": 0.05}
    assert config.workers.max_attempts == 3
    assert config.workers.retry_backoff_s == 0.5
    assert config.workers.retry_backoff_max_s == 30.0
    assert config.workers.shutdown_grace_s == 10.0
    mock = config.providers["mock"]
    assert (mock.type, mock.concurrency, mock.output, mock.embedding_dim) == ("mock", 64, "echo", 8)
    assert (mock.latency_ms, mock.latency_jitter_ms, mock.error_rates, mock.rpm) == (0.0, 0.0, {}, 0)
    assert config.route_primary("chat") == RouteTarget(provider="mock", model="mock-chat", weight=1)
    assert parse_config(MINIMAL) == config


def test_lanes_constant_matches_literal() -> None:
    assert get_args(Lane) == LANES == ("high", "normal", "low")


def test_models_are_frozen() -> None:
    config = default_config()
    with pytest.raises(ValidationError):
        config.nats = config.nats
    changed = config.model_copy(update={"lanes": config.lanes.model_copy(update={"default": "high"})})
    assert changed.lanes.default == "high"


def test_unknown_top_level_key_suggests_spelling() -> None:
    text = """\
        providers:
          mock:
            type: mock
        rotues:
          chat: {}
        """
    problems = problems_of(text)
    assert [(p.line, p.key) for p in problems] == [(1, "routes"), (4, "rotues")]
    assert problems[0].message == "required key is missing"
    assert problems[1].suggestion == "routes"
    assert str(problems[1]) == "test.yaml:4: rotues: unknown key 'rotues' (did you mean 'routes'?)"


def test_unknown_key_in_provider_uses_the_chosen_type_fields() -> None:
    # The provider name differs from its type, so a tag leaking into the path would show.
    text = """\
        providers:
          fast:
            type: mock
            concurrency: 4
            latncy_ms: 30
        routes:
          chat:
            targets: [{provider: fast, model: m}]
        """
    problem = only_problem(text)
    assert (problem.line, problem.key, problem.suggestion) == (5, "providers.fast.latncy_ms", "latency_ms")
    assert str(problem) == (
        "test.yaml:5: providers.fast.latncy_ms: unknown key 'latncy_ms' (did you mean 'latency_ms'?)"
    )


def test_unknown_key_without_close_match_lists_allowed_keys() -> None:
    problem = only_problem(MINIMAL + "lanes:\n  zzz: 1\n")
    assert (problem.line, problem.key, problem.suggestion) == (10, "lanes.zzz", None)
    assert problem.message == "unknown key 'zzz'; expected one of: default, guaranteed_share"


def test_bad_value_type_names_line() -> None:
    text = """\
        providers:
          mock:
            type: mock

            concurrency: lots
        routes:
          chat:
            targets: [{provider: mock, model: m}]
        """
    problem = only_problem(text)
    assert (problem.line, problem.key) == (5, "providers.mock.concurrency")
    assert "valid integer" in problem.message


def _tiered(targets: str) -> str:
    return f"""\
        providers:
          a: {{type: mock}}
          b: {{type: mock}}
          c: {{type: mock}}
        routes:
          chat:
            targets:
{targets}
        """


def test_targets_sharing_a_tier_are_grouped_in_order() -> None:
    config = parse_config(
        _tiered(
            "              - {provider: a, model: m, tier: 1, weight: 3}\n"
            "              - {provider: b, model: m, tier: 1}\n"
            "              - {provider: c, model: m}"
        )
    )
    tiers = [[(x.provider, x.weight) for x in tier] for tier in config.routes["chat"].tiers]
    assert tiers == [[("a", 3), ("b", 1)], [("c", 1)]]


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (
            "              - {provider: a, model: m}\n              - {provider: b, model: m, weight: 3}",
            "target 'b' has a weight but no tier shared with another target",
        ),
        (
            "              - {provider: a, model: m, tier: 1}\n              - {provider: b, model: m}\n"
            "              - {provider: c, model: m, tier: 1}",
            "the targets of tier 1 must be listed next to each other",
        ),
        (
            "              - {provider: a, model: m, tier: 2}\n"
            "              - {provider: b, model: m, tier: 1}",
            "tiers go up along the list: tier 1 is listed after tier 2",
        ),
    ],
)
def test_bad_tiers_name_the_route_and_line(targets: str, message: str) -> None:
    problem = only_problem(_tiered(targets))
    assert (problem.line, problem.key) == (7, "routes.chat.targets")
    assert message in problem.message


def test_unknown_provider_type_lists_known_types() -> None:
    text = MINIMAL.replace("type: mock", "type: mokc")
    problem = only_problem(text)
    assert (problem.line, problem.key, problem.suggestion) == (3, "providers.mock.type", "mock")
    assert problem.message == "unknown type 'mokc'; known: 'anthropic', 'mock', 'openai'"


def test_missing_provider_type() -> None:
    problem = only_problem(MINIMAL.replace("    type: mock\n", "    concurrency: 2\n"))
    assert (problem.line, problem.key) == (2, "providers.mock.type")
    assert "'mock'" in problem.message


def test_route_to_missing_provider_suggests_closest() -> None:
    text = """\
        providers:
          openai-main:
            type: mock
          anthropic:
            type: mock
        routes:
          chat:
            targets:
              - provider: anthropic
                model: m
              - model: m
                provider: openai_mian
        """
    problem = only_problem(text)
    assert (problem.line, problem.key) == (12, "routes.chat.targets[1].provider")
    assert problem.suggestion == "openai-main"
    assert problem.message == "unknown provider 'openai_mian'; known: 'openai-main', 'anthropic'"


def test_route_name_with_dot_is_rejected() -> None:
    text = MINIMAL + "  chat.v2:\n    targets: [{provider: mock, model: m}]\n"
    problem = only_problem(text)
    assert (problem.line, problem.key) == (9, "routes['chat.v2']")
    assert problem.message.startswith("invalid name 'chat.v2': must match ")


def test_env_interpolation_set_and_default() -> None:
    text = MINIMAL + textwrap.dedent("""\
        nats:
          url: "nats://${NATS_HOST}:${NATS_PORT:-4222}"
        broker:
          grpc_addr: ${ADDR:-0.0.0.0:6000}
        workers:
          max_attempts: ${ATTEMPTS:-5}
          shutdown_grace_s: ${GRACE:-2}
        queue:
          replicas: ${REPLICAS:-1}
        lanes:
          default: "$${not_expanded}"
        """)
    with pytest.raises(ConfigValidationError):
        # `lanes.default` keeps the literal text, which is not a lane.
        parse_config(text, env={"NATS_HOST": "nats.internal", "GRACE": "", "REPLICAS": "3"})
    config = parse_config(
        text.replace('"$${not_expanded}"', "${LANE}"),
        env={"NATS_HOST": "nats.internal", "GRACE": "", "REPLICAS": "3", "LANE": "low"},
    )
    assert config.nats.url == "nats://nats.internal:4222"
    assert config.broker.grpc_addr == "0.0.0.0:6000"
    assert config.workers.max_attempts == 5
    assert config.workers.shutdown_grace_s == 2.0  # empty, like unset, takes the default
    assert config.nats.replicas == 3  # queue.replicas, its deprecated name
    assert config.lanes.default == "low"


def test_env_escape_keeps_literal() -> None:
    text = MINIMAL.replace("model: mock-chat", "model: 'a$${B}c'")
    assert parse_config(text, env={}).route_primary("chat").model == "a${B}c"


def test_env_interpolation_unset_variable() -> None:
    text = MINIMAL + "workers:\n  max_attempts: ${MAX_ATTEMPTS}\n"
    problem = only_problem(text)
    # Only the unset variable: the empty value it left behind is not reported again.
    assert (problem.line, problem.key) == (10, "workers.max_attempts")
    assert "'MAX_ATTEMPTS' is not set" in problem.message


def test_env_interpolation_malformed_reference() -> None:
    problems = problems_of(MINIMAL + "nats:\n  url: ${1BAD}\n  connect_timeout_s: ${X\n")
    assert [(p.line, p.key) for p in problems] == [(10, "nats.url"), (11, "nats.connect_timeout_s")]
    assert problems[0].message.startswith("malformed reference")
    assert problems[1].message.startswith("unterminated")


def test_yaml_syntax_error_names_line() -> None:
    text = "nats:\n  url: x\nbroker:\n  grpc_addr: [a, b\nqueue: {}\n"
    problem = only_problem(text)
    assert problem.file == "test.yaml"
    assert problem.line == 5
    assert problem.key == ""
    assert problem.message.startswith("YAML syntax error:")
    assert "started on line 4" in problem.message


def test_duplicate_key_names_line() -> None:
    problem = only_problem(MINIMAL + "providers: {}\n")
    assert (problem.line, problem.message) == (9, "duplicate key 'providers'")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "config is empty"),
        ("# only a comment\n", "config is empty"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("just text\n", "top level must be a mapping"),
    ],
)
def test_document_must_be_a_mapping(text: str, message: str) -> None:
    problem = only_problem(text)
    assert problem.line == 1
    assert problem.message.startswith(message)


def test_all_problems_reported_together_sorted_by_line() -> None:
    text = """\
        routes:
          chat:
            targets:
              - provider: nope
                model: m
        queue:
          replicas: 9
        providers:
          mock:
            type: mock
            rpm: -2
        broker:
          grpc_addr: "localhost:99999"
          max_payload_bytes: -1
        """
    with pytest.raises(ConfigValidationError) as info:
        parse_config(textwrap.dedent(text), source="multi.yaml", env={})
    problems = info.value.problems
    assert [(p.line, p.key) for p in problems] == [
        (4, "routes.chat.targets[0].provider"),
        (7, "queue.replicas"),
        (11, "providers.mock.rpm"),
        (13, "broker.grpc_addr"),
        (14, "broker.max_payload_bytes"),
    ]
    lines = str(info.value).splitlines()
    assert lines == [str(p) for p in problems]
    assert lines[3] == "multi.yaml:13: broker.grpc_addr: port must be a number from 0 to 65535, got '99999'"
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize(
    ("addr", "ok"),
    [
        ("0.0.0.0:50051", True),
        ("[::]:1", True),
        ("localhost:65535", True),
        ("localhost", False),
        (":50051", False),
        ("::1:50051", False),
        ("host:0", True),
        ("host:http", False),
    ],
)
def test_grpc_addr(addr: str, ok: bool) -> None:
    text = MINIMAL + f"broker:\n  grpc_addr: '{addr}'\n"
    if ok:
        assert parse_config(text).broker.grpc_addr == addr
    else:
        assert only_problem(text).key == "broker.grpc_addr"


def test_backoff_cap_must_not_be_below_first_delay() -> None:
    # The cap is left at its default: the check must still run.
    problem = only_problem(MINIMAL + "workers:\n  retry_backoff_s: 60\n")
    assert (problem.line, problem.key) == (9, "workers.retry_backoff_max_s")
    assert problem.message == "must be at least retry_backoff_s (60.0), got 30.0"


@pytest.mark.parametrize("share", ["1.5", "1", "-0.1", ".nan"])
def test_guaranteed_share_out_of_range_names_the_lane(share: str) -> None:
    problem = only_problem(MINIMAL + f"lanes:\n  guaranteed_share:\n    high: 0\n    low: {share}\n")
    assert (problem.line, problem.key) == (12, "lanes.guaranteed_share.low")


def test_guaranteed_shares_must_sum_below_one() -> None:
    # 0.7 + 0.2 + 0.1 is just under 1 in a plain float sum: it must still be rejected.
    text = MINIMAL + "lanes:\n  guaranteed_share:\n    high: 0.7\n    normal: 0.2\n    low: 0.1\n"
    problem = only_problem(text)
    assert (problem.line, problem.key) == (10, "lanes.guaranteed_share")
    assert problem.message == "shares must add up to less than 1, got 1 (high 0.7 + normal 0.2 + low 0.1)"
    assert str(problem).startswith("test.yaml:10: lanes.guaranteed_share: ")


def test_guaranteed_share_of_unknown_lane() -> None:
    problem = only_problem(MINIMAL + "lanes:\n  guaranteed_share: {urgent: 0.1}\n")
    assert (problem.line, problem.key) == (10, "lanes.guaranteed_share.urgent")


def test_guaranteed_share_lanes_left_out_get_none() -> None:
    config = parse_config(MINIMAL + "lanes:\n  guaranteed_share: {low: 0.2}\n")
    assert config.lanes.guaranteed_share == {"low": 0.2}


def test_empty_targets_and_providers() -> None:
    problems = problems_of("providers: {}\nroutes:\n  chat:\n    targets: []\n")
    assert [(p.line, p.key, p.message) for p in problems] == [
        (1, "providers", "must not be empty"),
        (4, "routes.chat.targets", "must not be empty"),
    ]


def test_load_config_reports_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL + "lanes:\n  default: urgent\n", encoding="utf-8")
    with pytest.raises(ConfigValidationError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}:10: lanes.default: ")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_validation_error_pickles() -> None:
    with pytest.raises(ConfigValidationError) as info:
        parse_config("rotues: {}\n")
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.problems == info.value.problems
    assert str(copy) == str(info.value)


def test_code_built_config_checks_route_providers() -> None:
    with pytest.raises(ValidationError, match="unknown provider 'gone'"):
        LanewayConfig(
            providers={"mock": MockProviderConfig()},
            routes={"chat": RouteConfig(targets=(RouteTarget(provider="gone", model="m"),))},
        )


def _all_models(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"LanewayConfig": schema, **schema["$defs"]}


def test_json_schema_has_docstring_descriptions() -> None:
    schema = config_json_schema()
    mock = schema["$defs"]["MockProviderConfig"]["properties"]
    assert "milliseconds" in mock["latency_ms"]["description"]
    assert "NATS_URL" in schema["$defs"]["NatsConfig"]["properties"]["url"]["description"]
    assert schema["properties"]["providers"]["description"].startswith("Provider instances by name")
    for name, model in _all_models(schema).items():
        for field, prop in model["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no docstring"


def test_docs_config_example_is_valid() -> None:
    text = (EXAMPLE.parent / "docs" / "configuration.md").read_text()
    block = text.split("<!-- config-example")[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    config = parse_config(block, source="docs/configuration.md")
    assert config.routes["summarise"].targets[1].provider == "openai"
    openai = config.providers["openai"]
    assert openai.limits.for_model("gpt-4o") == (500, 30000)
    assert openai.limits.for_model("gpt-4o-mini") == (5000, 2_000_000)


def test_docs_weighted_tier_example_is_valid() -> None:
    text = (EXAMPLE.parent / "docs" / "routing-and-limits.md").read_text()
    block = text.split("<!-- tiers-example")[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    targets = textwrap.indent(textwrap.dedent(block), "    ")
    providers = "".join(f"  {p}: {{type: mock}}\n" for p in ("azure-east", "azure-west", "openai"))
    source = "docs/routing-and-limits.md"
    config = parse_config(f"providers:\n{providers}routes:\n  chat:\n{targets}", source=source)
    tiers = [[(x.provider, x.weight) for x in tier] for tier in config.routes["chat"].tiers]
    assert tiers == [[("azure-east", 3), ("azure-west", 1)], [("openai", 1)]]
