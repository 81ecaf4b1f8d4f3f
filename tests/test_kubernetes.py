"""deploy/kubernetes and the Dockerfile: offline, no cluster and no Docker needed.

* Every manifest ``kubectl apply -k deploy/kubernetes`` creates validates against the
  Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail) of
  the oldest and newest Kubernetes versions we claim; KEDA's ScaledObjects against a
  strict model of the fields they use (``tests/kube_manifests.py``).
* The manifests follow the config they ship (config/laneway.yaml, read with
  Laneway's own loader) and the topology module: one worker Deployment,
  PodDisruptionBudget and ScaledObject per provider pool, triggers on exactly the
  consumers the pool pulls, grace above ``workers.shutdown_grace_s``, a Secret for
  every ``api_key_env``; renaming a pool in the config alone fails.
* The image: multi-stage, ``python:3.11-slim``, built from the wheel, a numeric
  non-root user that the pods run as, ``laneway`` as entrypoint.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
import subprocess
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import typer.main
from kubernetes_validate.utils import ValidationError as SchemaError  # type: ignore[import-untyped]
from ruamel.yaml import YAML

import laneway
from laneway.broker.cli.app import app
from laneway.broker.cli.natsd import EmbeddedNats, free_port
from laneway.broker.config.model import LanewayConfig, load_config, parse_config
from laneway.broker.server.exposure import check_exposure
from laneway.broker.server.process import BrokerServer
from tests.conftest import eventually
from tests.keda_scaledobject import ScaledObject, keda_problems
from tests.kube_manifests import (
    CONFIG,
    DOCKERFILE,
    KUBE,
    NATS_VALUES,
    ROOT,
    Manifests,
    container,
    dockerfile_stages,
    load_yaml_docs,
    nats_problems,
    pool_problems,
    selects,
)

# Oldest: gRPC probes and PDB policy/v1 are GA there. Newest: what the package ships.
K8S_VERSIONS = ("1.30.0", "1.35.0")


@pytest.fixture(scope="module")
def manifests() -> Manifests:
    return Manifests.load()


@pytest.fixture(scope="module")
def config() -> LanewayConfig:
    return load_config(CONFIG)


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except SchemaError as err:
            errors.append(f"{doc['kind']} {doc['metadata']['name']} on {version}: {err.message}")
    return errors


def test_kustomization_lists_every_manifest(manifests: Manifests) -> None:
    shipped = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(manifests.kustomization["resources"]) == shipped
    assert manifests.of_kind("Namespace")[0]["metadata"]["name"] == manifests.kustomization["namespace"]


def test_manifests_validate_against_kubernetes_schemas(manifests: Manifests) -> None:
    builtin = [o for o in manifests.objects if not o["apiVersion"].startswith("keda.sh/")]
    assert {o["kind"] for o in builtin} >= {"Deployment", "Service", "PodDisruptionBudget", "Namespace"}
    configmap = manifests.generated_configmap(CONFIG.read_text(encoding="utf-8"))
    assert [e for doc in [*builtin, configmap] for e in _schema_errors(doc)] == []


def test_schema_validation_is_strict(manifests: Manifests) -> None:
    # Guards the test above: a misspelt field or a wrong type must fail it.
    deployment = copy.deepcopy(manifests.broker())
    container(deployment)["readinesProbe"] = {"grpc": {"port": 50051}}
    assert _schema_errors(deployment)
    service = copy.deepcopy(manifests.of_kind("Service")[0])
    service["spec"]["ports"][0]["port"] = "grpc"
    assert _schema_errors(service)


def test_scaled_objects_are_valid_keda(manifests: Manifests) -> None:
    scaled = manifests.of_kind("ScaledObject")
    assert scaled
    for raw in scaled:
        assert keda_problems(ScaledObject.model_validate(raw)) == []
    broken = copy.deepcopy(scaled[0])
    broken["spec"]["triggers"][0]["metadata"]["lagTreshold"] = "5"
    assert any("lagTreshold" in p for p in keda_problems(ScaledObject.model_validate(broken)))
    with pytest.raises(ValueError, match="minReplicas"):
        ScaledObject.model_validate({**broken, "spec": {**broken["spec"], "minReplicas": 1}})


def test_shipped_config_is_valid_and_clustered(config: LanewayConfig) -> None:
    assert config.nats.replicas == 3
    assert len(config.nats.url.split(",")) == 3
    assert config.workers.shutdown_grace_s > 0
    # What the broker checks at start-up: reachable beyond loopback, so keys or TLS.
    check_exposure(
        config.broker.grpc_addr, tls=config.broker.tls is not None, auth=config.auth.enabled, insecure=False
    )


def test_pools_follow_config_and_topology(config: LanewayConfig, manifests: Manifests) -> None:
    assert pool_problems(config, manifests) == []
    assert set(manifests.workers()) == set(config.providers)


def test_renaming_a_pool_in_the_config_alone_fails(manifests: Manifests) -> None:
    text = CONFIG.read_text(encoding="utf-8")
    renamed = re.sub(r"\banthropic\b(?=:|,|\})", "claude", text)
    renamed = renamed.replace("provider: anthropic", "provider: claude")
    config = parse_config(renamed, source="renamed.yaml")
    assert "claude" in config.providers
    problems = pool_problems(config, manifests)
    assert any("'claude' has no worker Deployment" in p for p in problems), problems
    assert any("'anthropic', which is no provider" in p for p in problems), problems


def test_a_route_added_in_the_config_alone_fails(manifests: Manifests) -> None:
    text = CONFIG.read_text(encoding="utf-8")
    added = text.replace(
        "  embed:\n", "  moderate:\n    targets:\n      - {provider: anthropic, model: m}\n  embed:\n", 1
    )
    problems = pool_problems(parse_config(added, source="added.yaml"), manifests)
    assert any(
        "laneway-worker-anthropic: triggers on consumers" in p and "jobs_moderate_high" in p for p in problems
    )


def test_grace_and_keys_are_checked(config: LanewayConfig, manifests: Manifests) -> None:
    longer = config.model_copy(
        update={"workers": config.workers.model_copy(update={"shutdown_grace_s": 120.0})}
    )
    assert any("terminationGracePeriodSeconds" in p for p in pool_problems(longer, manifests))
    workers = manifests.workers()
    for provider, dep in workers.items():
        env_name = getattr(config.providers[provider], "api_key_env", "")
        env = {e["name"]: e for e in container(dep).get("env", [])}
        assert env_name in env, provider
        ref = env[env_name]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "laneway-provider-keys", "key": env_name}
        # Least privilege: a pool's pods hold their own provider's key only.
        others = {getattr(p, "api_key_env", "") for n, p in config.providers.items() if n != provider}
        assert not others & set(env), provider


def test_broker_is_probed_over_grpc_health(config: LanewayConfig, manifests: Manifests) -> None:
    broker = manifests.broker()
    c = container(broker)
    port = int(config.broker.grpc_addr.rpartition(":")[2])
    assert [p["containerPort"] for p in c["ports"] if p["name"] == "grpc"] == [port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port, probe
    assert "--insecure" not in c["args"]
    (service,) = manifests.of_kind("Service")
    assert selects(
        {"matchLabels": service["spec"]["selector"]}, broker["spec"]["template"]["metadata"]["labels"]
    )
    assert service["spec"]["ports"][0]["targetPort"] == "grpc"
    # preStop, then the broker's own 5 s grace for unary calls, then closing NATS.
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert broker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= pre_stop + 5 + 10


def test_nats_values_match_config_and_triggers(config: LanewayConfig, manifests: Manifests) -> None:
    (values,) = load_yaml_docs(NATS_VALUES)
    assert nats_problems(config, manifests, values) == []
    no_monitor = copy.deepcopy(values)
    no_monitor["config"]["monitor"]["port"] = 8223
    assert any("endpoint should be" in p for p in nats_problems(config, manifests, no_monitor))
    two = copy.deepcopy(values)
    two["config"]["cluster"]["replicas"] = 2
    assert any("cannot hold nats.replicas 3" in p for p in nats_problems(config, manifests, two))


def test_dockerfile_builds_the_wheel_into_a_non_root_image(manifests: Manifests) -> None:
    builder, final = dockerfile_stages(DOCKERFILE.read_text(encoding="utf-8"))
    assert builder.name and builder.base.startswith("python:3.11")
    assert final.base == "python:3.11-slim"
    assert any("python -m build --wheel" in run for run in builder.all("RUN"))
    # The final stage takes nothing from the build context: wheels only, from the builder.
    assert final.all("COPY") == [] and final.all("ADD") == []
    (install,) = [run for run in final.all("RUN") if "install" in run]
    assert f"from={builder.name}" in install and "--no-index" in install
    assert '"laneway[server]"' in install and "dev]" not in install
    (user,) = final.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0
    assert final.all("ENTRYPOINT") == ['["laneway"]']
    # The build context is an allowlist of what the wheel is made of.
    ignore = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ignore[0] == "*"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    wheel_inputs = {
        "pyproject.toml",
        pyproject["project"]["readme"],
        "LICENSE",
        "clients/laneway",
        "broker",
        "workers",
    }
    assert {ln.removeprefix("!") for ln in ignore if ln.startswith("!")} == wheel_inputs
    for dep in manifests.of_kind("Deployment"):
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        security = pod["securityContext"]
        assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))


def test_pods_run_the_image_entrypoint(manifests: Manifests) -> None:
    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    (image,) = manifests.kustomization["images"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert image["newTag"] == version
    for dep in manifests.of_kind("Deployment"):
        c = container(dep)
        assert c["image"] == image["name"]
        assert "command" not in c, "the image's ENTRYPOINT (laneway) runs"
        assert c["args"][0] in commands
        assert c["args"][1:3] == ["--config", "/etc/laneway/laneway.yaml"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert mounts["config"] == "/etc/laneway"
        assert (
            volumes["config"]["configMap"]["name"] == manifests.kustomization["configMapGenerator"][0]["name"]
        )


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed"
)
def test_kustomize_renders_what_the_files_say(manifests: Manifests) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    rendered = list(YAML(typ="safe").load_all(out))
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered)
    want = sorted((o["kind"], o["metadata"]["name"]) for o in manifests.objects)
    (configmap,) = [d for d in rendered if d["kind"] == "ConfigMap"]
    assert sorted([*want, ("ConfigMap", configmap["metadata"]["name"])]) == kinds
    assert configmap["data"]["laneway.yaml"] == CONFIG.read_text(encoding="utf-8")
    for doc in rendered:
        assert doc["metadata"].get("namespace", "laneway") == "laneway"
        if doc["kind"] == "Deployment":
            assert container(doc)["image"].endswith(":" + manifests.kustomization["images"][0]["newTag"])
            volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
            assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
        if not doc["apiVersion"].startswith("keda.sh/"):
            assert _schema_errors(doc) == []


def _keda_lag(jsz: dict[str, Any], trigger: dict[str, str]) -> int | None:
    """What KEDA's nats-jetstream scaler reads for one trigger from ``/jsz``: the
    consumer's pending plus unacknowledged messages; None where it finds no consumer."""
    for account in jsz.get("account_details") or []:
        if trigger["account"] not in (account.get("id"), account.get("name")):
            continue
        for stream in account.get("stream_detail") or []:
            for consumer in (
                stream.get("consumer_detail") or [] if stream["name"] == trigger["stream"] else []
            ):
                if consumer["name"] == trigger["consumer"]:
                    return int(consumer["num_pending"]) + int(consumer["num_ack_pending"])
    return None


