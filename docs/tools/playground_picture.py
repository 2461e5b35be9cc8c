"""Take docs/playground.png: the real default model learning a product catalog in the playground.

    .venv/bin/python docs/tools/playground_picture.py [--products 4]

Starts `llm-module serve` with the default model, opens the page in headless Chromium (Debian's
chromium and chromedriver, as tests/test_ui.py does), uploads the catalog records of a few products
from tests/data, trains an adapter with the form's defaults, asks the new adapter a catalog question
beside the base model, and saves the Train tab (docs/playground.png) and the Generate tab
(artifacts/ui-product-generate.png). Minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.conftest import start_server  # noqa: E402
from tests.test_ui import (  # noqa: E402
    ARTIFACTS,
    CHROMEDRIVER,
    CHROMIUM,
    by_id,
    choose,
    fill,
    generate_and_wait,
    open_tab,
    screenshot,
    set_checked,
    wait_for,
    wait_until_ready,
)

DATA = REPO / "tests" / "data"


def catalog_records(products: int) -> tuple[list[dict], str]:
    """The training records of the first ``products`` products, and one of their seen questions."""
    names = list(json.loads((DATA / "catalog_facts.json").read_text()))[:products]
    records = [r for r in json.loads((DATA / "catalog_train.json").read_text())
               if any(name in r["instruction"] + r["output"] for name in names)]
    return records, records[0]["instruction"]


def browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1366,900",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llm-picture-"))
    records, question = catalog_records(args.products)
    upload = work / "upload" / "catalog.json"
    upload.parent.mkdir()
    upload.write_text(json.dumps(records, indent=1), encoding="utf-8")
    (work / "root").mkdir()
    server = start_server(work / "server", "--data-root", str(work / "root"))
    driver = browser(work / "profile")
    try:
        driver.get(server.url + "/ui/")
        wait_until_ready(driver)
        open_tab(driver, "train")
        by_id(driver, "upload-file").send_keys(str(upload))
        by_id(driver, "upload").click()
        wait_for(lambda: by_id(driver, "upload-status").text.startswith("Uploaded"), 30, "the upload")
        fill(driver, "train-adapter-name", "catalog")
        by_id(driver, "start-training").click()
        wait_for(lambda: by_id(driver, "job-state").get_attribute("data-state") in ("done", "failed", "cancelled"),
                 1800, "the training job", interval=1)
        assert by_id(driver, "job-state").get_attribute("data-state") == "done", by_id(driver, "job-result").text
        shutil.copy(screenshot(driver, "product-train"), REPO / "docs" / "playground.png")
        by_id(driver, "try-adapter").click()
        driver.find_element("css selector", "input[name=mode][value=chat]").click()  # an instruct model: chat
        set_checked(driver, "do-sample", False)
        set_checked(driver, "compare", True)
        choose(driver, "adapter-b", "base")
        fill(driver, "prompt", question)
        print("answers (catalog, base):", generate_and_wait(driver, "ab"))
        screenshot(driver, "product-generate")
        print(f"wrote docs/playground.png and {ARTIFACTS / 'ui-product-generate.png'} ({len(records)} records)")
    finally:
        driver.quit()
        server.stop()


if __name__ == "__main__":
    main()
