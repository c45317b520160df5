import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("FLG_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))


@pytest.fixture(params=["wan-t2v", "wan-i2v", "hunyuan", "hunyuan-i2v"])
def tiny(request):
    from flgcore.models import tiny_model
    return tiny_model(request.param)


TINY_ARCH = ["arch.num_layers=4", "arch.num_attention_heads=2", "arch.attention_head_dim=12",
             "arch.ffn_dim=32", "arch.freq_dim=16"]


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory):
    """A tiny teacher model directory (4 Wan blocks, 2 training steps): flgcore's model layout, in seconds."""
    from flgcore.config import load_config
    from flgcore.pretrain import PretrainConfig, run_pretrain
    out = tmp_path_factory.mktemp("tiny_teacher")
    run_pretrain(load_config(PretrainConfig, None, [f"out={out}", "steps=2", "batch_size=2", "warmup=1", *TINY_ARCH]))
    return out / "model"


@pytest.fixture(scope="session")
def tiny_stage2_dir(tiny_bundle_dir, tmp_path_factory):
    """A Stage-II model of the tiny teacher (blocks 1, 2 as the drop set, 2 steps)."""
    from flgcore.stage2 import Stage2Config, run_stage2
    out = tmp_path_factory.mktemp("tiny_stage2")
    run_stage2(Stage2Config(model=str(tiny_bundle_dir), out=str(out), drop=[1, 2], steps=2, batch_size=2, warmup=1))
    return out / "model"


# ----------------------------------------------------------------------------- a real browser on JupyterLab

BROWSER_HINT = "browser tests need chromium and chromium-driver: apt-get install chromium chromium-driver (as root)"


def _chromium() -> tuple[str, str] | None:
    import shutil
    found = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    return found if all(found) else None


@pytest.fixture(scope="session")
def chromium():
    """(browser, driver) paths of Debian's chromium and chromium-driver, installed here when we are root with
    apt-get; selenium is given the driver's path, so it downloads nothing."""
    import shutil
    import subprocess
    pytest.importorskip("selenium", reason="browser tests need selenium (pip install -e '.[dev]')")
    if _chromium() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium "
                       "chromium-driver", shell=True, capture_output=True)
    if _chromium() is None:
        pytest.skip(BROWSER_HINT)
    return _chromium()


@pytest.fixture(scope="session")
def jupyter_lab(chromium, tmp_path_factory):
    """JupyterLab on 127.0.0.1 serving a copy of the repo's notebooks (so their runs/ is the copy's), with its
    settings in a temp folder; yields (url, copy); stopped at the end of the session."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    copy = tmp_path_factory.mktemp("lab") / "repo"
    shutil.copytree(repo / "notebooks", copy / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copy(repo / "pyproject.toml", copy / "pyproject.toml")
    settings = copy.parent / "settings"
    for plugin, value in {"apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
                          "notebook-extension/tracker": {"windowingMode": "none"}}.items():
        path = settings / f"@jupyterlab/{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(__import__("json").dumps(value))  # no news pop-up; every cell in the DOM
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(copy.parent / "ws"),
               JUPYTER_RUNTIME_DIR=str(copy.parent / "runtime"))
    log = open(copy.parent / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                             "--IdentityProvider.token=", "--ServerApp.password=", "--allow-root",
                             "--expose-app-in-browser", f"--ServerApp.root_dir={copy}"],
                            cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"jupyter lab exited: {(copy.parent / 'lab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("jupyter lab did not start in 60 s")
        yield url, copy
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def browser(chromium):
    """A headless Chromium driven by selenium through the given chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(chromium[1]), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
