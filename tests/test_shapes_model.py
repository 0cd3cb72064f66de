"""The bundled shapes model: it ships in diffusers' layout, loads with no argument, and edits."""

import json
import warnings

import numpy as np
import pytest
import torch

from prompt2prompt import EditMode, LocalBlend, Prompt2PromptPipeline
from prompt2prompt.shapes import MODEL_DIR


@pytest.fixture(scope="module")
def pipe():
    p = Prompt2PromptPipeline.from_pretrained()
    p.set_progress_bar_config(disable=True)
    return p


def test_bundled_files_are_safetensors_within_size_limits():
    files = list(MODEL_DIR.rglob("*"))
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert weights and not [f for f in files if f.suffix in (".bin", ".pt", ".ckpt", ".pkl")]
    assert all(f.stat().st_size <= 16 * 2**20 for f in weights)
    assert sum(f.stat().st_size for f in files if f.is_file()) <= 40 * 2**20
    assert json.loads((MODEL_DIR / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_loads_with_no_argument_and_edits(pipe):
    assert pipe.vocabulary is not None and "circle" in pipe.vocabulary
    out = pipe("a big red circle on a blue background", ["a big red square on a blue background"],
               local_blend=LocalBlend("circle", "square"), num_inference_steps=4,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.edit_mode is EditMode.REPLACE
    assert out.images.shape == (2, 64, 64, 3) and np.isfinite(out.images).all()
    again = pipe("a big red circle on a blue background", ["a big red square on a blue background"],
                 local_blend=LocalBlend("circle", "square"), num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0), output_type="np")
    np.testing.assert_array_equal(again.images, out.images)


def test_multi_token_words_of_the_shapes_tokenizer(pipe):
    p = pipe.tokenizer("a red star on water").input_ids
    assert len(p) > 7  # "water" splits into several tokens
    out = pipe("a red star on water", ["a red star on grass"], num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(1), cross_replace_steps={"default_": 0.8, "grass": 0.2})
    side = pipe.unet.config.sample_size
    assert out.images.shape == (2, pipe.unet.config.in_channels, side, side)


def test_words_outside_the_vocabulary_warn(pipe):
    with pytest.warns(UserWarning, match="zebra"):
        pipe("a zebra on grass", num_inference_steps=1, output_type="latent")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("a red circle on grass", num_inference_steps=1, output_type="latent")
