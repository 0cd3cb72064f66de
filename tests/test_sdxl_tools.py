"""SDXL everywhere else (issue 29): ``p2p`` and the web page pick the XL pipeline from an SDXL
folder's own ``model_index.json``, every image records the model family, ``--from`` reruns an SDXL
image with it, and a photo is inverted and edited on SDXL as on Stable Diffusion."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from prompt2prompt import Prompt2PromptPipeline, Prompt2PromptXLPipeline, load_pipeline, model_family, pipeline_class_for
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


def test_edit_of_a_photo_with_an_sdxl_folder_inverts_and_edits(capsys, xl_folder, tmp_path):
    photo = tmp_path / "photo.png"
    PIL.Image.new("RGB", (32, 32), (200, 30, 30)).save(photo)
    code, out, err = run(capsys, "edit", SRC, "--to", TGT, "--model", xl_folder, "--image", photo, "--invert", "direct", *STEPS,
                         "-o", tmp_path / "out")
    assert code == 0, err
    meta = stored(tmp_path / "out" / "edit-1.png")
    assert meta["model_family"] == "sdxl" and meta["options"]["invert"] == "direct"
    source, edit = pixels(tmp_path / "out" / "source.png"), pixels(tmp_path / "out" / "edit-1.png")
    assert source.shape == edit.shape == (32, 32, 3) and not np.array_equal(source, edit)
    # direct inversion: the source row is the photo's own latent, decoded
    pipe = load_pipeline(xl_folder)
    latent = pipe._encode_image(np.array(PIL.Image.open(photo).convert("RGB")), "cpu")  # (1, C, h, w)
    with torch.no_grad():
        decoded = pipe.image_processor.postprocess(pipe.decode_latents(latent), output_type="np")[0]  # (32, 32, 3) in [0, 1]
    assert np.abs(source.astype(float) - decoded * 255).max() <= 1.0


def test_batch_runs_an_sdxl_photo_line(capsys, xl_folder, tmp_path):
    photo = tmp_path / "photo.png"
    PIL.Image.new("RGB", (32, 32)).save(photo)
    lines = [{"prompt": SRC, "to": [TGT], "image": str(photo), "invert": "ddim"}, {"prompt": SRC, "to": [TGT], "seed": 2}]
    jsonl = tmp_path / "edits.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code, out, err = run(capsys, "batch", jsonl, "--model", xl_folder, *STEPS, "-o", tmp_path / "runs")
    assert code == 0 and "2 done" in out, err
    for number in (1, 2):
        (done,) = (tmp_path / "runs").glob(f"line-{number}-*")
        assert stored(done / "edit-1.png")["model_family"] == "sdxl"


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
    req = web.parse_request(SRC, TGT, "auto", 0.8, 0.4, "", "", 0.3, [["", ""]], 3, 2, 7.5, str(photo), "negative-prompt")
    files, _ = editor.run(req)
    assert len(files) == 2 and stored(files[0])["model_family"] == "sdxl"
    assert len(editor._inversions) == 1 and next(iter(editor._inversions.values())).family == "sdxl"


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
