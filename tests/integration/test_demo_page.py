"""The demo page in a real browser: Debian's Chromium, driven by Playwright (with
``executable_path``: no browser download). The buttons change the session whichever
worker answers, and logging in and out behave."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from benchmarks.rig.harness import Gunicorn

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        # --no-sandbox: the tests may run as root, where Chromium's sandbox will not start
        found = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield found
        found.close()


def _pids(page: Page) -> set[str]:
    lines = page.locator("#log li").all_text_contents()
    return {m.group(1) for line in lines if (m := re.search(r"served by pid (\d+)", line))}


@pytest.mark.parametrize("mode", ["shared", "sticky"])
def test_the_buttons_change_the_session_on_every_worker(browser: Browser, mode: str) -> None:
    with Gunicorn(env={"STATESCALE_MODE": mode}) as server:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.port}/")
        expect(page.locator("#mode")).to_have_text(mode)
        served: set[str] = set()
        clicks = 0
        while clicks < 8 or (mode == "shared" and len(served) < 2 and clicks < 40):
            page.click("#incr")
            clicks += 1
            expect(page.locator("#clicks")).to_have_text(str(clicks))  # right, whoever served
            served |= _pids(page)
        # The session's name (a hash of its ID) follows the answers: it had no ID when
        # the page was served, and has one from the second click on.
        expect(page.locator("#sid")).to_have_text(re.compile(r"^[0-9a-f]{8}$"))
        if mode == "shared":
            assert len(served) >= 2  # several workers served it, and the count went on
            expect(page.locator("#owner")).to_contain_text("any worker")
        else:
            assert len(served) == 1  # the router sends the session to its owner
            expect(page.locator("#owner")).to_have_text(re.compile(r"worker\d"))
        page.close()


def test_log_in_and_log_out(browser: Browser) -> None:
    with Gunicorn(env={"STATESCALE_MODE": "shared"}) as server:
        page = browser.new_page()
        url = f"http://127.0.0.1:{server.port}/"
        page.goto(url)
        page.click("#incr")
        expect(page.locator("#clicks")).to_have_text("1")
        page.goto(url)  # the page as the server renders it: the session it holds
        before = page.locator("#sid").text_content()
        expect(page.locator("#user")).to_have_text("nobody")
        page.click("#login")
        expect(page.locator("#user")).to_have_text("ada")
        page.goto(url)
        expect(page.locator("#user")).to_have_text("ada")
        expect(page.locator("#clicks")).to_have_text("1")  # logging in keeps the session's data
        assert page.locator("#sid").text_content() != before  # under a new ID (no fixation)
        page.click("#logout")
        expect(page.locator("#user")).to_have_text("nobody")
        expect(page.locator("#sid")).to_have_text("none yet")
        page.goto(url)
        expect(page.locator("#user")).to_have_text("nobody")
        expect(page.locator("#clicks")).to_have_text("0")  # logged out: the session is gone
        page.close()


def test_an_answer_that_is_an_error_is_shown(browser: Browser, own_redis: Any) -> None:
    # The page read every answer as JSON: a 503 (the store down) broke its script and
    # showed nothing at all.
    env = {"STATESCALE_MODE": "shared", "STATESCALE_REDIS_URL": own_redis.url}
    with Gunicorn(env=env) as server:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.click("#incr")
        expect(page.locator("#clicks")).to_have_text("1")
        own_redis.pause()
        try:
            page.click("#incr")
            expect(page.locator("#log")).to_contain_text("POST /api/incr?key=clicks -> 503")
            expect(page.locator("#clicks")).to_have_text("1")
        finally:
            own_redis.resume()
        page.close()
