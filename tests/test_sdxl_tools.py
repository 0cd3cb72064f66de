"""SDXL everywhere else (issue 29): ``p2p`` and the web page pick the XL pipeline from an SDXL
folder's own ``model_index.json``, every image records the model family, ``--from`` reruns an SDXL
image with it, and inversion on SDXL is a one-line usage error before any work."""

import json

import numpy as np
import PIL.Image
import pytest

from prompt2prompt import Prompt2PromptPipeline, Prompt2PromptXLPipeline, cli, load_pipeline, model_family, pipeline_class_for
from prompt2prompt.arguments import ArgumentError
from prompt2prompt.cli import main

SRC = "a cat riding a bicycle"
TGT = "a dog riding a bicycle"
STEPS = ["--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def xl_folder(tiny_xl, tmp_path_factory):
    """The tiny SDXL model saved with save_pretrained (safetensors)."""
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-xl"
    StableDiffusionXLPipeline(**tiny_xl, add_watermarker=False).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sd_folder(tiny_sd1, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    StableDiffusionPipeline(**tiny_sd1, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(
        folder, safe_serialization=True)
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def stored(png) -> dict:
    from prompt2prompt.imageio import read_png_metadata

    return read_png_metadata(png)


def pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# --------------------------------------------------------------------------- the library chooses


def test_family_comes_from_the_folders_own_index(xl_folder, sd_folder, tmp_path):
    assert model_family(xl_folder) == "sdxl" and pipeline_class_for(xl_folder) is Prompt2PromptXLPipeline
    assert model_family(sd_folder) == "sd" and pipeline_class_for(sd_folder) is Prompt2PromptPipeline
    assert model_family(None) == "sd" and model_family("stabilityai/stable-diffusion-xl-base-1.0") == "sd"  # a hub id: today's behaviour
    renamed = tmp_path / "sdxl-looking-name"  # the name says nothing: only the index counts
    renamed.mkdir()
    (renamed / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    assert model_family(renamed) == "sd"
    (renamed / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline", "text_encoder_2": ["transformers", "X"]}))
    assert model_family(renamed) == "sdxl"
    (renamed / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    assert model_family(renamed) == "sdxl"


def test_load_pipeline_picks_the_class_and_sd_refuses_an_sdxl_folder(xl_folder, sd_folder):
    pipe = load_pipeline(xl_folder)
    assert type(pipe) is Prompt2PromptXLPipeline and pipe.model_family == "sdxl"
    assert type(load_pipeline(sd_folder)) is Prompt2PromptPipeline
    with pytest.raises(ArgumentError, match="SDXL model.*load_pipeline") as info:
        Prompt2PromptPipeline.from_pretrained(xl_folder)
    assert info.value.argument == "model"


def test_invert_on_sdxl_is_an_argument_error_about_the_image(xl_folder):
    from prompt2prompt.loading import check_supported

    with pytest.raises(ArgumentError, match="not yet available for SDXL") as info:
        check_supported(xl_folder, "photo.png")
    assert info.value.argument == "image" and isinstance(info.value, NotImplementedError)
    check_supported(xl_folder, None)  # generating and editing are fine


# --------------------------------------------------------------------------- p2p


def test_generate_and_edit_record_the_family(capsys, xl_folder, tmp_path):
    code, out, err = run(capsys, "generate", SRC, "--model", xl_folder, *STEPS, "-o", tmp_path / "gen")
    assert code == 0, err
    assert stored(tmp_path / "gen" / "image.png")["model_family"] == "sdxl"
    assert json.loads((tmp_path / "gen" / "result.json").read_text())["model_family"] == "sdxl"
    assert pixels(tmp_path / "gen" / "image.png").shape == (32, 32, 3)

    code, out, err = run(capsys, "edit", SRC, "--to", TGT, "--model", xl_folder, *STEPS, "-o", tmp_path / "edit")
    assert code == 0, err
    for name in ("source.png", "edit-1.png", "grid.png"):
        assert stored(tmp_path / "edit" / name)["model_family"] == "sdxl", name
    assert json.loads((tmp_path / "edit" / "result.json").read_text())["model_family"] == "sdxl"

    code, out, err = run(capsys, "info", tmp_path / "edit" / "edit-1.png")
    assert code == 0 and f"model: {xl_folder} (sdxl), float32 on cpu" in out


def test_sd_images_record_sd(capsys, sd_folder, tmp_path):
    code, out, err = run(capsys, "generate", SRC, "--model", sd_folder, *STEPS, "-o", tmp_path / "gen")
    assert code == 0, err
    assert stored(tmp_path / "gen" / "image.png")["model_family"] == "sd"
    code, out, _ = run(capsys, "info", tmp_path / "gen" / "image.png")
    assert "(sd), float32 on cpu" in out


def test_from_reruns_an_sdxl_image_to_the_same_pixels(capsys, xl_folder, tmp_path):
    code, _, err = run(capsys, "edit", SRC, "--to", TGT, "--model", xl_folder, *STEPS, "--seed", "5", "-o", tmp_path / "a")
    assert code == 0, err
    code, _, err = run(capsys, "edit", "--from", tmp_path / "a" / "edit-1.png", "--device", "cpu", "-o", tmp_path / "b")
    assert code == 0 and "warning" not in err, err
    assert stored(tmp_path / "b" / "edit-1.png")["model_family"] == "sdxl"
    for name in ("source.png", "edit-1.png"):
        np.testing.assert_array_equal(pixels(tmp_path / "a" / name), pixels(tmp_path / "b" / name))


def test_from_warns_when_the_stored_family_differs(capsys, xl_folder, sd_folder, tmp_path):
    code, _, err = run(capsys, "edit", SRC, "--to", TGT, "--model", xl_folder, *STEPS, "-o", tmp_path / "a")
    assert code == 0, err
    code, _, err = run(capsys, "edit", "--from", tmp_path / "a" / "edit-1.png", "--model", sd_folder, "--device", "cpu",
                       "-o", tmp_path / "b")
    assert code == 0 and "made with an SDXL model" in err and "is SD" in err, err


def test_image_with_sdxl_is_one_line_exit_2_before_any_work(capsys, xl_folder, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the usage error was found")

    monkeypatch.setattr(cli, "load_pipeline", refuse)
    photo = tmp_path / "photo.png"
    PIL.Image.new("RGB", (32, 32), (200, 30, 30)).save(photo)
    code, out, err = run(capsys, "edit", SRC, "--to", TGT, "--model", xl_folder, "--image", photo, *STEPS, "-o", tmp_path / "out")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("p2p edit: error: --image: ") and "not yet available for SDXL" in err
    assert not (tmp_path / "out").exists()


def test_batch_fails_an_sdxl_photo_line_before_any_work_and_runs_the_others(capsys, xl_folder, tmp_path):
    photo = tmp_path / "photo.png"
    PIL.Image.new("RGB", (32, 32)).save(photo)
    lines = [{"prompt": SRC, "to": [TGT], "image": str(photo)}, {"prompt": SRC, "to": [TGT], "seed": 2}]
    jsonl = tmp_path / "edits.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code, out, err = run(capsys, "batch", jsonl, "--model", xl_folder, *STEPS, "-o", tmp_path / "runs")
    assert code == 1 and "line 1: --image: inversion" in err and "1 done" in out and "1 failed" in out
    (done,) = (tmp_path / "runs").glob("line-2-*")
    assert stored(done / "edit-1.png")["model_family"] == "sdxl"
    assert not list((tmp_path / "runs").glob("line-1-*"))


# --------------------------------------------------------------------------- the web page


def test_web_editor_edits_with_an_sdxl_folder(xl_folder, tmp_path, monkeypatch):
    from prompt2prompt import web

    pipe = load_pipeline(xl_folder)
    pipe.set_progress_bar_config(disable=True)
    editor = web.Editor(pipe, tmp_path / "out", model=str(xl_folder))
    req = web.parse_request(SRC, TGT, "auto", 0.8, 0.4, "", "", 0.3, [["", ""]], 3, 2, 7.5, None, "null-text")
    files, heat = editor.run(req)
    assert len(files) == 2 and heat
    meta = stored(files[1])
    assert meta["model_family"] == "sdxl" and meta["model"] == str(xl_folder) and meta["source"] == "p2p serve"

    photo = tmp_path / "photo.png"
    PIL.Image.new("RGB", (32, 32)).save(photo)
    req = web.parse_request(SRC, TGT, "auto", 0.8, 0.4, "", "", 0.3, [["", ""]], 3, 2, 7.5, str(photo), "null-text")
    with pytest.raises(ArgumentError, match="not yet available for SDXL") as info:
        editor.run(req)
    assert web.field_of(info.value) == "image"


def test_serve_loads_an_sdxl_folder_with_the_xl_pipeline(xl_folder, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from prompt2prompt import web

    made = {}

    def fake_build_app(editor):
        made["pipe"] = editor.pipe

        class Demo:
            def queue(self, **kwargs):
                pass

            def launch(self, **kwargs):
                pass

        return Demo()

    monkeypatch.setattr(web, "build_app", fake_build_app)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    web.serve(model=str(xl_folder), device="cpu", output_dir=tmp_path / "web", block=False)
    assert type(made["pipe"]) is Prompt2PromptXLPipeline
