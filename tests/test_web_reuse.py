"""Issue 30 on the web page: it keeps each visitor's last source pass and re-edits from it while
only target-side settings change (driven through the page's handler, as tests/test_web.py does;
UNet rows counted with a forward pre-hook). The bundled shapes model, 2 steps."""

from __future__ import annotations

import contextlib

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("gradio")

STEPS = 2
ROWS = 2  # a prompt's conditional and unconditional rows per step


@pytest.fixture(scope="module")
def pipe():
    from prompt2prompt.pipeline import Prompt2PromptPipeline

    p = Prompt2PromptPipeline.from_pretrained()
    p.set_progress_bar_config(disable=True)
    return p


@contextlib.contextmanager
def counting_rows(pipe):
    rows: list[int] = []

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        rows.append(int(sample.shape[0]))

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def page(editor):
    from prompt2prompt.web import build_app

    demo = build_app(editor)
    (handler,) = [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_run"]
    return handler


class Visitor:
    """One browser session: the page's history and kept-pass states carried from click to click."""

    def __init__(self, handler):
        self.handler, self.history, self.kept = handler, [], None

    def click(self, **over):
        from prompt2prompt.web import FIELDS

        values = dict(prompt="a big red circle on a blue background", targets="a big red square on a blue background", mode="auto",
                      cross=0.8, self_steps=0.4, blend_source="", blend_target="", blend_threshold=0.3, reweight_rows=[["", ""]],
                      seed=0, steps=STEPS, guidance=7.5, image=None, inversion_method="null-text", blend_res=0)
        values.update(over)
        outputs = self.handler(*values.values(), list(self.history), self.kept)
        results, _, files, _, self.history, status, self.kept, *slots = outputs
        errors = {name: u["value"] for name, u in zip(FIELDS, slots) if isinstance(u, dict) and u.get("visible")}
        return files, status, errors


def pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_page_re_edits_from_the_kept_source_pass(tmp_path, pipe):
    from prompt2prompt.web import Editor, KeptSource

    visitor = Visitor(page(Editor(pipe, tmp_path / "out")))
    with counting_rows(pipe) as rows:
        files, status, errors = visitor.click()
        assert errors == {} and status.startswith("full edit in ") and "source pass kept" in status
        assert isinstance(visitor.kept, KeptSource) and visitor.kept.nbytes > 0
        full = sum(rows)
        assert full == STEPS * ROWS * 2 and len(rows) == STEPS  # one batch: the source and the target, its pass kept
        rows.clear()
        # only target-side settings change: a new target, a narrower window, re-weighting, a blend
        for over in (dict(targets="a big red star on a blue background"), dict(cross=0.4, self_steps=0.2),
                     dict(reweight_rows=[["square", "2"]]), dict(blend_source="circle", blend_target="square")):
            files_reused, status, errors = visitor.click(**over)
            assert errors == {} and status.startswith("source reused") and " s" in status, (over, status)
            assert sum(rows) * 2 == full, over
            rows.clear()
    # the reused edit gives the full edit's images
    fresh = Visitor(page(Editor(pipe, tmp_path / "fresh")))
    files_full, status, _ = fresh.click(blend_source="circle", blend_target="square")
    assert status.startswith("full edit")
    for a, b in zip(files_reused, files_full):
        assert np.abs(pixels(a) - pixels(b)).max() <= 2


@pytest.mark.parametrize("over", [dict(seed=1), dict(steps=STEPS + 1), dict(prompt="a big red circle on a green background"),
                                  dict(guidance=5.0), dict(cross=1.0)])
def test_page_runs_in_full_when_the_source_side_changes_or_the_budget_is_short(tmp_path, pipe, over):
    from prompt2prompt.web import Editor

    visitor = Visitor(page(Editor(pipe, tmp_path / "out")))
    visitor.click()
    first = visitor.kept
    with counting_rows(pipe) as rows:
        files, status, errors = visitor.click(**over)
    assert errors == {} and status.startswith("full edit"), status
    steps = over.get("steps", STEPS)
    assert sum(rows) == steps * ROWS * 2 and len(rows) == steps  # one batch
    assert visitor.kept is not first  # the new pass is kept
    with counting_rows(pipe) as rows:  # and the next edit reuses it
        _, status, _ = visitor.click(**{**over, "targets": "a big red star on a blue background"})
    assert status.startswith("source reused") and sum(rows) == steps * ROWS


def test_page_keeps_no_pass_over_its_limit_and_errors_keep_the_pass(tmp_path, pipe):
    from prompt2prompt.web import Editor

    visitor = Visitor(page(Editor(pipe, tmp_path / "out", source_limit_bytes=1)))
    _, status, _ = visitor.click()
    assert visitor.kept is None and "not kept" in status and "limit" in status
    visitor = Visitor(page(Editor(pipe, tmp_path / "out2")))
    visitor.click()
    kept = visitor.kept
    files, status, errors = visitor.click(reweight_rows=[["banana", "2"]])  # beside its field; the pass stays
    assert list(errors) == ["reweight"] and visitor.kept is kept


def test_the_bundled_models_pass_fits_the_default_limit(tmp_path, pipe):
    """At the page's default settings (50 steps), so the README's and docs/web.md's claim holds."""
    from prompt2prompt.web import MIB, SOURCE_LIMIT_MIB

    source = pipe.source("a big red circle on a blue background", num_inference_steps=50, cross_replace_steps=0.8, self_replace_steps=0.4)
    assert 0 < source.nbytes <= SOURCE_LIMIT_MIB * MIB


def test_page_re_edits_a_photo_from_its_kept_pass(tmp_path, pipe):
    from prompt2prompt.web import Editor

    photo = tmp_path / "photo.png"
    PIL.Image.new("RGB", (64, 64), (40, 80, 220)).save(photo)
    visitor = Visitor(page(Editor(pipe, tmp_path / "out")))
    with counting_rows(pipe) as rows:
        _, status, errors = visitor.click(image=str(photo), inversion_method="ddim")
        assert errors == {} and status.startswith("full edit") and visitor.kept.inversion is not None
        rows.clear()
        _, status, errors = visitor.click(image=str(photo), inversion_method="ddim", targets="a big red star on a blue background")
        assert errors == {} and status.startswith("source reused") and sum(rows) == STEPS * ROWS  # no inversion, no source


def test_all_visitors_kept_passes_together_are_bounded(pipe, tmp_path):
    """Every API caller is a session of its own, each keeping a pass: the `Editor` lets the least
    recently used go once all together are over ``kept_total_bytes``, and that visitor's next edit
    runs in full while the others' still reuse theirs."""
    from prompt2prompt.web import Editor, parse_request

    def request(seed, target="a big red square on a blue background"):
        return parse_request("a big red circle on a blue background", target, "auto", 0.8, 0.4, "", "", 0.3, [], seed, 2, 7.5,
                             None, "null-text")

    editor = Editor(pipe, tmp_path / "out")
    a = editor.edit(request(1)).kept
    editor.kept_total_bytes = int(2.5 * a.nbytes)  # room for two passes
    b = editor.edit(request(2)).kept
    c = editor.edit(request(3)).kept
    assert a.source is None and b.source is not None and c.source is not None  # A's, the oldest, was let go
    again = editor.edit(request(1, "a big red circle on a green background"), a)
    assert not again.reused and again.kept.source is not None and b.source is None  # A runs in full; now B's goes
    assert editor.edit(request(3, "a big red circle on a green background"), c).reused  # C still reuses its own
