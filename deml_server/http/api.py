"""The dashboard's JSON API under /api/ (jobs, one job, its event stream, submit, cancel, models)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from deml_server.http.app import HttpServices


def add_routes(app: web.Application, services: HttpServices) -> None:
    """Register the /api/ routes."""
