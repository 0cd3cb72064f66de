"""`Prompt2PromptXLPipeline` on tiny random SDXL-shaped models (two CLIP text encoders, the second
with a projection; a UNet with SDXL's "text_time" added conditions), built offline."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from _util import assert_close_to_scale
from conftest import counting_unet_calls, make_tokenizer_2
from prompt2prompt import EditMode, LocalBlend, Prompt2PromptPipeline, Prompt2PromptXLPipeline
from prompt2prompt.arguments import ArgumentError

STEPS = 3
PROMPTS = ["a cat riding a bicycle", "a dog riding a bicycle", "a cat riding a red bicycle"]


@pytest.fixture
def xl_calls(xl):
    """`counting_unet_calls` of ``xl`` for one test."""
    with counting_unet_calls(xl) as calls:
        yield calls


def plain_xl(components, **config):
    sd = StableDiffusionXLPipeline(**components, add_watermarker=False, **config)
    sd.set_progress_bar_config(disable=True)
    return sd


def noise(seed=0):
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- 1. no injection = diffusers' SDXL


@pytest.mark.parametrize("kwargs", [
    {},  # zeros for the unconditional half (force_zeros_for_empty_prompt)
    dict(negative_prompt="blurry", guidance_scale=5.0),
    dict(negative_prompt="blurry", negative_prompt_2="dark", prompt_2="an oil painting", guidance_rescale=0.7),
    dict(original_size=(64, 48), crops_coords_top_left=(4, 2), target_size=(32, 32)),
    dict(guidance_scale=1.0),  # few-step: no unconditional half
], ids=["zeros", "negative", "prompt_2-rescale", "time-ids", "no-guidance"])
def test_no_injection_equals_diffusers_sdxl(xl, tiny_xl, kwargs):
    lat = noise(1)
    kwargs = {"guidance_scale": 7.5, **kwargs}  # diffusers' SDXL default is 5, the table's 7.5
    out = xl(PROMPTS[0], PROMPTS[1:], edit="none", num_inference_steps=STEPS, latents=lat, output_type="np", **kwargs)
    assert out.images.shape == (3, 32, 32, 3) and out.edit_mode is EditMode.NONE
    sd = plain_xl(tiny_xl)
    for k, p in enumerate(PROMPTS):
        expected = sd(p, num_inference_steps=STEPS, latents=lat, output_type="np", **kwargs).images[0]
        np.testing.assert_allclose(out.images[k], expected, atol=1e-5, rtol=0)


def test_empty_negative_without_force_zeros_equals_diffusers(tiny_xl):
    pipe = Prompt2PromptXLPipeline(**tiny_xl, force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    lat, kw = noise(2), dict(num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent")
    out = pipe(PROMPTS[0], PROMPTS[1], edit="none", latents=lat, **kw)
    sd = plain_xl(tiny_xl, force_zeros_for_empty_prompt=False)
    zeros = plain_xl(tiny_xl)(PROMPTS[0], latents=lat, **kw).images[0]
    for k, p in enumerate(PROMPTS[:2]):
        expected = sd(p, latents=lat, **kw).images[0]
        assert_close_to_scale(out.images[k], expected)
    assert not torch.allclose(out.images[0], zeros, atol=1e-4)  # "" is not zeros


def test_generator_gives_diffusers_noise_and_default_size(xl, tiny_xl):
    kw = dict(num_inference_steps=STEPS, guidance_scale=7.5, output_type="np")
    out = xl(PROMPTS[0], PROMPTS[1], edit="none", generator=torch.Generator().manual_seed(3), **kw)
    expected = plain_xl(tiny_xl)(PROMPTS[0], generator=torch.Generator().manual_seed(3), **kw)
    assert out.images.shape == (2, 32, 32, 3)  # unet sample_size 16 times the VAE's factor 2
    np.testing.assert_allclose(out.images[0], expected.images[0], atol=1e-5, rtol=0)
    assert out.attention.resolution == 8  # latent 16 // 4 = 4, the nearest cross-attention side is 8


# --------------------------------------------------------------------------- 2. the edits keep the source


@pytest.mark.parametrize("target, kwargs", [
    (PROMPTS[1], dict(edit="replace", self_replace_max_res=8)),
    (PROMPTS[2], dict(edit="refine")),
    (PROMPTS[0], dict(edit="replace", equalizer={"cat": 3.0})),
    (PROMPTS[1], dict(edit="replace", local_blend=LocalBlend(["cat"], ["dog"]))),
    (PROMPTS[2], dict(edit="auto", guidance_scale=1.0)),
], ids=["replace", "refine", "reweight", "local-blend", "auto-no-guidance"])
def test_edits_run_and_keep_the_source(xl, target, kwargs):
    lat = noise(4)
    common = dict(num_inference_steps=STEPS, latents=lat, output_type="latent")
    if "guidance_scale" in kwargs:
        common["guidance_scale"] = kwargs.pop("guidance_scale")
    alone = xl(PROMPTS[0], **common).images
    plain = xl(PROMPTS[0], target, edit="none", **common).images
    out = xl(PROMPTS[0], target, **kwargs, **common)
    assert out.images.shape == (2, 4, 16, 16) and torch.isfinite(out.images).all()
    assert_close_to_scale(out.images[0], alone[0])  # the source row is never edited
    if target != PROMPTS[0] or "equalizer" in kwargs:
        assert not torch.allclose(out.images[1], plain[1], atol=1e-4)  # the edit changed the target
    assert out.attention.maps.shape == (2, 8, 8, 77)


@pytest.mark.parametrize("edit", ["replace", "refine"])
def test_editing_into_the_same_prompt_changes_nothing(xl, edit):
    """Injecting the source's attention into an identical prompt is the identity: the mappers address
    the concatenated states of both encoders at the first tokenizer's positions consistently."""
    out = xl(PROMPTS[0], PROMPTS[0], edit=edit, self_replace_max_res=8, num_inference_steps=STEPS, latents=noise(5), output_type="latent")
    assert_close_to_scale(out.images[1], out.images[0])
    cat = out.attention.word(1, "cat")
    assert cat.shape == (8, 8) and torch.isfinite(cat).all()
    assert_close_to_scale(cat, out.attention.word(0, "cat"))


