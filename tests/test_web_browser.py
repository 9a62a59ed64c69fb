"""The review app in a real browser (headless Chromium from Debian's packages, driven by
Selenium through chromedriver) over a real session stopped after its first iteration: open
the session and its plots, open an algorithm, approve one and reject one, refuse a bad prompt
edit and save a good one, have the SQL console refuse a file read; then resume the session
while its page is open and watch it refresh itself to the end; the human pairs reached the
DPO update and the next iteration's programs carry the edited template's hash.

Set COEVO_SCREENSHOTS=DIR to keep the screenshots (docs/screenshots holds the README's)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from launching import launch, read_until
from test_session import write_config

from agents.prompts import DEFAULT_PROMPTS_DIR, load_prompt
from archive_store import Archive

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
TOKEN = "browser-test-token"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if not (CHROMIUM and CHROMEDRIVER):
        message = "needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
        if os.environ.get("COEVO_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600",
                f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_of(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code
    except urllib.error.URLError:
        return 0  # not listening yet


def test_review_in_a_real_browser(tmp_path: Path, zoo_dir: Path, browser: object) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    driver: WebDriver = browser  # type: ignore[assignment]
    shots = Path(os.environ.get("COEVO_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    wait = WebDriverWait(driver, 60)

    # A session stopped after its first iteration was judged (its DPO update had started).
    workdir = tmp_path / "w"
    proc = launch(str(write_config(tmp_path / "c.toml", zoo_dir)), "--workdir", str(workdir))
    read_until(proc, "  DPO: ", [])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        sid = archive.scalar("select session_id from sessions")
        ranked = [a["algorithm_id"] for a in archive.top_algorithms(sid, 100)]
        old_template = archive.scalar("select distinct template_hash from algorithms")
    assert old_template == load_prompt("generator").hash

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "coevo", "serve", "--workdir", str(workdir), "--port", str(port), "--poll", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "COEVO_SERVE_TOKEN": TOKEN},
    )
    try:
        assert f"open {base}/?token={TOKEN}" in read_until(server, "open http", [], timeout=120)
        deadline = time.time() + 60
        while status_of(f"{base}/", {"Authorization": f"token {TOKEN}"}) != 200:
            assert time.time() < deadline, "coevo serve never answered"
            time.sleep(0.3)
        # No token, a wrong one: 403, for pages and for the app's own files alike.
        assert status_of(f"{base}/") == 403
        assert status_of(f"{base}/?token=nope") == 403
        assert status_of(f"{base}/static/htmx.min.js") == 403

        # Sessions -> the session: its plots.
        driver.get(f"{base}/?token={TOKEN}")
        assert "token" not in driver.current_url  # the token moved into a cookie
        driver.find_element(By.LINK_TEXT, sid).click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "svg.plot")) >= 3)
        labels = {e.get_attribute("aria-label") for e in driver.find_elements(By.CSS_SELECTOR, "svg.plot")}
        assert {"dev-score distribution per iteration", "program outcomes and executable rate per iteration",
                "leaderboard against the baselines"} <= labels
        for plot in driver.find_elements(By.CSS_SELECTOR, "svg.plot"):
            assert plot.size["width"] > 300 and plot.size["height"] > 150  # drawn, not empty
        driver.save_screenshot(str(shots / "session.png"))

        # An algorithm: approve the second best, reject the worst.
        liked, worst = ranked[1], ranked[-1]
        driver.find_element(By.CSS_SELECTOR, f'#top a[href="/algorithm/{liked}"]').click()
        wait.until(lambda d: d.find_elements(By.ID, "code"))
        assert "def merge" in driver.find_element(By.ID, "code").text
        assert driver.find_element(By.ID, "outcome").text == "ok"
        driver.save_screenshot(str(shots / "algorithm.png"))
        driver.find_element(By.NAME, "note").send_keys("clear and general")
        driver.find_element(By.ID, "verdict-approve").click()
        wait.until(lambda d: d.find_elements(By.ID, "notice"))
        assert driver.find_element(By.ID, "notice").text == "approve recorded"
        driver.get(f"{base}/algorithm/{worst}")
        driver.find_element(By.ID, "verdict-reject").click()
        wait.until(lambda d: d.find_elements(By.ID, "notice"))
        assert driver.find_element(By.ID, "notice").text == "reject recorded"
        with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
            rows = archive.query("select algorithm_id, verdict, note from reviews order by created_at")[1]
        assert rows == [(liked, "approve", "clear and general"), (worst, "reject", "")]

        # The generator's template: an unknown placeholder is refused, a good edit is saved.
        shipped = (DEFAULT_PROMPTS_DIR / "generator.md").read_text()
        driver.get(f"{base}/prompts/generator")
        area = driver.find_element(By.NAME, "text")
        driver.execute_script("arguments[0].value = arguments[1]", area, shipped + "\nUse $magic.\n")
        driver.find_element(By.CSS_SELECTOR, "#edit button").click()
        wait.until(lambda d: d.find_elements(By.ID, "error"))
        assert "unknown placeholder(s) $magic" in driver.find_element(By.ID, "error").text
        assert not (workdir / "prompts").exists()
        # (the template ends in an open code fence the generator continues: add above it)
        edited = shipped.replace("## New algorithm", "Keep the program short: one idea, done well.\n\n## New algorithm")
        area = driver.find_element(By.NAME, "text")
        driver.execute_script("arguments[0].value = arguments[1]", area, edited)
        driver.find_element(By.CSS_SELECTOR, "#edit button").click()
        wait.until(lambda d: d.find_elements(By.ID, "saved"))
        new_template = load_prompt("generator", [workdir / "prompts"]).hash
        assert new_template != old_template and new_template in driver.find_element(By.ID, "saved").text
        driver.save_screenshot(str(shots / "prompt.png"))

        # The SQL console: a file read is refused; a query gives a table and a CSV link.
        driver.get(f"{base}/sql")
        driver.find_element(By.ID, "q").send_keys("select * from read_text('/etc/passwd')")
        driver.find_element(By.CSS_SELECTOR, "#console button").click()
        wait.until(lambda d: d.find_elements(By.ID, "error"))
        assert "disabled by configuration" in driver.find_element(By.ID, "error").text
        assert "root:" not in driver.page_source
        query = driver.find_element(By.ID, "q")
        query.clear()
        query.send_keys("select iteration, n_programs, n_executable, mean_dev from iteration_stats")
        driver.find_element(By.CSS_SELECTOR, "#console button").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#result tr"))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#result tr")) == 2  # header + iteration 0
        assert driver.find_element(By.ID, "csv").get_attribute("href").startswith(f"{base}/sql.csv?q=")
        driver.save_screenshot(str(shots / "sql.png"))

        # Resume with the session's page open: it refreshes itself as steps land, to the end.
        driver.get(f"{base}/session/{sid}")
        assert driver.find_element(By.ID, "status").text == "running"  # the killed session never finished
        resumed = launch("--resume", "--workdir", str(workdir))
        output, _ = resumed.communicate(timeout=1200)
        assert resumed.returncode == 0, output
        assert "from reviewers (x2)" in output and f"generator template {new_template} (edited: {workdir / 'prompts'}" in output
        # htmx swaps the page body while we read it: a stale element means "read it again"
        WebDriverWait(driver, 30, ignored_exceptions=[StaleElementReferenceException]).until(
            lambda d: d.find_element(By.ID, "status").text == "finished")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#iterations tr")) == 3  # no reload: htmx polled
        assert driver.find_elements(By.CSS_SELECTOR, "#dpo tr")
        timings = driver.find_element(By.ID, "timings").text
        assert "execute" in timings and "judge" in timings and "improve" in timings
        driver.save_screenshot(str(shots / "session-finished.png"))

        # The edit is in the template's history, with what each version produced.
        driver.get(f"{base}/prompts/generator")
        history = driver.find_element(By.ID, "history").text
        assert old_template in history and new_template in history
        driver.find_element(By.CSS_SELECTOR, f'#history a[href*="{new_template}"]').click()  # what it produced
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#result tr"))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#result tr")) == 1 + 12
        driver.get(f"{base}/prompts/generator/diff?a={old_template}&b={new_template}")
        assert "+Keep the program short: one idea, done well." in driver.find_element(By.ID, "diff").text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        human = archive.query("select dpo_run_id, chosen_algorithm_id, rejected_algorithm_id from preference_pairs "
                              "where source = 'human'")[1]
        assert {r[0] for r in human} == {f"{sid}/dpo/it0", f"{sid}/dpo/it1"}
        assert {r[1] for r in human} == {liked} and worst in {r[2] for r in human}
        templates = dict(archive.query("select iteration, any_value(template_hash) from algorithms group by 1")[1])
        assert templates == {0: old_template, 1: new_template}
        assert archive.scalar("select count(distinct template_hash) from algorithms where iteration = 1") == 1
        versions = dict(archive.query("select prompt_hash, n_artifacts from prompt_versions where name = 'generator'")[1])
        assert versions == {old_template: 12, new_template: 12}  # each iteration's programs
        uses = dict(archive.query("select generation, prompt_hash from prompt_uses where name = 'generator'")[1])
        assert uses == {0: old_template, 1: new_template}
