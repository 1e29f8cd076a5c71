"""The chat page at / of `olivepress serve`, in a real browser: Debian's chromium, headless, driven by selenium.

A message is sent and the answer seen growing as it streams; the adapter is switched; Stop ends an answer; a
screenshot of each is kept under the test's tmp_path (and under $OLIVEPRESS_TEST_ARTIFACTS when CI sets it).
Skipped where chromium or its driver is not installed, unless OLIVEPRESS_REQUIRE_BROWSER=1 (CI) makes that a
failure; `apt-get install chromium chromium-driver` installs both.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from test_serve import Server, ask

BROWSER, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")
if not (BROWSER and DRIVER):
    if os.environ.get("OLIVEPRESS_REQUIRE_BROWSER") == "1":
        raise RuntimeError("chromium and chromedriver are required here (apt-get install chromium chromium-driver)")
    pytest.skip("needs chromium and chromium-driver", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def page_server(tiny_run):
    """A server slowed to ~15 tokens/s, so an answer visibly streams and can be stopped; 40 tokens an answer."""
    server = Server(tiny_run / "optimize", "--token-delay-ms", "60", "--default-max-tokens", "40")
    yield server
    server.stop()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",  # empty: no state from any earlier run
        "--window-size=1000,800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def keep(driver, tmp_path: Path, name: str) -> Path:
    """A screenshot, kept as the test's artefact."""
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 1000
    if os.environ.get("OLIVEPRESS_TEST_ARTIFACTS"):
        folder = Path(os.environ["OLIVEPRESS_TEST_ARTIFACTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
    return path


def assistant_texts(driver) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".message.assistant .text")]


def send(driver, text: str) -> None:
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def wait_done(driver, count: int, timeout: float = 60) -> None:
    WebDriverWait(driver, timeout).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.done")) >= count)


def test_a_message_streams_in_and_the_adapter_switches(page_server, browser, tmp_path):
    browser.get(page_server.root + "/")
    picker = Select(browser.find_element(By.ID, "model"))
    WebDriverWait(browser, 20).until(lambda d: len(picker.options) == 2)
    assert [o.text for o in picker.options] == ["base", "travel"]
    assert picker.first_selected_option.text == "travel"  # the adapter comes first

    send(browser, "Where should I eat in Rome?")
    seen = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not browser.find_elements(By.CSS_SELECTOR, ".message.done"):
        texts = assistant_texts(browser)
        if texts and texts[0]:
            seen.add(texts[0])
        time.sleep(0.05)
    assert len(seen) >= 3, f"the answer did not grow as it streamed: {seen}"  # several partial texts
    keep(browser, tmp_path, "chat-streaming-travel")
    travel = assistant_texts(browser)[0]
    expected = ask(page_server.client, "travel", "Where should I eat in Rome?", max_tokens=40)
    assert travel == expected.choices[0].message.content  # what the API answers, greedy

    picker.select_by_visible_text("base")
    send(browser, "Where should I eat in Rome?")
    wait_done(browser, 2)
    base = assistant_texts(browser)[1]
    assert base and base != travel
    labels = [e.get_attribute("data-model") for e in browser.find_elements(By.CSS_SELECTOR, ".message.assistant")]
    assert labels == ["travel", "base"]
    assert "tokens/s" in browser.find_element(By.ID, "status").text
    keep(browser, tmp_path, "chat-switched-to-base")


def test_stop_ends_an_answer_and_new_chat_forgets_the_conversation(page_server, browser, tmp_path):
    browser.get(page_server.root + "/")
    WebDriverWait(browser, 20).until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)
    send(browser, "Tell me everything about Tokyo.")
    WebDriverWait(browser, 30).until(lambda d: len((assistant_texts(d) or [""])[0]) > 5)
    browser.find_element(By.ID, "stop").click()
    wait_done(browser, 1)
    stopped = assistant_texts(browser)[0]
    time.sleep(0.5)
    assert assistant_texts(browser)[0] == stopped  # nothing more arrives
    assert browser.find_element(By.ID, "status").text == "stopped"
    assert browser.find_element(By.ID, "send").is_enabled()
    keep(browser, tmp_path, "chat-stopped")
    browser.find_element(By.ID, "clear").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".message")
    assert browser.execute_script("return conversation.length") == 0
