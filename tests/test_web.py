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

import PIL.Image
import pytest

from prompt2prompt.arguments import ArgumentError
from prompt2prompt.web import FieldError, field_of, parse_request

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- pure parts


def test_field_of_maps_arguments_to_fields():
    """The field comes from the error's argument (`arguments.ARGUMENTS`), whatever its message says."""
    fields = {
        "equalizer": "reweight", "local_blend": "blend", "local_blend.threshold": "blend", "local_blend.resolution": "blend",
        "cross_replace_steps": "cross", "self_replace_steps": "self", "edit": "mode", "num_inference_steps": "sampling",
        "guidance_scale": "sampling", "generator": "sampling", "image": "image", "method": "image", "inversion": "image",
        "prompt": "prompt", "edit_prompts": "edit_prompts",
    }
    for argument, name in fields.items():
        assert field_of(ArgumentError(argument, "something else entirely")) == name, argument
    assert field_of(ValueError("something else entirely")) == "general"


def test_field_of_never_reads_the_message():
    # the message quotes the user's prompt: words in it must not pick the field
    long = "prompt: the prompt 'a seed of a plant' is 82 tokens long but the text encoder takes at most 77"
    assert field_of(ArgumentError("prompt", long)) == "prompt"
    assert field_of(ArgumentError("edit_prompts", "edit_prompts[0]: the prompt 'a blend of equalizer image' is 82 tokens long")) == "edit_prompts"
    assert field_of(ValueError("equalizer names 'dog', which is in none of the prompts")) == "general"
    assert field_of(ValueError("the model says: seed, blend, image and prompt")) == "general"


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
    assert req.blend_res is None and kwargs["local_blend"].resolution is None  # no map side given: the library's default
    for given in (8, 8.0, " 8 "):
        req = base(blend_source="circle", blend_target="square, blue", blend_res=given)
        assert req.blend_res == 8 and req.pipeline_kwargs()["local_blend"].resolution == 8
        assert req.options(None)["blend_res"] == 8  # what the saved PNGs carry and --from reruns
    assert base(blend_res="").blend_res is None and base(blend_res=0).blend_res is None  # the page's 0: the default


@pytest.mark.parametrize(
    "over, field",
    [
        (dict(prompt="  "), "prompt"),
        (dict(targets="\n"), "edit_prompts"),
        (dict(blend_source="circle"), "blend"),
        (dict(reweight_rows=[["square", "lots"]]), "reweight"),
        (dict(reweight_rows=[["", "2"]]), "reweight"),
        (dict(seed=-1), "sampling"),
        (dict(blend_source="circle", blend_target="square", blend_res=2.5), "blend"),
        (dict(blend_source="circle", blend_target="square", blend_res="eight"), "blend"),
        (dict(blend_source="circle", blend_target="square", blend_res=-4), "blend"),
    ],
)
def test_parse_request_errors_name_their_field(over, field):
    with pytest.raises(FieldError) as info:
        base(**over)
    assert info.value.field == field


@pytest.mark.parametrize(
    "over, field",
    [
        (dict(seed=2**63), "sampling"),
        (dict(seed=2**64), "sampling"),
        (dict(seed=float("inf")), "sampling"),
        (dict(seed=1.5), "sampling"),
        (dict(steps=0), "sampling"),
        (dict(cross=None), "cross"),
        (dict(cross="lots"), "cross"),
        (dict(self_steps=None), "self"),
        (dict(blend_threshold=None), "blend"),
        (dict(blend_threshold=float("nan")), "blend"),
        (dict(guidance=None), "sampling"),
        (dict(steps=None), "sampling"),
        (dict(seed=None), "sampling"),
        (dict(reweight_rows=[["square", float("inf")]]), "reweight"),
        (dict(reweight_rows=5), "reweight"),
        (dict(prompt=5), "prompt"),
        (dict(targets=["a red square"]), "edit_prompts"),
        (dict(blend_source=5, blend_target="square"), "blend"),
        (dict(image="/nonexistent.png"), "image"),
    ],
)
def test_parse_request_catches_what_used_to_escape(over, field):
    """Out-of-range seeds and None/non-numbers through the API are messages beside their field."""
    with pytest.raises(FieldError) as info:
        base(**over)
    assert info.value.field == field and str(info.value)


def test_parse_request_accepts_the_largest_seed():
    assert base(seed=2**63 - 1).seed == 2**63 - 1 and base(seed=7.0).seed == 7


def test_blend_words_are_comma_separated_phrases():
    req = base(prompt="a pencil sketch of a cat", targets="an oil painting of a red cat", blend_source=" pencil sketch ",
               blend_target="oil painting,  red ,")
    assert req.blend_source == ["pencil sketch"] and req.blend_target == ["oil painting", "red"]
    assert req.pipeline_kwargs()["local_blend"].target_words == ("oil painting", "red")
    assert req.options(None)["blend"] == [["pencil sketch"], ["oil painting", "red"]]


