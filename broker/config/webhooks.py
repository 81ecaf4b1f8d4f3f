"""The ``webhooks`` block: signing secrets, the address guard's exceptions, the retry
horizon, and standing subscriptions of routes.

Its own block because webhook delivery is its own process (``laneway webhooks
serve``, started by ``laneway up``). Secrets live here, never in a job: a job names
one (``Notify.secret``), so a payload that leaks carries no key. A secret may be given
as ``${ENV_VAR}``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from laneway.broker.config.providers import ConfigModel
from laneway.broker.core.model import NAME_PATTERN

__all__ = ["WebhookSubscription", "WebhooksConfig"]

_PREFIX = "whsec_"


def _check_secret(value: str) -> str:
    raw = value.removeprefix(_PREFIX)
    try:
        key = base64.b64decode(raw + "==", validate=False)
    except (binascii.Error, ValueError):
        raise ValueError("not a Standard Webhooks secret (whsec_ followed by base64)") from None
    if len(key) < 16:
        raise ValueError("a signing secret needs at least 16 bytes (whsec_ + base64 of 16-64 random bytes)")
    return value


Secret = Annotated[str, AfterValidator(_check_secret)]
Events = Literal["final", "state_changes", "all"]


class WebhookSubscription(ConfigModel):
    """A standing subscription: every job of ``route`` is delivered to ``url``."""

    route: Annotated[str, Field(pattern=NAME_PATTERN)]
    """The route whose jobs are delivered."""
    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2048)]
    """``http://`` or ``https://`` URL the events are POSTed to."""
    events: Events = "final"
    """``final`` (the final event only), ``state_changes`` (every state, no text deltas)
    or ``all`` (every event, deltas too, in seq order)."""
    secret: str
    """Name of the signing secret (a key of ``webhooks.secrets``)."""


class WebhooksConfig(ConfigModel):
    """Signed webhooks with durable delivery (``laneway webhooks``)."""

    secrets: dict[
        Annotated[str, Field(pattern=NAME_PATTERN)], Annotated[list[Secret], Field(min_length=1)]
    ] = {}  # noqa: RUF012
    """Signing secrets by name, each a list of Standard Webhooks secrets (``whsec_`` +
    base64). Several = a rotation: each request carries one signature per secret, so a
    receiver verifying with the old or the new one accepts it."""
    allow_hosts: list[str] = []  # noqa: RUF012
    """Host names or CIDR ranges (``127.0.0.1/32``, ``10.0.0.0/8``) a webhook may reach
    although they resolve to a loopback, private, link-local or metadata address, which
    are refused otherwise."""
    max_age_s: Annotated[int, Field(gt=0)] = 86_400
    """Retry horizon: a delivery still failing this many seconds after its event is
    moved to the webhook dead letters (``laneway webhooks list``)."""
    timeout_s: Annotated[float, Field(gt=0, le=60, allow_inf_nan=False)] = 10.0
    """Total seconds one delivery attempt may take (connecting: at most 5 of them)."""
    subscriptions: list[WebhookSubscription] = []  # noqa: RUF012
    """Standing subscriptions of routes (besides the webhooks a job names itself)."""

    @field_validator("allow_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if "/" in host:
                ipaddress.ip_network(host, strict=False)  # ValueError names it
            elif not host or any(c.isspace() for c in host):
                raise ValueError(f"{host!r} is not a host name, address or CIDR range")
        return value

    @field_validator("subscriptions")
    @classmethod
    def _check_subscription_secrets(
        cls, value: list[WebhookSubscription], info: ValidationInfo
    ) -> list[WebhookSubscription]:
        secrets = info.data.get("secrets", {})
        for index, sub in enumerate(value):
            if sub.secret not in secrets:
                raise ValueError(f"[{index}].secret: no secret named {sub.secret!r} in webhooks.secrets")
        return value

    @property
    def enabled(self) -> bool:
        """Whether anything can be delivered (a job's webhook needs a secret)."""
        return bool(self.secrets)
