"""A missing or damaged file of a model folder is named before anything loads: the library raises a
`ValueError` that gives its path, the CLI prints it on one line."""

import json
import shutil

import pytest

from prompt2prompt import Prompt2PromptPipeline
from prompt2prompt.cli import main
from prompt2prompt.model_folder import check_model_folder, check_safetensors
from prompt2prompt.shapes import MODEL_DIR


@pytest.fixture(scope="module")
def saved(tiny_sd1, tmp_path_factory):
    """The tiny SD-1 model saved with save_pretrained, its UNet in several shards."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("models") / "tiny"
    StableDiffusionPipeline(**tiny_sd1, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(
        folder, safe_serialization=True)
    tiny_sd1["unet"].save_pretrained(folder / "unet", safe_serialization=True, max_shard_size="100KB")
    for p in (folder / "unet").glob("diffusion_pytorch_model.safetensors"):
        p.unlink()  # keep the sharded copy only
    return folder


@pytest.fixture
def copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "model")


def test_complete_folders_pass(saved):
    check_model_folder(saved)
    check_model_folder(MODEL_DIR)  # the bundled model, as installed
    assert len(list((saved / "unet").glob("*.safetensors"))) > 1  # the shards are checked, not a single file
    pipe = Prompt2PromptPipeline.from_pretrained(saved)
    assert pipe.unet.config.sample_size == 16


def _damage(folder, how):
    unet = folder / "unet"
    shard = sorted(unet.glob("*.safetensors"))[0]
    if how == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 100])
        return shard, "truncated safetensors"
    if how == "not safetensors":
        shard.write_bytes(b"<html>not found</html>")  # what a failed download leaves
        return shard, "safetensors"
    if how == "missing shard":
        shard.unlink()
        return shard, "missing shard"
    if how == "missing config":
        (folder / "text_encoder" / "config.json").unlink()
        return folder / "text_encoder" / "config.json", "missing"
    if how == "bad json":
        (folder / "scheduler" / "scheduler_config.json").write_text('{"beta_start": ')
        return folder / "scheduler" / "scheduler_config.json", "not readable JSON"
    if how == "missing component":
        shutil.rmtree(folder / "vae")
        return folder / "vae", "missing folder"
    if how == "no weights":
        for p in (folder / "vae").glob("*.safetensors"):
            p.unlink()
        return folder / "vae", "no weights"
    if how == "bad index":
        (folder / "model_index.json").write_text("[1, 2")
        return folder / "model_index.json", "not readable JSON"
    raise AssertionError(how)


HOW = ["truncated", "not safetensors", "missing shard", "missing config", "bad json", "missing component", "no weights", "bad index"]


@pytest.mark.parametrize("how", HOW)
def test_a_damaged_folder_names_the_file(copy, how):
    path, words = _damage(copy, how)
    with pytest.raises(ValueError, match=words) as err:
        check_model_folder(copy)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match=words):  # the pipeline checks before diffusers reads anything
        Prompt2PromptPipeline.from_pretrained(copy)


@pytest.mark.parametrize("how", ["truncated", "missing config"])
def test_the_cli_names_the_file_on_one_line(copy, how, capsys, tmp_path):
    path, words = _damage(copy, how)
    code = main(["generate", "a cat", "--model", str(copy), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and str(path) in err and words in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_pickle_only_weights_are_refused_unless_allowed(tiny_sd1, tmp_path):
    tiny_sd1["vae"].save_pretrained(tmp_path / "vae_only" / "vae", safe_serialization=False)
    (tmp_path / "vae_only" / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ValueError, match="only pickle weights.*diffusion_pytorch_model.bin"):
        check_model_folder(tmp_path / "vae_only")
    check_model_folder(tmp_path / "vae_only", allow_pickle=True)


def test_safetensors_header_checks(tmp_path):
    import torch
    from safetensors.torch import save_file

    good = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(3)}, str(good))
    check_safetensors(good)
    data = good.read_bytes()
    for name, content, words in (("empty", b"", "shorter than its header"), ("cut", data[:-1], "truncated"),
                                 ("header", data[:8] + b"x" * (len(data) - 8), "not JSON")):
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(content)
        with pytest.raises(ValueError, match=words):
            check_safetensors(p)


def test_the_cli_loads_pickle_weights_only_when_allowed(tiny_sd1, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(**tiny_sd1, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(
        tmp_path / "pickled", safe_serialization=False)
    capsys.readouterr()  # the save's progress bar
    argv = ["generate", "a cat riding a bicycle", "--model", str(tmp_path / "pickled"), "--steps", "1", "--quiet"]
    assert main(argv + ["-o", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "only pickle weights" in err and "--allow-pickle" in err
    assert not (tmp_path / "refused").exists()
    assert main(argv + ["-o", str(tmp_path / "allowed"), "--allow-pickle"]) == 0
    assert len(list((tmp_path / "allowed").glob("*.png"))) == 1


def test_world_json_sets_the_vocabulary_the_pipeline_warns_outside_of(copy, tiny_sd1):
    """A shapes-world model's export carries the words it was trained on; loading the folder warns
    about any other word, and a folder without the file warns about none."""
    import warnings

    assert Prompt2PromptPipeline.from_pretrained(copy).vocabulary is None
    (copy / "world.json").write_text(json.dumps({"world": "narrow", "words": ["a", "Red", "circle", "on", "blue", "background"]}))
    pipe = Prompt2PromptPipeline.from_pretrained(copy)
    assert pipe.vocabulary == {"a", "red", "circle", "on", "blue", "background"}
    with pytest.warns(UserWarning, match="square"):
        pipe("a red square on a blue background", num_inference_steps=1, output_type="latent")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("a red circle on a blue background", num_inference_steps=1, output_type="latent")


@pytest.mark.parametrize("text", ["{", "[]", '{"words": []}', '{"words": ["a", 3]}'])
def test_a_bad_world_json_is_named(copy, text):
    (copy / "world.json").write_text(text)
    with pytest.raises(ValueError, match="world.json"):
        Prompt2PromptPipeline.from_pretrained(copy)
