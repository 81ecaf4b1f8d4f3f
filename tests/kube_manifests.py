"""deploy/kubernetes as data, and the rules that tie it to Laneway's config, topology
and image (used by tests/test_kubernetes.py).

Each ``*_problems`` function returns what is wrong, one sentence per problem, so a
test can assert both that the shipped files have none and that a broken variant
(a pool renamed in the config only, say) has the expected one. KEDA's ScaledObject
is modelled in ``tests/keda_scaledobject.py``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.core.model import LANES
from tests.keda_scaledobject import ScaledObject, keda_problems

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
CONFIG = KUBE / "config" / "laneway.yaml"
NATS_VALUES = KUBE / "nats" / "values.yaml"
DOCKERFILE = ROOT / "Dockerfile"

POOL_LABEL = "laneway.dev/pool"

Doc = dict[str, Any]


def load_yaml_docs(path: Path) -> list[Doc]:
    yaml = YAML(typ="safe")
    return [d for d in yaml.load_all(path.read_text(encoding="utf-8")) if d is not None]


@dataclass(frozen=True)
class Manifests:
    """Every object ``kubectl apply -k deploy/kubernetes`` creates, from the files."""

    kustomization: Doc
    objects: tuple[Doc, ...]

    @classmethod
    def load(cls, root: Path = KUBE) -> Manifests:
        (kustomization,) = load_yaml_docs(root / "kustomization.yaml")
        objects = [doc for name in kustomization["resources"] for doc in load_yaml_docs(root / name)]
        return cls(kustomization, tuple(objects))

    def of_kind(self, kind: str) -> list[Doc]:
        return [o for o in self.objects if o["kind"] == kind]

    def generated_configmap(self, config_text: str) -> Doc:
        """The ConfigMap kustomize's configMapGenerator makes (before its name hash)."""
        (gen,) = self.kustomization["configMapGenerator"]
        (entry,) = gen["files"]
        key, _, _ = entry.partition("=")
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": gen["name"]},
            "data": {key: config_text},
        }

    def workers(self) -> dict[str, Doc]:
        """Worker Deployments by the provider their container serves (``--provider``)."""
        out: dict[str, Doc] = {}
        for dep in self.of_kind("Deployment"):
            args = container(dep)["args"]
            if args[0] == "worker":
                providers = [args[i + 1] for i, a in enumerate(args) if a == "--provider"]
                assert len(providers) == 1, f"{dep['metadata']['name']}: one --provider per pool"
                out[providers[0]] = dep
        return out

    def broker(self) -> Doc:
        (dep,) = [d for d in self.of_kind("Deployment") if container(d)["args"][0] == "broker"]
        return dep


def container(deployment: Doc) -> Doc:
    """The Deployment's one container (the object itself: tests mutate it)."""
    containers: list[Doc] = deployment["spec"]["template"]["spec"]["containers"]
    (c,) = containers
    return c


def pod_labels(deployment: Doc) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def deployment_name(provider: str) -> str:
    """Provider names allow ``_`` and capitals; object names do not."""
    return f"laneway-worker-{provider.lower().replace('_', '-')}"


def pool_consumers(config: LanewayConfig, provider: str) -> list[str]:
    """What ``laneway.workers.pool`` pulls for ``provider``: every lane of every route
    it is a target of, each a durable consumer the topology module creates."""
    created = {c.name for c in t.TopologySettings.from_config(config).lane_consumers()}
    names = [t.LaneConsumer(route, lane).name for route in config.routes_of(provider) for lane in LANES]
    missing = sorted(set(names) - created)
    assert not missing, f"the topology does not create {missing}"
    return names


# --- the rules tying manifests to the config --------------------------------------------