def test_xl_shares_the_edit_machinery():
    """The loop, the plan, the blend and the output are the SD pipeline's, not copies."""
    for name in ("_denoise", "_predict_noise", "_plan_edit", "_local_blend", "_postprocess", "_output", "prepare_latents"):
        assert getattr(Prompt2PromptXLPipeline, name) is getattr(Prompt2PromptPipeline, name), name


def test_euler_scheduler_equals_diffusers_sdxl(tiny_xl):
    """SDXL's usual sampler scales the initial noise (init_noise_sigma) and the model input."""
    from diffusers import EulerDiscreteScheduler

    components = dict(tiny_xl, scheduler=EulerDiscreteScheduler.from_config(tiny_xl["scheduler"].config))
    pipe = Prompt2PromptXLPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0, latents=noise(8), output_type="np")
    out = pipe(PROMPTS[0], PROMPTS[1], edit="none", **kw)
    sd = plain_xl(components)
    for k, p in enumerate(PROMPTS[:2]):
        np.testing.assert_allclose(out.images[k], sd(p, **kw).images[0], atol=1e-5, rtol=0)


def test_float16_vae_decodes_in_float32(tiny_xl):
    """A float16 VAE with force_upcast decodes in float32 (SDXL's VAE overflows in float16) and is
    put back to float16."""
    import copy

    vae = copy.deepcopy(tiny_xl["vae"]).to(torch.float16)
    vae.register_to_config(force_upcast=True)
    pipe = Prompt2PromptXLPipeline(**dict(tiny_xl, vae=vae))
    latents = noise(9)
    expected = Prompt2PromptXLPipeline(**tiny_xl).decode_latents(latents)
    decoded = pipe.decode_latents(latents)
    assert decoded.dtype == torch.float32 and pipe.vae.dtype == torch.float16
    assert_close_to_scale(decoded, expected, rel=1e-2)  # the weights went through float16


# --------------------------------------------------------------------------- 3. loading


