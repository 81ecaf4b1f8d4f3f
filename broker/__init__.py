"""The broker side of Laneway, and the core every Laneway process shares.

Packages, from the bottom up (``make test`` enforces the layering: see
``.importlinter``)::

    core/           the job model, the JetStream topology, a job's event log, dead
                    letters, background-task lifecycle; core/nats/ (connection,
                    inboxes, acknowledged publish) and core/wire/ (protobuf <->
                    domain objects, pure)
    config/         the YAML config file, validated into frozen models; provider types
    observability/  logs, tracing, the /metrics server
    fleet/          provider state the whole fleet shares through JetStream KV:
                    limiter budgets, circuits, recent calls, tier shares
    server/         the gRPC broker process: service, status mapping, job store,
                    result streams, stats, sweeper, redrive
    cli/            the ``laneway`` command line and the local stack (composition root)

Worker processes (``laneway.workers``) load core, config, observability and fleet;
never server or cli.
"""
