"""How the README's screenshots were taken: headless Chromium (Debian package `chromium`) driven by
Playwright (`pip install playwright`, not a dependency of the harness), against `mlflow ui` and
`optuna-dashboard` serving a finished smoke sweep on 127.0.0.1:

    harness sweep search_spaces/smoke.yaml --out /tmp/smoke
    mlflow ui --backend-store-uri sqlite:////tmp/smoke/mlflow.db --port 5000 &
    optuna-dashboard sqlite:////tmp/smoke/optuna.db --port 8080 &
    python docs/screenshots/take_screenshots.py /tmp/smoke

Playwright only clicks what a reader would: closes MLflow's chat side panel, picks the columns,
expands the parent run, opens grid.png. The PNGs are then reduced to a palette to keep them small.
"""
import json
import re
import sys
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

MLFLOW, DASHBOARD = "http://127.0.0.1:5000", "http://127.0.0.1:8080"
HERE = Path(__file__).resolve().parent
COLUMNS_OFF = ["Dataset", "Source", "Models"]
COLUMNS_ON = ["Description", "score", "best_score/all", "trials_finished", "trials_pruned", "loss.cos", "loss.tv"]


def save(page, name: str, colors: int = 128) -> None:
    page.screenshot(path=HERE / name)
    Image.open(HERE / name).convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(
        HERE / name, optimize=True)


def runs_table(browser) -> None:
    page = browser.new_page(viewport={"width": 1600, "height": 1200})
    page.goto(f"{MLFLOW}/#/experiments/1/runs?workflowType=machine_learning")
    page.wait_for_timeout(6000)
    page.get_by_label("Close").first.click()  # MLflow's chat side panel
    page.get_by_role("button", name="Columns").click()
    search = page.get_by_placeholder("Search columns")
    for name in COLUMNS_OFF + COLUMNS_ON:
        search.fill(name)
        page.wait_for_timeout(400)
        node = page.locator(".du-bois-light-tree-treenode").filter(has_text=re.compile(f"^{re.escape(name)}$"))
        node.locator(".du-bois-light-tree-checkbox").first.click()
    page.keyboard.press("Escape")
    page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()  # expand the parent
    page.mouse.click(5, 5)
    page.set_viewport_size({"width": 1600, "height": 545})
    page.wait_for_timeout(800)
    save(page, "mlflow-runs-table.png", colors=256)


def trial_grid(browser, run_id: str) -> None:
    page = browser.new_page(viewport={"width": 1300, "height": 860})
    page.goto(f"{MLFLOW}/#/experiments/1/runs/{run_id}/artifacts?workflowType=machine_learning")
    page.wait_for_timeout(6000)
    page.get_by_label("Close").first.click()
    page.get_by_text("grid.png", exact=True).first.click()
    page.wait_for_timeout(3000)
    save(page, "mlflow-trial-grid.png")


def pruned_trial(browser) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 830})
    page.goto(f"{DASHBOARD}/dashboard/studies/1/trials")
    page.wait_for_timeout(8000)
    save(page, "optuna-dashboard-pruned-trial.png")


if __name__ == "__main__":
    summary = json.loads((Path(sys.argv[1]) / "summary.json").read_text())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        runs_table(browser)
        trial_grid(browser, summary["variants"][0]["best"]["run_id"])
        pruned_trial(browser)
        browser.close()
