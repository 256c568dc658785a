"""The Dagster UI in a real browser: Debian's chromium, headless, driven by Playwright.

A user opens the asset page of a drifted reconciliation, sees its checks fail, launches the
backfill job from the launchpad, waits for the run to succeed, rematerializes the differences
and sees the checks pass. Screenshots land in ``artifacts/browser/`` (ignored by git).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import launch_job, wait_for
from tests.e2e.test_ui_graphql import (
    DIFFERENCES,
    REPAIRS_OP,
    checks,
    drifted_shop_in_dagster,
    repository,
    run_status,
)

pytestmark = [pytest.mark.dagster, pytest.mark.postgres]

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "browser"
UI_TIMEOUT_MS = 60_000


@pytest.fixture
def page() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (make install adds it)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                    headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(UI_TIMEOUT_MS)
            # dagster dev greets a first-time user with a community dialog: skip it, as one would
            page.add_locator_handler(page.get_by_text("Join the Dagster community"),
                                     lambda: page.get_by_role("button", name="Skip").click())
            yield page
        finally:
            browser.close()


def shot(page: object, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))  # type: ignore[attr-defined]
    return path


def test_a_user_sees_failed_checks_launches_the_backfill_and_sees_them_pass(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, page: object) -> None:
    p = page  # a playwright Page
    with drifted_shop_in_dagster(new_db, state_db, tmp_path) as shop:
        url = shop.url
        first = launch_job(url, "reconcile_orders")
        assert run_status(url, first) == "SUCCESS"

        # the asset page's checks tab: the difference checks failed
        p.goto(f"{url}/assets/{'/'.join(DIFFERENCES)}?view=checks")  # type: ignore[attr-defined]
        p.get_by_text("missing", exact=True).first.wait_for()  # type: ignore[attr-defined]
        p.get_by_text("Failed").first.wait_for()  # type: ignore[attr-defined]
        shot(p, "1-differences-checks-failed")

        # the backfill job's launchpad, with config typed in as a user would
        location = repository(url)["location"]["name"]
        p.goto(f"{url}/locations/{location}/jobs/backfill_orders/playground")  # type: ignore[attr-defined]
        editor = p.locator(".CodeMirror").first  # type: ignore[attr-defined]
        editor.wait_for()
        config = {"ops": {REPAIRS_OP: {"config": {"scope": "all", "chunk_size": 50}}}}
        editor.click()
        p.keyboard.press("Control+A")  # type: ignore[attr-defined]
        p.keyboard.press("Delete")  # type: ignore[attr-defined]
        p.keyboard.insert_text(json.dumps(config))  # type: ignore[attr-defined]
        p.keyboard.press("Escape")  # type: ignore[attr-defined]
        launch_button = p.get_by_role("button", name="Launch Run")  # type: ignore[attr-defined]
        try:
            playwright.expect(launch_button).to_be_enabled()
        finally:
            shot(p, "2-backfill-launchpad")
        launch_button.click()
        p.wait_for_url("**/runs/**")  # type: ignore[attr-defined]
        run_id = p.url.rstrip("/").split("/runs/")[1].split("?")[0]  # type: ignore[attr-defined]
        assert run_status(url, run_id) == "SUCCESS"
        p.get_by_text("Success").first.wait_for()  # type: ignore[attr-defined]
        shot(p, "3-backfill-run-succeeded")

        # rematerialize the differences from the asset page; the checks pass
        p.goto(f"{url}/assets/{'/'.join(DIFFERENCES)}")  # type: ignore[attr-defined]
        p.locator("button", has_text="Materialize").first.click()  # type: ignore[attr-defined]

        def passed_in_a_new_run() -> bool:
            latest = checks(url, DIFFERENCES)
            runs = {e["runId"] for e in latest.values() if e}
            return bool(runs - {first}) and all(
                e and e["evaluation"] and e["evaluation"]["success"] for e in latest.values())

        wait_for("the rematerialized checks to pass", passed_in_a_new_run, seconds=90)
        p.goto(f"{url}/assets/{'/'.join(DIFFERENCES)}?view=checks")  # type: ignore[attr-defined]
        p.get_by_text("missing", exact=True).first.wait_for()  # type: ignore[attr-defined]
        p.get_by_text("Passed").first.wait_for()  # type: ignore[attr-defined]
        assert p.get_by_text("Failed").count() == 0  # type: ignore[attr-defined]
        shot(p, "4-differences-checks-passed")
