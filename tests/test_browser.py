"""The gateway's page at ``/`` in a real browser: Debian's headless ``chromium``
driven by Playwright (which never downloads a browser here), against a real stack
(nats-server, broker, worker with a mock provider that streams slowly, and the HTTP
gateway on loopback). Skips, naming what is missing, when Chromium or Playwright is
absent. Screenshots land in build/test-artifacts/browser-<test>.png."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from laneway.broker.config.model import LanewayConfig
from laneway.broker.gateway.serve import running_gateway
from laneway.broker.server.process import BrokerServer
from laneway.workers.pool import WorkerPool

from .conftest import make_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"
TOKEN_DELAY_MS = 150
# The mock echoes the prompt, one word per streamed token.
PROMPT = "one two three four five six seven eight nine ten"

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="chromium is not installed (apt-get install chromium)"
    ),
]
async_api = pytest.importorskip(
    "playwright.async_api", reason="playwright (the Python package, in [dev]) is not installed"
)


@pytest.fixture
def config() -> LanewayConfig:
    return make_config(
        f"""
providers:
  mock:
    type: mock
    concurrency: 8
    token_delay_ms: {TOKEN_DELAY_MS}
  broken:
    type: mock
    concurrency: 2
    token_delay_ms: 20
    error_rates: {{503: 1.0}}
routes:
  broken:
    targets: [{{provider: broken, model: mock-chat}}]
    max_attempts: 2
"""
    )


@pytest.fixture
async def gateway_url(broker: BrokerServer, worker: WorkerPool) -> AsyncIterator[str]:
    async with running_gateway(broker.address, "127.0.0.1:0") as url:
        yield url


@pytest.fixture
async def page(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            page.set_default_timeout(15_000)
            script_errors: list[Any] = []
            page.on("pageerror", lambda error: script_errors.append(error))
            yield page
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / f"browser-{request.node.name}.png"
            await page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            assert not script_errors, f"the page's script failed: {script_errors}"
        finally:
            await browser.close()


async def open_page(page: Any, url: str) -> None:
    await page.goto(url)
    await page.wait_for_selector("#route[data-loaded='true']", state="attached")


async def test_page_streams_tokens_one_by_one(page: Any, gateway_url: str) -> None:
    await open_page(page, gateway_url + "/")
    assert await page.locator("#route option").all_inner_texts() == ["chat", "embed", "slow", "broken"]
    await page.get_by_label("Route").select_option("chat")
    await page.get_by_label("Prompt").fill(PROMPT)
    assert await page.get_by_label("Stream tokens").is_checked()
    await page.get_by_role("button", name="Submit").click()

    # Watch the delta count while the job runs: the tokens arrive one by one.
    deltas = page.locator("#output .delta")
    final = page.locator("#final-state[data-final='true']")
    seen: list[int] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline and not await final.count():
        count = await deltas.count()
        if count and (not seen or count != seen[-1]):
            seen.append(count)
        await asyncio.sleep(0.02)  # an observation interval, not synchronisation
    tokens = len(PROMPT.split())
    assert await final.count(), f"no final state within 20 s; deltas seen: {seen}"
    assert len(seen) >= 3, f"tokens did not arrive one by one: counts observed {seen}"
    assert seen == sorted(seen) and seen[0] < tokens, seen
    assert await deltas.count() == tokens

    assert await page.locator("#final-state").inner_text() == "SUCCEEDED"
    assert await page.locator("#final-text").inner_text() == PROMPT
    assert "".join(await deltas.all_text_contents()) == PROMPT
    assert (await page.locator("#job-id").inner_text()).strip() not in ("", "-")
    running = page.locator("#states li[data-state='RUNNING']")
    assert await running.count() >= 1
    assert await running.first.get_attribute("data-attempt") == "1"
    assert await running.first.get_attribute("data-provider") == "mock"
    assert await page.locator("#error").is_hidden()


async def test_page_shows_the_problem_of_a_refused_submit(page: Any, gateway_url: str) -> None:
    await open_page(page, gateway_url + "/?route=no-such-route&prompt=hello")
    assert await page.get_by_label("Route").input_value() == "no-such-route"
    await page.get_by_role("button", name="Submit").click()

    error = page.get_by_role("alert")
    await error.wait_for(state="visible")
    assert "UNKNOWN_ROUTE" in await page.locator("#error-reason").inner_text()
    assert await page.locator("#error-title").inner_text() != ""
    assert "no-such-route" in await error.inner_text()
    assert await page.locator("#job-id").inner_text() == "-"


async def test_page_shows_attempts_and_the_error_of_a_failed_job(page: Any, gateway_url: str) -> None:
    # Every call to "broken" fails with 503 mid-stream: two attempts, then a dead letter.
    await open_page(page, gateway_url + "/")
    await page.get_by_label("Route").select_option("broken")
    await page.get_by_label("Prompt").fill(PROMPT)
    await page.get_by_role("button", name="Submit").click()

    await page.locator("#final-state[data-final='true']").wait_for(state="attached")
    assert await page.locator("#final-state").inner_text() == "DEAD_LETTERED"
    states = page.locator("#states li")
    lines = [
        (await li.get_attribute("data-state"), await li.get_attribute("data-attempt"))
        for li in await states.all()
    ]
    assert ("RETRYING", "1") in lines and ("RUNNING", "2") in lines, lines
    assert lines[-1] == ("DEAD_LETTERED", "2"), lines
    assert (
        await page.locator("#states li[data-state='RUNNING']").first.get_attribute("data-provider")
        == "broken"
    )
    error = page.get_by_role("alert")
    assert await error.is_visible()
    assert "503" in await error.inner_text()
    assert await page.locator("#error-reason").inner_text() not in ("", "-")
    assert await page.locator("#final-text").inner_text() == ""
