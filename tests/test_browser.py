"""End-to-end walk through the dashboard in headless Chromium.

Starts ``streamlit run app.py`` on a free port with a temporary workspace and
walks Setup → Failures → Causes → Repair on a tiny MNIST run (200 training
and 100 test images, one epoch), checking what is on screen. A second tab
then checks that sessions keep their own choices but share saved decisions.
Screenshots go to test-artifacts/. The browser may only reach the local
server, so every other request is aborted and fails the test.

Needs Debian's Chromium at /usr/bin/chromium; without it the test is
skipped, or fails when REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import torch

from repair_core import pipeline
from repair_core.dashboard import MAP_FILE
from repair_core.training import TrainConfig
from repair_core.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Seconds to wait for the server to start and for one page run to finish.
SERVER_START_TIMEOUT = 90
RUN_TIMEOUT = 240
LOCAL_HOSTS = {"localhost", "127.0.0.1"}

pytestmark = pytest.mark.browser


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = (
        f"Chromium not found at {CHROMIUM}. Install it with "
        "'apt-get install -y chromium'."
    )
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(reason + " REQUIRE_BROWSER=1 makes this a failure.")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_health(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(
                f"The streamlit server exited with code {server.returncode} before "
                f"it answered. Its output is in {log}."
            )
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(
        f"The streamlit server did not answer at {url} within "
        f"{SERVER_START_TIMEOUT} s. Its output is in {log}."
    )


@pytest.fixture
def server(tmp_path):
    """Start the dashboard on a free port and yield (url, workspace folder)."""
    require_chromium()
    port = free_port()
    workspace = tmp_path / "workspace"
    environment = {**os.environ, "REPAIR_WORKSPACE": str(workspace)}
    log_path = tmp_path / "streamlit.log"
    log = log_path.open("wb")
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "app.py",
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--browser.gatherUsageStats",
        "false",
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process, log_path)
        yield url, workspace
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def wait_until_idle(page) -> None:
    """Wait until the running indicator is gone, after a rerun had time to start."""
    time.sleep(1.5)
    indicator = page.get_by_test_id("stStatusWidgetRunningIcon")
    indicator.wait_for(state="hidden", timeout=RUN_TIMEOUT * 1000)
    time.sleep(0.5)


def fill_number(page, key: str, value: int) -> None:
    field = page.locator(f".st-key-{key} input")
    field.fill(str(value))
    field.press("Enter")
    wait_until_idle(page)


def nav_link(page, name: str):
    """Return the sidebar's link to the page ``name``. Links to the next step
    in the pages also end with a page name."""
    return page.get_by_test_id("stSidebarNavItems").get_by_role("link", name=name)


def click(page, key: str) -> None:
    page.locator(f".st-key-{key} button").first.click()
    wait_until_idle(page)


def choose_option(page, key: str, option: str) -> None:
    page.locator(f".st-key-{key}").click()
    page.get_by_role("option", name=re.compile(f"^{re.escape(option)}")).click()
    wait_until_idle(page)


def grid_images(page) -> int:
    return page.locator('img[src^="data:image/png"]').count()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def failure_cell(workspace: Path) -> tuple[int, int, int, int]:
    """Return (true, predicted, count, classes) of the largest confusion cell."""
    store = Workspace(workspace)
    run = pipeline.load_run(store, store.list_runs()[-1]["id"])
    labels, predictions = run.data.test.labels, run.test_predictions
    classes = len(run.data.test.class_names)
    wrong = predictions != labels
    cells = labels[wrong] * classes + predictions[wrong]
    counts = cells.bincount(minlength=classes * classes)
    cell = int(counts.argmax())
    return cell // classes, cell % classes, int(counts[cell]), classes


@contextlib.contextmanager
def local_browser(profile: Path, height: int) -> Iterator[tuple[Any, list[str]]]:
    """Open headless Chromium with a fresh profile in ``profile`` and a window
    1400 pixels wide. Yield its context and the list of requests to other
    hosts than this machine, which are aborted."""
    from playwright.sync_api import sync_playwright

    outside: list[str] = []

    def keep_local(route) -> None:
        if urlparse(route.request.url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": height},
        )
        try:
            context.route("**/*", keep_local)
            yield context, outside
        finally:
            context.close()


def test_walk_setup_to_repair(server):
    url, workspace = server

    with local_browser(workspace.parent / "chromium-profile", 1800) as (
        context,
        outside,
    ):
        page = context.new_page()
        walk(page, url, workspace)
        check_second_session(context.new_page(), url)
    assert outside == []


def walk(page, url: str, workspace: Path) -> None:
    # Setup: train a tiny run with a live progress bar.
    page.goto(url)
    page.get_by_text("Create a new run").wait_for(timeout=RUN_TIMEOUT * 1000)
    wait_until_idle(page)
    # .streamlit/config.toml sets the viewer toolbar, which has no Deploy button.
    assert page.get_by_role("button", name="Deploy").count() == 0
    page.get_by_text("Advanced", exact=True).click()
    fill_number(page, "setup_n_train", 200)
    fill_number(page, "setup_n_test", 100)
    fill_number(page, "setup_epochs", 1)
    page.locator(".st-key-setup_train button").first.click()
    # wait_until_idle relies on the running indicator, which the toolbar shows.
    page.get_by_test_id("stStatusWidgetRunningIcon").wait_for(timeout=30_000)
    wait_until_idle(page)
    page.get_by_text("Trained run").wait_for(timeout=RUN_TIMEOUT * 1000)
    wait_until_idle(page)
    accuracy = page.get_by_test_id("stMetric").filter(has_text="Test accuracy")
    assert re.search(r"\d+\.\d%", accuracy.inner_text())
    assert grid_images(page) >= 16
    screenshot(page, "setup")
    # The first edit after training removes the success message, and the
    # new-run form stays open through it.
    page.get_by_text("Create a new run").click()
    fields = page.locator(".st-key-setup_epochs input")
    if not fields.is_visible():
        page.get_by_text("Advanced", exact=True).click()
    fill_number(page, "setup_epochs", 2)
    assert fields.is_visible()
    fill_number(page, "setup_epochs", 1)

    # Failures: a click on a confusion-matrix cell filters the grid. The page
    # is opened by the link to the next step.
    page.get_by_role(
        "link", name="Next: pick the failures to repair on Failures"
    ).click()
    page.get_by_text("Misclassifications").wait_for(timeout=RUN_TIMEOUT * 1000)
    wait_until_idle(page)
    assert grid_images(page) > 0
    true_class, predicted_class, count, classes = failure_cell(workspace)
    markers = page.locator(".st-key-failures_confusion .scatterlayer .point")
    assert markers.count() == classes * classes
    markers.nth(true_class * classes + predicted_class).click(force=True)
    wait_until_idle(page)
    heading = page.get_by_role("heading", name=re.compile(r"of \d+ failures"))
    assert heading.inner_text().startswith(f"{count} of ")
    assert grid_images(page) == min(count, 32)
    click(page, "failures_create")
    # The message shows below the button and in a toast.
    page.get_by_test_id("stAlertContentSuccess").get_by_text(
        "Created failure set"
    ).wait_for()
    assert (
        page.get_by_test_id("stToastText").get_by_text("Created failure set").count()
        == 1
    )
    wait_until_idle(page)
    screenshot(page, "failures")

    # Causes: rank with training-loss and confirm the top K.
    page.get_by_role("link", name="Next: rank the causes on Causes").click()
    page.get_by_text("Run identification methods").wait_for()
    wait_until_idle(page)
    methods = page.locator(".st-key-causes_methods input")
    methods.click()
    methods.press("Backspace")
    methods.fill("training-loss")
    methods.press("Enter")
    page.keyboard.press("Escape")
    wait_until_idle(page)
    click(page, "causes_run")
    page.get_by_text("Ranked with training-loss").wait_for()
    wait_until_idle(page)
    assert grid_images(page) == 24
    check_review_keeps_focus(page)
    fill_number(page, "causes_k", 5)
    click(page, "causes_confirm_top")
    confirmed = page.get_by_test_id("stMetric").filter(has_text="Confirmed")
    assert confirmed.get_by_test_id("stMetricValue").inner_text() == "5"
    screenshot(page, "causes")

    # Repair: fine-tune without the confirmed culprits, one seed, with controls.
    page.get_by_role(
        "link", name="Next: remove the 5 confirmed culprits on Repair"
    ).click()
    page.get_by_text("Causes C to remove").wait_for()
    wait_until_idle(page)
    choose_option(page, "repair_treatment", "finetune")
    # The browser sends an out-of-range number, and the page names it and
    # turns the run off instead of using the last valid value.
    fill_number(page, "repair_seeds", 0)
    assert page.get_by_text("Number of seeds = 0 is out of range").count() == 1
    assert page.locator(".st-key-repair_run button").is_disabled()
    fill_number(page, "repair_seeds", 1)
    click(page, "repair_run")
    page.get_by_text("Gain on F_h over nothing removed").wait_for()
    wait_until_idle(page)
    assert page.get_by_text("Removed 5 examples (confirmed in review)").count() == 1
    download = page.locator(".st-key-repair_download")
    assert download.get_by_role("button", name="Download the model").count() == 1
    assert page.locator(".st-key-repair_bars .js-plotly-plot").count() == 1
    screenshot(page, "repair")

    # Setup still shows the training settings entered before the other pages.
    nav_link(page, "Setup").click()
    page.get_by_text("Create a new run").wait_for()
    wait_until_idle(page)
    page.get_by_text("Create a new run").click()
    page.get_by_text("Advanced", exact=True).click()
    assert page.locator(".st-key-setup_n_train input").input_value() == "200"
    assert page.locator(".st-key-setup_epochs input").input_value() == "1"
    nav_link(page, "Repair").click()
    page.get_by_text("Removed 5 examples (confirmed in review)").wait_for(
        timeout=RUN_TIMEOUT * 1000
    )
    wait_until_idle(page)

    # A reload starts a new session, which reopens what the address names.
    assert "run=run-" in page.url
    page.reload()
    page.get_by_text("Removed 5 examples (confirmed in review)").wait_for(
        timeout=RUN_TIMEOUT * 1000
    )
    wait_until_idle(page)
    assert page.get_by_text("No run open").count() == 0


def check_review_keeps_focus(page) -> None:
    """Confirm the top card from the keyboard and check that the focus stays
    on the card's control, so the reviewer can tab on to the next card. This
    first decision after ranking removes the ranking's message and adds the
    Undo button above the grid."""
    control = page.locator('[class*="st-key-review_"]').first
    key = next(
        name
        for name in control.get_attribute("class").split()
        if name.startswith("st-key-review_")
    )
    control.locator("button").first.focus()
    page.keyboard.press("Space")
    wait_until_idle(page)
    confirmed = page.get_by_test_id("stMetric").filter(has_text="Confirmed")
    assert confirmed.get_by_test_id("stMetricValue").inner_text() == "1"
    assert page.locator(".st-key-causes_undo_button").count() == 1
    focused = page.evaluate(
        """() => {
            const box = document.activeElement.closest('[class*="st-key-review_"]');
            return box ? box.className : document.activeElement.tagName;
        }"""
    )
    assert key in focused.split(), focused


def check_second_session(page, url: str) -> None:
    """Check that a second tab, a new session, starts without the first tab's
    run and shows the decisions the first tab saved once it opens that run."""
    page.goto(url)
    page.get_by_text("Create a new run").wait_for(timeout=RUN_TIMEOUT * 1000)
    wait_until_idle(page)
    assert page.get_by_text("No run open").count() == 1
    click(page, "setup_open")
    nav_link(page, "Causes").click()
    page.get_by_text("Ranking to review").wait_for(timeout=RUN_TIMEOUT * 1000)
    wait_until_idle(page)
    confirmed = page.get_by_test_id("stMetric").filter(has_text="Confirmed")
    assert confirmed.get_by_test_id("stMetricValue").inner_text() == "5"


#: Measures, in CSS pixels, the Compare page's Compute button label, the
#: removal charts and their legends, and the sidebar's page icons.
LAYOUT_SCRIPT = """() => {
    const button = document.querySelector('.st-key-compare_run button');
    const style = getComputedStyle(button);
    const content = button.clientWidth - parseFloat(style.paddingLeft)
        - parseFloat(style.paddingRight);
    const walker = document.createTreeWalker(button, NodeFilter.SHOW_TEXT);
    const range = document.createRange();
    range.selectNodeContents(walker.nextNode());
    const charts = ['compare_fh', 'compare_rest'].map((key) => {
        const svg = document.querySelector(`.st-key-${key} .main-svg`);
        const legend = document.querySelector(`.st-key-${key} .legend`);
        const texts = [...document.querySelectorAll(`.st-key-${key} .legendtext`)];
        return {
            right: svg.getBoundingClientRect().right,
            height: svg.getBoundingClientRect().height,
            legendHeight: legend.getBoundingClientRect().height,
            textRight: Math.max(...texts.map((t) => t.getBoundingClientRect().right)),
        };
    });
    const icons = [...document.querySelectorAll('[data-testid="stSidebarNavLink"]')]
        .map((link) => {
            const icon = link.querySelector('[data-testid="stIconMaterial"]');
            if (!icon) return null;
            return {
                width: icon.getBoundingClientRect().width,
                fontSize: parseFloat(getComputedStyle(icon).fontSize),
                font: getComputedStyle(icon).fontFamily,
            };
        });
    return {label: range.getBoundingClientRect().width, content, charts, icons};
}"""


def train_tiny_run(store: Workspace) -> tuple[dict, pipeline.LoadedRun]:
    """Train a one-epoch run on 200 flipped-label images; return its summary
    and the loaded run."""
    config = pipeline.RunConfig(
        n_train=200,
        n_test=100,
        scenario="label-flip",
        device="cpu",
        train=TrainConfig(max_epochs=1),
    )
    summary = pipeline.train_run(store, config)
    return summary, pipeline.load_run(store, summary["run_id"])


def test_compare_layout_fits_window_widths(server):
    url, workspace = server
    store = Workspace(workspace)
    summary, run = train_tiny_run(store)
    failure_set_id = summary["failure_set_id"]
    for method in ("training-loss", "random", "oracle"):
        scores_id = pipeline.run_identification(
            store, run, method, failure_set_id=failure_set_id
        )["scores_id"]
        pipeline.run_removal_curve(
            store,
            run,
            scores_id,
            failure_set_id=failure_set_id,
            ks=(0, 3, 10, 30),
            seeds=(0, 1),
        )
    address = f"{url}/compare?run={summary['run_id']}&fs={failure_set_id}"

    with local_browser(workspace.parent / "chromium-profile", 2400) as (
        context,
        outside,
    ):
        page = context.new_page()
        for width in (400, 900, 1440):
            page.set_viewport_size({"width": width, "height": 2400})
            page.goto(address)
            charts = page.locator(".st-key-compare_rest .js-plotly-plot")
            charts.wait_for(timeout=RUN_TIMEOUT * 1000)
            wait_until_idle(page)
            screenshot(page, f"compare-{width}")
            layout = page.evaluate(LAYOUT_SCRIPT)

            # Half a pixel of slack for rounding.
            assert layout["label"] <= layout["content"] + 0.5, (width, layout)
            for chart in layout["charts"]:
                assert chart["textRight"] <= chart["right"], (width, chart)
                assert chart["legendHeight"] <= chart["height"] / 3, (width, chart)
            if width < 900:
                # The sidebar starts collapsed in a narrow window.
                continue
            assert len(layout["icons"]) == 5, (width, layout["icons"])
            for icon in layout["icons"]:
                assert icon is not None, (width, layout["icons"])
                assert "Material Symbols" in icon["font"], icon
                # A loaded icon font draws the ligature as one glyph, where a
                # fallback font would spell out the icon's name.
                assert icon["width"] <= 1.5 * icon["fontSize"], icon
    assert outside == []


def test_back_returns_to_previous_page(server):
    url, workspace = server
    store = Workspace(workspace)
    summary, run = train_tiny_run(store)
    scores_id = pipeline.run_identification(
        store, run, "training-loss", failure_set_id=summary["failure_set_id"]
    )["scores_id"]
    query = f"run={summary['run_id']}&fs={summary['failure_set_id']}&scores={scores_id}"

    with local_browser(workspace.parent / "chromium-profile", 1200) as (
        context,
        outside,
    ):
        page = context.new_page()
        page.goto(f"{url}/?{query}")
        page.get_by_text("Create a new run").wait_for(timeout=RUN_TIMEOUT * 1000)
        wait_until_idle(page)
        start = page.evaluate("history.length")
        visited = ["/"]
        for name in ("Failures", "Causes", "Repair"):
            nav_link(page, name).click()
            wait_until_idle(page)
            visited.append(f"/{name.lower()}")
            # One history entry per page visit.
            assert page.evaluate("history.length") == start + len(visited) - 1
            assert urlparse(page.url).query == query

        for path in reversed(visited[:-1]):
            page.go_back()
            wait_until_idle(page)
            assert urlparse(page.url).path == path
            assert urlparse(page.url).query == query
    assert outside == []


#: Measures, in CSS pixels, the plot areas of the Failures page's confusion
#: matrix and feature map, the map's chart, its legend and plotly's toolbar.
FAILURES_LAYOUT_SCRIPT = """() => {
    const box = (selector) => {
        const rect = document.querySelector(selector).getBoundingClientRect();
        return {
            left: rect.left, right: rect.right, top: rect.top,
            bottom: rect.bottom, width: rect.width,
        };
    };
    return {
        matrix: box('.st-key-failures_confusion .nsewdrag'),
        map: box('.st-key-failures_map_0 .nsewdrag'),
        chart: box('.st-key-failures_map_0 .main-svg'),
        legend: box('.st-key-failures_map_0 .legend'),
        toolbar: box('.st-key-failures_map_0 .modebar'),
    };
}"""
#: Narrowest plot area, in CSS pixels, that the Failures page's charts get: 25
#: pixels per cell of a ten-class confusion matrix.
MIN_PLOT_WIDTH = 250


def overlap(first: dict[str, float], second: dict[str, float]) -> bool:
    return (
        first["left"] < second["right"]
        and second["left"] < first["right"]
        and first["top"] < second["bottom"]
        and second["top"] < first["bottom"]
    )


def test_failures_layout_fits_window_widths(server):
    url, workspace = server
    store = Workspace(workspace)
    summary, run = train_tiny_run(store)
    # A stored map is drawn without a UMAP fit, whose first run in a process
    # compiles numba code for about a minute. Random points fill the chart as well.
    generator = torch.Generator().manual_seed(0)
    stored_map = {
        part: torch.rand(len(data), 2, generator=generator).numpy()
        for part, data in (("train", run.data.train), ("test", run.data.test))
    }
    store.save_tensor(summary["run_id"], MAP_FILE, stored_map)
    address = f"{url}/failures?run={summary['run_id']}"

    with local_browser(workspace.parent / "chromium-profile", 1600) as (
        context,
        outside,
    ):
        page = context.new_page()
        for width in (400, 900, 1440):
            page.set_viewport_size({"width": width, "height": 1600})
            page.goto(address)
            page.locator(".st-key-failures_map_0 .js-plotly-plot").wait_for(
                timeout=RUN_TIMEOUT * 1000
            )
            wait_until_idle(page)
            screenshot(page, f"failures-{width}")
            layout = page.evaluate(FAILURES_LAYOUT_SCRIPT)

            assert layout["map"]["width"] >= MIN_PLOT_WIDTH, (width, layout)
            assert layout["matrix"]["width"] >= MIN_PLOT_WIDTH, (width, layout)
            # The legend lies below the points, inside the chart, and clear
            # of the toolbar. Half a pixel of slack for rounding.
            assert layout["legend"]["top"] >= layout["map"]["bottom"], (width, layout)
            assert layout["legend"]["right"] <= layout["chart"]["right"] + 0.5, (
                width,
                layout,
            )
            assert not overlap(layout["legend"], layout["toolbar"]), (width, layout)
    assert outside == []
