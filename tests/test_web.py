"""The web page end to end: a real server on a loopback port, driven by headless Chromium.

Needs the `web` extra (gradio, selenium) and Debian's `chromium` + `chromium-driver`; `.ci/run`
installs them. The test installs nothing itself.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prompt2prompt.web import FieldError, field_of, parse_request

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- pure parts


def test_field_of_maps_library_messages_to_fields():
    assert field_of("equalizer names 'dog', which is in none of the prompts") == "reweight"
    assert field_of("LocalBlend source word 'dog' is not in the prompt") == "blend"
    assert field_of("cross_replace_steps fraction 1.5 is outside [0, 1]") == "cross"
    assert field_of("word swap (edit='replace') needs prompts with the same number of words") == "mode"
    assert field_of("num_inference_steps must be a positive integer") == "sampling"
    assert field_of("image file 'x.png' is empty") == "image"
    assert field_of("prompt: the prompt is 82 tokens long") == "prompt"
    assert field_of("something else entirely") == "general"


def base(**over):
    values = dict(prompt="a red circle", targets="a red square\n\n a blue circle ", mode="auto", cross=0.8, self_steps=0.4,
                  blend_source="", blend_target="", blend_threshold=0.3, reweight_rows=[["", ""]], seed=3, steps=5,
                  guidance=7.5, image=None, inversion_method="null-text")
    values.update(over)
    return parse_request(**values)


def test_parse_request():
    req = base(reweight_rows=[["square", "2"], ["", ""]], blend_source="circle", blend_target="square, blue")
    assert req.edit_prompts == ["a red square", "a blue circle"] and req.equalizer == {"square": 2.0}
    kwargs = req.pipeline_kwargs()
    assert kwargs["local_blend"].target_words == ("square", "blue") if hasattr(kwargs["local_blend"], "target_words") else True
    assert kwargs["equalizer"] == {"square": 2.0} and kwargs["num_inference_steps"] == 5


@pytest.mark.parametrize(
    "over, field",
    [
        (dict(prompt="  "), "prompt"),
        (dict(targets="\n"), "edit_prompts"),
        (dict(blend_source="circle"), "blend"),
        (dict(reweight_rows=[["square", "lots"]]), "reweight"),
        (dict(reweight_rows=[["", "2"]]), "reweight"),
        (dict(seed=-1), "sampling"),
    ],
)
def test_parse_request_errors_name_their_field(over, field):
    with pytest.raises(FieldError) as info:
        base(**over)
    assert info.value.field == field


# --------------------------------------------------------------------------- the page in a browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("gradio")
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=options)
    b.set_page_load_timeout(60)
    yield b
    b.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio")
    out = tmp_path_factory.mktemp("web-out")
    port = _free_port()
    code = f"from prompt2prompt.web import serve; serve(port={port}, output_dir={str(out)!r})"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read()}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not start within 120 s")
    yield f"http://127.0.0.1:{port}", out, port
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _set(browser, elem_id, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    if text:
        box.send_keys(text)
    box.send_keys(Keys.TAB)


def _wait(browser, condition, timeout=180):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, timeout, poll_frequency=0.5, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(lambda b: condition(b))


def _visible_errors(browser):
    from selenium.webdriver.common.by import By

    texts = [e.text.strip() for e in browser.find_elements(By.CSS_SELECTOR, ".field-error") if e.is_displayed() and e.text.strip()]
    return sorted(set(texts))  # the class may sit on nested elements of one slot


def test_server_binds_loopback_only(server):
    _, _, port = server
    hosts = [a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    for host in hosts:
        if host.startswith("127."):
            continue
        with pytest.raises(OSError):
            socket.create_connection((host, port), timeout=1).close()


def test_edit_in_the_browser(server, browser):
    from selenium.webdriver.common.by import By

    url, out, _ = server
    browser.get(url)
    _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#run"), 60)
    _set(browser, "prompt", "a big red circle on a blue background")
    _set(browser, "targets", "a big red square on a blue background")
    from selenium.webdriver.common.keys import Keys

    steps_box = browser.find_element(By.CSS_SELECTOR, "#steps input[type=number]")
    steps_box.click()
    steps_box.send_keys(Keys.CONTROL, "a")
    steps = os.environ.get("P2P_WEB_STEPS", "3")
    steps_box.send_keys(steps, Keys.TAB)  # typing over the selection: 50 -> 3
    _wait(browser, lambda b: steps_box.get_attribute("value") == steps, 10)
    browser.find_element(By.CSS_SELECTOR, "#run").click()

    def results_ready(b):
        imgs = b.find_elements(By.CSS_SELECTOR, "#results img")
        sizes = [b.execute_script("return [arguments[0].complete, arguments[0].naturalWidth, arguments[0].naturalHeight]", i) for i in imgs]
        return sizes if len(sizes) >= 2 and all(s[0] and s[1] > 0 for s in sizes) else False

    sizes = _wait(browser, results_ready)
    assert all(w == 64 and h == 64 for _, w, h in sizes[:2]), sizes
    assert not _visible_errors(browser)
    pngs = [p for p in sorted(out.rglob("*.png")) if ".gradio" not in p.parts and "rerun" not in p.parts]
    assert len(pngs) == 2
    from prompt2prompt.imageio import read_png_metadata

    meta = read_png_metadata(next(p for p in pngs if p.name == "edit-1.png"))
    assert meta["options"]["prompt"] == "a big red circle on a blue background" and meta["options"]["steps"] == int(steps)
    assert meta["options"]["to"] == ["a big red square on a blue background"] and meta["source"] == "p2p serve"
    # the command line reads it and makes the same image again
    from prompt2prompt.cli import main

    rerun = out / "rerun"
    assert main(["edit", "--from", str(next(p for p in pngs if p.name == "edit-1.png")), "-o", str(rerun), "--quiet"]) == 0
    import numpy as np
    from PIL import Image

    with Image.open(rerun / "edit-1.png") as a, Image.open(next(p for p in pngs if p.name == "edit-1.png")) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))

    # the attention view: one heat map per word of each prompt
    browser.find_element(By.CSS_SELECTOR, "#attention-accordion button").click()
    heat = _wait(browser, lambda b: [i for i in b.find_elements(By.CSS_SELECTOR, "#attention img") if i.is_displayed()] or False, 60)
    assert len(heat) >= 8

    shot = Path(os.environ.get("P2P_WEB_SCREENSHOT") or out / "page.png")  # docs/web.png: P2P_WEB_SCREENSHOT=docs/web.png
    assert browser.save_screenshot(str(shot.with_name(shot.name + ".tmp.png")))
    os.replace(shot.with_name(shot.name + ".tmp.png"), shot)

    # a validation error from the library appears beside its field, not as a stack trace
    _set(browser, "blend-source", "dog")
    _set(browser, "blend-target", "square")
    browser.find_element(By.CSS_SELECTOR, "#run").click()
    errors = _wait(browser, lambda b: _visible_errors(b) or False, 60)
    assert len(errors) == 1 and "dog" in errors[0] and "Traceback" not in browser.page_source
    slot = browser.find_elements(By.CSS_SELECTOR, ".field-error")
    shown = [e for e in slot if e.is_displayed() and e.text.strip()][0]
    threshold = browser.find_element(By.CSS_SELECTOR, "#blend-threshold")
    assert 0 <= shown.location["y"] - threshold.location["y"] < 200  # directly under the blend fields

    # a page-level validation error (no target prompt) also sits beside its field
    _set(browser, "blend-source", "")
    _set(browser, "blend-target", "")
    _set(browser, "targets", "")
    browser.find_element(By.CSS_SELECTOR, "#run").click()
    errors = _wait(browser, lambda b: [e for e in _visible_errors(b) if "target prompt" in e] or False, 60)
    assert errors
