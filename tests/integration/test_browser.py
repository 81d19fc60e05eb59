"""The search page in real headless Chromium (selenium + Debian's chromium and chromedriver)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from samestyle.streams.dev.broker import EmbeddedBroker
from tests.integration.test_search_api import Served, serve_sample

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Flags for a quiet, reproducible headless run that never reaches out to the network.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1280,900")


def chromium_driver(user_data_dir: Path) -> Any:
    """A selenium Chrome driver on Debian's chromium, with a fresh profile directory."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: `make test` installs Debian chromium and chromium-driver")
    profile = Path(tempfile.mkdtemp(prefix="samestyle-chromium-"))
    driver = chromium_driver(profile)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def served(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from serve_sample(broker, tmp_path_factory.mktemp("browser"))


def test_page_runs_a_text_search_and_an_image_plus_modifier_search(browser: Any, served: Served,
                                                                   tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(served.base + "/")
    # Live counters come from /stats.
    wait.until(ec.text_to_be_present_in_element((By.ID, "stat-index"), str(len(served.messages))))
    assert browser.find_element(By.ID, "stat-model").text == "tiny-random-concat-v1"

    title = served.messages[0]["title"]
    browser.find_element(By.ID, "q-text").send_keys(title)
    browser.find_element(By.ID, "q-submit").click()
    wait.until(lambda d: d.find_element(By.ID, "results").get_attribute("data-context") == "search:text")
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    assert len(cards) == 10
    assert cards[0].find_element(By.CLASS_NAME, "title").text == title
    assert "score" in cards[0].find_element(By.CLASS_NAME, "score").text

    image = tmp_path / "query.png"
    image.write_bytes(served.image(1))
    browser.find_element(By.ID, "q-text").clear()
    browser.find_element(By.ID, "q-image").send_keys(str(image))
    browser.find_element(By.ID, "q-modifier").send_keys("the same, but red")
    browser.find_element(By.ID, "q-submit").click()
    wait.until(lambda d: d.find_element(By.ID, "results").get_attribute("data-context") == "search:image_text")
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    assert len(cards) == 10
    chips = cards[0].find_element(By.CLASS_NAME, "views").text
    assert "IT" in chips and "I " in chips and "T " in chips
    assert "image + “the same, but red”" in browser.find_element(By.ID, "status").text

    # The "duplicates of this listing" view of the first result.
    first_id = cards[0].get_attribute("data-listing-id")
    cards[0].find_element(By.CLASS_NAME, "duplicates").click()
    wait.until(lambda d: d.find_element(By.ID, "results").get_attribute("data-context") == f"duplicates:{first_id}")
    assert "Duplicates of" in browser.find_element(By.CSS_SELECTOR, "#results .context").text
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None

    shot = tmp_path / "search.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 1000


def test_page_shows_api_errors(browser: Any, served: Served, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a picture")
    browser.get(served.base + "/")
    browser.find_element(By.ID, "q-image").send_keys(str(broken))
    browser.find_element(By.ID, "q-submit").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "cannot use this query" in browser.find_element(By.ID, "error").text


TOKEN = "browser-token-0123456789abcdef"


@pytest.fixture(scope="module")
def served_with_token(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from serve_sample(broker, tmp_path_factory.mktemp("browser-token"), n_products=4, api_token=TOKEN)


def test_page_behind_a_token_signs_in_then_searches(browser: Any, served_with_token: Served) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    served = served_with_token
    wait = WebDriverWait(browser, 30)
    browser.delete_all_cookies()
    browser.get(served.base + "/")
    assert browser.find_elements(By.ID, "search-form") == []  # the sign-in form, not the page
    browser.find_element(By.ID, "token").send_keys("not-the-token-at-all")
    browser.find_element(By.ID, "sign-in").click()
    wait.until(lambda d: "not the API token" in d.find_element(By.TAG_NAME, "body").text)

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "sign-in").click()
    # Signed in: the page and its API calls (counters, search) carry the session cookie.
    wait.until(ec.text_to_be_present_in_element((By.ID, "stat-index"), str(len(served.messages))))
    title = served.messages[0]["title"]
    browser.find_element(By.ID, "q-text").send_keys(title)
    browser.find_element(By.ID, "q-submit").click()
    wait.until(lambda d: d.find_element(By.ID, "results").get_attribute("data-context") == "search:text")
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    assert cards and cards[0].find_element(By.CLASS_NAME, "title").text == title
    browser.delete_all_cookies()
