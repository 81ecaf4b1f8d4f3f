"""``python -m laneway.broker.cli``: the same as the ``laneway`` command."""

from laneway.broker.cli import main

main()
