"""``nats.replicas``: the setting, its deprecated name, the cluster-size check at
start-up, and a comma-separated ``nats.url``. The cluster tests are in test_cluster.py."""

from __future__ import annotations

import textwrap

import nats
import pytest
import structlog.testing

from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import ConfigValidationError, LanewayConfig, default_config, parse_config
from laneway.broker.core import topology as t
from laneway.broker.core.cluster_size import cluster_servers
from laneway.broker.core.errors import TopologyError
from laneway.broker.core.nats.connection import connect_nats, server_list
from laneway.broker.server.process import BrokerServer
from tests.conftest import make_config

MINIMAL = """\
providers:
  mock: {type: mock}
routes:
  chat: {targets: [{provider: mock, model: m}]}
"""


def test_nats_replicas_is_the_setting() -> None:
    config = parse_config(MINIMAL + "nats:\n  replicas: 3\n")
    assert config.nats.replicas == 3
    assert t.TopologySettings.from_config(config).replicas == 3


def test_queue_replicas_is_a_deprecated_alias_with_a_warning() -> None:
    with structlog.testing.capture_logs() as logs:
        config = parse_config(MINIMAL + "queue:\n  replicas: 3\n", source="old.yaml")
    assert config.nats.replicas == 3
    assert t.TopologySettings.from_config(config).replicas == 3
    warned = [e for e in logs if e["log_level"] == "warning"]
    assert len(warned) == 1 and "nats.replicas" in warned[0]["event"], logs
    assert (warned[0]["source"], warned[0]["line"]) == ("old.yaml", 6)


def test_both_replicas_keys_are_refused_naming_both_and_their_lines() -> None:
    text = MINIMAL + textwrap.dedent("""\
        nats:
          replicas: 3
        queue:
          replicas: 3
        """)
    with pytest.raises(ConfigValidationError) as info:
        parse_config(text, source="both.yaml")
    [problem] = info.value.problems
    assert (problem.line, problem.key) == (8, "queue.replicas")
    assert "nats.replicas (line 6)" in problem.message and "queue.replicas (line 8)" in problem.message


def test_both_replicas_keys_are_refused_in_code_built_configs() -> None:
    data = default_config().model_dump(exclude_unset=True)
    data |= {"nats": {"replicas": 3}, "queue": {"replicas": 1}}
    with pytest.raises(ValueError, match=r"queue.replicas \(1\) and nats.replicas \(3\)"):
        LanewayConfig.model_validate(data)
    data["nats"] = {}
    assert LanewayConfig.model_validate(data).nats.replicas == 1


def test_replicas_out_of_range_names_the_key() -> None:
    with pytest.raises(ConfigValidationError) as info:
        parse_config(MINIMAL + "nats:\n  replicas: 7\n")
    assert [(p.line, p.key) for p in info.value.problems] == [(6, "nats.replicas")]


def test_nats_url_takes_a_list_or_commas() -> None:
    listed = parse_config(MINIMAL + "nats:\n  url: [nats://a:4222, nats://b:4222]\n")
    assert listed.nats.url == "nats://a:4222,nats://b:4222"
    assert server_list(listed.nats.url) == ["nats://a:4222", "nats://b:4222"]
    assert server_list(" nats://a:4222 , nats://b:4222,") == ["nats://a:4222", "nats://b:4222"]
    assert server_list("nats://a:4222") == ["nats://a:4222"]


def test_cluster_servers_from_server_info() -> None:
    assert cluster_servers({"server_name": "x"}) == 1
    assert cluster_servers({"cluster": "c", "connect_urls": ["a:1", "b:2", "c:3", "a:1"]}) == 3


async def test_comma_separated_url_connects_past_a_dead_one(nats_server: EmbeddedNats) -> None:
    # The first URL has no server: the client moves on to the next one.
    dead = EmbeddedNats(nats_server.store_dir.parent / "dead")
    nc = await connect_nats(f"nats://127.0.0.1:{dead.port},{nats_server.url}", name="t")
    try:
        assert nc.connected_url is not None and nc.connected_url.port == nats_server.port
    finally:
        await nc.close()


async def test_replicas_above_one_on_a_single_server_fail_start_up_clearly(
    nats_server: EmbeddedNats,
) -> None:
    config = make_config("nats:\n  replicas: 3\n")
    with pytest.raises(TopologyError) as info:
        async with BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False):
            pass
    message = str(info.value)
    assert (
        "nats.replicas is 3" in message
        and "single server, not a cluster: 1 JetStream server up, 3 needed" in message
    ), message
    nc = await nats.connect(nats_server.url)
    try:  # refused before anything was created
        assert [s async for s in _stream_names(nc)] == []
    finally:
        await nc.close()


async def _stream_names(nc: nats.NATS):  # type: ignore[no-untyped-def]
    for info in await nc.jetstream().streams_info():
        yield info.config.name
