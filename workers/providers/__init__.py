"""Provider types that call a real API over HTTP: ``openai`` (the OpenAI API and
compatible servers) and ``anthropic`` (the Messages API), with the seam they share
(``base``), error classification and the HTTP plumbing. Each type's module holds its
config model, its provider and the ``PROVIDER_TYPE`` its entry point names."""
