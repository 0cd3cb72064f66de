"""The pipeline's stages one at a time, the errors that name their argument, and module boundaries."""

import ast
import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import prompt2prompt
from prompt2prompt import Inversion, InversionMethod, LocalBlend, Prompt2PromptPipeline, load_image
from prompt2prompt.arguments import ARGUMENTS, ArgumentError, default
from prompt2prompt.pipeline import CheckedInputs

SRC = "a cat riding a bicycle"
TGT = "a cat riding a motorcycle"
PACKAGE = Path(prompt2prompt.__file__).parent


# --------------------------------------------------------------------------- check_inputs


ARGUMENT_CASES = [
    (dict(prompt=""), "prompt"),
    (dict(prompt=" ".join(["cat"] * 90)), "prompt"),
    (dict(edit_prompts=[TGT, ""]), "edit_prompts"),
    (dict(edit_prompts=[]), "edit_prompts"),
    (dict(equalizer={"cat": 2.0}), "equalizer"),
    (dict(local_blend=LocalBlend("cat", "cat")), "local_blend"),
    (dict(edit_prompts=[TGT], local_blend="bicycle"), "local_blend"),
    (dict(edit_prompts=[TGT], local_blend=LocalBlend("bicycle", "motorcycle", resolution=5)), "local_blend.resolution"),
    (dict(attention_res=3), "attention_res"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(guidance_scale=math.nan), "guidance_scale"),
    (dict(height=31), "height"),
    (dict(width=0), "width"),
    (dict(negative_prompt=3), "negative_prompt"),
    (dict(negative_prompt=" ".join(["blurry"] * 90)), "negative_prompt"),
    (dict(latents=torch.zeros(3, 4, 16, 16)), "latents"),
    (dict(latents=torch.zeros(1, 4, 16, 16, dtype=torch.float64)), "latents"),
    (dict(eta=-1), "eta"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(generator=7), "generator"),
    (dict(self_replace_max_res=-1), "self_replace_max_res"),
    (dict(inversion="inv.safetensors"), "inversion"),
]


@pytest.mark.parametrize("kwargs,argument", ARGUMENT_CASES, ids=[f"{a}-{i}" for i, (_, a) in enumerate(ARGUMENT_CASES)])
def test_check_inputs_names_the_bad_argument(pipe, unet_calls, kwargs, argument):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", SRC)
    with pytest.raises(ArgumentError) as checked:
        pipe.check_inputs(prompt, **kwargs)
    assert checked.value.argument == argument and argument in ARGUMENTS
    with pytest.raises(ArgumentError) as called:  # the call raises the same, before any denoising
        pipe(prompt, num_inference_steps=kwargs.pop("num_inference_steps", 2), output_type=kwargs.pop("output_type", "latent"), **kwargs)
    assert called.value.argument == argument and str(called.value) == str(checked.value)
    assert unet_calls == []


def test_check_inputs_resolves_defaults(pipe):
    inputs = pipe.check_inputs(SRC, TGT, local_blend=LocalBlend("bicycle", "motorcycle"), return_self_attention=True)
    assert isinstance(inputs, CheckedInputs)
    assert [p.prompt for p in inputs.prompts] == [SRC, TGT]
    assert inputs.num_inference_steps == default("num_inference_steps") and inputs.guidance_scale == default("guidance_scale")
    assert inputs.do_classifier_free_guidance
    assert (inputs.height, inputs.width, inputs.latent_hw) == (32, 32, (16, 16))  # the tiny UNet's 16 latent, VAE factor 2
    # the maps' default side is the latent's over 4 (16 // 4), taken to the nearest side the UNet has (8, 16)
    assert inputs.blend_res == inputs.record_res == inputs.self_res == 8 and inputs.record_sides == {8}
    assert inputs.self_replace_max_res == 16 // 4
    assert len(inputs.negative_ids) == 2
    quiet = pipe.check_inputs(SRC, guidance_scale=1.0, return_attention=False)
    assert not quiet.do_classifier_free_guidance and quiet.targets == [] and quiet.record_res is None and quiet.record_sides == set()


def test_a_missing_target_is_named_by_what_needs_it(pipe):
    with pytest.raises(ArgumentError, match="give edit_prompts as well") as err:
        pipe.check_inputs(SRC, local_blend=LocalBlend("cat", "cat"), equalizer={"cat": 2.0})
    assert err.value.argument == "equalizer"


