"""Whether the NATS cluster has enough servers for ``nats.replicas``.

Without this check a replica count the cluster cannot place fails deep inside
stream creation with JetStream's own words ("insufficient resources", "no suitable
peers"); here it fails at start-up with one sentence naming the key, the count
wanted and the count found.

Counting servers needs no system-account credentials: the INFO the connected
server sends every client names its cluster and lists the client URLs of the
cluster's servers that are up (``connect_urls``). A server that is down is not
listed, so a cluster that already holds the jobs stream at the wanted replica
count also counts that stream's peers (its leader and replicas, online or not):
a broker restarted while one node of three is down still starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import nats.js.errors
from nats.js import JetStreamContext

from laneway.broker.core.errors import TopologyError

__all__ = ["check_cluster_size", "cluster_servers", "placement_error"]

_KEY = "nats.replicas"


def cluster_servers(server_info: Mapping[str, Any]) -> int:
    """Servers in the connected server's cluster that are up (1 when it is alone)."""
    if not server_info.get("cluster"):
        return 1
    urls = server_info.get("connect_urls") or []
    return max(1, len(set(urls)))


async def _stream_peers(js: JetStreamContext, stream: str, replicas: int) -> int:
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return 0
    if (info.config.num_replicas or 1) < replicas or info.cluster is None:
        return 0
    return (1 if info.cluster.leader else 0) + len(info.cluster.replicas or [])


async def check_cluster_size(js: JetStreamContext, replicas: int, placed_stream: str) -> None:
    """Raise TopologyError when fewer servers than ``replicas`` can hold the streams.

    ``placed_stream`` is a stream that, when it already exists at ``replicas``,
    proves the cluster has (had) that many servers."""
    if replicas <= 1:
        return
    # nats-py keeps the server's INFO only in this attribute; the JetStream context
    # keeps its connection in ``_nc``. Both have been stable across nats-py releases.
    info: Mapping[str, Any] = js._nc._server_info
    found = cluster_servers(info)
    if found >= replicas:
        return
    found = max(found, await _stream_peers(js, placed_stream, replicas))
    if found >= replicas:
        return
    at = f"{info.get('host', '?')}:{info.get('port', '?')}"
    where = (
        f"the NATS cluster {info['cluster']!r} (connected at {at}) has"
        if info.get("cluster")
        else f"the NATS server at {at} is a single server, not a cluster:"
    )
    raise TopologyError(
        f"{_KEY} is {replicas} but {where} {found} JetStream server{'s' if found != 1 else ''} up, "
        f"{replicas} needed. Start more servers in the cluster (and list each in nats.url), "
        f"or lower {_KEY}"
    )


def placement_error(what: str, replicas: int, err: nats.js.errors.APIError) -> TopologyError:
    """JetStream refused to place ``what`` on ``replicas`` servers: say which key asked."""
    return TopologyError(
        f"cannot place {what} on {replicas} servers ({_KEY} is {replicas}): "
        f"{err.description or type(err).__name__} (JetStream error {err.err_code})"
    )
