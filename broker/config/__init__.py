"""The configuration file: YAML with line numbers, validated into frozen pydantic
models; provider types' config blocks and routes."""
