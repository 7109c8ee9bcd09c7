"""A real headless Chromium for the tests that look at what users see (the run report).

Debian's `chromium` and `chromium-driver` packages (installed by tests/infra/install_node_deps.sh,
which `make test` runs first), driven through Selenium with the driver's path given, so Selenium
never looks for a driver to download. `view(path)` opens a local HTML file, waits until the page
has loaded, and returns what the page shows: each image with whether it decoded, the tables'
cells, the headings, and a screenshot of the whole page.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = "run `bash tests/infra/install_node_deps.sh` as root (Debian's chromium and chromium-driver)"

# Every <img> with whether it decoded (complete with a width: a broken or missing file has width 0).
IMAGES_JS = "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);"
TABLES_JS = (
    "return Array.from(document.querySelectorAll('table')).map("
    "t => Array.from(t.rows).map(r => Array.from(r.cells).map(c => c.textContent.trim())));"
)
HEADINGS_JS = "return Array.from(document.querySelectorAll('h1,h2,h3')).map(h => h.textContent.trim());"


@dataclass
class Page:
    images: list[tuple[str, bool, int]]
    tables: list[list[list[str]]]
    headings: list[str]
    screenshot: bytes

    @property
    def broken_images(self) -> list[str]:
        return [src for src, complete, width in self.images if not (complete and width > 0)]


def view(path: Path, width: int = 1100) -> Page:
    """Open `path` in headless Chromium and read the page as loaded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    assert not missing, f"{', '.join(missing)} missing: {INSTALL_HINT}"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(path.resolve().as_uri())  # returns once the load event fired: images have loaded or failed
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, max(900, int(height) + 100))
        return Page(
            images=[(str(s), bool(c), int(w)) for s, c, w in driver.execute_script(IMAGES_JS)],
            tables=driver.execute_script(TABLES_JS),
            headings=driver.execute_script(HEADINGS_JS),
            screenshot=driver.get_screenshot_as_png(),
        )
    finally:
        driver.quit()
