"""The dashboard in a real browser: Debian chromium (never a downloaded one) driven by Playwright.

Streamlit draws after the page loads (websocket, then React), so a plain `--screenshot` captures a blank page:
each visit waits for the app container, a title, and the end of the running indicator before it looks.
Screenshots land in tests/artifacts/screenshots/ (gitignored; CI keeps them as test artifacts).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
# url path -> a text the rendered page must contain
PAGES = {"": "Champion", "datasets": "Filter funnel", "training": "Loss-mask audit", "embeddings": "Leaderboard",
         "prompt-eval": "Variant × target", "ab": "Verdicts", "gate": "Gate decisions"}

IDLE = ("() => !document.querySelector('[data-testid=\"stStatusWidgetRunningIcon\"], "
        "[data-testid=\"stStatusWidgetRunningManIcon\"], [data-testid=\"stSkeleton\"], [data-stale=\"true\"]')")

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(dash_store_built):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (`make browser` installs Debian chromium)")
    from flywheel.pipelines import dashboard_cmd

    port = _free_port()
    env = dashboard_cmd.environment(dash_store_built["uri"])
    env["FLYWHEEL_HOME"] = str(dash_store_built["home"])
    SHOTS.mkdir(parents=True, exist_ok=True)
    log = open(SHOTS.parent / "streamlit.log", "w")
    proc = subprocess.Popen(dashboard_cmd.command(port=port), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"streamlit did not come up (exit {proc.poll()}); see {SHOTS.parent / 'streamlit.log'}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_every_page_renders_in_chromium(server):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--no-first-run", "--disable-dev-shm-usage"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            for path, must_show in PAGES.items():
                page.goto(f"{server}/{path}", wait_until="domcontentloaded", timeout=60_000)
                page.wait_for_selector('[data-testid="stAppViewContainer"]', timeout=60_000)
                page.wait_for_selector('[data-testid="stMainBlockContainer"] h1', timeout=60_000)
                page.get_by_text(must_show, exact=False).first.wait_for(timeout=60_000)
                # Idle = no running indicator, no skeleton, no stale element; checked twice, a second apart,
                # because the indicator only shows up a moment after a script starts.
                for _ in range(2):
                    page.wait_for_timeout(1000)
                    page.wait_for_function(IDLE, timeout=60_000)
                page.wait_for_function(
                    "() => [...document.querySelectorAll('[data-testid=\"stPlotlyChart\"]')]"
                    ".every(e => e.querySelector('.main-svg'))", timeout=60_000)
                page.wait_for_timeout(500)
                name = path or "overview"
                page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
                assert page.locator('[data-testid="stException"]').count() == 0, f"{name}: exception shown"
                body = page.inner_text('[data-testid="stMainBlockContainer"]')
                assert len(body.strip()) > 200, f"{name}: page nearly blank ({len(body.strip())} chars)"
                assert (SHOTS / f"{name}.png").stat().st_size > 10_000
        finally:
            browser.close()
    assert os.path.exists(SHOTS / "overview.png")
