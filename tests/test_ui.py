"""The web playground in real headless Chromium (Debian's chromium + chromedriver) over real uvicorn.

Screenshots of each tab go to artifacts/ui-*.png. The browser is the system one
(scripts/install-browser.sh installs it with apt-get); nothing is downloaded.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import start_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
TOKEN = "playground-token-123"
ALPACA_RECORDS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "What is Jac?", "input": "", "output": "A programming language for AI agents."},
    {"instruction": "Reverse the word.", "input": "abc", "output": "cba"},
]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent: the browser test needs Debian's "
                       "chromium and chromium-driver (scripts/install-browser.sh installs them as root)"),
]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ui_data_root(tiny_model_dir, tiny_adapter_dir, tmp_path_factory) -> Path:
    """A data root with the tiny model and the 'tiny' adapter; training data is uploaded through the page."""
    root = tmp_path_factory.mktemp("ui-data-root")
    shutil.copytree(tiny_model_dir, root / "model")
    shutil.copytree(tiny_adapter_dir, root / "adapters" / "tiny")
    return root


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ui-upload") / "alpaca-tiny.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in ALPACA_RECORDS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ui_server(ui_data_root, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("ui-server"), "--model", str(ui_data_root / "model"),
                          "--adapter", f"tiny={ui_data_root / 'adapters' / 'tiny'}",
                          "--data-root", str(ui_data_root), "--torch-threads", "1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
                 "--window-size=1366,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


# ------------------------------------------------------------------ helpers
def wait_for(condition, timeout: float = 60, what: str = "the page", interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # the element is not there yet, or is being replaced
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def fill(driver, element_id: str, text: str) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(text)


def choose(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, element_id)).select_by_value(value)


def set_checked(driver, element_id: str, checked: bool) -> None:
    box = by_id(driver, element_id)
    if box.is_selected() != checked:
        box.click()


def open_tab(driver, name: str) -> None:
    by_id(driver, f"tab-{name}").click()
    wait_for(lambda: by_id(driver, f"panel-{name}").is_displayed(), 5, f"the {name} tab")


def wait_until_ready(driver) -> None:
    wait_for(lambda: "ok" in by_id(driver, "model-status").get_attribute("class"), 60, "the model status")
    wait_for(lambda: driver.execute_script("return document.body.dataset.ready === 'true'"), 30, "the page start")


def screenshot(driver, name: str) -> Path:
    """The whole page (not only the window) into artifacts/ui-<name>.png."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"ui-{name}.png"
    page = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": page["width"], "height": page["height"], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def generate_and_wait(driver, sides: str = "a", timeout: float = 90) -> list[str]:
    """Click Generate; return the generated text of each output column in ``sides`` once its stream is done."""
    invalid = driver.execute_script(
        "return [...document.querySelectorAll('#generate-form :invalid')].map(e => e.id + ': ' + e.validationMessage)")
    assert not invalid, f"the form would not submit: {invalid}"
    by_id(driver, "generate").click()
    texts = []
    for side in sides:
        stats = f"output-{side}-stats"
        wait_for(lambda stats=stats: by_id(driver, stats).text.startswith(("Done", "Failed")), timeout,
                 f"output {side}")
        assert by_id(driver, stats).text.startswith("Done"), by_id(driver, "generate-error").text
        texts.append(driver.execute_script(
            f"return document.querySelector('#output-{side}-text .generated').textContent"))
    return texts


def count_output_updates(driver, side: str = "a") -> None:
    """From now on count the changes to side's output, so a test can tell text arrived piece by piece."""
    driver.execute_script(f"""
        window.outputUpdates = 0;
        new MutationObserver((changes) => {{ window.outputUpdates += changes.length; }})
            .observe(document.getElementById('output-{side}-text'),
                     {{childList: true, characterData: true, subtree: true}});
    """)


