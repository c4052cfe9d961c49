"""The web page at / in a real headless Chromium (Debian's chromium, driven by Selenium
through Debian's chromedriver), against the real server and the embedded model on llama.cpp:
chat streaming and Stop, the model picker, structured output and tools, safe Markdown,
embeddings, the dashboard, kept conversations, and the key prompt of a server with keys.

With SCREENSHOTS_DIR set (`make screenshots`: docs/images), the chat and the dashboard are
saved there for the README; otherwise in the test's temporary folder."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import MODEL, free_port, start_server, wait_for

pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed: ./install.sh")
pytest.importorskip("selenium", reason="selenium not installed: ./install.sh --dev")

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(
        "Debian's chromium and chromium-driver are not installed: "
        "apt-get install chromium chromium-driver (.ci/run does)",
        allow_module_level=True,
    )

KEY = "sk-playground-test"
EMBEDDING_MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("web-ui")
    with start_server(workdir, ["--engine", "llama.cpp"], free_port()) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("web-ui-keys")
    args = ["--engine", "llama.cpp", "--embedding-model", "none", "--api-key", KEY]
    with start_server(workdir, args, free_port()) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    # Selenium's manager would otherwise try to download a driver and send statistics.
    os.environ["SE_AVOID_STATS"] = "true"
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,900")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: WebDriver, server: str) -> WebDriver:
    """The page, fresh: no conversations kept from another test."""
    browser.get(server)
    browser.execute_script("localStorage.clear(); sessionStorage.clear();")
    browser.get(server)
    until(browser, lambda: browser.find_element(By.ID, "app").is_displayed(), "the page")
    return browser


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("SCREENSHOTS_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def until(driver: WebDriver, condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if found := condition():
                return found
        except StaleElementReferenceException:
            pass  # re-rendered meanwhile: look again
        time.sleep(0.05)
    shown = driver.find_element(By.TAG_NAME, "body").text[-1500:]
    pytest.fail(f"timed out waiting for {what}; the page shows: {shown}")


def labelled(driver: WebDriver, name: str) -> WebElement:
    """The form control whose accessible name is `name`, as people and screen readers find it."""
    found = driver.find_element(By.XPATH, f"//label[normalize-space()='{name}']")
    control = driver.find_element(By.ID, found.get_attribute("for") or "")
    assert control.accessible_name == name
    return control


def button(driver: WebDriver, name: str) -> WebElement:
    found = driver.find_element(By.XPATH, f"//button[normalize-space()='{name}']")
    assert found.accessible_name == name
    return found


def set_field(driver: WebDriver, element_id: str, value: str) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    if value:
        driver.execute_script("arguments[0].value = arguments[1];", element, value)


def last_answer(driver: WebDriver) -> WebElement:
    return driver.find_elements(By.CSS_SELECTOR, '[data-role="assistant"]')[-1]


def answer_state(driver: WebDriver) -> str:
    items = driver.find_elements(By.CSS_SELECTOR, "li.message.assistant")
    return (items[-1].get_attribute("data-state") or "") if items else ""


def ask(driver: WebDriver, text: str, *, max_tokens: int = 48) -> None:
    set_field(driver, "max-tokens", str(max_tokens))
    set_field(driver, "temperature", "0")
    message = labelled(driver, "Message")
    message.send_keys(text)
    button(driver, "Send").click()


def finished(driver: WebDriver, timeout: float = 120) -> WebElement:
    ended = ("done", "error", "stopped")
    until(driver, lambda: answer_state(driver) in ended, "the answer", timeout)
    assert answer_state(driver) == "done", last_answer(driver).find_element(By.XPATH, "..").text
    return last_answer(driver)


def running_requests(url: str) -> int:
    models = httpx.get(f"{url}/health", timeout=10).json()["models"]
    return sum(int(m.get("running", 0)) + int(m.get("waiting", 0)) for m in models)


# --- chat --------------------------------------------------------------------------------------


def test_the_model_picker_lists_the_chat_models(page: WebDriver, server: str):
    served = {m["id"] for m in httpx.get(f"{server}/v1/models", timeout=10).json()["data"]}
    picker = Select(labelled(page, "Model"))
    listed = [option.text for option in picker.options]
    assert listed == [MODEL]
    assert set(listed) | {EMBEDDING_MODEL} == served  # the embedding model is offered apart
    embedders = Select(page.find_element(By.ID, "embedding-model"))
    assert [option.get_attribute("value") for option in embedders.options] == [EMBEDDING_MODEL]


def test_a_message_streams_into_an_assistant_answer_that_ends_with_its_figures(
    page: WebDriver, screenshots: Path
):
    # Every length the answer's text takes as it renders: streamed, it grows in many steps.
    page.execute_script("""
        window.seenLengths = [];
        new MutationObserver(() => {
          const answers = document.querySelectorAll('[data-role="assistant"]');
          if (answers.length) {
            window.seenLengths.push(answers[answers.length - 1].textContent.length);
          }
        }).observe(document.getElementById("messages"),
                   {subtree: true, childList: true, characterData: true});
    """)
    ask(page, "Write a Python function that adds two numbers, in a code block.", max_tokens=96)
    until(page, lambda: button(page, "Stop").is_enabled(), "Stop to be enabled while streaming", 30)
    answer = finished(page)
    assert answer.text.strip()
    lengths = page.execute_script("return window.seenLengths;")
    assert len({n for n in lengths if n > 0}) >= 3, lengths
    stats = answer.find_element(By.XPATH, "../p[@class='stats']").text
    assert "tokens" in stats and "TTFT" in stats and "tokens/s" in stats, stats
    assert not button(page, "Stop").is_enabled() and button(page, "Send").is_enabled()
    assert page.get_screenshot_as_file(str(screenshots / "ui-chat.png"))


def test_stop_halts_a_long_answer_and_the_server_stops_generating(page: WebDriver, server: str):
    ask(page, "Tell me a very long story about a dragon and a knight.", max_tokens=2000)
    until(page, lambda: len(last_answer(page).text) > 20, "the first words of the answer", 60)
    # The engine's gauges come from its process about once a second.
    wait_for(lambda: running_requests(server) == 1, 10, "the server to count the request")
    button(page, "Stop").click()
    until(page, lambda: answer_state(page) == "stopped", "the answer to stop", 10)
    shown = last_answer(page).text
    wait_for(lambda: running_requests(server) == 0, 10, "the server to stop generating")
    time.sleep(0.5)
    assert last_answer(page).text == shown  # nothing more arrived
    assert "stopped" in last_answer(page).find_element(By.XPATH, "../p[@class='stats']").text


def test_markdown_in_an_answer_is_rendered_and_a_script_in_it_is_shown_as_text(page: WebDriver):
    """The model is made to write HTML (a JSON schema whose only value is it): shown, not run."""
    payload = "<script>window.injected = 1</script><img src=x onerror='window.injected = 2'>"
    schema = {
        "type": "object",
        "properties": {"html": {"type": "string", "enum": [payload]}},
        "required": ["html"],
    }
    page.find_element(By.XPATH, "//summary[normalize-space()='Structured output']").click()
    set_field(page, "json-schema", json.dumps(schema))
    ask(page, "Reply with the JSON.", max_tokens=64)
    answer = finished(page)
    assert json.loads(answer.text) == {"html": payload}  # shown, character for character
    assert answer.find_elements(By.CSS_SELECTOR, "script, img") == []
    assert page.execute_script("return window.injected;") is None
    # The same renderer on Markdown of our own: code blocks, and a javascript: link disarmed.
    html = page.execute_script("""
        const { renderMarkdown } = await import("./ui/markdown.js");
        const box = document.createElement("div");
        renderMarkdown(box, "# Title\\n```python\\nprint('<b>')\\n```\\n[x](javascript:alert(1))");
        return box.innerHTML;
    """)
    assert "<h1>Title</h1>" in html and "<pre><code" in html and "&lt;b&gt;" in html
    assert "javascript:" not in html


def test_a_tool_call_is_shown_as_a_tool_call(page: WebDriver):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    page.find_element(By.XPATH, "//summary[normalize-space()='Tools']").click()
    set_field(page, "tools", json.dumps(tools))
    Select(page.find_element(By.ID, "tool-choice")).select_by_value("required")
    ask(page, "What is the weather in Paris?", max_tokens=64)
    answer = finished(page)
    calls = answer.find_elements(By.XPATH, "..//div[@data-role='tool-call']")
    assert len(calls) == 1
    assert "get_weather" in calls[0].text
    arguments = json.loads(calls[0].find_element(By.TAG_NAME, "pre").text)
    assert isinstance(arguments["city"], str)


def test_a_bad_schema_is_shown_beside_the_settings_and_nothing_is_sent(page: WebDriver):
    page.find_element(By.XPATH, "//summary[normalize-space()='Structured output']").click()
    set_field(page, "json-schema", "{not json")
    ask(page, "Hello")
    error = page.find_element(By.ID, "settings-error")
    until(page, error.is_displayed, "the settings error")
    assert "not valid JSON" in error.text
    assert page.find_elements(By.CSS_SELECTOR, '[data-role="assistant"]') == []


def test_the_usable_context_is_shown_and_a_max_tokens_past_it_shows_the_servers_message(
    page: WebDriver, server: str
):
    cards = httpx.get(f"{server}/v1/models", timeout=10).json()["data"]
    context = next(card["max_model_len"] for card in cards if card["id"] == MODEL)
    assert context == 8192  # SmolLM2's whole context, not a slot's share
    shown = page.find_element(By.ID, "model-context")
    assert shown.text == "Context: 8,192 tokens (prompt and answer)"

    ask(page, "Hello", max_tokens=context + 1000)
    until(page, lambda: answer_state(page) == "error", "the refusal")
    refusal = last_answer(page).find_element(By.CSS_SELECTOR, '[role="alert"]')
    assert refusal.is_displayed()
    assert "This model's maximum context length is 8192 tokens" in refusal.text
    assert "9192 in the completion" in refusal.text


def test_conversations_are_kept_in_the_browser_until_cleared(page: WebDriver, server: str):
    ask(page, "Say hello.", max_tokens=8)
    finished(page)
    page.get(server)  # a reload: the conversation is still there
    until(page, lambda: page.find_elements(By.CSS_SELECTOR, '[data-role="user"]'), "the kept chat")
    assert page.find_element(By.CSS_SELECTOR, '[data-role="user"]').text == "Say hello."
    assert page.find_element(By.ID, "conversation-list").text == "Say hello."
    button(page, "Clear conversations").click()
    assert page.find_element(By.ID, "conversation-list").text == ""
    assert page.execute_script("return localStorage.length;") == 0


# --- embeddings and dashboard --------------------------------------------------------------------


def test_two_texts_are_compared_by_their_embeddings(page: WebDriver):
    page.find_element(By.ID, "tab-embeddings").click()
    set_field(page, "first-text", "The cat sat on the mat.")
    set_field(page, "second-text", "The cat sat on the mat.")
    button(page, "Compare").click()
    output = page.find_element(By.ID, "similarity")
    until(page, lambda: output.get_attribute("data-value"), "the similarity")
    assert float(output.get_attribute("data-value") or 0) == pytest.approx(1.0, abs=1e-3)
    set_field(page, "second-text", "Quarterly revenue grew by four percent.")
    button(page, "Compare").click()
    until(page, lambda: float(output.get_attribute("data-value") or 1) < 0.9, "a lower similarity")


def test_the_dashboard_shows_the_model_loaded_and_tokens_per_second_after_a_request(
    page: WebDriver, screenshots: Path
):
    ask(page, "Name three colours.", max_tokens=32)
    finished(page)
    page.find_element(By.ID, "tab-dashboard").click()
    row = f"tr[data-model='{MODEL}']"

    def state() -> str:
        return page.find_element(By.CSS_SELECTOR, f"{row} [data-field='state']").text

    until(page, lambda: page.find_elements(By.CSS_SELECTOR, row), "the model's row", 10)
    assert state() == "loaded"
    assert page.find_element(By.CSS_SELECTOR, f"{row} [data-field='engine']").text == "llama.cpp"
    assert "MiB" in page.find_element(By.CSS_SELECTOR, f"{row} [data-field='memory']").text
    rate = page.find_element(By.CSS_SELECTOR, "[data-metric='tokens-per-second']")
    until(page, lambda: float(rate.text) > 0, "a non-zero tokens/s", 10)

    def chart_points() -> int:
        line = page.find_element(By.CSS_SELECTOR, "#rate-chart polyline")
        return len((line.get_attribute("points") or "").split())

    points = chart_points()
    assert points >= 2
    page.find_element(By.ID, "tab-chat").click()  # one more answer, for the chart to move
    ask(page, "Name three animals.", max_tokens=32)
    finished(page)
    page.find_element(By.ID, "tab-dashboard").click()
    until(page, lambda: chart_points() >= points + 2, "the chart to take new samples", 10)
    system = page.find_element(By.ID, "system")
    until(page, lambda: "llama.cpp" in system.text, "the system report", 30)
    assert "Linux" in system.text
    assert page.get_screenshot_as_file(str(screenshots / "ui-dashboard.png"))


# --- a server with keys --------------------------------------------------------------------------


def test_with_keys_the_page_shows_only_the_key_prompt_until_the_api_takes_the_key(
    browser: WebDriver, keyed_server: str
):
    browser.get(keyed_server)
    browser.execute_script("sessionStorage.clear();")
    browser.get(keyed_server)
    prompt = browser.find_element(By.ID, "key-prompt")
    until(browser, prompt.is_displayed, "the key prompt")
    assert not browser.find_element(By.ID, "app").is_displayed()

    labelled(browser, "API key").send_keys("sk-wrong")
    button(browser, "Use key").click()
    error = browser.find_element(By.ID, "key-error")
    until(browser, error.is_displayed, "the refusal")
    assert "Incorrect API key" in error.text
    assert not browser.find_element(By.ID, "app").is_displayed()
    assert browser.execute_script("return sessionStorage.length;") == 0

    labelled(browser, "API key").send_keys(KEY)
    button(browser, "Use key").click()
    until(browser, lambda: browser.find_element(By.ID, "app").is_displayed(), "the page")
    assert [o.text for o in Select(labelled(browser, "Model")).options] == [MODEL]
    assert KEY not in httpx.get(keyed_server, timeout=10).text  # the page itself holds none
