"""`visualad app`: the Gradio app's `detect` endpoint equals the pipeline, bad uploads are messages, the batch tab
writes its files, a Space folder is complete, and a real headless Chromium drives the page.

The browser test needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). On CI (`CI=true`) their
absence is a failure; elsewhere the test says how to install them and skips.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# The app is the optional extra (pip install "visualad-hf[app]"): elsewhere its tests skip, on CI they must run.
if os.environ.get("CI"):
    import gradio
else:
    gradio = pytest.importorskip("gradio", reason='the app is the optional extra: pip install "visualad-hf[app]"')

from visualad_hf.app import build_app, load_detector, write_space
from visualad_hf.errors import VisualADError

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(model_dir):
    """The app on 127.0.0.1 in this process, and its pipeline."""
    from visualad_hf.app.ui import offline_theme

    detector = load_detector(os.environ.get("VISUALAD_APP_MODEL", str(model_dir)))
    app = build_app(detector, os.environ.get("VISUALAD_APP_MODEL", str(model_dir)))
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=offline_theme())
    yield app, detector, f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def examples(served):
    return sorted(str(p) for p in (served[0].visualad_detector.work_dir / "examples").iterdir())


def test_detect_endpoint_returns_the_pipelines_score(served, examples):
    from gradio_client import Client, handle_file

    _app, detector, url = served
    client = Client(url, verbose=False)
    for path in examples[:2]:
        overlay, score, verdict, panel = client.predict(handle_file(path), api_name="/detect")
        assert score == pytest.approx(detector(path)["score"], abs=1e-9)
        assert Path(overlay).is_file() and Path(panel).is_file() and verdict.startswith("score ")


def test_a_bad_upload_is_a_message_and_the_app_keeps_serving(served, examples, tmp_path):
    from gradio_client import Client, handle_file

    _, detector, url = served
    client = Client(url, verbose=False)
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(Exception, match="Could not score this file") as info:
        client.predict(handle_file(str(bad)), api_name="/detect")
    assert "Traceback" not in str(info.value)
    _, score, _, _ = client.predict(handle_file(examples[0]), api_name="/detect")
    assert score == pytest.approx(detector(examples[0])["score"], abs=1e-9)


def test_batch_tab_scores_every_file_and_writes_csv_and_maps(served, examples, tmp_path):
    from gradio_client import Client, handle_file

    _, detector, url = served
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(examples[0]).read_bytes()[:100])
    inputs = [*examples[:2], str(truncated)]
    client = Client(url, verbose=False)
    gallery, table, csv_path, map_files, status = client.predict(
        [handle_file(p) for p in inputs], 0.25, api_name="/detect_batch"
    )
    assert "Scored 2 of 3" in status and "truncated.png" in status
    with open(csv_path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["file"] for row in rows] == [Path(p).name for p in inputs]
    for row, path in zip(rows[:2], examples[:2]):
        score = detector(path)["score"]
        assert float(row["score"]) == pytest.approx(score, abs=1e-6)
        assert row["decision"] == ("ANOMALOUS" if score >= 0.25 else "normal")
    assert rows[2]["decision"] == "error" and rows[2]["error"]
    assert len(gallery) == 2 and len(table["data"]) == 3
    npys = sorted(p for p in map_files if p.endswith(".npy"))
    assert len(npys) == 2 and len([p for p in map_files if p.endswith(".png")]) == 2
    expected = detector(examples[0])["anomaly_map"]
    np.testing.assert_allclose(np.load(npys[0]), expected, atol=1e-6)


def test_write_space_writes_a_complete_space(tmp_path):
    folder = write_space(tmp_path / "space", "org/visualad-demo")
    names = {p.name for p in folder.iterdir()}
    assert {"app.py", "requirements.txt", "README.md", "visualad_hf"} <= names
    readme = (folder / "README.md").read_text()
    assert "sdk: gradio" in readme and f"sdk_version: {gradio.__version__}" in readme and "- org/visualad-demo" in readme
    requirements = (folder / "requirements.txt").read_text().splitlines()
    assert f"gradio=={gradio.__version__}" in requirements and any(r.startswith("transformers") for r in requirements)
    assert (folder / "visualad_hf" / "modeling_visualad.py").is_file()
    assert not list(folder.rglob("__pycache__"))
    compile((folder / "app.py").read_text(), "app.py", "exec")
    local = tmp_path / "demo_output" / "model"
    local.mkdir(parents=True)
    with pytest.raises(VisualADError, match="not a Hub model id"):
        write_space(tmp_path / "other", str(local))
    with pytest.raises(VisualADError, match="not a Hub model id"):
        write_space(tmp_path / "other", "no-slash")


def test_app_command_without_a_model_says_how_to_get_one(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "visualad_cli", "app"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert done.returncode == 2
    assert "run `visualad demo`" in done.stderr and "--model demo_output/model" in done.stderr
    assert "Traceback" not in done.stderr


def test_not_a_model_folder_is_one_line(tmp_path):
    with pytest.raises(VisualADError, match="not a model folder"):
        load_detector(str(tmp_path))


def test_missing_gradio_gives_the_pip_command(monkeypatch):
    from visualad_hf.app import MissingExtraError, require_gradio

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(MissingExtraError, match=r'pip install "visualad-hf\[app\]"'):
        require_gradio()


def _browser_or_skip() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    message = "the browser test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.mark.slow
def test_the_page_in_headless_chromium(served, examples, tmp_path):
    """Open the page, upload images in both tabs, wait for results, check the score shown, save a screenshot."""
    from selenium import webdriver  # in the dev extra
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_path = _browser_or_skip()
    _, detector, url = served
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(argument)
    options.binary_location = chromium
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 120)

        def tab(name):
            return wait.until(
                lambda d: next((b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if name in b.text), None)
            )

        def button(text):
            return next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip() == text)

        # Batch tab: two images, the table fills with both names and scores.
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type=file]"))
        upload.send_keys("\n".join(examples[:2]))
        time.sleep(1.0)
        button("Detect").click()
        wait.until(lambda d: "Scored 2 of 2" in d.find_element(By.ID, "status").text)
        table_text = browser.find_element(By.ID, "results").text
        first = detector(examples[0])["score"]
        assert Path(examples[0]).name in table_text and f"{first:.4f}"[:5] in table_text
        browser.save_screenshot(str(tmp_path / "batch.png"))
        screenshot = os.environ.get("VISUALAD_APP_SCREENSHOT")
        if screenshot:
            browser.save_screenshot(screenshot)

        # Single-image tab: the score field shows the pipeline's score.
        tab("Single image").click()
        single = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#single-image input[type=file]"))
        single.send_keys(examples[1])
        time.sleep(1.0)
        button("Detect this image").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#verdict textarea").get_attribute("value"))
        shown = browser.find_element(By.CSS_SELECTOR, "#score input").get_attribute("value")
        assert float(shown) == pytest.approx(detector(examples[1])["score"], abs=1e-9)
        browser.save_screenshot(str(tmp_path / "single.png"))
        assert (tmp_path / "batch.png").stat().st_size > 10_000
    finally:
        browser.quit()
