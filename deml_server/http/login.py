"""Who calls an HTTP request: the token check's inputs and outputs, and the dashboard's login form.

A request carries its token in `Authorization: Bearer TOKEN` or in the login cookie: `POST /login` checks the token
and sets it as an HttpOnly, SameSite=Strict cookie (Secure over TLS); `POST /logout` clears it. The auth middleware
(deml_server.http.app) makes the decision and records the caller here; handlers read its scope with `scope(request)`.
Tokens are never logged and never put in an answer.
"""

from __future__ import annotations

import html
import string
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from deml_server.auth import PermissionDenied, Principal, Role, Unauthenticated
from deml_server.ownership import Scope, scope_of

if TYPE_CHECKING:
    from deml_server.http.app import HttpServices

COOKIE = "deml_token"
LOGIN_PAGE = string.Template((Path(__file__).resolve().parent / "static" / "login.html").read_text(encoding="utf-8"))
# The login form is open to anyone: its body is read only up to this size.
MAX_LOGIN_BYTES = 16 << 10
PRINCIPAL = web.RequestKey("deml_principal", Principal)


def caller(request: web.Request) -> Principal | None:
    """The checked caller of a request; None on a server without tokens (or on an open route)."""
    return request.get(PRINCIPAL)


def scope(request: web.Request) -> Scope:
    """What the caller may see: None for admin (or without tokens), else its owner key (deml_server.ownership)."""
    return scope_of(caller(request))


def owner(request: web.Request) -> str | None:
    """The owner key that things the caller creates are recorded under (None without tokens)."""
    principal = caller(request)
    return principal.owner if principal is not None else None


def credentials(request: web.Request) -> str | None:
    """The authorization value of a request: its Authorization header, else `Bearer <login cookie>`, else None."""
    headers = request.headers.getall("Authorization", [])
    if len(headers) > 1:
        raise Unauthenticated("more than one Authorization header")
    if headers:
        return headers[0]
    cookie = request.cookies.get(COOKIE)
    return f"Bearer {cookie}" if cookie else None


def is_page_request(request: web.Request) -> bool:
    """A browser asking for a page without a header token: it is sent to the login form rather than a 401."""
    return (
        request.method in ("GET", "HEAD")
        and "text/html" in request.headers.get("Accept", "")
        and "Authorization" not in request.headers
    )


def _safe_next(target: str) -> str:
    """A local path to return to after logging in (never another site)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def login_redirect(request: web.Request) -> web.HTTPFound:
    """Where a page request without a (valid) login goes: the form, coming back here afterwards."""
    return web.HTTPFound("/login?" + urllib.parse.urlencode({"next": request.path_qs}))


def _page(status: int, error: str = "", target: str = "/") -> web.Response:
    body = LOGIN_PAGE.substitute(error=html.escape(error), next=html.escape(_safe_next(target)))
    return web.Response(text=body, status=status, content_type="text/html", headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application, services: HttpServices) -> None:
    """Register /login (the form and its POST) and /logout."""
    login = _Login(services)
    app.router.add_get("/login", login.form)
    app.router.add_post("/login", login.submit)
    app.router.add_post("/logout", login.logout)


class _Login:
    def __init__(self, services: HttpServices) -> None:
        self._s = services

    async def form(self, request: web.Request) -> web.Response:
        """The login form."""
        return _page(200, target=request.query.get("next", "/"))

    async def submit(self, request: web.Request) -> web.Response:
        """Check the token; on success set the cookie and go to the dashboard (or the page that sent here)."""
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            # Another site's form may not log this browser in (under a token of the other site's choosing).
            return _page(403, "the login form must be sent from this server's own page")
        body = await request.content.read(MAX_LOGIN_BYTES + 1)
        if len(body) > MAX_LOGIN_BYTES:
            return _page(413, f"the login form is larger than {MAX_LOGIN_BYTES} bytes")
        fields = urllib.parse.parse_qs(body.decode("utf-8", errors="replace"))
        token = (fields.get("token") or [""])[0].strip()
        target = _safe_next((fields.get("next") or ["/"])[0])
        authority = self._s.authority
        if authority is None:  # nothing to log in to: every caller is admin
            raise web.HTTPSeeOther(target)
        if not token:
            return _page(400, "enter a token", target)
        try:
            authority.require(f"Bearer {token}", Role.TRAIN, "the dashboard")
        except Unauthenticated as exc:
            return _page(401, exc.reason, target)
        except PermissionDenied as exc:
            return _page(403, exc.reason, target)
        response = web.HTTPSeeOther(target)
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=self._s.tls, path="/")
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        """Forget the login cookie."""
        response = web.HTTPSeeOther("/login")
        response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict", secure=self._s.tls)
        raise response