# --------------------------------------------------------------------------- the stages


def test_encode_prompt_shapes(pipe):
    inputs = pipe.check_inputs(SRC, [TGT, "a dog riding a bicycle"])
    length, dim = pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(inputs.prompts, "cpu", True, inputs.negative_ids)
        alone, none = pipe.encode_prompt(inputs.prompts, "cpu", False)
        _, source = pipe.encode_prompt(inputs.prompts, "cpu", True, source_as_negative=True)
    assert embeds.shape == negative.shape == (3, length, dim) and embeds.dtype == pipe.unet.dtype
    assert none is None and torch.equal(alone, embeds)
    assert torch.equal(negative[0], negative[2])  # the same empty prompt in every row
    assert source.shape == (3, length, dim) and all(torch.equal(row, embeds[0]) for row in source)


def test_prepare_latents_shares_one_noise(pipe):
    noise = pipe.prepare_latents(3, 4, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert noise.shape == (3, 4, 16, 16)
    expected = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * pipe.scheduler.init_noise_sigma
    assert all(torch.equal(row, expected[0]) for row in noise)
    given = torch.randn(1, 4, 16, 16)
    assert torch.equal(pipe.prepare_latents(2, 4, 32, 32, torch.float32, "cpu", None, given), given.expand(2, -1, -1, -1))


def test_prepare_extra_step_kwargs_follows_the_scheduler(pipe, tiny_sd1):
    from diffusers import EulerDiscreteScheduler

    g = torch.Generator().manual_seed(1)
    extra = pipe.prepare_extra_step_kwargs(g, 0.5)
    assert extra["eta"] == 0.5 and extra["generator"] is g
    euler = EulerDiscreteScheduler.from_config(tiny_sd1["scheduler"].config)
    assert "eta" not in pipe.prepare_extra_step_kwargs(g, 0.5, euler)
    torch.manual_seed(3)
    first = pipe.prepare_extra_step_kwargs(None, 0.0)["generator"].initial_seed()
    torch.manual_seed(3)
    assert pipe.prepare_extra_step_kwargs(None, 0.0)["generator"].initial_seed() == first  # torch.manual_seed reproduces it


def test_decode_latents_shape(pipe):
    with torch.no_grad():
        images = pipe.decode_latents(torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


# --------------------------------------------------------------------------- invert's and the inversion's arguments


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(method="textual"), "method"),
        (dict(prompt=""), "prompt"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(guidance_scale=math.inf), "guidance_scale"),
        (dict(num_inner_steps=0), "num_inner_steps"),
        (dict(early_stop_epsilon=-1.0), "early_stop_epsilon"),
        (dict(height=31), "height"),
        (dict(image=42), "image"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt"),
        (dict(cuda_graph="yes"), "cuda_graph"),
        (dict(cuda_graph=True), "cuda_graph"),
    ],
)
def test_invert_names_the_bad_argument(pipe, unet_calls, kwargs, argument):
    args = dict(image=np.zeros((32, 32, 3), np.uint8), prompt=SRC) | kwargs
    with pytest.raises(ArgumentError) as err:
        pipe.invert(**args)
    assert err.value.argument == argument
    assert unet_calls == []


def test_image_and_method_errors_name_their_argument():
    with pytest.raises(ArgumentError, match="must be a file path") as err:
        load_image(42, 32, 32)
    assert err.value.argument == "image"
    with pytest.raises(ArgumentError, match="inversion method must be one of") as err:
        InversionMethod.parse("sideways")
    assert err.value.argument == "method"