async def test_keda_reads_each_pools_lag_from_nats_monitoring(tmp_path: Path, manifests: Manifests) -> None:
    # The shipped config on one real nats-server with monitoring on (replicas 1, keys off),
    # a broker creating the topology and taking jobs, no worker: KEDA's query must find
    # every trigger's consumer, and each pool's formula must add up its routes' jobs.
    shipped = load_config(CONFIG)
    monitor = free_port()
    (tmp_path / "nats.conf").write_text(f"http: 127.0.0.1:{monitor}\n")
    async with EmbeddedNats(tmp_path / "nats", config_file=tmp_path / "nats.conf") as server:
        config = shipped.model_copy(
            update={
                "nats": shipped.nats.model_copy(update={"url": server.url, "replicas": 1}),
                "auth": shipped.auth.model_copy(update={"enabled": False}),
                "metrics": shipped.metrics.model_copy(update={"broker_port": 0, "worker_port": 0}),
            }
        )
        async with (
            BrokerServer(config, nats_url=server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as broker,
            laneway.AsyncClient(broker.address, timeout=10) as client,
        ):
            await client.submit("chat", laneway.chat("hi"), lane="normal")
            for _ in range(2):
                await client.submit("embed", laneway.embedding(["a"]), lane="high")
            await client.submit("summarize", laneway.chat("long text"), lane="low")
            query = urllib.parse.urlencode({"acc": "$G", "consumers": "true", "config": "true"})

            async def pool_lags() -> dict[str, float] | None:
                def get() -> dict[str, Any]:
                    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/jsz?{query}", timeout=5) as r:
                        return dict(json.load(r))

                jsz = await asyncio.to_thread(get)
                lags: dict[str, float] = {}
                for so in manifests.of_kind("ScaledObject"):
                    values = {
                        trig["name"]: _keda_lag(jsz, trig["metadata"]) for trig in so["spec"]["triggers"]
                    }
                    if None in values.values():
                        return None
                    formula = so["spec"]["advanced"]["scalingModifiers"]["formula"]
                    lags[so["spec"]["scaleTargetRef"]["name"]] = sum(
                        values[n.strip()] or 0 for n in formula.split("+")
                    )
                return lags

            async def counted() -> bool:
                return await pool_lags() == {"laneway-worker-openai": 4, "laneway-worker-anthropic": 2}

            await eventually(counted)
