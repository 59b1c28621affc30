"""Logging in to the dashboard through the form in a real browser (Debian's chromium, Playwright), over HTTPS."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.http.test_http_auth import ADMIN, OTHER, TRAIN, Served, submit, token_file
from tests.support import ServerThread, make_config
from tests.tls_support import make_pki

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (scripts/setup.sh)")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (scripts/setup.sh installs Debian's as root)", allow_module_level=True)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    pki = make_pki(tmp_path / "pki")
    config = make_config(
        tmp_path / "server", workers=1, tls_cert=pki.cert, tls_key=pki.key, auth_tokens=token_file(tmp_path / "tokens")
    )
    thread = ServerThread(config).start()
    try:
        yield Served(thread, pki)
    finally:
        thread.stop()


def test_log_in_through_the_form_and_see_only_this_tokens_jobs(served: Served) -> None:
    # Prepare: another token's job, then this token's
    theirs = submit(served, OTHER, "theirs")
    mine = submit(served, TRAIN, "mine")
    errors: list[str] = []
    try:
        with playwright_sync.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                # The test CA is not in chromium's store; the Python tests check the certificate itself.
                context = browser.new_context(ignore_https_errors=True)
                tab: Any = context.new_page()
                tab.on("pageerror", lambda exc: errors.append(str(exc)))
                # Execute: the dashboard sends a browser without a login to the form
                tab.goto(served.base + "/")
                assert tab.url.startswith(served.base + "/login")
                tab.fill('input[name="token"]', TRAIN)
                tab.click('button[type="submit"]')
                tab.wait_for_selector(f'tr[data-job-id="{mine}"]', timeout=60_000)
                # Assert: this token's job is listed, the other's is not; the cookie is out of the page's reach
                rows = tab.eval_on_selector_all("tr[data-job-id]", "rows => rows.map(r => r.dataset.jobId)")
                cookie = tab.evaluate("document.cookie")
                cookies = context.cookies()
            finally:
                browser.close()
    finally:
        for job in (mine, theirs):
            served.call("POST", f"/api/jobs/{job}/cancel", ADMIN)
    assert tab.url.rstrip("/") == served.base
    assert mine in rows and theirs not in rows
    assert TRAIN not in cookie
    (login,) = [c for c in cookies if c["name"] == "deml_token"]
    assert login["httpOnly"] and login["secure"] and login["sameSite"] == "Strict"
    assert not errors, f"JavaScript errors on the page: {errors}"
