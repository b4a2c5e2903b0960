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
        "--window-size=1400,1300",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
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
    for asset in ("app.js", "style.css"):
        r = httpx.get(f"{url}/static/{asset}")
        assert r.status_code == 200 and "https://" not in r.text


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
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("JULIET:")
    for field, value in (("temperature", "0.8"), ("max_tokens", "24"), ("seed", "3")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "output").get_attribute("data-state") in ("done", "error"))
    assert browser.find_element(By.ID, "output").get_attribute("data-state") == "done"
    tokens = browser.find_elements(By.CSS_SELECTOR, "#output .tok")
    shown = browser.execute_script("return document.querySelector('#output .generated').textContent")
    expected = generate(
        run.model, run.tokenizer, "JULIET:", max_new_tokens=24, temperature=0.8, top_k=0, top_p=1.0, seed=3
    )[0].text
    assert shown == expected and len(tokens) == 24
    assert "%" in tokens[0].get_attribute("title")  # each token carries its probability
    browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('mouseenter'))", tokens[0])
    assert "top alternatives" in browser.find_element(By.ID, "token-detail").text
    wait.until(lambda d: d.find_element(By.ID, "heatmap").get_attribute("data-cells"))
    painted = browser.execute_script(
        "const c = document.getElementById('heatmap');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 200 && d[i + 2] > 60) n++; return n;"
    )
    assert painted > 100  # coloured heatmap cells, not a blank canvas
    facts = browser.find_element(By.ID, "card-facts").text
    assert "validation loss" in facts and "parameters" in facts
    assert browser.find_elements(By.CSS_SELECTOR, "#loss-curve path")
    shot = Path(os.environ.get("TINYLM_SCREENSHOT_DIR", tmp_path)) / "playground.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
