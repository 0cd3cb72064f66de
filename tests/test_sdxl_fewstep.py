"""Few-step SDXL (issue 29): SDXL-Turbo-style use (guidance 0, 2 steps, Euler / Euler ancestral / LCM
schedulers with "trailing" timesteps), LCM-distilled UNets (the guidance scale as ``timestep_cond``),
and float16 / bfloat16, on tiny random SDXL-shaped models built offline (`conftest.make_tiny_xl`).

A stochastic scheduler adds fresh noise at each step; drawn once per row, it would differ between the
source and the targets and undo Prompt-to-Prompt's "same seed for every prompt". The pipeline draws it
once for all rows (`pipeline.scheduler_step`); these tests show both sides of that.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

import prompt2prompt.pipeline as p2p_pipeline
from _util import assert_close_to_scale
from conftest import counting_unet_calls
from prompt2prompt import LocalBlend, Prompt2PromptPipeline, Prompt2PromptXLPipeline
from prompt2prompt.pipeline import guidance_embedding

SRC, TGT, REFINED = "a cat riding a bicycle", "a dog riding a bicycle", "a cat riding a red bicycle"
STEPS = 2
SCHEDULERS = {"euler-ancestral": EulerAncestralDiscreteScheduler, "lcm": LCMScheduler, "euler": EulerDiscreteScheduler}
STOCHASTIC = ["euler-ancestral", "lcm"]
#: Every step injects the source's cross- and self-attention (the tiny UNet's attention side is 8).
FULL_INJECTION = dict(cross_replace_steps=1.0, self_replace_steps=1.0, self_replace_max_res=8)


def turbo(components: dict, name: str) -> dict:
    """``components`` with the scheduler ``name`` configured from theirs as SDXL-Turbo configures it."""
    return dict(components, scheduler=SCHEDULERS[name].from_config(components["scheduler"].config, timestep_spacing="trailing"))


def ours(components: dict, cls=Prompt2PromptXLPipeline):
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_xl(components: dict):
    pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def decorrelation(a: torch.Tensor, b: torch.Tensor) -> float:
    """``1 - corr(a, b)``, Pearson's correlation over all elements: 0 for the same layout."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return 1.0 - float(a @ b / (a.norm() * b.norm()))


def unshared_step(scheduler, noise, t, latents, extra):
    """A scheduler step as a batch of independent images: the generator draws a different noise
    for each row (diffusers' ``randn_tensor`` with one generator and a batch shape)."""
    return scheduler.step(noise, t, latents, **extra, return_dict=False)[0]


FEW = dict(num_inference_steps=STEPS, guidance_scale=0.0, output_type="latent")


# --------------------------------------------------------------------------- 1. a 2-step, guidance-0 edit keeps the source


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("target, edit", [(TGT, "replace"), (REFINED, "refine")])
def test_two_step_edit_keeps_the_source_equal_to_diffusers(tiny_xl, name, target, edit):
    components = turbo(tiny_xl, name)
    pipe = ours(components)
    with counting_unet_calls(pipe) as calls:
        out = pipe(SRC, target, edit=edit, self_replace_max_res=8, generator=seeded(), **FEW)
    assert len(calls) == STEPS  # guidance 0: no unconditional half, one UNet call per step
    assert out.images.shape == (2, 4, 16, 16) and torch.isfinite(out.images).all()
    plain = pipe(SRC, target, edit="none", generator=seeded(), **FEW).images
    expected = diffusers_xl(components)(SRC, generator=seeded(), **FEW).images
    assert_close_to_scale(out.images[0], plain[0])
    assert_close_to_scale(out.images[0], expected[0])
    assert not torch.allclose(out.images[1], plain[1], atol=1e-4)  # the edit changed the target


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("target, kwargs", [
    (TGT, dict(edit="replace")),
    (REFINED, dict(edit="refine")),
    (SRC, dict(edit="replace", equalizer={"cat": 3.0})),
    (TGT, dict(edit="replace", local_blend=LocalBlend("cat", "dog"))),
    (TGT, dict(edit="replace", cross_replace_steps={"default_": 1.0, "dog": 0.5})),
], ids=["replace", "refine", "reweight", "local-blend", "per-word"])
def test_every_edit_runs_in_one_and_four_steps(tiny_xl, steps, target, kwargs):
    """At one step the default windows (fractions 0.8 and 0.4) round down to no step: whole windows edit."""
    pipe = ours(turbo(tiny_xl, "euler-ancestral"))
    kw = dict(FEW, num_inference_steps=steps)
    if steps == 1:
        kwargs = dict(cross_replace_steps=1.0, self_replace_steps=1.0) | kwargs
    out = pipe(SRC, target, self_replace_max_res=8, generator=seeded(3), **kwargs, **kw).images
    alone = pipe(SRC, generator=seeded(3), **kw).images
    plain = pipe(SRC, target, edit="none", generator=seeded(3), **kw).images
    assert torch.isfinite(out).all()
    assert_close_to_scale(out[0], alone[0])
    assert not torch.allclose(out[1], plain[1], atol=1e-4)


