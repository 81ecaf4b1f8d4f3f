"""Who is calling: the principal an RPC runs for, set by the auth interceptor.

Every handler reads ``current_principal()``; with authentication off it is
``ANONYMOUS``: the default tenant with every right, which is exactly the broker's
behaviour before tenants existed. Tenant scoping (jobs, dead letters, idempotency
and debounce keys) uses ``principal.tenant``; role checks use ``principal.may``.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass

from laneway.broker.config.security import ROLES, Role

__all__ = [
    "ANONYMOUS",
    "DEFAULT_TENANT",
    "Principal",
    "current_principal",
    "reset_principal",
    "set_principal",
]

DEFAULT_TENANT = ""
"""The tenant of jobs submitted without authentication (shown as empty on the wire)."""


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    """The API key's id ("" without authentication); logged, never the key."""
    tenant: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may(self, required: Role) -> bool:
        """Whether this principal's role is ``required`` or a stronger one."""
        return ROLES.index(self.role) >= ROLES.index(required)

    def sees(self, tenant: str) -> bool:
        """Whether a resource of ``tenant`` is visible to this principal (admins see all)."""
        return self.is_admin or tenant == self.tenant


ANONYMOUS = Principal(key_id="", tenant=DEFAULT_TENANT, role="admin")

_current: ContextVar[Principal] = ContextVar("laneway_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    return _current.get()


def set_principal(principal: Principal) -> Token[Principal]:
    return _current.set(principal)


def reset_principal(token: Token[Principal]) -> None:
    _current.reset(token)
