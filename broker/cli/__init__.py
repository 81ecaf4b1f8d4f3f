"""The ``laneway`` command line: client commands (submit, watch, dlq, top), the
processes (broker, worker, fake-provider) and ``laneway up``, the whole stack on
one machine.

This is the composition root: the one package that imports both the gRPC server
(``laneway.broker.server``) and the workers (``laneway.workers``), to start them.
Nothing imports it back.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """Console script ``laneway``. The command line needs the server's
    dependencies; a client-only install gets a hint instead of a traceback."""
    try:
        from laneway.broker.cli.app import run
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] == "laneway":
            raise
        missing = exc.name or "a dependency"
        sys.exit(
            f"laneway: the command line needs the server's dependencies ({missing} is missing); "
            "install them with: pip install 'laneway[server]'"
        )
    run()
