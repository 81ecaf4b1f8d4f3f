"""A sink step that delivers its result to a webhook (``docs/pipelines.md``): a real
nats-server, broker (with its driver), worker pool and webhook delivery process, and
a real HTTP receiver on loopback that verifies every signature with the
``standardwebhooks`` package; and the config checks of the step."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import nats
import pytest
from nats.aio.msg import Msg

from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import ConfigValidationError, LanewayConfig, parse_config
from laneway.broker.core import topology as t
from laneway.broker.core.events import EventLog
from laneway.broker.pipelines.outputs import Outputs
from laneway.broker.pipelines.runlog import RunLog
from laneway.broker.pipelines.sink_webhook import WebhookSink
from laneway.broker.server.process import BrokerServer
from laneway.broker.webhooks.delivery import Tuning
from laneway.broker.webhooks.service import WebhookService
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import job_pb2, pipeline_pb2
from laneway.workers.fakes.simulation import unit_vector

from .conftest import eventually, make_config
from .test_pipelines import finished, start
from .test_webhooks import MAIN, Receiver, receiver, watched  # noqa: F401 (the receiver fixture)

RUN = pipeline_pb2.PipelineRunState


@pytest.fixture
def config(receiver: Receiver) -> LanewayConfig:  # noqa: F811
    return make_config(f"""
webhooks:
  secrets: {{main: ["{MAIN}"]}}
  allow_hosts: ["127.0.0.1"]
pipelines:
  hooked:
    steps:
      - {{name: chunks, kind: split, size: 6}}
      - {{name: vectors, kind: map, over: chunks, route: embed}}
      - {{name: notify, kind: sink, from: vectors, webhook: {{url: "{receiver.url}/sink", secret: main}}}}
""")


@pytest.fixture
async def webhooks(
    nats_server: EmbeddedNats, config: LanewayConfig, broker: BrokerServer
) -> AsyncIterator[WebhookService]:
    async with (
        WebhookService(config, nats_url=nats_server.url, tuning=Tuning(backoff_base_s=0.05)) as service,
        watched(service),
    ):
        yield service


@pytest.fixture
async def stub(broker: BrokerServer) -> AsyncIterator[pb_grpc.BrokerServiceStub]:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        yield pb_grpc.BrokerServiceStub(channel)


async def test_a_sink_step_posts_the_result_signed_once_and_the_run_shows_the_delivery(
    stub: pb_grpc.BrokerServiceStub,
    worker: object,
    webhooks: WebhookService,
    receiver: Receiver,  # noqa: F811
    nats_server: EmbeddedNats,
) -> None:
    text = "abcdefghijklmnopqrstuvwxyz"  # five chunks of six, the last short
    run_id = await start(stub, "hooked", text)
    run = await finished(stub, run_id)
    assert run.state == RUN.PIPELINE_RUN_STATE_SUCCEEDED, run.error
    assert run.steps[2].items == 5

    async def delivered() -> bool:
        got = await stub.GetPipelineRun(pipeline_pb2.GetPipelineRunRequest(run_id=run_id))
        found = got.run.steps[2].deliveries
        return len(found) == 1 and found[0].state == job_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED

    await eventually(delivered)
    (call,) = receiver.at("/sink")
    assert receiver.bad_signatures == []
    body = call.event
    assert {k: body[k] for k in ("type", "run_id", "pipeline", "step", "part", "parts")} == {
        "type": "pipeline.sink",
        "run_id": run_id,
        "pipeline": "hooked",
        "step": "notify",
        "part": 1,
        "parts": 1,
    }
    assert [i["index"] for i in body["items"]] == [0, 1, 2, 3, 4]
    assert [i["item"] for i in body["items"]] == ["abcdef", "ghijkl", "mnopqr", "stuvwx", "yz"]
    assert body["items"][1]["output"] == pytest.approx(unit_vector("ghijkl", 8), rel=1e-6)
    got = await stub.GetPipelineRun(pipeline_pb2.GetPipelineRunRequest(run_id=run_id))
    (delivery,) = got.run.steps[2].deliveries
    assert call.headers["webhook-id"] == delivery.webhook_id
    assert delivery.webhook_id.startswith(f"msg_{run_id}_2_1_")
    assert delivery.source == "pipeline" and delivery.attempts == 1 and delivery.last_status == 200
    assert delivery.endpoint == f"{receiver.url}/sink"

    # The transition replayed (as after a broker killed before it stored the step's
    # end): nothing is published again, even past the stream's deduplication window,
    # because the delivery is recorded.
    nc = await nats.connect(nats_server.url)
    try:
        published: list[str] = []

        async def seen(msg: Msg) -> None:
            published.append(msg.subject)

        sub = await nc.subscribe(f"{t.WEBHOOKS_PREFIX}.*.{run_id}", cb=seen)
        async with EventLog(nc) as events:
            stored = await RunLog(nc, events.mux).read(run_id)
            assert stored is not None
            sink = WebhookSink(nc.jetstream(), 1 << 20)
            assert await sink.deliver(stored.state, 2, Outputs(events, stored.state)) == 5
        await nc.flush()
        await sub.unsubscribe()
    finally:
        await nc.close()
    assert published == []
    assert len(receiver.at("/sink")) == 1


BASE = """\
providers:
  mock: {type: mock}
routes:
  embed:
    targets: [{provider: mock, model: mock-embedding}]
webhooks:
  secrets: {main: ["whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3"]}
pipelines:
  p:
    steps:
      - {name: chunks, kind: split, size: 6}
      - {name: vectors, kind: map, over: chunks, route: embed}
"""


HOOKED = (
    '      - {name: out, kind: sink, from: vectors, webhook: {url: "https://h.example/x", secret: SECRET}}\n'
)


def _problems(sink: str) -> list[str]:
    with pytest.raises(ConfigValidationError) as caught:
        parse_config(BASE + sink, source="p.yaml")
    return [str(p) for p in caught.value.problems]


def test_an_unknown_secret_is_refused_with_its_line_and_the_closest_name() -> None:
    found = _problems(HOOKED.replace("SECRET", "mian"))
    assert found == [
        "p.yaml:13: pipelines.p.steps[2].webhook.secret: no secret named 'mian' in "
        "webhooks.secrets; known: 'main' (did you mean 'main'?)"
    ]


def test_a_sink_has_a_bucket_or_a_webhook() -> None:
    both = _problems(
        "      - {name: out, kind: sink, from: vectors, bucket: b, "
        'webhook: {url: "https://h.example/x", secret: main}}\n'
    )
    assert len(both) == 1 and "exactly one of bucket and webhook" in both[0] and "p.yaml:13" in both[0]
    neither = _problems("      - {name: out, kind: sink, from: vectors}\n")
    assert len(neither) == 1 and "exactly one of bucket and webhook" in neither[0]
    bad_url = _problems(
        '      - {name: out, kind: sink, from: vectors, webhook: {url: "ftp://x", secret: main}}\n'
    )
    assert len(bad_url) == 1 and "webhook.url" in bad_url[0]
    config = parse_config(BASE + HOOKED.replace("SECRET", "main"))
    sink = config.pipelines["p"].steps[2]
    assert json.loads(json.dumps(sink.model_dump(mode="json", by_alias=True)))["webhook"]["secret"] == "main"
