"""The explorer page in a real browser: Debian's headless Chromium driven by Selenium through chromium-driver (both
installed by .ci/run with apt-get; the test skips, saying why, where they are absent). Pick a test example, see k
helpful and k harmful training images, mark one here and one on the self-influence tab, export, and check the
export and a screenshot (not blank)."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the explorer needs the [serve] extra (fastapi, uvicorn)")
webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium (the [test] extra)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from influencekit.index.serve import serving
    from influencekit_paper.index_demo import build_demo_index

    index = build_demo_index("digits", tmp_path_factory.mktemp("index"))
    with serving(index) as url:
        yield index, url


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _wait(condition, timeout=30.0):
    """Poll ``condition`` until it is truthy; an element not drawn yet, or replaced by a re-render while read, counts as
    not yet."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    end = time.time() + timeout
    while time.time() < end:
        try:
            value = condition()
        except (StaleElementReferenceException, NoSuchElementException):  # replaced by a re-render, or not drawn yet
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("the page did not get there in time")


def test_pick_explain_mark_export_in_a_real_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    index, url = server
    browser.get(url)
    cards = lambda part: browser.find_elements(By.CSS_SELECTOR, f"#{part} .card")  # noqa: E731
    _wait(lambda: len(cards("helpful")) == 8 and len(cards("harmful")) == 8)  # test example 0 at k = 8
    _wait(lambda: browser.find_element(By.ID, "query-text").text.startswith("test #0"))  # the first query answered
    # pick test example 12
    box = browser.find_element(By.ID, "test-index")
    box.clear()
    box.send_keys("12")
    browser.find_element(By.ID, "explain-button").click()
    _wait(lambda: browser.find_element(By.ID, "query-text").text.startswith("test #12"))
    _wait(lambda: len(cards("helpful")) == 8 and len(cards("harmful")) == 8)
    expected = index.explain_test([12], k=8)
    shown = [int(c.get_attribute("data-index")) for c in cards("harmful")]
    assert shown == expected.harmful.indices[0].tolist()
    assert all(c.find_element(By.TAG_NAME, "canvas").size["width"] >= 64 for c in cards("helpful"))  # images drawn
    first = shown[0]
    cards("harmful")[0].find_element(By.CSS_SELECTOR, "input.mark").click()
    # the self-influence tab: the highest first; mark one
    browser.find_element(By.ID, "tab-self").click()
    self_cards = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#self-list .card"))
    top = int(self_cards[0].get_attribute("data-index"))
    assert top == int(np.argmax(index.self_influence()))
    self_cards[0].find_element(By.CSS_SELECTOR, "input.mark").click()
    assert browser.find_element(By.ID, "marked-count").text == str(len({first, top}))
    browser.find_element(By.ID, "export-json").click()
    exported = json.loads(browser.find_element(By.ID, "export-text").get_attribute("value"))
    assert sorted(m["train_index"] for m in exported["marked"]) == sorted({first, top})
    browser.find_element(By.ID, "export-csv").click()
    csv_text = browser.find_element(By.ID, "export-text").get_attribute("value")
    assert csv_text.splitlines()[0] == "train_index,label,score,self_influence" and len(
        csv_text.splitlines()
    ) == 1 + len({first, top})
    assert browser.find_element(By.ID, "error").text == ""
    # a screenshot of the explain tab, checked to be a page and not blank
    browser.find_element(By.ID, "tab-explain").click()
    shot = tmp_path / "explorer.png"
    browser.save_screenshot(str(shot))
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] >= 500 and pixels.shape[1] >= 800
    assert float(pixels[..., :3].std()) > 0.05 and len(np.unique(pixels[..., 0])) > 20


def test_a_bad_query_shows_the_message_on_the_page(server, browser):
    from selenium.webdriver.common.by import By

    _, url = server
    browser.get(url)
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#helpful .card"))
    box = browser.find_element(By.ID, "test-index")
    box.clear()
    box.send_keys("5000")
    browser.find_element(By.ID, "explain-button").click()
    message = _wait(lambda: browser.find_element(By.ID, "error").text)
    assert "test example 5000 does not exist: the index has 597 test examples" in message


def test_an_uploaded_image_is_explained(server, browser, tmp_path):
    """A test digit saved as a 64×64 PNG (dark ink on white, as a scan would be) and uploaded: the page scales it to
    8×8, maps it onto the inputs' range and shows the k helpful and harmful examples for the model's prediction."""
    from matplotlib.image import imsave
    from selenium.webdriver.common.by import By

    index, url = server
    pixels = np.kron(np.array(index.display_item("test", 12), dtype=float), np.ones((8, 8)))
    path = tmp_path / "digit.png"
    imsave(path, 255.0 - pixels, cmap="gray", vmin=0, vmax=255)
    browser.get(url)
    _wait(lambda: browser.find_element(By.ID, "query-text").text.startswith("test #0"))
    browser.find_element(By.TAG_NAME, "summary").click()
    browser.find_element(By.ID, "upload").send_keys(str(path))
    text = _wait(
        lambda: (
            browser.find_element(By.ID, "query-text").text.startswith("new input")
            and browser.find_element(By.ID, "query-text").text
        )
    )
    _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#harmful .card")) == 8)
    predicted = int(index.split_array("predicted", "test")[12])
    assert f"label {predicted}" in text, text  # the model reads the upload as it reads the stored digit
    assert browser.find_element(By.ID, "error").text == ""