def test_windows_that_cover_no_step_are_warned_about(tiny_xl):
    pipe = ours(turbo(tiny_xl, "euler-ancestral"))
    with pytest.warns(UserWarning, match=r"cover none of the 1 steps .* pass cross_replace_steps=1.0"):
        out = pipe(SRC, TGT, generator=seeded(3), **dict(FEW, num_inference_steps=1)).images
    plain = pipe(SRC, TGT, edit="none", generator=seeded(3), **dict(FEW, num_inference_steps=1)).images
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # what the warning says: no edit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(SRC, TGT, generator=seeded(3), **FEW)  # two steps: 0.8 covers the first
    assert not [w for w in caught if "cover none" in str(w.message)]


# --------------------------------------------------------------------------- 2. one step noise for every row


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_scheduler_gives_every_row_the_source_noise(tiny_xl, name):
    """Editing into the same prompt with every step injected: each target is the source exactly;
    with a noise drawn per row (as a batch of independent images) they would differ."""
    pipe = ours(turbo(tiny_xl, name))
    out = pipe(SRC, [SRC, SRC], edit="replace", generator=seeded(1), **FULL_INJECTION, **FEW).images
    for k in (1, 2):
        torch.testing.assert_close(out[k], out[0], rtol=0, atol=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(p2p_pipeline, "scheduler_step", unshared_step)
        apart = pipe(SRC, [SRC, SRC], edit="replace", generator=seeded(1), **FULL_INJECTION, **FEW).images
    for k in (1, 2):
        assert (apart[k] - apart[0]).abs().max() > 1.0  # a whole draw of step noise apart
    assert_close_to_scale(apart[0], out[0])  # row 0 draws the same noise either way


def test_deterministic_scheduler_needs_no_sharing(tiny_xl):
    """Euler adds no noise: per-row generators change nothing (the control of the test above)."""
    pipe = ours(turbo(tiny_xl, "euler"))
    out = pipe(SRC, SRC, edit="replace", generator=seeded(1), **FULL_INJECTION, **FEW).images
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(p2p_pipeline, "scheduler_step", unshared_step)
        apart = pipe(SRC, SRC, edit="replace", generator=seeded(1), **FULL_INJECTION, **FEW).images
    torch.testing.assert_close(apart, out, rtol=0, atol=0)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_edit_keeps_the_deterministic_layout(tiny_xl, name):
    """A real edit (cat -> dog): with the step noise shared the target is as close to the source as
    with deterministic Euler; with a noise per row it drifts two orders of magnitude further."""
    kw = dict(edit="replace", self_replace_max_res=8, generator=seeded(2), **FEW)
    euler = ours(turbo(tiny_xl, "euler"))(SRC, TGT, **kw).images
    pipe = ours(turbo(tiny_xl, name))
    shared = pipe(SRC, TGT, **kw).images
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(p2p_pipeline, "scheduler_step", unshared_step)
        apart = pipe(SRC, TGT, **kw).images
    d_euler, d_shared, d_apart = (decorrelation(x[1], x[0]) for x in (euler, shared, apart))
    assert 0 < d_shared < 2 * d_euler  # the edit changed the target, no more than Euler's does
    assert d_apart > 20 * d_shared


def test_scheduler_step_draws_one_noise_for_all_rows():
    """`pipeline.scheduler_step` on rows that are equal gives equal rows, and row 0 is what a single
    image's step draws from the same generator (so the source equals diffusers' one-image run)."""
    scheduler = EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", timestep_spacing="trailing")
    scheduler.set_timesteps(STEPS)
    t = scheduler.timesteps[0]
    latents = torch.randn(1, 4, 8, 8, generator=seeded(3)).expand(3, -1, -1, -1).clone()  # (3, 4, 8, 8)
    noise = torch.zeros_like(latents)
    generator = seeded(4)
    stepped = p2p_pipeline.scheduler_step(scheduler, noise, t, latents, {"generator": generator})
    assert torch.equal(stepped[1], stepped[0]) and torch.equal(stepped[2], stepped[0])
    after = torch.randn(1, generator=generator)

    scheduler.set_timesteps(STEPS)
    single_generator = seeded(4)
    single = scheduler.step(noise[:1], t, latents[:1], generator=single_generator, return_dict=False)[0]
    torch.testing.assert_close(stepped[:1], single, rtol=0, atol=0)
    assert torch.equal(after, torch.randn(1, generator=single_generator))  # the run's generator moved past one draw


# --------------------------------------------------------------------------- 3. LCM-distilled UNets (guidance as an input)


def lcm_unet(unet: UNet2DConditionModel, dim: int = 8, seed: int = 5) -> UNet2DConditionModel:
    """``unet``'s architecture with ``time_cond_proj_dim`` set (as LCM-SDXL's and LCM-SD's), random weights."""
    torch.manual_seed(seed)
    config = {k: v for k, v in unet.config.items() if k != "_use_default_values"}  # that list would override the new value
    lcm = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": dim}).eval()
    assert lcm.config.time_cond_proj_dim == dim and lcm.time_embedding.cond_proj is not None
    return lcm


def test_guidance_embedding_is_vdms_sinusoid():
    w = torch.tensor([0.0, 1.5, 7.5])
    emb = guidance_embedding(w, 8)  # (3, 8)
    freqs = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 3)  # (4,): 1, 10000^(-1/3), ..., 1/10000
    angles = (1000 * w.double()[:, None] * freqs).float()  # (3, 4)
    torch.testing.assert_close(emb, torch.cat([angles.sin(), angles.cos()], 1), rtol=0, atol=1e-3)  # float32 angles up to 7500
    odd = guidance_embedding(w, 9)
    assert odd.shape == (3, 9) and torch.equal(odd[:, :8], emb) and not odd[:, 8].any()  # a zero column pads an odd width
    theirs = StableDiffusionXLPipeline.get_guidance_scale_embedding(None, w, embedding_dim=9)
    torch.testing.assert_close(odd, theirs)


