"""Pipelines: runs of configured chains of steps, driven durably (``docs/pipelines.md``)."""
