"""The server side's own exceptions, beside the client's (``laneway.errors``).

Hierarchy (the root is the client's, so one ``except LanewayError`` catches all)::

    LanewayError
    ├── ApiError ...            laneway.errors: an RPC failed (client and server)
    ├── ConfigError             a config file is invalid (names file, line, key)
    └── TopologyError           the NATS server lacks a feature Laneway needs
"""

from __future__ import annotations

from laneway.errors import LanewayError

__all__ = ["ConfigError", "TopologyError"]


class ConfigError(LanewayError):
    """A configuration file or value is invalid. The message names file, line and key."""


class TopologyError(LanewayError):
    """The NATS server cannot host Laneway's JetStream topology (version, JetStream off)."""