def test_from_pretrained_and_from_pipe(tiny_xl, tmp_path):
    sd = plain_xl(tiny_xl)
    sd.save_pretrained(tmp_path / "model", safe_serialization=True)
    loaded = Prompt2PromptXLPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=STEPS, latents=noise(6), output_type="latent")
    direct = Prompt2PromptXLPipeline(**tiny_xl)
    direct.set_progress_bar_config(disable=True)
    expected = direct(PROMPTS[0], PROMPTS[1], **kw).images
    assert_close_to_scale(loaded(PROMPTS[0], PROMPTS[1], **kw).images, expected)
    assert loaded.tokenizer_2.pad_token == "!"

    piped = Prompt2PromptXLPipeline.from_pipe(sd)
    piped.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        theirs, ours = getattr(sd, name), getattr(piped, name)
        assert all(a is b for a, b in zip(theirs.parameters(), ours.parameters())), name
    assert_close_to_scale(piped(PROMPTS[0], PROMPTS[1], **kw).images, expected)


def test_from_pretrained_refuses_pickle_unless_allowed(tiny_xl, tmp_path):
    plain_xl(tiny_xl).save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        Prompt2PromptXLPipeline.from_pretrained(tmp_path / "pickled")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        Prompt2PromptXLPipeline.from_pretrained(tmp_path / "pickled", use_safetensors=False)
    pipe = Prompt2PromptXLPipeline.from_pretrained(tmp_path / "pickled", allow_pickle=True)
    assert pipe.text_encoder_2 is not None


# --------------------------------------------------------------------------- 4. bad input


def test_sd_components_are_refused(tiny_sd1, tiny_xl):
    with pytest.raises(TypeError):
        Prompt2PromptXLPipeline(**tiny_sd1)  # no text_encoder_2 / tokenizer_2 at all
    with pytest.raises(ValueError, match="text_encoder_2 and tokenizer_2.*Prompt2PromptPipeline"):
        Prompt2PromptXLPipeline(**tiny_sd1, text_encoder_2=None, tokenizer_2=None)
    with pytest.raises(ValueError, match="addition_embed_type.*'text_time'"):
        Prompt2PromptXLPipeline(**dict(tiny_xl, unet=tiny_sd1["unet"]))
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        Prompt2PromptXLPipeline(**dict(tiny_xl, text_encoder_2=tiny_xl["text_encoder"]))


