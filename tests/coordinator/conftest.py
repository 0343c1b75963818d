"""Fixtures for the dashboard's browser tests (test_dashboard*.py): one headless Chromium per
module (Debian's /usr/bin/chromium, driven by Playwright's sync API) and a fresh tab per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One Chromium for the module, with a fresh profile directory."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: `pip install playwright` (and never run "
                    "`playwright install`: these tests use Debian's /usr/bin/chromium)")
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing: `apt-get install -y chromium`")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM),
            headless=True, args=FLAGS, viewport={"width": 1440, "height": 900},
            # Playwright hides scrollbars in headless mode; the tests look for them (a user's
            # browser shows them), and the screenshots show what a user sees.
            ignore_default_args=["--hide-scrollbars"])
        yield context
        context.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A new tab; fails the test if the page throws, logs an error, cannot draw a status, or gets
    an HTTP error.

    Failed loads are judged by their responses, not the console: connection failures are expected
    while a test takes the server away, and api/events may be refused (the page then polls).
    """
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    tab.on("console", lambda msg: errors.append(f"console: {msg.text}")
           if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    # app.js catches a document it could not draw and warns "shoal: ...": that is a bug too
    tab.on("console", lambda msg: errors.append(f"console: {msg.text}")
           if msg.type == "warning" and msg.text.startswith("shoal:") else None)
    tab.on("response", lambda resp: errors.append(f"HTTP {resp.status} for {resp.url}")
           if resp.status >= 400 and not resp.url.endswith("/api/events") else None)
    yield tab
    tab.close()
    assert not errors, errors
