"""The HTTP face: dashboard, JSON API, Open Inference Protocol REST and Prometheus metrics, on one aiohttp app."""
