"""Tokens, roles, ownership and TLS on the HTTP face of a real deml-server on 127.0.0.1 (no mocks).

Every route of the application is probed, enumerated from `app.router.routes()` so that none is forgotten.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import ssl
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests.deml_server.inference.support import export_mlp
from tests.support import SMALL_TASK, ServerProcess, ServerThread, make_config
from tests.tls_support import Pki, make_pki

ADMIN = "admin-token-0123456789abcdef"
TRAIN = "train-token-0123456789abcdef"
OTHER = "other-train-token-0123456789abcdef"
PREDICT = "predict-token-0123456789abcdef"
WRONG = "wrong-token-0123456789abcdef"
COOKIE = "deml_token"
# The routes anyone may call without a token, listed here on purpose (not read from the code under test).
OPEN_ROUTES = {"/v2/health/live", "/v2/health/ready", "/login", "/logout", "/static"}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    cookies: dict[str, Any]

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> str:
        payload = self.json()
        assert set(payload) == {"error"}, payload
        return str(payload["error"])


@dataclass
class Served:
    thread: ServerThread
    pki: Pki | None

    @property
    def base(self) -> str:
        assert self.thread.server is not None and self.thread.server.http is not None
        return self.thread.server.http.url.rstrip("/")

    def ssl(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.pki.ca)) if self.pki is not None else False

    def call(
        self, method: str, path: str, token: str | None = None, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> Answer:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        return asyncio.run(self._call(method, path, sent, **kwargs))

    async def _call(self, method: str, path: str, headers: dict[str, str], **kwargs: Any) -> Answer:
        timeout = aiohttp.ClientTimeout(total=120)  # a safety net against a hang, not an assertion
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(
                method, self.base + path, headers=headers, ssl=self.ssl(), allow_redirects=False, **kwargs
            ) as response,
        ):
            body = await response.read()
            return Answer(response.status, dict(response.headers), body, dict(response.cookies))


def token_file(path: Path) -> Path:
    path.write_text(f"{ADMIN} admin\n{TRAIN} train\n{OTHER} train\n{PREDICT} predict\n")
    return path


async def _register(thread: ServerThread, name: str, model: Path, owner: str | None) -> int:
    assert thread.server is not None
    digest = thread.server.artifacts.put_file(model)
    return thread.server.registry.register(name, digest, owner=owner).version


def owner_of(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """TLS and tokens; the digits MLP as `digits` (no owner) and as `mine` (owned by the TRAIN token)."""
    root = tmp_path_factory.mktemp("httpauth")
    pki = make_pki(root / "pki")
    config = make_config(
        root / "server", workers=1, tls_cert=pki.cert, tls_key=pki.key, auth_tokens=token_file(root / "tokens")
    )
    thread = ServerThread(config).start()
    try:
        model = export_mlp(root / "digits.onnx")
        thread.call(_register(thread, "digits", model, None))
        thread.call(_register(thread, "mine", model, owner_of(TRAIN)))
        yield Served(thread, pki)
    finally:
        thread.stop()


def route_paths(served: Served) -> list[tuple[str, str, str]]:
    """(method, canonical route, a concrete path of it) for every route of the running app."""
    assert served.thread.server is not None and served.thread.server.http is not None
    found = []
    for route in served.thread.server.http.app.router.routes():
        canonical = route.resource.canonical if route.resource is not None else ""
        path = "/static/app.js" if canonical == "/static" else re.sub(r"\{[^}]+\}", "x1", canonical)
        found.append((route.method, canonical, path))
    return found


# -- tokens and roles -------------------------------------------------------------------------------------------


def test_every_route_refuses_a_missing_or_wrong_token_except_the_open_ones(shared: Served) -> None:
    routes = route_paths(shared)
    canonicals = {canonical for _, canonical, _ in routes}
    assert {"/api/jobs", "/v2/models/{name}/infer", "/metrics", "/", "/static"} <= canonicals, canonicals
    assert canonicals >= OPEN_ROUTES
    # Execute
    missing = {(m, c): shared.call(m, p) for m, c, p in routes}
    wrong = {(m, c): shared.call(m, p, WRONG) for m, c, p in routes}
    # Assert
    closed = {key for key in missing if key[1] not in OPEN_ROUTES}
    assert len(closed) >= 25
    assert {key: a.status for key, a in missing.items() if key in closed and a.status != 401} == {}
    assert {key: a.status for key, a in wrong.items() if key in closed and a.status != 401} == {}
    assert {key: a.status for key, a in missing.items() if key not in closed and a.status == 401} == {}
    for key in closed:
        if key[0] != "HEAD":
            assert "missing `Authorization: Bearer TOKEN` header or login cookie" in missing[key].error(), key
            assert wrong[key].error() == "the token is not valid on this server", key
    assert missing[("GET", "/api/jobs")].headers["WWW-Authenticate"].startswith("Bearer")
    # A path that matches no route tells a caller without a token nothing either.
    assert shared.call("GET", "/api/no-such-thing").status == 401
    assert shared.call("GET", "/api/no-such-thing", ADMIN).status == 404


def test_a_predict_token_may_infer_and_read_model_metadata_but_not_use_the_api(shared: Served) -> None:
    x = np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32)
    body = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
    # Execute
    infer = shared.call("POST", "/v2/models/digits/infer", PREDICT, json=body)
    metadata = shared.call("GET", "/v2/models/digits", PREDICT)
    models = shared.call("GET", "/api/models", PREDICT)
    jobs = shared.call("GET", "/api/jobs", PREDICT)
    download = shared.call("GET", "/api/models/digits/versions/1/download", PREDICT)
    page = shared.call("GET", "/", PREDICT)
    # Assert
    assert infer.status == 200, infer.body
    assert infer.json()["outputs"][0]["shape"] == [2, 10]
    assert metadata.status == 200 and models.status == 200
    refusal = "a predict token may not call GET /api/jobs (it needs a train or admin token)"
    assert (jobs.status, jobs.error()) == (403, refusal)
    assert download.status == 403 and page.status == 403


def test_metrics_need_an_admin_token(shared: Served) -> None:
    assert shared.call("GET", "/metrics").status == 401
    denied = shared.call("GET", "/metrics", TRAIN)
    assert (denied.status, denied.error()) == (403, "a train token may not call GET /metrics (it needs an admin token)")
    assert shared.call("GET", "/metrics", ADMIN).status == 200


def test_metrics_open_with_the_flag_and_tokens_on_plain_http(tmp_path: Path) -> None:
    config = make_config(tmp_path / "server", workers=1, auth_tokens=token_file(tmp_path / "tokens"), metrics_open=True)
    thread = ServerThread(config).start()
    try:
        served = Served(thread, None)
        assert served.base.startswith("http://")
        metrics = served.call("GET", "/metrics")
        assert metrics.status == 200 and b"deml_" in metrics.body
        assert served.call("GET", "/api/jobs").status == 401
        assert served.call("GET", "/api/jobs", TRAIN).status == 200
    finally:
        thread.stop()


# -- the login form ---------------------------------------------------------------------------------------------


def test_the_login_form_sets_an_httponly_cookie_and_the_dashboard_then_loads(shared: Served) -> None:
    # A browser without a login is sent to the form; the form itself is open.
    redirect = shared.call("GET", "/submit", headers={"Accept": "text/html"})
    assert (redirect.status, redirect.headers["Location"]) == (302, "/login?next=/submit")
    form = shared.call("GET", "/login?next=/submit")
    assert form.status == 200 and b'name="token"' in form.body and b'value="/submit"' in form.body
    # Execute
    refused = shared.call("POST", "/login", data={"token": WRONG, "next": "/submit"})
    predict = shared.call("POST", "/login", data={"token": PREDICT, "next": "/"})
    login = shared.call("POST", "/login", data={"token": TRAIN, "next": "/submit"})
    # Assert
    assert refused.status == 401 and COOKIE not in refused.cookies
    assert b"the token is not valid on this server" in refused.body
    assert predict.status == 403 and COOKIE not in predict.cookies
    assert (login.status, login.headers["Location"]) == (303, "/submit")
    cookie = login.cookies[COOKIE]
    assert cookie.value == TRAIN
    assert cookie["httponly"] and cookie["secure"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    with_cookie = {"Cookie": f"{COOKIE}={cookie.value}", "Accept": "text/html"}
    page = shared.call("GET", "/submit", headers=with_cookie)
    assert page.status == 200 and b'data-page="submit"' in page.body
    assert shared.call("GET", "/api/jobs", headers=with_cookie).status == 200
    # An open redirect is not offered: `next` stays on this site.
    offsite = shared.call("POST", "/login", data={"token": TRAIN, "next": "//evil.example/"})
    assert offsite.headers["Location"] == "/"
    # Another site's page may not log this browser in.
    forged = shared.call("POST", "/login", data={"token": TRAIN}, headers={"Origin": "https://evil.example"})
    assert forged.status == 403 and COOKIE not in forged.cookies
    same_site = shared.call("POST", "/login", data={"token": TRAIN}, headers={"Origin": shared.base})
    assert same_site.status == 303 and COOKIE in same_site.cookies
    logout = shared.call("POST", "/logout", headers=with_cookie)
    assert logout.status == 303 and logout.cookies[COOKIE].value == ""


# -- ownership --------------------------------------------------------------------------------------------------


def small_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("task.py", SMALL_TASK)
    return buffer.getvalue()


def submit(served: Served, token: str, name: str) -> str:
    form = aiohttp.FormData()
    form.add_field("spec", json.dumps({"name": name, "rounds": 50, "workers": 1}))
    form.add_field("code", small_zip(), filename="task.zip", content_type="application/zip")
    answer = served.call("POST", "/api/jobs", token, data=form)
    assert answer.status == 201, answer.body
    return str(answer.json()["id"])


async def _stream_until(served: Served, token: str, wanted: str) -> list[str]:
    """The job ids of /api/events (from the start of the log) up to and including the first event of `wanted`."""
    seen: list[str] = []
    timeout = aiohttp.ClientTimeout(total=120)  # a safety net against a hang, not an assertion
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{served.base}/api/events?after=0", headers=headers, ssl=served.ssl()) as response,
    ):
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: "):
                seen.append(json.loads(line[6:])["job_id"])
                if seen[-1] == wanted:
                    return seen
    raise AssertionError(f"the stream ended before an event of {wanted}: {seen}")


def test_a_train_token_sees_only_its_own_jobs_and_models(shared: Served) -> None:
    # Prepare: TRAIN's job first, then OTHER's
    mine = submit(shared, TRAIN, "mine")
    theirs = submit(shared, OTHER, "theirs")
    try:
        # Execute / Assert: OTHER cannot tell TRAIN's job from a missing one
        for method, path in [
            ("GET", f"/api/jobs/{mine}"),
            ("GET", f"/api/jobs/{mine}/tasks"),
            ("GET", f"/api/jobs/{mine}/events"),
            ("POST", f"/api/jobs/{mine}/cancel"),
            ("GET", f"/jobs/{mine}"),
        ]:
            hidden = shared.call(method, path, OTHER)
            missing = shared.call(method, path.replace(mine, "0" * len(mine)), OTHER)
            assert (hidden.status, method, path) == (404, method, path)
            assert hidden.error() == missing.error().replace("0" * len(mine), mine)
        listed = [job["id"] for job in shared.call("GET", "/api/jobs", OTHER).json()["jobs"]]
        assert mine not in listed and theirs in listed
        assert shared.call("GET", f"/api/jobs/{mine}", TRAIN).status == 200
        assert shared.call("GET", f"/api/jobs/{theirs}", TRAIN).status == 404
        admin_listed = [job["id"] for job in shared.call("GET", "/api/jobs", ADMIN).json()["jobs"]]
        assert {mine, theirs} <= set(admin_listed)
        # The event stream carries only the caller's jobs (TRAIN's events were logged before OTHER's job existed).
        assert set(asyncio.run(_stream_until(shared, OTHER, theirs))) == {theirs}
        assert mine in asyncio.run(_stream_until(shared, ADMIN, theirs))
        # Models: metadata is visible to every token; the file only to its owner (and admin).
        download = "/api/models/mine/versions/1/download"
        assert shared.call("GET", download, OTHER).status == 404
        assert shared.call("GET", download, TRAIN).status == 200
        assert shared.call("GET", download, ADMIN).status == 200
        assert shared.call("GET", "/api/models/mine/versions/1", OTHER).status == 200
    finally:
        for job in (mine, theirs):
            shared.call("POST", f"/api/jobs/{job}/cancel", ADMIN)
    assert shared.call("POST", f"/api/jobs/{mine}/cancel", OTHER).status == 404


# -- TLS --------------------------------------------------------------------------------------------------------


def test_https_with_the_test_ca_works_and_plain_http_fails(shared: Served) -> None:
    assert shared.base.startswith("https://127.0.0.1:")
    ready = shared.call("GET", "/v2/health/ready")
    assert ready.status == 200
    plain = shared.base.replace("https://", "http://") + "/v2/health/ready"

    async def plain_http() -> int:
        timeout = aiohttp.ClientTimeout(total=60)  # a safety net against a hang, not an assertion
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(plain) as response:
            return response.status

    with pytest.raises(aiohttp.ClientError):
        asyncio.run(plain_http())


async def _reload(thread: ServerThread) -> None:
    assert thread.server is not None
    thread.server.security.reload()


def test_sighup_reload_gives_new_https_connections_the_new_certificate(tmp_path: Path) -> None:
    # Prepare: a TLS server, then its certificate files replaced by ones from another CA
    first = make_pki(tmp_path / "pki")
    first_ca = tmp_path / "first-ca.pem"
    first_ca.write_bytes(first.ca.read_bytes())
    thread = ServerThread(make_config(tmp_path / "server", workers=1, tls_cert=first.cert, tls_key=first.key)).start()
    try:
        served = Served(thread, first)
        assert served.call("GET", "/v2/health/ready").status == 200
        second = make_pki(tmp_path / "pki", name="DeML second test CA")
        # Execute: what SIGHUP calls
        thread.call(_reload(thread))
        # Assert: the new CA is needed now, the old one no longer verifies the server
        assert served.call("GET", "/v2/health/ready").status == 200
        stale = Served(thread, Pki(first_ca, second.cert, second.key, second.client_cert, second.client_key))
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            stale.call("GET", "/v2/health/ready")
    finally:
        thread.stop()


def test_deml_server_announces_https_and_takes_the_flags(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    flags = ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--auth-tokens", str(token_file(tmp_path / "t"))]
    process = ServerProcess(tmp_path / "server", "--workers", "1", *flags, "--metrics-open")
    try:
        assert process.http_url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(pki.ca))

        async def get(path: str, headers: dict[str, str]) -> int:
            timeout = aiohttp.ClientTimeout(total=60)  # a safety net against a hang, not an assertion
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(process.http_url + path, headers=headers, ssl=context) as response,
            ):
                return response.status

        assert asyncio.run(get("/api/jobs", {})) == 401
        assert asyncio.run(get("/api/jobs", {"Authorization": f"Bearer {TRAIN}"})) == 200
        assert asyncio.run(get("/metrics", {})) == 200
    finally:
        process.stop()
    assert TRAIN not in process.log_path.read_text() and ADMIN not in process.log_path.read_text()