def pool_problems(config: LanewayConfig, m: Manifests) -> list[str]:
    """One Deployment, PodDisruptionBudget and ScaledObject per provider pool, each
    pointing at the others, scaled on the consumers the pool pulls, with the pool's
    autoscale bounds, shutdown grace and API key Secret."""
    problems: list[str] = []
    workers = m.workers()
    pdbs = m.of_kind("PodDisruptionBudget")
    scaled = [ScaledObject.model_validate(o) for o in m.of_kind("ScaledObject")]
    for extra in sorted(set(workers) - set(config.providers)):
        problems.append(f"worker Deployment for {extra!r}, which is no provider in the config")
    deployments = {d["metadata"]["name"]: d for d in m.of_kind("Deployment")}
    for so in scaled:
        if so.spec.scaleTargetRef.name not in deployments:
            problems.append(f"ScaledObject {so.metadata.name} scales a missing Deployment")
    for provider, pcfg in config.providers.items():
        dep = workers.get(provider)
        if dep is None:
            problems.append(f"provider {provider!r} has no worker Deployment (--provider {provider})")
            continue
        dname = dep["metadata"]["name"]
        if dname != deployment_name(provider):
            problems.append(
                f"worker Deployment of {provider!r} is {dname}, expected {deployment_name(provider)}"
            )
        labels = pod_labels(dep)
        if labels.get(POOL_LABEL) != provider:
            problems.append(f"{dname}: pod label {POOL_LABEL} should be {provider!r}")
        if "replicas" in dep["spec"]:
            problems.append(f"{dname}: sets replicas, which KEDA owns")
        matching = [p for p in pdbs if selects(p["spec"]["selector"], labels)]
        if len(matching) != 1:
            problems.append(f"{dname}: {len(matching)} PodDisruptionBudgets select its pods, expected 1")
        problems += _grace_problems(config, dep)
        problems += _key_problems(provider, getattr(pcfg, "api_key_env", ""), dep)
        mine = [so for so in scaled if so.spec.scaleTargetRef.name == dname]
        if len(mine) != 1:
            problems.append(f"{dname}: {len(mine)} ScaledObjects scale it, expected 1")
            continue
        problems += _scaling_problems(config, provider, mine[0])
    return problems


