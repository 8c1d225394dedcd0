"""The runtime: pipeline stages, schedulers, backends."""
