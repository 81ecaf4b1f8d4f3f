"""KEDA's ScaledObject as far as deploy/kubernetes uses it, strictly.

KEDA's ScaledObject is a CRD the Kubernetes schemas do not cover. ``ScaledObject``
models the part of it these manifests use (field names from KEDA's
``apis/keda/v1alpha1/scaledobject_types.go``), with unknown keys refused, and
``keda_problems`` checks what the model cannot: trigger metadata keys (those of
``pkg/scalers/nats_jetstream_scaler.go``), numbers KEDA parses from strings, and a
formula that sums every trigger once.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Every key KEDA's nats-jetstream scaler reads from trigger metadata.
NATS_JETSTREAM_KEYS = frozenset(
    {
        "natsServerMonitoringEndpoint",
        "account",
        "accountID",
        "stream",
        "consumer",
        "lagThreshold",
        "activationLagThreshold",
        "useHttps",
    }
)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class _ScaleTargetRef(_Strict):
    name: str
    kind: Literal["Deployment"] = "Deployment"
    apiVersion: Literal["apps/v1"] = "apps/v1"


class _HpaPolicy(_Strict):
    type: Literal["Pods", "Percent"]
    value: int = Field(gt=0)
    periodSeconds: int = Field(gt=0, le=1800)


class _HpaRules(_Strict):
    stabilizationWindowSeconds: int = Field(ge=0, le=3600)
    policies: list[_HpaPolicy] = []


class _Behavior(_Strict):
    scaleUp: _HpaRules
    scaleDown: _HpaRules


class _HpaConfig(_Strict):
    behavior: _Behavior


class _ScalingModifiers(_Strict):
    formula: str
    target: str
    activationTarget: str = ""
    metricType: Literal["AverageValue", "Value"] = "AverageValue"


class _Advanced(_Strict):
    horizontalPodAutoscalerConfig: _HpaConfig
    scalingModifiers: _ScalingModifiers


class _Trigger(_Strict):
    type: Literal["nats-jetstream"]
    name: str = Field(pattern=_IDENTIFIER.pattern)
    metadata: dict[str, str]


class _Spec(_Strict):
    scaleTargetRef: _ScaleTargetRef
    pollingInterval: int = Field(gt=0)
    minReplicaCount: int = Field(ge=0)
    maxReplicaCount: int = Field(gt=0)
    advanced: _Advanced
    triggers: list[_Trigger] = Field(min_length=1)


class _Metadata(_Strict):
    name: str
    labels: dict[str, str] = {}


class ScaledObject(_Strict):
    apiVersion: Literal["keda.sh/v1alpha1"]
    kind: Literal["ScaledObject"]
    metadata: _Metadata
    spec: _Spec


def keda_problems(so: ScaledObject) -> list[str]:
    """What KEDA itself would refuse or misread in one ScaledObject."""
    name, spec = so.metadata.name, so.spec
    problems: list[str] = []
    if spec.minReplicaCount > spec.maxReplicaCount:
        problems.append(f"{name}: minReplicaCount above maxReplicaCount")
    names = [trig.name for trig in spec.triggers]
    if len(set(names)) != len(names):
        problems.append(f"{name}: trigger names repeat: {names}")
    terms = [s.strip() for s in spec.advanced.scalingModifiers.formula.split("+")]
    if sorted(terms) != sorted(names):
        problems.append(f"{name}: the formula must sum every trigger once, got {terms} for {names}")
    for number in (spec.advanced.scalingModifiers.target, spec.advanced.scalingModifiers.activationTarget):
        if not re.fullmatch(r"\d+(\.\d+)?", number):
            problems.append(f"{name}: scalingModifiers target {number!r} is not a number")
    for trig in spec.triggers:
        meta = trig.metadata
        unknown = sorted(set(meta) - NATS_JETSTREAM_KEYS)
        missing = sorted({"natsServerMonitoringEndpoint", "stream", "consumer"} - set(meta))
        if unknown or missing:
            problems.append(f"{name}/{trig.name}: unknown metadata {unknown}, missing {missing}")
        if "account" not in meta and "accountID" not in meta:
            problems.append(f"{name}/{trig.name}: the scaler needs account or accountID")
        for key in ("lagThreshold", "activationLagThreshold"):
            if key in meta and not meta[key].isdigit():
                problems.append(f"{name}/{trig.name}: {key} {meta[key]!r} is not an integer")
        if meta.get("useHttps", "false") not in ("true", "false"):
            problems.append(f"{name}/{trig.name}: useHttps must be 'true' or 'false'")
    return problems
