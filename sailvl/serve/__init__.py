"""Inference and serving: the batching engine, `sailvl chat` / `sailvl caption`, the OpenAI-compatible server."""
