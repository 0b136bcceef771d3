"""The chat page in headless Chromium: it loads, sends a message and shows a streamed reply.

Driven with selenium and Debian's chromium + chromedriver (CI installs them, see .ci/run).
A MutationObserver counts how often the reply's text changes, so a reply that arrived in
one piece (not streamed) fails the test.
"""

import shutil
import tempfile

import pytest
from serve_helpers import LiveServer

from lmstack.serve import ServeConfig, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture()
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="lmstack-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_chat_page_streams_a_reply(browser, engine):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with LiveServer(create_app(engine, config=ServeConfig(model_names=["tiny"]))) as live:
        browser.get(live.url + "/")
        wait = WebDriverWait(browser, 60)
        assert browser.title == "lmstack chat"
        wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("value") == "tiny")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("40")
        browser.execute_script("""
            window.__updates = 0;
            new MutationObserver((records) => {
              for (const r of records) if (r.target.closest && r.target.closest('.assistant .text')) window.__updates++;
            }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
        """)
        browser.find_element(By.ID, "prompt").send_keys("Hello there")
        browser.find_element(By.ID, "send").click()
        reply = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".assistant[data-finish-reason]")))
        assert browser.find_element(By.CSS_SELECTOR, ".user").text == "Hello there"
        assert reply.get_attribute("data-finish-reason") == "length"
        assert reply.find_element(By.CSS_SELECTOR, ".text").text.strip(), "the reply is empty"
        assert "40 tokens" in reply.find_element(By.CSS_SELECTOR, ".stats").text
        assert browser.execute_script("return window.__updates") > 1, "the reply did not arrive as a stream"
        assert not browser.find_elements(By.CSS_SELECTOR, ".error")