def test_sd_folder_and_pipe_are_refused(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline(**tiny_sd1, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.save_pretrained(tmp_path / "sd", safe_serialization=True)
    with pytest.raises(ArgumentError, match="no text_encoder_2 or tokenizer_2.*Prompt2PromptPipeline") as info:
        Prompt2PromptXLPipeline.from_pretrained(tmp_path / "sd")
    assert info.value.argument == "model"
    with pytest.raises(ArgumentError, match="not an SDXL pipeline"):
        Prompt2PromptXLPipeline.from_pipe(sd)


@pytest.mark.parametrize("kwargs, argument, message", [
    (dict(original_size=(32,)), "original_size", "pair of integers"),
    (dict(crops_coords_top_left=(-1, 0)), "crops_coords_top_left", ">= 0"),
    (dict(target_size="big"), "target_size", "pair of integers"),
    (dict(guidance_rescale=-0.5), "guidance_rescale", ">= 0"),
    (dict(prompt_2=["one", "two", "three"]), "prompt_2", "list of 2 strings"),
    (dict(negative_prompt="x", negative_prompt_2=["a"]), "negative_prompt_2", "list of 2 strings"),
    (dict(inversion=object()), "inversion", "must be an Inversion"),
    (dict(edit_prompts=[]), "edit_prompts", "empty"),
    (dict(height=33), "height", "multiple of 2"),  # the tiny VAE's factor
    (dict(width=15), "width", "multiple of 2"),
    (dict(local_blend=LocalBlend(["cat"], ["dog"], resolution=16)), "local_blend.resolution", r"LocalBlend resolution 16 .*use one of \[8\]"),
    (dict(local_blend=LocalBlend(["cat"], ["dog"], resolution=4)), "local_blend.resolution", r"use one of \[8\]"),
    (dict(self_replace_max_res=16), "self_replace_max_res", r"self_replace_max_res 16 is not an attention map side.*use one of \[8\]"),
    (dict(self_replace_max_res=8, height=64, width=64, latents=None), "self_replace_max_res", r"use one of \[16\]"),  # this size's sides
])
def test_bad_input_is_refused_before_the_unet(xl, xl_calls, kwargs, argument, message):
    call = dict(edit_prompts=PROMPTS[1], num_inference_steps=STEPS, latents=noise(), output_type="latent")
    call.update(kwargs)
    with pytest.raises(ArgumentError, match=message) as info:
        xl(PROMPTS[0], **call)
    assert info.value.argument == argument and xl_calls == []
    assert "\n" not in str(info.value)  # one line


def test_a_refiner_is_refused_with_one_line_naming_the_model(tiny_xl, tmp_path):
    """An SDXL refiner (image-to-image, no first text encoder or tokenizer) from a folder, a
    pipeline or components: refused before anything runs, the base model named as the fix."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from prompt2prompt import load_pipeline

    parts = dict(tiny_xl, text_encoder=None, tokenizer=None)
    refiner = StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True, add_watermarker=False)
    refiner.save_pretrained(tmp_path / "refiner", safe_serialization=True)
    for load in (Prompt2PromptXLPipeline.from_pretrained, load_pipeline):
        with pytest.raises(ArgumentError, match=r"StableDiffusionXLImg2ImgPipeline\) has no text_encoder or tokenizer; an SDXL refiner.*base SDXL") as info:
            load(tmp_path / "refiner")
        assert info.value.argument == "model" and "\n" not in str(info.value)
    with pytest.raises(ArgumentError, match="has no text_encoder or tokenizer; an SDXL refiner") as info:
        Prompt2PromptXLPipeline.from_pipe(refiner)
    assert info.value.argument == "model"
    with pytest.raises(ValueError, match="SDXL needs text_encoder and tokenizer, got NoneType and NoneType; an SDXL refiner"):
        Prompt2PromptXLPipeline(**parts)


def test_tokenizers_that_split_a_prompt_differently_are_refused(tiny_xl, tmp_path):
    """The edit addresses both encoders' states by the first tokenizer's positions."""
    tok = tiny_xl["tokenizer"]
    other = make_tokenizer_2(tmp_path, tok.model_max_length)
    other.add_tokens(["zebracorn"])  # one token where the first tokenizer has several
    assert len(tok("zebracorn")["input_ids"]) > len(other("zebracorn")["input_ids"]) == 3
    pipe = Prompt2PromptXLPipeline(**dict(tiny_xl, tokenizer_2=other))
    hits = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: hits.append(1))
    try:
        with pytest.raises(ArgumentError, match="with tokenizer_2") as info:
            pipe(PROMPTS[0], "a zebracorn riding a bicycle", num_inference_steps=STEPS, latents=noise(), output_type="latent")
        assert info.value.argument == "edit_prompts" and "edit_prompts[0]" in str(info.value) and hits == []
        out = pipe(PROMPTS[0], "a zebracorn riding a bicycle", prompt_2="a horse", num_inference_steps=1, output_type="latent")
        assert out.images.shape == (2, 4, 16, 16)  # an explicit prompt_2 need not align
    finally:
        handle.remove()


def test_invert_signature_is_the_sd_one_plus_sdxl_conditions():
    import inspect

    from prompt2prompt.arguments import default

    ours = inspect.signature(Prompt2PromptXLPipeline.invert).parameters
    theirs = inspect.signature(Prompt2PromptPipeline.invert).parameters
    extra = ["negative_prompt_2", "original_size", "crops_coords_top_left", "target_size"]
    assert list(ours) == [*theirs, *extra]
    assert all(ours[n].default == theirs[n].default for n in theirs if n != "self")
    assert all(ours[n].default == default(n) for n in extra)


def test_signature_is_the_sd_one_plus_sdxl_arguments_with_the_tables_defaults():
    import inspect

    from prompt2prompt.arguments import ARGUMENTS, default

    ours = inspect.signature(Prompt2PromptXLPipeline.__call__).parameters
    theirs = inspect.signature(Prompt2PromptPipeline.__call__).parameters
    extra = ["prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size", "guidance_rescale"]
    assert list(ours) == [*theirs, *extra]
    assert all(ours[n].default == theirs[n].default for n in theirs if n != "self")
    for name in extra:
        assert name in ARGUMENTS and ours[name].default == default(name), name
    checked = inspect.signature(Prompt2PromptXLPipeline.check_inputs).parameters
    assert all(checked[n].default == ours[n].default for n in checked if n != "self")