def fake_inversion(pipe, steps=2, **over):
    scheduler = prompt2prompt.inversion.inversion_scheduler(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    fields = dict(method=InversionMethod.DDIM, prompt=SRC, num_inference_steps=steps, guidance_scale=7.5,
                  timesteps=scheduler.timesteps, latent=torch.zeros(1, 4, 16, 16), image_latent=torch.zeros(1, 4, 16, 16),
                  image=np.zeros((32, 32, 3), np.uint8))
    return Inversion(**(fields | over))


@pytest.mark.parametrize(
    "kwargs,over,argument",
    [
        (dict(prompt="a dog"), {}, "prompt"),
        (dict(latents=torch.zeros(1, 4, 16, 16)), {}, "latents"),
        (dict(eta=0.5), {}, "eta"),
        (dict(num_inference_steps=3), {}, "num_inference_steps"),
        (dict(width=64), {}, "width"),
        (dict(negative_prompt="blurry"), dict(method=InversionMethod.NEGATIVE_PROMPT), "negative_prompt"),
        (dict(guidance_scale=3.0), dict(method=InversionMethod.NULL_TEXT, null_embeddings=torch.zeros(2, 77, 32)), "guidance_scale"),
        ({}, dict(latent=torch.zeros(1, 4, 8, 8)), "inversion"),
        ({}, dict(method=InversionMethod.NULL_TEXT, null_embeddings=torch.zeros(2, 77, 16)), "inversion"),
        ({}, dict(timesteps=torch.tensor([999, 1])), "inversion"),  # other timesteps: found when the scheduler is set
    ],
)
def test_edits_of_an_inversion_name_the_bad_argument(pipe, unet_calls, kwargs, over, argument):
    args = dict(prompt=SRC, edit_prompts=[TGT], inversion=fake_inversion(pipe, **over), output_type="latent") | kwargs
    with pytest.raises(ArgumentError) as err:
        pipe(**args)
    assert err.value.argument == argument
    assert unet_calls == []


# --------------------------------------------------------------------------- defaults and module boundaries


@pytest.mark.parametrize("method", ["__call__", "check_inputs", "invert"])
def test_signature_defaults_come_from_the_table(method):
    params = inspect.signature(getattr(Prompt2PromptPipeline, method)).parameters
    named = [p for p in params.values() if p.name in ARGUMENTS and p.default is not inspect.Parameter.empty]
    assert len(named) >= 7
    for p in named:
        if method != "invert" and p.name in ("num_inference_steps", "guidance_scale"):
            assert p.default is None  # the inversion's, or the table's
        else:
            assert p.default == default(p.name), p.name


@pytest.mark.parametrize("module", ["pipeline.py", "inversion.py"])
def test_no_default_number_is_written(module):
    """Defaults live in `arguments.ARGUMENTS`: no parameter default in these files is a number."""
    tree = ast.parse((PACKAGE / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for value in [*node.args.defaults, *node.args.kw_defaults]:
                is_number = isinstance(value, ast.Constant) and type(value.value) in (int, float)
                is_negative = isinstance(value, ast.UnaryOp) and isinstance(value.operand, ast.Constant)
                assert not (is_number or is_negative), f"{module}:{value.lineno} {ast.unparse(value)}"


@pytest.mark.parametrize("module", ["inversion.py", "checks.py", "attention.py"])
def test_helper_modules_do_not_import_the_pipeline(module):
    """inversion.py holds formulas and the result; the pipeline runs them, never the other way round."""
    tree = ast.parse((PACKAGE / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [a.name for a in node.names]
            assert not any(n == "pipeline" or n.endswith(".pipeline") for n in names), f"{module}:{node.lineno}"
        elif isinstance(node, ast.Import):
            assert not any(a.name.endswith(".pipeline") for a in node.names), f"{module}:{node.lineno}"


# --------------------------------------------------------------------------- the processor outside the loop


def test_processor_without_a_step_attends_as_diffusers(tiny_sd1):
    """Without ``p2p_step`` (a UNet call outside the pipeline's loop) each path is plain attention."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from prompt2prompt.attention import P2PAttnProcessor, P2PController

    unet = tiny_sd1["unet"]
    layers = {n: m for n, m in unet.named_modules() if n.endswith(("attn1", "attn2"))}
    ctrl = P2PController(None, 2, True, (16, 16), record_sides=(8, 16), self_record_side=8)
    g = torch.Generator().manual_seed(0)
    for name, attn in layers.items():
        hidden = torch.randn(4, 8 * 8, attn.to_q.in_features, generator=g)  # (batch, pixels, channels)
        text = torch.randn(4, 7, attn.to_k.in_features, generator=g) if attn.is_cross_attention else None  # (batch, tokens, channels)
        with torch.no_grad():
            ours = P2PAttnProcessor(ctrl, name)(attn, hidden, text)
            theirs = AttnProcessor2_0()(attn, hidden, text)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert not ctrl.maps and not ctrl.self_calls  # nothing is recorded outside the loop