def test_lcm_unet_on_xl_equals_diffusers(tiny_xl):
    components = dict(turbo(tiny_xl, "lcm"), unet=lcm_unet(tiny_xl["unet"]))
    pipe = ours(components)
    kw = dict(num_inference_steps=STEPS, guidance_scale=8.5, output_type="latent")
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, k: seen.append((a[0].shape[0], k["timestep_cond"].shape)), with_kwargs=True)
    try:
        out = pipe(SRC, TGT, edit="none", generator=seeded(6), **kw).images
    finally:
        hook.remove()
    assert seen == [(2, (2, 8))] * STEPS  # no unconditional half: the scale goes in as timestep_cond
    reference = diffusers_xl(components)
    for k, prompt in enumerate([SRC, TGT]):
        assert_close_to_scale(out[k], reference(prompt, generator=seeded(6), **kw).images[0])
    weaker = pipe(SRC, TGT, edit="none", generator=seeded(6), **dict(kw, guidance_scale=2.0)).images
    assert not torch.allclose(weaker, out, atol=1e-3)  # the UNet reads the scale
    edited = pipe(SRC, TGT, edit="replace", self_replace_max_res=8, generator=seeded(6), **kw).images
    assert_close_to_scale(edited[0], out[0])


def test_lcm_unet_on_sd_equals_diffusers(tiny_sd1):
    scheduler = LCMScheduler.from_config(tiny_sd1["scheduler"].config)
    components = dict(tiny_sd1, unet=lcm_unet(tiny_sd1["unet"]), scheduler=scheduler)
    pipe = ours(components, Prompt2PromptPipeline)
    latents = torch.randn(1, 4, 16, 16, generator=seeded(7))
    kw = dict(num_inference_steps=STEPS, guidance_scale=8.5, latents=latents, output_type="latent")
    with counting_unet_calls(pipe) as calls:
        out = pipe(SRC, TGT, edit="none", generator=seeded(8), **kw).images
    assert len(calls) == STEPS
    reference = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    for k, prompt in enumerate([SRC, TGT]):
        assert_close_to_scale(out[k], reference(prompt, generator=seeded(8), **kw).images[0])
    weaker = pipe(SRC, TGT, edit="none", generator=seeded(8), **dict(kw, guidance_scale=2.0)).images
    assert not torch.allclose(weaker, out, atol=1e-3)