def _grace_problems(config: LanewayConfig, dep: Doc) -> list[str]:
    grace = dep["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    # After the grace: hand the rest back, flush events, close NATS.
    need = config.workers.shutdown_grace_s + 10
    if grace < need:
        return [
            f"{dep['metadata']['name']}: terminationGracePeriodSeconds {grace} must be at least "
            f"workers.shutdown_grace_s ({config.workers.shutdown_grace_s}) + 10"
        ]
    return []


def _key_problems(provider: str, env_name: str, dep: Doc) -> list[str]:
    env = {e["name"]: e for e in container(dep).get("env", [])}
    if not env_name:
        return []
    ref = env.get(env_name, {}).get("valueFrom", {}).get("secretKeyRef")
    if ref is None:
        return [
            f"{dep['metadata']['name']}: providers.{provider}.api_key_env {env_name} is not set from a Secret"
        ]
    return []


def _scaling_problems(config: LanewayConfig, provider: str, so: ScaledObject) -> list[str]:
    name, spec = so.metadata.name, so.spec
    bounds = config.autoscale.for_pool(provider)
    problems = keda_problems(so)
    want = pool_consumers(config, provider)
    got = [trig.metadata.get("consumer", "") for trig in spec.triggers]
    if sorted(got) != sorted(want):
        problems.append(f"{name}: triggers on consumers {sorted(got)}, the pool pulls {sorted(want)}")
    streams = {trig.metadata.get("stream") for trig in spec.triggers}
    if streams != {t.JOBS_STREAM}:
        problems.append(
            f"{name}: triggers on streams {sorted(map(str, streams))}, jobs are in {t.JOBS_STREAM}"
        )
    if (spec.minReplicaCount, spec.maxReplicaCount) != (bounds.min, bounds.max):
        problems.append(
            f"{name}: replicas {spec.minReplicaCount}-{spec.maxReplicaCount}, "
            f"autoscale says {bounds.min}-{bounds.max}"
        )
    if spec.minReplicaCount < 1:
        problems.append(f"{name}: minReplicaCount 0 makes the first job wait for a pod to start")
    # KEDA's lag counts running jobs too: a pod's share is its concurrency plus its backlog.
    target = config.providers[provider].concurrency + bounds.target_lag_per_worker
    modifiers = spec.advanced.scalingModifiers
    if float(modifiers.target) != target:
        problems.append(
            f"{name}: target {modifiers.target}, expected concurrency + target_lag_per_worker = {target}"
        )
    for trig in spec.triggers:
        if float(trig.metadata.get("lagThreshold", "10")) != target:
            problems.append(f"{name}/{trig.name}: lagThreshold should equal the pool's target {target}")
    behavior = spec.advanced.horizontalPodAutoscalerConfig.behavior
    if behavior.scaleUp.stabilizationWindowSeconds != bounds.cooldown_up_s:
        problems.append(f"{name}: scaleUp window is not autoscale cooldown_up_s ({bounds.cooldown_up_s})")
    if behavior.scaleDown.stabilizationWindowSeconds != bounds.cooldown_down_s:
        problems.append(
            f"{name}: scaleDown window is not autoscale cooldown_down_s ({bounds.cooldown_down_s})"
        )
    one_per_idle = [("Pods", 1, bounds.idle_s)]
    if [(p.type, p.value, p.periodSeconds) for p in behavior.scaleDown.policies] != one_per_idle:
        problems.append(f"{name}: scale down one pod per idle_s ({bounds.idle_s} s)")
    return problems


def nats_problems(config: LanewayConfig, m: Manifests, values: Doc) -> list[str]:
    """The NATS chart's values, Laneway's nats.url and the KEDA endpoint agree."""
    problems: list[str] = []
    fullname = values["fullnameOverride"]
    cfg = values["config"]
    size = cfg["cluster"]["replicas"] if cfg["cluster"]["enabled"] else 1
    if not cfg["jetstream"]["enabled"] or not cfg["jetstream"]["fileStore"]["pvc"]["enabled"]:
        problems.append("NATS values: JetStream on a persistent file store is required")
    if size < config.nats.replicas:
        problems.append(f"NATS values: {size} servers cannot hold nats.replicas {config.nats.replicas}")
    port = values.get("config", {}).get("nats", {}).get("port", 4222)
    want_urls = [f"nats://{fullname}-{i}.{fullname}-headless:{port}" for i in range(size)]
    if config.nats.url.split(",") != want_urls:
        problems.append(f"nats.url {config.nats.url!r} should list every NATS pod: {','.join(want_urls)}")
    monitor = cfg.get("monitor", {})
    if not monitor.get("enabled", True):
        problems.append("NATS values: monitoring is off, KEDA's nats-jetstream scaler needs it")
    endpoint = (
        f"{fullname}-headless.{m.kustomization['namespace']}.svc.cluster.local:{monitor.get('port', 8222)}"
    )
    for so in m.of_kind("ScaledObject"):
        for trig in so["spec"]["triggers"]:
            if trig["metadata"]["natsServerMonitoringEndpoint"] != endpoint:
                problems.append(f"{so['metadata']['name']}/{trig['name']}: endpoint should be {endpoint}")
    return problems


# --- the Dockerfile ---------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    base: str
    name: str
    instructions: tuple[tuple[str, str], ...]

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def dockerfile_stages(text: str) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comments dropped, ARGs before
    the first FROM substituted into it."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            key, _, value = rest.partition("=")
            args[key] = value
        elif keyword == "FROM":
            words = shlex.split(re.sub(r"\$\{(\w+)\}", lambda mt: args.get(mt.group(1), ""), rest))
            base, name = words[0], words[2] if len(words) > 2 and words[1].upper() == "AS" else ""
            stages.append(Stage(base, name, ()))
        else:
            stages[-1] = Stage(stages[-1].base, stages[-1].name, (*stages[-1].instructions, (keyword, rest)))
    return stages
