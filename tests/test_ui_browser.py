"""The Gradio chat UI in a real browser: Playwright drives Debian's Chromium against `diffgraph
serve`'s app on loopback. Type a prompt, get an image with its experts; ask for a refinement,
get a changed image; every request the page made went to the server itself (no fonts, scripts
or analytics from anywhere else). The screenshot is docs/ui.png."""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from diffgraph.settings import Settings
from support.serving import serving

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "ui.png"
PROMPT = "a pink circle on a striped white background, warm light"

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Debian's Chromium is not at {CHROMIUM}")]


@pytest.fixture(scope="module")
def base_url(graph_home, tmp_path_factory):
    from diffgraph.agents.chat import ChatAgent
    from diffgraph.agents.server import create_app

    home = tmp_path_factory.mktemp("ui_home")
    shutil.copytree(graph_home, home, dirs_exist_ok=True)
    settings = Settings(home=home)
    with ChatAgent(settings, llm=None) as agent, serving(create_app(settings, agent=agent)) as url:
        yield url


def _last_image(page, base_url: str) -> bytes:
    src = page.locator("#last-image img").get_attribute("src")
    return httpx.get(src if src.startswith("http") else base_url + src, timeout=30).content


def test_prompt_image_experts_refinement(base_url):
    from playwright.sync_api import expect, sync_playwright

    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 960})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(base_url + "/", wait_until="load")

            # the base picker: one base held here, so it shows it and offers no choice
            expect(page.locator("#base")).to_contain_text("Base model")
            expect(page.locator("#base input")).to_have_value("miniworld-sd")
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#send").click()
            experts = page.locator("#experts")
            expect(experts.locator("table")).to_be_visible(timeout=180_000)
            expect(experts).to_contain_text("Pink Pop")
            expect(experts).to_contain_text("Image 1")
            expect(page.locator("#last-image img")).to_be_visible()
            first = _last_image(page, base_url)

            page.locator("#prompt textarea").fill("less of Pink Pop")
            page.locator("#send").click()
            expect(experts).to_contain_text("changed from image 1", timeout=180_000)
            expect(experts).to_contain_text("less of Pink Pop")
            expect(page.locator("#chat")).to_contain_text("Image 2")
            expect(page.locator("#gallery img")).to_have_count(2)
            second = _last_image(page, base_url)
            assert first[:8] == second[:8] == b"\x89PNG\r\n\x1a\n"
            assert first != second, "the refinement changed the image"
            expect(page.locator("#download")).to_contain_text(".png")

            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    host = urlsplit(base_url).netloc
    outside = [u for u in requests if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u).netloc != host]
    assert requests and not outside, f"the page fetched from elsewhere: {outside[:5]}"
