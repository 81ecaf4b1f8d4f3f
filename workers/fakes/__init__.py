"""Test doubles behind the provider seam: the in-process ``mock`` provider type and
the fake OpenAI/Anthropic HTTP server, sharing one simulation of a provider."""
