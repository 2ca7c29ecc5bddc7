"""Engines behind one protocol (app.engines.protocol): a simulated vLLM now, real vLLM later."""
