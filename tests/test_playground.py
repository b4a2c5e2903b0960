"""The web playground in a real headless Chromium driven by Selenium: it loads, streams, draws."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from conftest import start_server  # noqa: E402
from tinylm.checkpoint import load_run  # noqa: E402
from tinylm.config import SampleConfig  # noqa: E402
from tinylm.generate import generate  # noqa: E402
from tinylm.serve import create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def playground(tiny_run: Path) -> Iterator[tuple[str, object]]:
    run = load_run(tiny_run)
    server, thread, url = start_server(create_app(run, name="tiny"))
    yield url, run
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "needs chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)"
        )
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--window-size=1400,1800",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, read by the test
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_and_assets_come_from_the_server(playground) -> None:
    url, _ = playground
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "tinylm playground" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    for asset in ("app.js", "style.css", "favicon.svg"):
        r = httpx.get(f"{url}/static/{asset}")
        assert r.status_code == 200 and "https://" not in r.text
    assert 'rel="icon" href="/static/favicon.svg"' in page.text  # no request for a missing /favicon.ico


def test_run_card_and_attention_endpoints(playground) -> None:
    url, run = playground
    card = httpx.get(f"{url}/v1/playground/run").json()
    assert card["parameters"] == sum(p.numel() for p in run.model.parameters())
    assert card["config"]["n_layer"] == 2 and card["val_loss"] > 0 and len(card["train_curve"]) >= 5
    data = httpx.post(f"{url}/v1/playground/attention", json={"prompt": "ROMEO", "n_tokens": 4}).json()
    assert data["context"] == list("ROMEO") and len(data["generated"]) == 4
    last = data["attention"][-1]  # (n_layer, n_head, S): each head's weights sum to 1 over S positions
    assert len(last) == 2 and len(last[0][0]) == 5 + 3
    assert all(abs(sum(head) - 1) < 1e-3 for layer in last for head in layer)
    bad = httpx.post(f"{url}/v1/playground/attention", json={"prompt": "ROMEO", "n_tokens": 40})
    assert bad.status_code == 400 and bad.json()["error"]["message"]


def test_playground_streams_and_draws(playground, browser, tmp_path: Path) -> None:
    url, run = playground
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "model-name").text == "tiny")
    defaults = SampleConfig()  # the page starts from the server's sampling defaults
    wait.until(lambda d: d.find_element(By.ID, "max_tokens").get_attribute("value") != "")
    for field, value in (
        ("max_tokens", defaults.max_new_tokens),
        ("top_k", defaults.top_k),
        ("top_p", defaults.top_p),
    ):
        assert float(browser.find_element(By.ID, field).get_attribute("value")) == value
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("JULIET:")
    # 25 tokens: as many as tiny's 32-token context takes after the prompt (the default, 200, is for real runs)
    for field, value in (("temperature", "0.8"), ("seed", "3"), ("max_tokens", "25")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "output").get_attribute("data-state") in ("done", "error"))
    assert browser.find_element(By.ID, "output").get_attribute("data-state") == "done"
    tokens = browser.find_elements(By.CSS_SELECTOR, "#output .generated .tok")
    shown = browser.execute_script("return document.querySelector('#output .generated').textContent")
    expected = generate(
        run.model, run.tokenizer, "JULIET:", defaults, max_new_tokens=25, temperature=0.8, seed=3
    )
    assert shown == expected[0].text and len(tokens) == 25
    assert "%" in tokens[0].get_attribute("title")  # each token carries its probability
    # shading: one of five probability bands per token, each its own colour, explained by a legend
    bands = browser.execute_script(
        "return [...document.querySelectorAll('#prob-legend .tok')].map(e => [e.className, e.textContent,"
        " getComputedStyle(e).backgroundColor])"
    )
    assert [b[1] for b in bands] == ["≥ 80%", "50–80%", "20–50%", "5–20%", "< 5%"] and len(
        {b[2] for b in bands}
    ) == 5
    for tok in tokens[:40]:
        p, classes = float(tok.get_attribute("data-p")), tok.get_attribute("class").split()
        low = [0.8, 0.5, 0.2, 0.05, 0.0]
        assert f"p{next(i for i, b in enumerate(low) if p >= b)}" in classes
    browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('mouseenter'))", tokens[0])
    assert "top alternatives" in browser.find_element(By.ID, "token-detail").text
    wait.until(lambda d: d.find_element(By.ID, "heatmap").get_attribute("data-cells"))
    painted = browser.execute_script(
        "const c = document.getElementById('heatmap');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 200 && d[i + 2] > 60) n++; return n;"
    )
    assert painted > 100  # coloured heatmap cells, not a blank canvas
    legend = browser.find_element(By.ID, "attention-legend")
    assert "attention weight" in legend.text and legend.find_elements(By.CSS_SELECTOR, ".ramp")
    facts = browser.find_element(By.ID, "card-facts").text
    assert "validation loss" in facts and "parameters" in facts
    assert browser.find_elements(By.CSS_SELECTOR, "#loss-curve path")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors  # e.g. a 404 for /favicon.ico, or a script error
    shot = Path(os.environ.get("TINYLM_SCREENSHOT_DIR", tmp_path)) / "playground.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot))
    _check_screenshot(browser, shot)


def _check_screenshot(browser, shot: Path) -> None:
    """The screenshot, taken after the page's scripts ran, shows the run card's curves and the generation."""
    from PIL import Image

    image = Image.open(shot).convert("RGB")

    def pixels_like(element, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
        r = browser.execute_script(
            "const b = arguments[0].getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]",
            element,
        )
        assert r[3] <= image.height and r[2] <= image.width, (
            f"{element.get_attribute('id')} is off the screenshot"
        )
        box = image.crop(tuple(int(v) for v in r))
        return sum(1 for p in box.getdata() if all(abs(a - b) <= tolerance for a, b in zip(p, rgb)))

    curve = browser.find_element(By.ID, "loss-curve")
    assert pixels_like(curve, (0x3A, 0x5C, 0xCC)) > 50 and pixels_like(curve, (0xE8, 0x86, 0x2A)) > 20
    generated = browser.find_element(By.CSS_SELECTOR, "#output .generated")
    shaded = sum(
        pixels_like(generated, rgb, 12)
        for rgb in ((0xCF, 0xE3, 0xFF), (0xFF, 0xE0, 0x8A), (0xFF, 0xAB, 0x5E))
    )
    assert shaded > 500  # the generation's shaded tokens are on screen
    assert pixels_like(browser.find_element(By.ID, "heatmap"), (253, 231, 37), 60) > 20  # viridis' top
