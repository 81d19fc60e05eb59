"""The search page in real headless Chromium (selenium + Debian's chromium and chromedriver)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from samestyle.streams.dev.broker import EmbeddedBroker
from tests.integration.conftest import text_listing
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


def page_wait(browser: Any, seconds: float = 30.0) -> Any:
    """A WebDriverWait that polls through page changes: an element found just before the page
    re-renders or navigates (the sign-in form posting) raises StaleElementReferenceException,
    which is a reason to look again, not a failure."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, seconds, ignored_exceptions=(StaleElementReferenceException,))


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

    wait = page_wait(browser)
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

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a picture")
    browser.get(served.base + "/")
    browser.find_element(By.ID, "q-image").send_keys(str(broken))
    browser.find_element(By.ID, "q-submit").click()
    page_wait(browser).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "cannot use this query" in browser.find_element(By.ID, "error").text


TOKEN = "browser-token-0123456789abcdef"


@pytest.fixture(scope="module")
def served_with_token(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from serve_sample(broker, tmp_path_factory.mktemp("browser-token"), n_products=4, api_token=TOKEN)


def test_page_behind_a_token_signs_in_then_searches(browser: Any, served_with_token: Served) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    served = served_with_token
    wait = page_wait(browser)
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


def read_decisions(served: Served, wanted: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
    """The first ``moderation-decisions`` record, decoded with the topic's codec, that ``wanted`` accepts."""
    from samestyle.streams.io.reader import LogReader, every_partition
    from samestyle.topics import MODERATION_DECISIONS, codec_for_topic

    spec = served.stack.specs[MODERATION_DECISIONS]
    codec = codec_for_topic(MODERATION_DECISIONS)

    async def run() -> dict[str, Any]:
        async with LogReader(served.stack.settings.bootstrap_servers, client_id="test-decisions") as reader:
            await reader.assign(every_partition(spec.name, spec.partitions))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for record in await reader.fetch(0.5):
                    decision = codec.decode(record.value)
                    if wanted(decision):
                        assert record.key == decision["listing_id"].encode()
                        return decision
            pytest.fail(f"no matching record on {spec.name} in {timeout:.0f} s")

    return asyncio.run(run())


def test_moderation_page_shows_an_alert_and_writes_the_confirmation(browser: Any, served: Served) -> None:
    from selenium.webdriver.common.by import By

    # A listing and an exact copy by the same (fresh) supplier, images under the image base dir so
    # both sides get thumbnails: image+text cosine 1, an alert under any threshold.
    settings = served.stack.settings
    assert settings.image_base_dir is not None
    image = settings.image_base_dir / "moderation.png"
    image.write_bytes(served.image(2))
    supplier = "moderated-supplier"
    now = int(time.time() * 1000)
    original = text_listing("mod-original", "walnut serving board", supplier, image_uri=str(image), event_time=now)
    copy = {**original, "listing_id": "mod-copy", "event_time": now + 1}
    served.stack.produce([original])
    served.stack.collect(lambda o: "mod-original" in o.indexed_ids)
    served.stack.produce([copy])
    outputs = served.stack.collect(lambda o: any(a["listing_id"] == "mod-copy" for a in o.alerts))
    [alert] = [a for a in outputs.alerts if a["listing_id"] == "mod-copy"]
    assert alert["duplicate_of"] == "mod-original"

    wait = page_wait(browser)
    # A clean slate for the moderator id the page keeps in localStorage, cleared through the
    # DevTools protocol rather than a script in the page: a script sent right after a cross-origin
    # navigation can find no execution context yet (chromium 156 under load: "timeout from no
    # such execution context", CI of stop 27).
    browser.execute_cdp_cmd("Storage.clearDataForOrigin", {"origin": served.base, "storageTypes": "local_storage"})
    browser.get(served.base + "/#moderation")
    assert browser.find_element(By.ID, "view-search").get_attribute("hidden") is not None
    browser.find_element(By.ID, "mod-supplier").send_keys(supplier)
    card = wait.until(lambda d: next(iter(d.find_elements(
        By.CSS_SELECTOR, "#alerts .alert[data-listing-id='mod-copy'][data-duplicate-of='mod-original']")), None))
    assert browser.find_element(By.ID, "alerts").get_attribute("data-count") == "1"  # the supplier filter
    titles = [t.text for t in card.find_elements(By.CLASS_NAME, "title")]
    assert titles == ["walnut serving board", "walnut serving board"]
    # Both thumbnails come from the thumbnail route and decode in the browser.
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                             for img in card.find_elements(By.CSS_SELECTOR, "img.thumb")))
    assert len(card.find_elements(By.CSS_SELECTOR, "img.thumb")) == 2
    info = card.find_element(By.CLASS_NAME, "verdict-box").text
    assert alert["model_version"] in info and "IT 1.000" in info and "probability" in info

    # Without a moderator id the page refuses to decide.
    card.find_element(By.CLASS_NAME, "confirm").click()
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "moderator id" in browser.find_element(By.ID, "error").text

    browser.find_element(By.ID, "mod-moderator").send_keys("moderator-ana")
    card.find_element(By.CLASS_NAME, "confirm").click()
    wait.until(lambda d: d.find_element(
        By.CSS_SELECTOR, "#alerts .alert[data-listing-id='mod-copy']").get_attribute("data-decision") == "confirmed")

    decision = read_decisions(served, lambda d: d["listing_id"] == "mod-copy")
    assert decision["duplicate_of"] == "mod-original"
    assert decision["decision"] == "confirmed" and decision["moderator_id"] == "moderator-ana"
    assert decision["model_version"] == alert["model_version"]
    assert decision["probability"] == alert["probability"]
    assert now <= decision["decided_at"] <= int(time.time() * 1000)

    # A reload remembers the moderator (localStorage) and shows the decision the worker read back.
    browser.refresh()
    assert browser.find_element(By.ID, "mod-moderator").get_attribute("value") == "moderator-ana"
    browser.find_element(By.ID, "mod-supplier").send_keys(supplier)
    wait.until(lambda d: "confirmed by moderator-ana" in d.find_element(By.ID, "alerts").text)
    # The probability filter: an alert of the cosine rule has none, so it is hidden.
    if alert["probability"] is None:
        browser.find_element(By.ID, "mod-min-probability").send_keys("0.5")
        wait.until(lambda d: d.find_element(By.ID, "alerts").get_attribute("data-count") == "0")
