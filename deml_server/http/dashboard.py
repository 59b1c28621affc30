"""The dashboard: five pages served from the package, their data from /api/ and /v2, no asset from outside.

Each page is a small server-rendered shell (navigation and the page's frame); static/app.js fills it from the
JSON API and keeps it live with one Server-Sent Events stream. Charts are drawn by uPlot (MIT), vendored under
static/vendor/uplot with its licence.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from deml_server.http.login import scope

if TYPE_CHECKING:
    from deml_server.http.app import HttpServices

STATIC_DIR = Path(__file__).resolve().parent / "static"

_PAGES = {"jobs": "Jobs", "submit": "Submit", "models": "Models", "server": "Server"}
_LINKS = {"jobs": "/", "submit": "/submit", "models": "/models", "server": "/server"}


def add_routes(app: web.Application, services: HttpServices) -> None:
    """Register the dashboard's pages and static assets."""
    pages = _Pages(services)
    app.router.add_get("/", pages.jobs)
    app.router.add_get("/jobs/{job_id}", pages.job)
    app.router.add_get("/submit", pages.submit)
    app.router.add_get("/models", pages.models)
    app.router.add_get("/server", pages.server)
    app.router.add_static("/static/", STATIC_DIR, append_version=True)


def render(page: str, title: str, *, data: dict[str, str] | None = None) -> web.Response:
    """A page's shell: the navigation with `page` marked, and a <main> that app.js fills."""
    attrs = "".join(f' data-{k}="{html.escape(v)}"' for k, v in (data or {}).items())
    nav = "".join(
        f'<a href="{_LINKS[key]}"{" class=current" if key == page or (page == "job" and key == "jobs") else ""}>'
        f"{label}</a>"
        for key, label in _PAGES.items()
    )
    body = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} · DeML</title>
<link rel="stylesheet" href="/static/vendor/uplot/uPlot.min.css">
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/vendor/uplot/uPlot.iife.min.js"></script>
<script src="/static/app.js" defer></script>
</head>
<body data-page="{page}"{attrs}>
<header class="top"><a class="brand" href="/">DeML</a><nav>{nav}</nav></header>
<main id="main"><p class="muted">Loading…</p></main>
</body>
</html>
"""
    return web.Response(text=body, content_type="text/html")


class _Pages:
    def __init__(self, services: HttpServices) -> None:
        self._s = services

    async def jobs(self, request: web.Request) -> web.Response:
        """The jobs list."""
        return render("jobs", "Jobs")

    async def job(self, request: web.Request) -> web.Response:
        """One job: curves, tasks, events, error, cancel."""
        job_id = request.match_info["job_id"]
        job = self._s.jobs.get(job_id, scope(request))  # an unknown id (or another token's job) is a 404
        return render("job", f"Job {job.spec.name} {job.id}", data={"job-id": job.id})

    async def submit(self, request: web.Request) -> web.Response:
        """The submit form."""
        return render("submit", "Submit a job")

    async def models(self, request: web.Request) -> web.Response:
        """Registered models and the "try it" box."""
        return render("models", "Models")

    async def server(self, request: web.Request) -> web.Response:
        """Workers, backends, budget."""
        return render("server", "Server")
