"""The HTTP provider types, registered by config ``type``: ``openai`` (the OpenAI
API and compatible servers) and ``anthropic`` (the Messages API)."""

from __future__ import annotations

from workers.provider import register_provider_type
from workers.providers.anthropic import AnthropicProvider
from workers.providers.openai import OpenAIProvider

__all__ = ["AnthropicProvider", "OpenAIProvider"]

register_provider_type("openai", OpenAIProvider)
register_provider_type("anthropic", AnthropicProvider)
