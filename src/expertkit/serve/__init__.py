"""Serving: an OpenAI-compatible HTTP API over the library (see app.py), with continuous batching (engine.py)."""
