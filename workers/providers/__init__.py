"""The HTTP provider types, registered by config ``type``: ``openai`` (the OpenAI
API and compatible servers) and ``anthropic`` (the Messages API)."""

from __future__ import annotations

from laneway.workers.providers.anthropic import AnthropicProvider
from laneway.workers.providers.base import register_provider_type
from laneway.workers.providers.openai import OpenAIProvider

__all__ = ["AnthropicProvider", "OpenAIProvider"]

register_provider_type("openai", OpenAIProvider)
register_provider_type("anthropic", AnthropicProvider)
