"""The Open Inference Protocol's REST face (KServe v2 / Triton HTTP): /v2 paths over the inference gateway."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from deml_server.http.app import HttpServices


def add_routes(app: web.Application, services: HttpServices) -> None:
    """Register the /v2 routes."""
