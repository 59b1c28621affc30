"""/metrics: Prometheus text with Triton's inference metric names and DeML's training metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from deml_server.http.app import HttpServices


def add_routes(app: web.Application, services: HttpServices) -> None:
    """Register /metrics."""