# --------------------------------------------------------------------------- 4. float16 and bfloat16


def cpu_runs(dtype: torch.dtype) -> str | None:
    """None when this CPU build runs the tiny models' ops in ``dtype``, else why not."""
    try:
        x = torch.randn(1, 4, 8, 8).to(dtype)
        torch.nn.functional.conv2d(x, torch.randn(4, 4, 3, 3).to(dtype), padding=1)
        torch.nn.functional.group_norm(x, 2)
        torch.nn.functional.scaled_dot_product_attention(*(torch.randn(1, 2, 4, 8).to(dtype),) * 3)
        torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    except RuntimeError as err:
        return f"this CPU build of torch does not run {dtype} ({err})"
    return None


def in_dtype(components: dict, dtype: torch.dtype) -> dict:
    return {k: copy.deepcopy(v).to(dtype) if isinstance(v, torch.nn.Module) else v for k, v in components.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_edit_is_finite_and_close_to_float32(tiny_xl, dtype):
    if (reason := cpu_runs(dtype)) is not None:
        pytest.skip(reason)
    latents = torch.randn(1, 4, 16, 16, generator=seeded(9))
    kw = dict(edit="replace", self_replace_max_res=8, num_inference_steps=3, guidance_scale=7.5, output_type="np")
    full = ours(tiny_xl)(SRC, TGT, latents=latents, **kw)
    half_pipe = ours(in_dtype(tiny_xl, dtype))
    half = half_pipe(SRC, TGT, latents=latents.to(dtype), **kw)
    assert half.images.dtype == np.float32 and np.isfinite(half.images).all()
    np.testing.assert_allclose(half.images, full.images, atol=0.1, rtol=0)  # pixels in [0, 1]
    assert torch.isfinite(half.attention.maps).all()
    plain = half_pipe(SRC, TGT, latents=latents.to(dtype), **dict(kw, edit="none"))
    assert np.abs(half.images[1] - plain.images[1]).max() > 1e-3  # the edit ran in this dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_no_edit_equals_diffusers_in_that_dtype(tiny_xl, dtype):
    if (reason := cpu_runs(dtype)) is not None:
        pytest.skip(reason)
    components = in_dtype(tiny_xl, dtype)
    latents = torch.randn(1, 4, 16, 16, generator=seeded(10)).to(dtype)
    kw = dict(num_inference_steps=3, guidance_scale=7.5, latents=latents)
    pipe, reference = ours(components), diffusers_xl(components)
    out = pipe(SRC, TGT, edit="none", output_type="latent", **kw).images
    images = pipe(SRC, TGT, edit="none", output_type="np", **kw).images
    assert out.dtype == dtype
    for k, prompt in enumerate([SRC, TGT]):
        expected = reference(prompt, output_type="latent", **kw).images[0]
        assert expected.dtype == dtype
        assert_close_to_scale(out[k].float(), expected.float(), rel=1e-2)  # a couple of half-precision steps at the largest values
        np.testing.assert_allclose(images[k], reference(prompt, output_type="np", **kw).images[0], atol=2 / 255, rtol=0)
