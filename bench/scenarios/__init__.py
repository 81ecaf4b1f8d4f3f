"""Scenarios for the fleet-wide adaptive limiter and multi-target routing: each starts
its own stack (embedded nats-server, fake providers over HTTP, a broker and four
worker processes), drives it with the Python client at a steady offered rate, and
compares what the fake providers saw with the targets.

    .venv/bin/python -m bench.scenarios goodput|overflow|failover|retry_after|priority|all \\
        [--duration S] [--output FILE.json]
"""