def test_options_errors_are_field_errors():
    """`EditRequest.options` (the command line's checks) names the page's field, never raises UsageError."""
    req = base()
    req.seed = 2**63
    with pytest.raises(FieldError) as info:
        req.options(None)
    assert info.value.field == "sampling" and "Seed" in str(info.value)
    req = base()
    req.cross_replace_steps = 1.5
    with pytest.raises(FieldError) as info:
        req.options(None)
    assert info.value.field == "cross"


# --------------------------------------------------------------------------- the page's handler, no server


class NoWork:
    """A pipeline stand-in that fails the test if any model work starts."""

    device = "cpu"

    def __call__(self, *args, **kwargs):
        raise AssertionError("the pipeline ran before the input was checked")

    def invert(self, *args, **kwargs):
        raise AssertionError("the inversion ran before the input was checked")


@pytest.fixture(scope="module")
def pipe():
    from prompt2prompt.pipeline import Prompt2PromptPipeline

    return Prompt2PromptPipeline.from_pretrained()


def page(editor):
    """The Edit button's handler of the page built for ``editor`` (what a click or an API call runs)."""
    pytest.importorskip("gradio")
    from prompt2prompt.web import build_app

    demo = build_app(editor)
    (handler,) = [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_run"]
    return demo, handler


def click(handler, history=(), **over):
    values = dict(prompt="a big red circle on a blue background", targets="a big red square on a blue background", mode="auto",
                  cross=0.8, self_steps=0.4, blend_source="", blend_target="", blend_threshold=0.3, reweight_rows=[["", ""]],
                  seed=0, steps=2, guidance=7.5, image=None, inversion_method="null-text", blend_res=0)
    values.update(over)
    return handler(*values.values(), list(history), None)  # no kept source pass (tests/test_web_reuse.py keeps one)


def shown(outputs) -> dict:
    """The error slots the handler made visible: field -> message."""
    from prompt2prompt.web import FIELDS

    slots = outputs[-len(FIELDS):]
    return {name: u["value"] for name, u in zip(FIELDS, slots) if isinstance(u, dict) and u.get("visible")}


def folders(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name != ".gradio"] if out.exists() else []


def has_parameters(path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        return im.format == "PNG" and "prompt2prompt" in im.text and "parameters" in im.text


def test_editor_checks_the_options_before_any_work(tmp_path):
    from prompt2prompt.web import Editor

    req = base()
    req.seed = 2**63  # past parse_request: the command line's own check (cli.normalise_options) still stops it
    with pytest.raises(FieldError) as info:
        Editor(NoWork(), tmp_path / "out").run(req)
    assert info.value.field == "sampling" and folders(tmp_path / "out") == []


@pytest.mark.parametrize("over, field", [
    (dict(blend_source="triangle", blend_target="square"), "blend"),
    (dict(reweight_rows=[["banana", "2"]]), "reweight"),
])
def test_page_checks_words_before_a_photo_is_inverted(tmp_path, over, field):
    """A word that is not in the prompts is reported beside its field before the (slow) inversion."""
    from prompt2prompt.web import Editor

    photo = tmp_path / "photo.png"
    PIL.Image.new("RGB", (16, 16), (200, 30, 30)).save(photo)
    _, handler = page(Editor(NoWork(), tmp_path / "out"))
    shown_errors = shown(click(handler, image=str(photo), **over))
    assert list(shown_errors) == [field] and folders(tmp_path / "out") == []


@pytest.mark.parametrize("seed", [2**63, 2**64, -1])
def test_page_rejects_a_seed_out_of_range_beside_the_seed(tmp_path, seed):
    from prompt2prompt.web import Editor

    _, handler = page(Editor(NoWork(), tmp_path / "out"))
    errors = shown(click(handler, seed=seed))
    assert list(errors) == ["sampling"] and "seed" in errors["sampling"].lower()
    assert folders(tmp_path / "out") == []


@pytest.mark.parametrize("over", [dict(cross=None), dict(guidance=None), dict(blend_threshold=None), dict(image="/nonexistent.png")])
def test_page_api_values_that_used_to_escape(tmp_path, over):
    from prompt2prompt.web import Editor

    _, handler = page(Editor(NoWork(), tmp_path / "out"))
    errors = shown(click(handler, **over))
    assert len(errors) == 1 and "general" not in errors and folders(tmp_path / "out") == []


def test_page_photo_that_is_not_an_image(tmp_path):
    """A non-image upload reaches the image check (not Gradio's decoder) and is reported under the photo."""
    from gradio.data_classes import ImageData

    from prompt2prompt.web import Editor

    demo, handler = page(Editor(NoWork(), tmp_path / "out"))
    upload = tmp_path / "notes.png"
    upload.write_text("not a picture")
    photo = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "photo")
    path = photo.preprocess(ImageData(path=str(upload), orig_name="notes.png"))
    assert path == str(upload)
    errors = shown(click(handler, image=path))
    assert list(errors) == ["image"] and "notes.png" in errors["image"] and folders(tmp_path / "out") == []


@pytest.mark.parametrize("over, field", [
    (dict(prompt="a seed " * 20), "prompt"),  # too long, and says "seed"
    (dict(targets="a blend " * 20, blend_source="circle", blend_target="blend"), "edit_prompts"),  # too long, says "blend"
])
def test_page_routes_library_errors_by_their_argument(tmp_path, pipe, over, field):
    from prompt2prompt.web import Editor

    _, handler = page(Editor(pipe, tmp_path / "out"))
    errors = shown(click(handler, **over))
    assert list(errors) == [field] and "tokens long" in errors[field] and folders(tmp_path / "out") == []


def test_page_blend_map_side_the_model_lacks_is_shown_beside_the_blend_fields(tmp_path, pipe):
    from prompt2prompt.web import Editor

    _, handler = page(Editor(pipe, tmp_path / "out"))
    errors = shown(click(handler, blend_source="circle", blend_target="square", blend_res=5))
    assert list(errors) == ["blend"] and "LocalBlend resolution 5" in errors["blend"] and folders(tmp_path / "out") == []


def test_page_galleries_show_the_saved_pngs(tmp_path, pipe):
    """Every image the page shows is a saved PNG that carries its parameters, so the galleries'
    download buttons give the PNG with its parameters (not a re-encoded WebP without them)."""
    from prompt2prompt.web import Editor

    demo, handler = page(Editor(pipe, tmp_path / "out"))
    results, attention, files, past, history, *_ = outputs = click(handler)
    assert shown(outputs) == {}
    (folder,) = folders(tmp_path / "out")
    assert sorted(Path(f).name for f in files) == ["edit-1.png", "source.png"] and all(Path(f).parent == folder for f in files)
    assert [caption for _, caption in results] == ["source", "a big red square on a blue background"]
    assert [path for path, _ in results] == files
    assert past == history and [path for path, _ in past] == files[1:]
    assert len(attention) >= 8 and attention[0][1].startswith("source: ")
    for path, _ in [*results, *attention, *past]:
        assert isinstance(path, str) and Path(path).parent == folder and has_parameters(path), path
    from prompt2prompt.imageio import read_png_metadata

    meta = read_png_metadata(attention[0][0])
    assert meta["image"]["role"] == "cross-attention" and meta["options"]["prompt"] == "a big red circle on a blue background"
    # what Gradio serves (and its download button gives) is that file, byte for byte
    from gradio import processing_utils

    gallery = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "results")
    served = processing_utils.move_files_to_cache(gallery.postprocess(results), gallery, postprocess=True)
    served = served.model_dump() if hasattr(served, "model_dump") else served
    paths = [item["image"]["path"] for item in served]
    assert len(paths) == 2 and all(has_parameters(p) for p in paths)
    assert [Path(p).read_bytes() for p in paths] == [Path(f).read_bytes() for f in files]

    # the history keeps the earlier edits' files
    *_, past2, _ = click(handler, history=history, targets="a big red circle on a green background")[:5]
    assert len(past2) == 2 and past2[0] == past[0] and all(has_parameters(p) for p, _ in past2)


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