# ------------------------------------------------------------------ tests
def test_generate_streams_text_and_compares_adapters(browser, ui_server):
    browser.get(ui_server.url + "/")
    assert browser.current_url == ui_server.url + "/ui/"
    wait_until_ready(browser)
    assert "model" in by_id(browser, "model-status").text

    choose(browser, "adapter-a", "base")
    set_checked(browser, "do-sample", False)  # greedy: the same text each run
    fill(browser, "max-new-tokens", "24")
    fill(browser, "prompt", "Once upon a time")
    count_output_updates(browser)
    [text] = generate_and_wait(browser)
    assert text.strip(), "no text appeared"
    assert browser.execute_script("return window.outputUpdates") >= 2, "the text did not arrive piece by piece"
    assert by_id(browser, "output-a-text").get_attribute("aria-busy") == "false"

    set_checked(browser, "compare", True)
    choose(browser, "adapter-b", "tiny")
    base_text, tiny_text = generate_and_wait(browser, "ab")
    assert base_text == text
    assert tiny_text.strip() and tiny_text != base_text, "the adapter should change the greedy output"
    assert by_id(browser, "output-b").find_element("css selector", "h2").text == "tiny"
    screenshot(browser, "generate")
    set_checked(browser, "compare", False)

    # Chat: each turn is sent with the ones before it, shown as a transcript.
    browser.find_element("css selector", 'input[name="mode"][value="chat"]').click()
    assert by_id(browser, "prompt-label").text == "Message" and by_id(browser, "system-prompt").is_displayed()
    for message in ("Hi there", "And again"):
        fill(browser, "prompt", message)
        assert generate_and_wait(browser)[0] is not None
    turns = browser.find_elements("css selector", "#output-a-text .turn")
    assert [t.get_attribute("class") for t in turns] == ["turn user", "turn assistant"] * 2
    assert turns[2].text == "You: And again" and by_id(browser, "prompt").get_attribute("value") == ""
    by_id(browser, "new-conversation").click()
    assert browser.find_elements("css selector", "#output-a-text .turn") == []


