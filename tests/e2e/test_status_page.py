"""The status page in a real headless browser (Debian's chromium through Selenium): a series sent over C-STORE
shows up, with its thumbnail, behind basic auth.

Selenium is given the driver's path, so Selenium Manager never downloads anything. Missing chromium,
chromedriver or selenium skip these tests locally and fail them in CI (which installs them).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dicom_node.node import Node
from tests.conftest import wait_until
from tests.dicomtools import StoreSCP, in_ci
from tests.e2e.conftest import pet_rule, send_datasets, wait_state
from tests.factories import make_pet_series

pytestmark = pytest.mark.network

USER, PASSWORD = "pacsadmin", "status-page-pw"  # URL-safe: they go into the address for the browser


def _missing(what: str) -> None:
    if in_ci():
        pytest.fail(f"{what} not found (CI installs chromium, chromium-driver and selenium)")
    pytest.skip(f"{what} not found")


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless chromium (as root in CI: no sandbox; /dev/shm may be small in containers)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")  # Debian's chromium-driver: /usr/bin/chromedriver
    if chromium is None:
        _missing("chromium")
    if driver_path is None:
        _missing("chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-proxy-server",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_status_page_lists_a_received_series_with_its_thumbnail(start_node: Callable[..., Node], browser: Any,
                                                                 storescp_sink: StoreSCP):
    from selenium.webdriver.common.by import By

    node = start_node([pet_rule([{"peer": "sink"}])],
                      peers=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": storescp_sink.port}],
                      web={"port": 0, "user": USER, "password": PASSWORD, "refresh_s": 0})
    series = make_pet_series(shape=(9, 32, 32), seed=41, series_description="PET WB status page")
    uid = str(series[0].SeriesInstanceUID)
    assert send_datasets(series, node.port) == [0] * 9
    assert wait_state(node, uid, ["delivered", "failed"]) == "delivered", node.db.series(uid)

    # Without the login the browser gets the 401 and nothing of the node.
    browser.get(f"http://127.0.0.1:{node.web_port}/")
    assert uid not in browser.page_source and "PET WB status page" not in browser.page_source

    browser.get(f"http://{USER}:{PASSWORD}@127.0.0.1:{node.web_port}/")
    assert browser.title == "petnode PETNODE"
    series_table = browser.find_elements(By.TAG_NAME, "table")[0].text
    assert uid in series_table and "delivered" in series_table and "PET WB status page" in series_table
    image = browser.find_element(By.ID, "thumbnail")
    loaded = wait_until(lambda: browser.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth", image), timeout=15)
    assert loaded and loaded > 2 * 32, f"thumbnail did not load: naturalWidth={loaded}"
    assert browser.execute_script("return arguments[0].naturalHeight", image) >= 32
