"""The web UI in headless Chromium (Debian's chromium driven by Playwright; no browser download): generate with a
live progress bar, a gallery card with the parameters and a download link, cancel, and the debounced live mode."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_server_support import load_engines, make_config, running

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (test extra)")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; scripts/setup.sh --dev does this)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def page(tiny_schnell_folder, tiny_dev_folder, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("ui-loras")
    engines = load_engines(tiny_schnell_folder, tiny_dev_folder, lora_dir)
    from test_server_support import SCHNELL, write_lora

    write_lora(engines[SCHNELL].pipe, lora_dir / "ink.safetensors")
    config = make_config(tmp_path_factory.mktemp("ui"), engines, limits={"max_steps": 2000})  # see the cancel test
    with running(config, engines) as (url, _), sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800}, accept_downloads=True)
            page.set_default_timeout(30_000)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('status').textContent === 'ready'")
            yield page
        finally:
            browser.close()


def test_generate_shows_progress_and_a_card_with_parameters(page, tmp_path):
    assert page.locator("#model option").all_inner_texts() == ["black-forest-labs/flux-schnell",
                                                               "black-forest-labs/flux-dev"]
    assert page.locator("#guidance").is_disabled()  # schnell takes no guidance
    assert page.locator("#lora option").all_inner_texts() == ["none", "ink"]
    # Record every progress value the bar shows.
    page.evaluate("""() => { window.seen = []; const bar = document.getElementById('progress');
                             setInterval(() => window.seen.push(bar.value), 5); }""")
    page.fill("#prompt", "a red circle above a blue square")
    page.fill("#seed", "42")
    page.fill("#steps", "40")
    page.select_option("#aspect_ratio", "16:9")
    page.select_option("#lora", "ink")
    page.click("#generate")
    card = page.locator("#gallery .card").first
    card.wait_for()
    assert card.locator("dd[data-param=seed]").inner_text() == "42"
    assert card.locator("dd[data-param=steps]").inner_text() == "40"
    assert card.locator("dd[data-param=lora]").inner_text() == "ink"
    assert card.locator("dd[data-param=prompt]").inner_text() == "a red circle above a blue square"
    seen = page.evaluate("window.seen")
    assert any(0 < v < 100 for v in seen) and seen[-1] == 100  # the bar moved through the steps
    size = page.evaluate("""() => { const i = document.querySelector('#gallery img');
                                    return [i.naturalWidth, i.naturalHeight]; }""")
    assert size[0] > size[1]  # 16:9
    with page.expect_download() as download:
        card.locator("a", has_text="Download").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == "fluxkit-42.png" and saved.read_bytes()[:4] == b"\x89PNG"
    page.screenshot(path=str(tmp_path / "ui.png"))


def test_model_switch_enables_guidance_and_cancel_stops(page):
    page.select_option("#model", "black-forest-labs/flux-dev")
    assert not page.locator("#guidance").is_disabled()
    page.select_option("#model", "black-forest-labs/flux-schnell")
    before = page.locator("#gallery .card").count()
    page.select_option("#lora", "")
    page.fill("#steps", "2000")  # long enough on any CPU that the cancel lands mid-run (60 steps could finish first)
    page.select_option("#aspect_ratio", "1:1")
    page.evaluate("document.getElementById('seed').value = ''")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('step')")
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status').textContent === 'canceled'")
    page.wait_for_timeout(500)
    assert page.locator("#gallery .card").count() == before


def test_live_mode_regenerates_as_the_prompt_is_typed(page):
    requests = []
    page.on("request", lambda r: requests.append(r) if r.method == "POST" and r.url.endswith("/v1/predictions")
            else None)
    page.fill("#steps", "2")
    page.check("#live")
    page.locator("#prompt").fill("")
    page.locator("#prompt").press_sequentially("a yellow star", delay=20)  # faster than the debounce
    live = page.locator("#gallery .card.live")
    live.wait_for()
    page.wait_for_function(
        "document.querySelector('#gallery .card.live dd[data-param=prompt]').textContent === 'a yellow star'"
    )
    assert len(requests) <= 2  # 13 keystrokes, debounced into one or two generations
    page.locator("#prompt").press_sequentially(" on the left", delay=20)
    page.wait_for_function(
        "document.querySelector('#gallery .card.live dd[data-param=prompt]').textContent"
        " === 'a yellow star on the left'"
    )
    assert live.count() == 1  # live results replace one card instead of filling the gallery
    page.uncheck("#live")
