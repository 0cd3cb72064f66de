"""Every bad input gives a ValueError naming the problem and the fix, before any denoising."""

import math

import pytest
import torch

from prompt2prompt import LocalBlend

SRC = "a cat riding a bicycle"
TGT = "a cat riding a motorcycle"


CASES = [
    (dict(edit_prompts=[TGT], cross_replace_steps={"car": 0.4}), r"cross_replace_steps names 'car', which is in none of the prompts 'a cat riding a motorcycle'; name a word"),
    (dict(edit_prompts=[TGT], equalizer={"dog": 2.0}), r"equalizer names 'dog', which is in none of the prompts"),
    (dict(edit_prompts=[TGT], equalizer={"motorcycle": math.nan}), r"equalizer\['motorcycle'\] must be a finite number"),
    (dict(edit_prompts=[TGT], equalizer={"motorcycle": math.inf}), r"must be a finite number"),
    (dict(edit_prompts=[TGT], equalizer={"motorcycle": [1.0, 2.0]}), r"gives 2 factors for 1 target prompts"),
    (dict(edit_prompts=[TGT], local_blend=LocalBlend("car", "motorcycle")), r"LocalBlend source_words: 'car' is not a word of the prompt 'a cat riding a bicycle'"),
    (dict(edit_prompts=[TGT], local_blend=LocalBlend("bicycle", "car")), r"LocalBlend target_words names 'car', which is in none of the prompts 'a cat riding a motorcycle'"),
    (dict(edit_prompts=[TGT], local_blend=LocalBlend("bicycle", "motorcycle", subtract_words="tree")), r"LocalBlend subtract_words names 'tree', which is in none of the prompts"),
    (dict(edit_prompts=[TGT], local_blend=LocalBlend("bicycle", "motorcycle", resolution=5)), r"LocalBlend resolution 5 .* use one of \[8, 16\]"),
    (dict(edit_prompts=[TGT], local_blend="bicycle"), r"local_blend must be a LocalBlend"),
    (dict(edit_prompts=["a cat riding a red bicycle"], edit="replace"), r"same number of words.*edit='refine'"),
    (dict(edit_prompts=[TGT], edit="swap"), r"edit must be one of 'auto', 'replace', 'refine', 'none'"),
    (dict(edit_prompts=[TGT], edit=None), r"edit must be one of 'auto', 'replace', 'refine', 'none', got None"),
    (dict(edit_prompts=[" ".join(["cat"] * 80)]), r"edit_prompts\[0\]: the prompt .* is 82 tokens long but the text encoder takes at most 77; .*truncate_prompts=True"),
    (dict(prompt=" ".join(["cat"] * 90)), r"prompt: the prompt .* is 92 tokens long"),
    (dict(prompt=""), r"prompt must be a non-empty string"),
    (dict(edit_prompts=[TGT], cross_replace_steps=1.2), r"cross_replace_steps.* must lie in \[0, 1\]"),
    (dict(edit_prompts=[TGT], cross_replace_steps=(0.8, 0.2)), r"start 0.8 after end 0.2"),
    (dict(edit_prompts=[TGT], cross_replace_steps={"default_": -0.1}), r"must lie in \[0, 1\]"),
    (dict(edit_prompts=[TGT], self_replace_steps=(0.5, 0.1)), r"self_replace_steps has start 0.5 after end 0.1"),
    (dict(edit_prompts=[TGT], self_replace_steps=math.nan), r"self_replace_steps must hold finite numbers"),
    (dict(edit_prompts=[TGT], self_replace_max_res=-1), r"self_replace_max_res must be a non-negative integer"),
    (dict(edit_prompts=[TGT], self_replace_max_res=12), r"self_replace_max_res 12 is not an attention map side .* use one of \[8, 16\], or 0"),
    (dict(edit_prompts=[]), r"edit_prompts is empty"),
    (dict(equalizer={"cat": 2.0}), r"give edit_prompts as well"),
    (dict(edit_prompts=[TGT], height=31), r"height must be a positive multiple of 2"),
    (dict(edit_prompts=[TGT], width=0), r"width must be a positive multiple of 2"),
    (dict(edit_prompts=[TGT], num_inference_steps=0), r"num_inference_steps must be a positive integer"),
    (dict(edit_prompts=[TGT], guidance_scale=math.inf), r"guidance_scale must be a finite number"),
    (dict(edit_prompts=[TGT], output_type="jpeg"), r"output_type must be"),
    (dict(edit_prompts=[TGT], generator=7), r"generator must be one torch.Generator"),
    (dict(edit_prompts=[TGT], eta=math.nan), r"eta must be a number in \[0, 1\]"),
    (dict(edit_prompts=[TGT], eta=-1), r"eta must be a number in \[0, 1\]"),
    (dict(edit_prompts=[TGT], eta=2.0), r"eta must be a number in \[0, 1\]"),  # found by tests/test_properties.py: NaN images
    (dict(edit_prompts=[TGT], negative_prompt=3), r"negative_prompt must be a string or a list of 2 strings"),
    (dict(edit_prompts=[TGT], generator=[torch.Generator(), torch.Generator()]), r"generator must be one torch.Generator"),
    (dict(edit_prompts=[TGT], negative_prompt=["a", "b", "c"]), r"negative_prompt must be a string or a list of 2 strings"),
    (dict(edit_prompts=[TGT], attention_res=3), r"attention_res 3 is not a cross-attention map side"),
    (dict(edit_prompts=[TGT], latents=torch.zeros(1, 4, 16, 16, dtype=torch.float64)), r"latents are torch.float64 on cpu but the model is torch.float32 on cpu; pass latents.to"),
    (dict(edit_prompts=[TGT], latents=torch.zeros(3, 4, 16, 16)), r"latents must have shape \(1 or 2, 4, 16, 16\)"),
]


@pytest.mark.parametrize("kwargs,message", CASES, ids=[c[1][:40] for c in CASES])
def test_bad_input_raises_before_denoising(pipe, unet_calls, kwargs, message):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", SRC)
    with pytest.raises(ValueError, match=message):
        kwargs.setdefault("num_inference_steps", 2)
        kwargs.setdefault("output_type", "latent")
        pipe(prompt, **kwargs)
    assert unet_calls == []


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(threshold=1.5), r"threshold must be a number in \[0, 1\]"),
        (dict(threshold=(0.3, 0.2, 0.1)), r"threshold must be a number or a \(mask, subtract\) pair"),
        (dict(start=-0.5), r"start must be a number in \[0, 1\]"),
        (dict(resolution=0), r"resolution must be a positive integer"),
        (dict(source_words=[]), r"source_words must be a word or a list of words"),
        (dict(target_words=[""]), r"target_words must be a word or a list of words"),
    ],
)
def test_local_blend_validates_on_construction(kwargs, message):
    args = dict(source_words="bicycle", target_words="car") | kwargs
    with pytest.raises(ValueError, match=message):
        LocalBlend(**args)


def test_local_blend_is_frozen_and_normalised():
    lb = LocalBlend("bicycle", ["car", "truck"], threshold=0.4, start=0)
    assert lb.source_words == ("bicycle",) and lb.target_words == ("car", "truck")
    assert lb.threshold == (0.4, 0.4) and lb.start == 0.0
    with pytest.raises(Exception):
        lb.threshold = 0.5


def test_truncation_on_request(pipe):
    long = " ".join(["cat"] * 80)
    out = pipe(long, [long.replace("cat", "dog", 1)], truncate_prompts=True, num_inference_steps=1, output_type="latent")
    assert out.images.shape[0] == 2
