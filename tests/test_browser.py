"""The notebooks as a person exploring sees them: JupyterLab in a headless Chromium (selenium), every cell run
from the browser. Figures and tables show inline, progress bars are widgets, runs go to the repo's runs/, and
the explorer answers a click on a block toggle with a new readout and a redrawn clip strip."""
import json
import os
import shutil
import time

import pytest

from flgcore.notebooks import ORDER

pytestmark = pytest.mark.browser

# notebook 01 at test size (its parameters cell gets these lines appended, as papermill would inject them);
# FLG_BROWSER_QUICK=1 keeps the quick profile's sizes (for a screenshot of the explorer as a user first sees it)
WHERE_01 = dict(skip=[6, 7], out="runs/browser/01", figures="runs/browser/01/figures", runs_root="runs/browser")
TINY_01 = dict(n=4, sigmas=[0.5], retentions=[0.7], clip_steps=2, clip_seeds=[2000000000], **WHERE_01)

STATE = """
const w = window.jupyterapp && jupyterapp.shell.currentWidget;
if (!w || !w.sessionContext || !w.content || !w.sessionContext.session || !w.sessionContext.session.kernel) return null;
const cells = w.content.widgets.filter(c => c.model.type === 'code');
return {status: w.sessionContext.session.kernel.status, cells: cells.map(c => ({
  count: c.model.executionCount, source: c.model.sharedModel.getSource(),
  prompt: (c.node.querySelector('.jp-InputPrompt') || {}).textContent || '',
  imgs: c.node.querySelectorAll('.jp-OutputArea-output img').length,
  outputs: c.model.outputs.toJSON().map(o => ({type: o.output_type, ename: o.ename || '', evalue: o.evalue || '',
    text: [].concat(o.text || []).join('') + [].concat((o.data || {})['text/plain'] || []).join(''),
    mimes: Object.keys(o.data || {})}))}))};
"""


def _wait(what, timeout: float, every: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        if (got := what()):
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s")


def _errors(state) -> list[str]:
    return [f"cell {k}: {o['ename']}: {o['evalue']}" for k, c in enumerate(state["cells"]) for o in c["outputs"]
            if o["type"] == "error"]


def run_in_lab(driver, url: str, path: str, timeout: float) -> dict:
    """Open a notebook in JupyterLab, run all its cells from the browser, wait for the last; its final state."""
    driver.get(f"{url}/lab/tree/{path}")
    _wait(lambda: (s := driver.execute_script(STATE)) and s["status"] == "idle" and s["cells"], 120)
    driver.execute_script("jupyterapp.commands.execute('notebook:run-all-cells')")

    def finished():
        s = driver.execute_script(STATE)
        if s and _errors(s):
            return s  # run-all stops at an error: report it rather than wait
        done = s and s["status"] == "idle" and all(c["count"] is not None and "*" not in c["prompt"] for c in s["cells"])
        return s if done else None
    return _wait(finished, timeout, every=2)


def check_cells(state) -> None:
    """No error; every plotting cell shows an image; tqdm drew widgets, not its 'IProgress not found' warning."""
    assert not _errors(state), _errors(state)
    text = "".join(o["text"] for c in state["cells"] for o in c["outputs"])
    assert "IProgress not found" not in text
    plotting = [c for c in state["cells"] if any(k in c["source"] for k in ("save_figure(", "plot_", "report.explorer("))]
    assert plotting and all(c["imgs"] >= 1 for c in plotting), [c["source"][:60] for c in plotting if not c["imgs"]]


def _shutdown(driver) -> None:
    driver.execute_script("return jupyterapp.shell.currentWidget.sessionContext.shutdown()")


def test_notebook_01_and_its_explorer_in_a_real_browser(jupyter_lab, browser, tmp_path):
    from selenium.webdriver.common.by import By
    url, repo = jupyter_lab
    src = json.loads((repo / "notebooks" / "01_block_importance.ipynb").read_text())
    params = next(c for c in src["cells"] if "parameters" in c["metadata"].get("tags", []))
    params["source"] = "".join(params["source"]) + "\n" + "\n".join(
        f"{k} = {v!r}" for k, v in (WHERE_01 if os.environ.get("FLG_BROWSER_QUICK") else TINY_01).items())
    (repo / "notebooks" / "01_tiny.ipynb").write_text(json.dumps(src))
    t0 = time.time()
    state = run_in_lab(browser, url, "notebooks/01_tiny.ipynb", timeout=900)
    ran = time.time() - t0
    check_cells(state)
    progress = [c for c in state["cells"] if "report.run(" in c["source"]][0]
    assert any("application/vnd.jupyter.widget-view+json" in o["mimes"] for o in progress["outputs"])  # a tqdm widget
    assert (repo / "runs" / "browser" / "01" / "stage1" / "blocks.csv").is_file()  # the repo's runs/, not notebooks/runs
    assert not (repo / "notebooks" / "runs").exists()

    box = browser.find_element(By.CSS_SELECTOR, ".flg-explorer")
    browser.execute_script("arguments[0].scrollIntoView()", box)
    toggles = box.find_elements(By.CSS_SELECTOR, ".flg-toggle")
    assert len(toggles) == 16 and [t.text for t in toggles if "mod-active" in t.get_attribute("class")] == ["6", "7"]
    readout = box.find_element(By.CSS_SELECTOR, ".flg-readout")
    clips = box.find_element(By.CSS_SELECTOR, ".flg-clips")
    before, src_before = readout.text, clips.get_attribute("src")
    assert "skip [6, 7]" in before
    toggles[10].click()
    t1 = time.time()
    _wait(lambda: "skip [6, 7, 10]" in readout.text and clips.get_attribute("src") != src_before, 60, every=0.1)
    status = box.find_element(By.CSS_SELECTOR, ".flg-status")
    _wait(lambda: "updated in" in status.text, 30, every=0.1)
    answered = time.time() - t1
    assert "mod-active" in toggles[10].get_attribute("class") and readout.text != before
    time.sleep(0.5)  # let the new image paint
    box.screenshot(str(tmp_path / "explorer.png"))
    browser.save_screenshot(str(tmp_path / "page.png"))
    if os.environ.get("FLG_SCREENSHOT"):  # e.g. figures/explorer.png
        shutil.copy(tmp_path / "explorer.png", os.environ["FLG_SCREENSHOT"])
    size = "quick profile" if os.environ.get("FLG_BROWSER_QUICK") else "test size"
    print(f"notebook 01 ({size}) ran in the browser in {ran:.0f} s; a click was answered in {answered:.2f} s "
          f"({status.text}); screenshot {tmp_path / 'explorer.png'}")
    _shutdown(browser)


@pytest.mark.slow
@pytest.mark.parametrize("name", ORDER)  # in dependency order: later notebooks read the runs earlier ones made
def test_every_notebook_runs_interactively_in_the_quick_profile(jupyter_lab, browser, name):
    url, repo = jupyter_lab
    t0 = time.time()
    state = run_in_lab(browser, url, f"notebooks/{name}.ipynb", timeout=5400)
    check_cells(state)
    assert (repo / "runs" / "notebooks" / "quick" / name).is_dir() and not (repo / "notebooks" / "runs").exists()
    print(f"{name}: {time.time() - t0:.0f} s in the browser")
    _shutdown(browser)
