"""The activate pages in a real headless Chromium against the real server: the way a person pairs a device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ADMIN_PASSWORD, ServerThread

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.browser


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1000,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def test_owner_pairs_a_device_from_the_verification_link(server: ServerThread, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 10)
    started = server.call(server.service.device_authorization, {"client_id": "thermo-1"}, server.clock.now())
    code = started["user_code"]
    assert started["verification_uri_complete"].endswith(f"/activate?user_code={code}")
    browser.get(started["verification_uri_complete"])  # http://localhost:<port>/activate?user_code=..., as in a QR code

    wait.until(ec.presence_of_element_located((By.ID, "password")))
    assert code in browser.find_element(By.TAG_NAME, "main").text
    browser.find_element(By.ID, "username").send_keys("admin")
    browser.find_element(By.ID, "password").send_keys(ADMIN_PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit].primary").click()

    field = wait.until(ec.presence_of_element_located((By.ID, "user_code")))
    assert field.get_attribute("value") == code
    browser.find_element(By.CSS_SELECTOR, "form[action='/activate'] button[type=submit]").click()

    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "button[value=approve]")))
    main = browser.find_element(By.TAG_NAME, "main").text
    assert "Living-room thermostat" in main and "thermo-1" in main
    assert "Report its own temperature readings" in main
    assert "Receive power on/off commands for itself and report its power state" in main
    browser.save_screenshot(str(tmp_path / "consent.png"))
    browser.find_element(By.CSS_SELECTOR, "button[value=approve]").click()

    heading = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "h1.ok")))
    assert heading.text == "Approved"
    assert "Living-room thermostat (thermo-1) is now allowed to:" in browser.find_element(By.TAG_NAME, "main").text
    browser.save_screenshot(str(tmp_path / "approved.png"))
    # the stylesheet loaded under the CSP (no inline styles anywhere)
    assert browser.execute_script(
        "return getComputedStyle(document.querySelector('h1.ok')).color") == "rgb(27, 122, 61)"

    row = server.call(server.service.store.device_code_by_user_code, code)
    assert (row.status, row.sub) == ("approved", "admin")