def test_train_an_adapter_then_generate_and_evaluate_with_it(browser, ui_server, alpaca_file):
    browser.get(ui_server.url + "/ui/")
    wait_until_ready(browser)
    open_tab(browser, "train")

    by_id(browser, "upload-file").send_keys(str(alpaca_file))
    by_id(browser, "upload").click()
    wait_for(lambda: by_id(browser, "upload-status").text.startswith("Uploaded"), 30, "the upload")
    assert by_id(browser, "train-data-file").get_attribute("value") == "uploads/alpaca-tiny.jsonl"

    # A long run, cancelled once it has started.
    fill(browser, "train-adapter-name", "ui-cancelled")
    fill(browser, "train-max-steps", "100000")
    by_id(browser, "start-training").click()
    wait_for(lambda: by_id(browser, "job-step").text not in ("–", "0 / 100000"), 120, "the first steps")
    by_id(browser, "cancel-job").click()
    wait_for(lambda: by_id(browser, "job-state").get_attribute("data-state") == "cancelled", 120, "the cancel")
    assert "Cancelled" in by_id(browser, "job-result").text

    fill(browser, "train-adapter-name", "ui-tuned")
    assert by_id(browser, "train-output-dir").text == "runs/ui-tuned"
    for element_id, value in {"train-epochs": "1", "train-max-steps": "60", "train-micro-batch": "2",
                              "train-batch": "2", "train-cutoff": "64", "train-lora-r": "4",
                              "train-lora-alpha": "8"}.items():
        fill(browser, element_id, value)
    # On a slow link the cancelled run's state must be gone at once, not after the server answers.
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": False, "latency": 1500, "downloadThroughput": -1, "uploadThroughput": -1})
    try:
        by_id(browser, "start-training").click()
        assert by_id(browser, "job-state").get_attribute("data-state") != "cancelled"
        assert by_id(browser, "job-title").text.startswith("ui-tuned"), by_id(browser, "job-title").text
    finally:
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", {
            "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})

    steps_seen = set()

    def finished() -> bool:
        steps_seen.add(by_id(browser, "job-step").text)
        return by_id(browser, "job-state").get_attribute("data-state") in ("done", "failed", "cancelled")

    wait_for(finished, 300, "the training job", interval=0.1)
    assert by_id(browser, "job-state").get_attribute("data-state") == "done", by_id(browser, "job-result").text
    assert by_id(browser, "job-step").text == "60 / 60"
    assert by_id(browser, "job-progress").get_attribute("value") == by_id(browser, "job-progress").get_attribute("max")
    assert len(steps_seen - {"–"}) >= 2, f"no live progress was shown (saw {steps_seen})"
    assert int(by_id(browser, "loss-chart").get_attribute("data-points")) == 60
    assert "ui-tuned is trained and loaded" in by_id(browser, "job-result").text
    screenshot(browser, "train")

    by_id(browser, "try-adapter").click()  # opens Generate with the new adapter picked
    assert by_id(browser, "panel-generate").is_displayed()
    assert by_id(browser, "adapter-a").get_attribute("value") == "ui-tuned"
    set_checked(browser, "do-sample", False)
    fill(browser, "prompt", "Name the capital of France.")
    assert generate_and_wait(browser)[0].strip()
    assert by_id(browser, "output-a").find_element("css selector", "h2").text == "ui-tuned"

    open_tab(browser, "adapters")
    row = wait_for(lambda: next(r for r in browser.find_elements("css selector", "#adapters-table tbody tr")
                                if r.text.startswith("ui-tuned")), 10, "the adapter row")
    assert "model" in row.text and ("KiB" in row.text or "MiB" in row.text)
    choose(browser, "evaluate-adapter", "ui-tuned")
    fill(browser, "evaluate-file", "uploads/alpaca-tiny.jsonl")
    by_id(browser, "evaluate").click()
    wait_for(lambda: by_id(browser, "evaluate-result").is_displayed(), 120, "the evaluation")
    assert float(by_id(browser, "evaluate-perplexity").text.replace(",", "")) > 1
    assert float(by_id(browser, "evaluate-loss").text) > 0
    screenshot(browser, "adapters")

    row.find_element("css selector", "button.danger").click()  # Unload, after a confirm()
    browser.switch_to.alert.accept()
    wait_for(lambda: "ui-tuned" not in by_id(browser, "adapters-table").text, 30, "the unload")
    fill(browser, "load-path", "runs/ui-tuned")
    fill(browser, "load-name", "ui-again")
    by_id(browser, "load-adapter").click()
    wait_for(lambda: "ui-again" in by_id(browser, "adapters-table").text, 30, "the load")
    assert "Loaded ui-again" in by_id(browser, "load-status").text
    options = [o.get_attribute("value") for o in by_id(browser, "adapter-a").find_elements("css selector", "option")]
    assert options == ["base", "tiny", "ui-again"]


@pytest.fixture(scope="module")
def locked_ui_server(ui_data_root, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("ui-locked"), "--model", str(ui_data_root / "model"),
                          "--data-root", str(ui_data_root), "--torch-threads", "1", env={"LLM_MODULE_TOKEN": TOKEN})
    yield server
    server.stop()


def test_the_page_asks_for_the_token_and_works_once_given(browser, locked_ui_server):
    browser.get(locked_ui_server.url + "/ui/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    dialog = wait_for(lambda: browser.find_element("css selector", "#token-dialog[open]"), 30, "the token dialog")
    fill(browser, "token-input", "wrong-token-000")
    by_id(browser, "token-submit").click()
    wait_for(lambda: "refused" in by_id(browser, "token-error").text, 30, "the refusal")
    assert dialog.get_attribute("open") is not None
    screenshot(browser, "token")

    fill(browser, "token-input", TOKEN)
    by_id(browser, "token-submit").click()
    wait_until_ready(browser)
    assert not by_id(browser, "forget-token").get_attribute("hidden")
    choose(browser, "adapter-a", "base")
    fill(browser, "max-new-tokens", "12")
    fill(browser, "prompt", "Hello")
    assert generate_and_wait(browser)[0].strip()

    # The /t/<token>/ address carries the token itself: no question asked.
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"{locked_ui_server.url}/t/{TOKEN}/")
    assert browser.current_url == f"{locked_ui_server.url}/t/{TOKEN}/ui/"
    wait_until_ready(browser)
    assert browser.find_elements("css selector", "#token-dialog[open]") == []
