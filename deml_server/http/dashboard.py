"""The dashboard: server-rendered pages and their vendored assets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from deml_server.http.app import HttpServices


def add_routes(app: web.Application, services: HttpServices) -> None:
    """Register the dashboard's pages and static assets."""