def start_server(args: list[str], port: int, wait_s: float = 120, log: Path | None = None) -> subprocess.Popen:
    """Run ``python ARGS`` (a server that listens on ``port``) and return its process once the port
    answers; the test fails if it exits or does not listen within ``wait_s``. Its output goes to
    ``log`` (a file: a long run fills no pipe) or a pipe. Stop it with `stop_server`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sink = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115 - the server's, closed when it exits
    proc = subprocess.Popen([sys.executable, *args], stdout=sink, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {log.read_text() if log is not None else proc.stdout.read()}")
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"server did not start within {wait_s:g} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio")
    out = tmp_path_factory.mktemp("web-out")
    port = _free_port()
    proc = start_server(["-c", f"from prompt2prompt.web import serve; serve(port={port}, output_dir={str(out)!r})"], port)
    yield f"http://127.0.0.1:{port}", out, port
    stop_server(proc)


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


def test_edit_in_the_browser(server, browser, tmp_path):
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
    written = [p for p in sorted(out.rglob("*.png")) if ".gradio" not in p.parts and "rerun" not in p.parts]
    pngs = [p for p in written if not p.name.startswith("attention-")]
    assert len(pngs) == 2 and len(written) - len(pngs) >= 8 and all(has_parameters(p) for p in written)
    # the page shows those PNGs (not WebP copies without the parameters)
    assert all(i.get_attribute("src").endswith(".png") for i in browser.find_elements(By.CSS_SELECTOR, "#results img"))
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

    # a file that is not a picture, uploaded as the photo, is reported under the photo (not by Gradio's decoder)
    _set(browser, "targets", "a big red square on a blue background")
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    browser.find_element(By.CSS_SELECTOR, "#photo-accordion button").click()
    upload = _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#photo input[type=file]") or False, 30)[0]
    upload.send_keys(str(notes))
    time.sleep(2)  # the upload finishes before the click sends its path
    browser.find_element(By.CSS_SELECTOR, "#run").click()
    errors = _wait(browser, lambda b: [e for e in _visible_errors(b) if "not an image" in e] or False, 60)
    assert "notes" in errors[0] and "Traceback" not in browser.page_source
