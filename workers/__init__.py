"""Worker processes: provider pools that pull jobs from the lanes and call providers.

Modules here run one job's life inside a worker (pool, puller, runner, attempts,
calling, streaming, batching, retry, log position, spans, metrics). Packages::

    fleet/      what a worker does with the fleet-wide provider state: the limiter,
                circuit breakers, feedback from answers, tier shares, routing
    providers/  the provider seam (base), error classification and the HTTP provider
                types (openai, anthropic)
    fakes/      test doubles behind the same seam: the in-process ``mock`` provider
                type and the fake OpenAI/Anthropic HTTP server, with their simulation

The runtime never imports ``fakes`` (the ``mock`` type is found through its entry
point like any provider type); only the command line and the tests do.
"""
