"""Screenshots of the demo walkthrough (README, "The demo, step by step") in Dagster's UI.

Playwright drives Debian's chromium (``/usr/bin/chromium``; never ``playwright install``)
headless at 1440x900 against a running demo UI (``make demo``). It only looks: it launches
nothing (the launchpad is filled in, not launched).

``before`` (after step 1 of the walkthrough: the four assets materialized once)
    demo-asset-graph.png                the global asset lineage, every group expanded
    demo-differences-checks-failed.png  orders_invoices' differences, Checks tab: failed checks
    demo-dlq.png                        orders_dlq's dead letters: depth, by error, within_limits
    demo-backfill-launchpad.png         backfill_orders_events' launchpad: today, scope all
``after`` (after steps 2 to 5: fix deployed, both queues replayed, both backfills, step 1 again)
    demo-checks-passed.png              orders_invoices' differences, Checks tab: all passed

Usage: python -m examples.screenshots URL [before|after|all] [--out docs/images]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from playwright.sync_api import Page, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
#: without the background-networking flags chromium tries to reach the internet
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
TIMEOUT_MS = 60_000
OUT = Path(__file__).resolve().parents[1] / "docs" / "images"

INVOICES = "trueup/orders_invoices/differences"
ORDERS_DLQ = "trueup/orders_dlq/dead_letters"
BACKFILL_JOB = "backfill_orders_events"
BACKFILL_CONFIG = "ops:\n  trueup__orders_events__repairs:\n    config:\n      scope: all\n"


def location(url: str) -> str:
    """The name of the demo's code location (the only one)."""
    query = ("{ repositoriesOrError { ... on RepositoryConnection "
             "{ nodes { location { name } } } } }")
    request = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        nodes = json.loads(response.read())["data"]["repositoriesOrError"]["nodes"]
    return str(nodes[0]["location"]["name"])


def visit(page: Page, url: str) -> None:
    """Open ``url`` and let it settle; skip dagster dev's first-visit community dialog."""
    page.goto(url)
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1000)
    if page.get_by_text("Join the Dagster community").is_visible():
        page.get_by_role("button", name="Skip").click()
        page.wait_for_timeout(500)


def shot(page: Page, out: Path, name: str) -> Path:
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1000)  # charts and the graph animate in
    path = out / f"demo-{name}.png"
    page.screenshot(path=str(path))
    print(f"{path} ({path.stat().st_size // 1024} KB)")
    return path


def asset_graph(page: Page, url: str, out: Path) -> Path:
    visit(page, f"{url}/asset-groups")
    page.get_by_text("reconciliations").first.wait_for()
    if not page.get_by_text("orders_v1_dlq").count():
        page.keyboard.press("Alt+e")  # "Expand all groups" (remembered by the browser)
        page.get_by_text("orders_v1_dlq").first.wait_for()
    for _ in range(3):  # zoom out until it all shows: the button below the zoom slider,
        # bottom right of the 1440x900 page (it has no accessible name)
        page.mouse.click(1412, 752)
        page.wait_for_timeout(400)
    page.wait_for_timeout(1500)
    return shot(page, out, "asset-graph")


def checks(page: Page, url: str, out: Path, *, expect: str, name: str) -> Path:
    visit(page, f"{url}/assets/{INVOICES}?view=checks")
    page.get_by_text(expect, exact=True).first.wait_for()
    page.get_by_text("missing", exact=True).first.click()  # its count, its evaluation
    page.get_by_text("Latest execution").first.wait_for()
    return shot(page, out, name)


def dead_letters(page: Page, url: str, out: Path) -> Path:
    visit(page, f"{url}/assets/{ORDERS_DLQ}")
    page.get_by_text("depth", exact=True).first.wait_for()
    return shot(page, out, "dlq")


def launchpad(page: Page, url: str, out: Path) -> Path:
    """The README's way: the job, the menu next to Materialize, Open launchpad; today's
    partition, ``scope: all``. Not launched."""
    visit(page, f"{url}/locations/{location(url)}/jobs/{BACKFILL_JOB}")
    page.get_by_role("button", name="Materialize").first.locator(
        "xpath=following::button[1]").click()
    page.get_by_role("menuitem", name="Open launchpad").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("scope: auto").first.wait_for()  # the scaffolded default config
    editor = dialog.locator(".CodeMirror").first
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text(BACKFILL_CONFIG)
    page.keyboard.press("Escape")
    dialog.get_by_placeholder("Partition").click()
    page.keyboard.type(dt.datetime.now(dt.UTC).date().isoformat())  # today's partition (UTC)
    page.keyboard.press("Enter")
    dialog.get_by_text("No errors").first.wait_for()
    expect(dialog.get_by_role("button", name="Materialize")).to_be_enabled()
    return shot(page, out, "backfill-launchpad")


def capture(url: str, phase: str, out: Path) -> list[Path]:
    url = url.rstrip("/")
    out.mkdir(parents=True, exist_ok=True)
    steps: list[Callable[[Page], Path]] = []
    if phase in ("before", "all"):
        steps += [lambda p: asset_graph(p, url, out),
                  lambda p: checks(p, url, out, expect="Failed", name="differences-checks-failed"),
                  lambda p: dead_letters(p, url, out),
                  lambda p: launchpad(p, url, out)]
    if phase in ("after", "all"):
        steps.append(lambda p: checks(p, url, out, expect="Passed", name="checks-passed"))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                             headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            return [step(page) for step in steps]
        finally:
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the demo's Dagster UI, e.g. http://127.0.0.1:3000")
    parser.add_argument("phase", nargs="?", default="all", choices=["before", "after", "all"])
    parser.add_argument("--out", type=Path, default=OUT, help=f"default {OUT}")
    args = parser.parse_args()
    capture(args.url, args.phase, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
