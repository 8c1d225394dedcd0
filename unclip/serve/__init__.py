"""Serving: the batching engine (engine.py) that front ends (HTTP, Ray Serve) share."""
