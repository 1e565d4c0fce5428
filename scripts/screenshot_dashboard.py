"""Open the dashboard in headless Chromium and save a screenshot (and the rendered DOM).

    python scripts/screenshot_dashboard.py                     # seeded sample data
    python scripts/screenshot_dashboard.py --database-url sqlite:///data/churn.db

Without ``--database-url`` it seeds a temporary SQLite database with
``dashboard.sample_data``. Needs Debian's ``chromium`` and ``chromium-driver`` packages;
Selenium drives them (no browser download).
"""

import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import httpx
import typer
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from churn_stream import storage
from churn_stream.logs import configure_logging
from churn_stream.settings import mask_url
from dashboard.sample_data import seed_sample_data

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "dashboard.png"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
)
SETTLE_S = 2.0
STALE_SELECTOR = '[data-stale="true"]'
FULL_HEIGHT_JS = (
    "const main = document.querySelector('[data-testid=\"stMain\"]');"
    "return main ? main.scrollHeight : document.body.scrollHeight;"
)
log = logging.getLogger("screenshot")
app = typer.Typer(add_completion=False)


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_dashboard(database_url: str, port: int, predictor_url: str) -> subprocess.Popen:
    """``streamlit run dashboard/app.py`` on loopback, reading ``database_url``."""
    env = {"DATABASE_URL": database_url, "PREDICTOR_URL": predictor_url,
           "PATH": "/usr/bin:/bin", "HOME": tempfile.gettempdir()}
    argv = [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"),
            "--server.port", str(port), "--server.address", "127.0.0.1",
            "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)


def wait_healthy(port: int, timeout_s: float = 60.0) -> None:
    """Block until Streamlit's health endpoint answers ``ok``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).text == "ok":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the dashboard on port {port} was not healthy within {timeout_s} s")


def open_browser(profile: Path, width_px: int, height_px: int) -> webdriver.Chrome:
    """Headless Debian Chromium driven by its chromedriver, with a fresh profile."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        raise FileNotFoundError("needs Debian's chromium and chromium-driver packages")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                 f"--window-size={width_px},{height_px}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=ChromeService(executable_path=driver))


def capture(browser: webdriver.Chrome, url: str, out: Path, min_charts: int,
            full_page: bool = True, timeout_s: float = 90.0) -> str:
    """Load ``url``, wait until ``min_charts`` Plotly charts have drawn, save a PNG.

    Returns the rendered DOM. Streamlit fills the page over a websocket after the load
    event, so waiting for the charts themselves is the only reliable signal.
    """
    browser.get(url)
    WebDriverWait(browser, timeout_s).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= min_charts
    )
    time.sleep(SETTLE_S)  # Plotly animates its first draw; let it finish.
    if full_page:
        # Streamlit scrolls inside its main block, not the window: grow the window to fit it.
        height_px = browser.execute_script(FULL_HEIGHT_JS)
        browser.set_window_size(browser.get_window_size()["width"], int(height_px) + 40)
        time.sleep(SETTLE_S)
    # A fragment rerunning on its timer greys its elements out until it is done.
    WebDriverWait(browser, timeout_s).until(
        lambda b: not b.find_elements(By.CSS_SELECTOR, STALE_SELECTOR)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(out))
    return browser.page_source


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="Where the PNG goes.")] = DEFAULT_OUT,
    dom: Annotated[Path | None, typer.Option(help="Also save the rendered DOM here.")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="Read this database; default: seed a sample one.")
    ] = None,
    predictor_url: Annotated[
        str, typer.Option(help="Predictor the drill-down asks.")
    ] = "http://127.0.0.1:8000",
    width_px: int = 1400,
    height_px: int = 2200,
    min_charts: Annotated[int, typer.Option(help="Wait until this many charts drew.")] = 10,
    full_page: Annotated[bool, typer.Option(help="Grow the window to the whole page.")] = True,
    users: Annotated[int, typer.Option(min=1, help="Simulated users when seeding.")] = 600,
) -> None:
    """Start the dashboard, let it render in headless Chromium, save what it shows."""
    configure_logging()
    with tempfile.TemporaryDirectory(prefix="churn-shot-") as scratch:
        if database_url is None:
            database_url = f"sqlite:///{Path(scratch) / 'sample.db'}"
            engine = storage.make_engine(database_url)
            summary = seed_sample_data(engine, datetime.now(UTC), n_users=users)
            engine.dispose()
            log.info("seeded %d events and %d predictions", summary.events, summary.predictions)
        port = free_port()
        server = start_dashboard(database_url, port, predictor_url)
        try:
            wait_healthy(port)
            log.info("dashboard on port %d reading %s", port, mask_url(database_url))
            browser = open_browser(Path(scratch) / "profile", width_px, height_px)
            try:
                page = capture(browser, f"http://127.0.0.1:{port}/", out, min_charts,
                               full_page)
            finally:
                browser.quit()
            log.info("screenshot saved to %s", out)
            if dom is not None:
                dom.write_text(page)
        finally:
            server.terminate()
            server.wait(timeout=20)


if __name__ == "__main__":
    app()
