"""A kept source pass (`pipe.source`) and edits from it (``source=``): the same images, maps and
``out`` fields as the call without it, half the UNet rows for one target, and every argument that
would change the source's pass refused before any UNet call."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import counting_unet_calls
from prompt2prompt import LocalBlend, Prompt2PromptPipeline, Prompt2PromptXLPipeline, SourcePass
from prompt2prompt.arguments import ArgumentError
from prompt2prompt.source_pass import source_pass_bytes

STEPS = 4
PROMPT = "a red circle and a blue square"
#: A budget that covers every edit below: every step, self-attention at every side of the tiny models.
BUDGET = dict(cross_replace_steps=1.0, self_replace_steps=1.0, self_replace_max_res=16)

#: Edit kinds: the call's keyword arguments besides the prompt, steps, seed and output type.
KINDS = {
    "replace": dict(edit_prompts="a red circle and a blue circle"),
    "refine": dict(edit_prompts="a big red circle and a blue square"),
    "reweight": dict(edit_prompts="a red circle and a blue square", equalizer={"red": 3.0}),
    "per-word windows": dict(edit_prompts="a red circle and a green square", cross_replace_steps={"default_": 0.5, "green": (0.25, 1.0)}),
    "self windows": dict(edit_prompts="a red circle and a blue circle", self_replace_steps=(0.25, 0.75), self_replace_max_res=16),
    "local blend": dict(edit_prompts="a red circle and a blue circle", local_blend=LocalBlend("square", "circle", start=0.25)),
    "local blend subtract": dict(edit_prompts="a red circle and a blue circle",
                                 local_blend=LocalBlend("square", "circle", start=0.25, subtract_words="red")),
    "several targets": dict(edit_prompts=["a red circle and a blue circle", "a green circle and a blue square"]),
    "no guidance": dict(edit_prompts="a red circle and a blue circle", guidance_scale=1.0),
}


def make(components, cls=Prompt2PromptPipeline):
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seed(n=3):
    return torch.Generator().manual_seed(n)


def assert_same(ref, out, atol=1e-4):
    """Images, maps, the self-attention map and the edit mode of two outputs agree to float tolerance."""
    assert out.edit_mode == ref.edit_mode
    torch.testing.assert_close(out.images, ref.images, atol=atol, rtol=0)
    assert (out.attention is None) == (ref.attention is None)
    if ref.attention is not None:
        torch.testing.assert_close(out.attention.maps, ref.attention.maps, atol=1e-6, rtol=1e-4)
        assert out.attention.resolution == ref.attention.resolution
        assert [p.prompt for p in out.attention.prompts] == [p.prompt for p in ref.attention.prompts]
    assert (out.self_attention is None) == (ref.self_attention is None)
    if ref.self_attention is not None:
        torch.testing.assert_close(out.self_attention, ref.self_attention, atol=1e-6, rtol=1e-4)
        assert out.self_attention_res == ref.self_attention_res


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    return make(tiny_sd1)


@pytest.fixture(scope="module")
def sd2(tiny_sd2):
    return make(tiny_sd2)


@pytest.fixture(scope="module")
def passes(sd1, sd2):
    """One pass per model and guidance (the ``no guidance`` kind runs at scale 1)."""
    out = {}
    for name, pipe in (("sd1", sd1), ("sd2", sd2)):
        for scale in (7.5, 1.0):
            out[name, scale] = pipe.source(PROMPT, num_inference_steps=STEPS, guidance_scale=scale, generator=seed(), **BUDGET)
    return out


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize("model", ["sd1", "sd2"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_an_edit_from_a_kept_pass_equals_the_full_edit(request, passes, model, kind):
    pipe = request.getfixturevalue(model)
    kwargs = dict(KINDS[kind])
    scale = kwargs.pop("guidance_scale", 7.5)
    common = dict(num_inference_steps=STEPS, guidance_scale=scale, output_type="pt", return_self_attention=True, **kwargs)
    ref = pipe(PROMPT, generator=seed(), **common)
    with counting_unet_calls(pipe) as calls:
        out = pipe(PROMPT, source=passes[model, scale], **common)
    assert len(calls) == STEPS
    assert_same(ref, out)


def test_the_pass_alone_gives_the_source_image(sd1, passes):
    """The source image comes from the kept final latents: the same as a call without targets."""
    ref = sd1(PROMPT, num_inference_steps=STEPS, generator=seed(), output_type="pt", return_self_attention=True)
    out = sd1(PROMPT, "a red circle and a blue circle", source=passes["sd1", 7.5], output_type="pt", return_self_attention=True)
    torch.testing.assert_close(out.images[:1], ref.images, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.attention.maps[:1], ref.attention.maps, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(out.self_attention, ref.self_attention, atol=1e-6, rtol=1e-4)


def test_a_re_edit_of_one_target_runs_half_the_unet_rows(sd1, passes):
    rows = []
    handle = sd1.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        sd1(PROMPT, "a red circle and a blue circle", num_inference_steps=STEPS, generator=seed(), output_type="latent")
        full = sum(rows)
        rows.clear()
        sd1(PROMPT, "a red circle and a blue circle", source=passes["sd1", 7.5], output_type="latent")
        assert sum(rows) * 2 == full == 4 * STEPS
    finally:
        handle.remove()


@pytest.mark.parametrize("scheduler, eta", [("EulerAncestralDiscreteScheduler", 0.0), ("DDIMScheduler", 0.7)])
def test_a_stochastic_sampler_draws_the_sources_step_noise(tiny_sd1, scheduler, eta):
    import diffusers

    pipe = make(dict(tiny_sd1, scheduler=getattr(diffusers, scheduler).from_config(tiny_sd1["scheduler"].config)))
    kw = dict(num_inference_steps=STEPS, eta=eta, output_type="pt")
    src = pipe.source(PROMPT, generator=seed(), num_inference_steps=STEPS, eta=eta, **BUDGET)
    ref = pipe(PROMPT, "a red circle and a blue circle", generator=seed(), **kw)
    assert_same(ref, pipe(PROMPT, "a red circle and a blue circle", source=src, **kw))  # the pass's generator state
    assert_same(ref, pipe(PROMPT, "a red circle and a blue circle", source=src, generator=seed(), **kw))  # the same seed
    with pytest.raises(ArgumentError) as err:
        pipe(PROMPT, "a red circle and a blue circle", source=src, generator=seed(4), **kw)
    assert err.value.argument == "generator"


def test_a_guidance_distilled_unet_with_an_lcm_sampler(tiny_sd1):
    """An LCM UNet takes the guidance as ``timestep_cond``, one row per batch row: the targets' rows only."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    torch.manual_seed(5)
    config = {k: v for k, v in tiny_sd1["unet"].config.items() if k != "_use_default_values"}
    unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 8}).eval()
    pipe = make(dict(tiny_sd1, unet=unet, scheduler=LCMScheduler.from_config(tiny_sd1["scheduler"].config)))
    kw = dict(num_inference_steps=STEPS, guidance_scale=4.0, output_type="pt")
    src = pipe.source(PROMPT, generator=seed(), num_inference_steps=STEPS, guidance_scale=4.0, **BUDGET)
    ref = pipe(PROMPT, "a red circle and a blue circle", generator=seed(), **kw)
    assert_same(ref, pipe(PROMPT, "a red circle and a blue circle", source=src, **kw))


def picture(size=(32, 32)):
    rng = np.random.default_rng(0)
    return np.asarray(PIL.Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, PIL.Image.BICUBIC))


@pytest.mark.parametrize("method", ["null-text", "direct", "negative-prompt"])
def test_an_inversion_fixes_the_source_and_edits_from_it_match(sd1, method):
    inv = sd1.invert(picture(), PROMPT, method=method, num_inference_steps=STEPS, num_inner_steps=2)
    src = sd1.source(PROMPT, inversion=inv, **BUDGET)
    kw = dict(inversion=inv, output_type="pt", local_blend=LocalBlend("square", "circle", start=0.25))
    ref = sd1(PROMPT, "a red circle and a blue circle", **kw)
    assert_same(ref, sd1(PROMPT, "a red circle and a blue circle", source=src, **kw))
    with pytest.raises(ArgumentError) as err:
        sd1(PROMPT, "a red circle and a blue circle", source=src, output_type="pt")
    assert err.value.argument == "inversion"


# --------------------------------------------------------------------------- SDXL


@pytest.fixture(scope="module")
def xl(tiny_xl):
    return make(tiny_xl, Prompt2PromptXLPipeline)


@pytest.mark.parametrize("kind", ["replace", "refine", "local blend subtract", "several targets", "no guidance", "self windows"])
def test_sdxl_edits_from_a_kept_pass_equal_the_full_edit(xl, kind):
    kwargs = dict(KINDS[kind])
    kwargs["self_replace_max_res"] = 8  # the tiny SDXL UNet attends at side 8 only
    scale = kwargs.pop("guidance_scale", 7.5)
    common = dict(num_inference_steps=STEPS, guidance_scale=scale, output_type="pt", return_self_attention=True,
                  original_size=(48, 48), guidance_rescale=0.3)
    src = xl.source(PROMPT, generator=seed(), cross_replace_steps=1.0, self_replace_steps=1.0, self_replace_max_res=8,
                    **{k: v for k, v in common.items() if k not in ("output_type", "return_self_attention")})
    ref = xl(PROMPT, generator=seed(), **common, **kwargs)
    assert_same(ref, xl(PROMPT, source=src, **common, **kwargs))


@pytest.mark.parametrize("method", ["null-text", "direct"])
def test_sdxl_inversion_edits_from_a_kept_pass_match(xl, method):
    inv = xl.invert(picture(), PROMPT, method=method, num_inference_steps=STEPS, num_inner_steps=2)
    src = xl.source(PROMPT, inversion=inv, **dict(BUDGET, self_replace_max_res=8))
    kw = dict(inversion=inv, output_type="pt", self_replace_max_res=8, local_blend=LocalBlend("square", "circle", start=0.25))
    assert_same(xl(PROMPT, "a red circle and a blue circle", **kw), xl(PROMPT, "a red circle and a blue circle", source=src, **kw))


def test_sdxl_refuses_other_conditions(xl):
    src = xl.source(PROMPT, num_inference_steps=STEPS, generator=seed(), negative_prompt="blurry", **dict(BUDGET, self_replace_max_res=8))
    for name, value in [("original_size", (64, 64)), ("crops_coords_top_left", (2, 2)), ("target_size", (16, 16)),
                        ("guidance_rescale", 0.5), ("prompt_2", "a green square"), ("negative_prompt_2", "ugly")]:
        with counting_unet_calls(xl) as calls, pytest.raises(ArgumentError) as err:
            xl(PROMPT, "a red circle and a blue circle", source=src, self_replace_max_res=8, **{name: value})
        assert err.value.argument == name and calls == [], name
    with pytest.raises(ArgumentError) as err:  # None is zeros on SDXL base (force_zeros_for_empty_prompt), not ""
        xl(PROMPT, "a red circle and a blue circle", source=src, negative_prompt="", self_replace_max_res=8)
    assert err.value.argument == "negative_prompt"


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def small_pass(sd1):
    """A pass with a narrower budget than the defaults of an edit: cross 0.5, self 0.25 at sides <= 8."""
    return sd1.source(PROMPT, num_inference_steps=STEPS, generator=seed(), cross_replace_steps=0.5, self_replace_steps=0.25,
                      self_replace_max_res=8, negative_prompt="blurry")


MISMATCHES = [
    ("prompt", dict(prompt="a red circle and a blue triangle")),
    ("num_inference_steps", dict(num_inference_steps=STEPS + 1)),
    ("guidance_scale", dict(guidance_scale=5.0)),
    ("height", dict(height=16)),
    ("width", dict(width=16)),
    ("negative_prompt", dict(negative_prompt="ugly")),
    ("generator", dict(generator=torch.Generator().manual_seed(99))),
    ("latents", dict(latents=torch.zeros(1, 4, 16, 16))),
    ("eta", dict(eta=0.5)),
]


@pytest.mark.parametrize("argument, change", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_an_argument_that_changes_the_source_is_refused_before_any_unet_call(sd1, small_pass, argument, change):
    kwargs = dict(prompt=PROMPT, edit_prompts="a red circle and a blue circle", cross_replace_steps=0.5, self_replace_steps=0.25,
                  self_replace_max_res=8, source=small_pass)
    kwargs.update(change)
    if argument == "generator":  # a generator is compared by the latents it draws
        kwargs["generator"] = torch.Generator().manual_seed(99)
    with counting_unet_calls(sd1) as calls, pytest.raises(ArgumentError) as err:
        sd1(**kwargs)
    assert err.value.argument == argument, str(err.value)
    assert calls == []


def test_the_scheduler_and_the_model_are_checked(tiny_sd1, sd2, small_pass):
    import diffusers

    other = make(dict(tiny_sd1, scheduler=diffusers.EulerDiscreteScheduler.from_config(tiny_sd1["scheduler"].config)))
    for pipe in (other, sd2):
        with counting_unet_calls(pipe) as calls, pytest.raises(ArgumentError) as err:
            pipe(PROMPT, "a red circle and a blue circle", source=small_pass, cross_replace_steps=0.5, self_replace_steps=0.25,
                 self_replace_max_res=8)
        assert err.value.argument == "source" and calls == []
    assert "SD" in str(err.value) and "pipe.source" in str(err.value)
    with pytest.raises(ArgumentError) as err:
        sd2(PROMPT, "a red circle", source={"not": "a pass"})
    assert err.value.argument == "source"


BUDGETS = [
    ("cross_replace_steps", dict(cross_replace_steps=0.8), "cross_replace_steps=(0.0, 0.8)"),
    ("cross_replace_steps", dict(cross_replace_steps={"default_": 0.5, "circle": (0.0, 1.0)}), "cross_replace_steps=(0.0, 1.0)"),
    ("self_replace_steps", dict(self_replace_steps=0.5), "self_replace_steps=(0.0, 0.5)"),
    ("self_replace_max_res", dict(self_replace_max_res=16), "self_replace_max_res=16"),
]


@pytest.mark.parametrize("argument, change, fix", BUDGETS, ids=["cross", "cross word", "self steps", "self side"])
def test_an_edit_beyond_the_budget_is_refused_with_the_pass_that_covers_it(sd1, small_pass, argument, change, fix):
    kwargs = dict(cross_replace_steps=0.5, self_replace_steps=0.25, self_replace_max_res=8, negative_prompt="blurry")
    kwargs.update(change)
    with counting_unet_calls(sd1) as calls, pytest.raises(ArgumentError) as err:
        sd1(PROMPT, "a red circle and a blue circle", source=small_pass, **kwargs)
    assert err.value.argument == argument and calls == []
    assert "pipe.source(" in str(err.value) and fix in str(err.value), str(err.value)


def test_within_the_budget_the_narrow_pass_edits(sd1, small_pass):
    kw = dict(cross_replace_steps=0.5, self_replace_steps=0.25, self_replace_max_res=8, negative_prompt="blurry", output_type="pt")
    ref = sd1(PROMPT, "a red circle and a blue circle", num_inference_steps=STEPS, generator=seed(), **kw)
    assert_same(ref, sd1(PROMPT, "a red circle and a blue circle", source=small_pass, **kw))


def test_a_budget_must_be_one_window(sd1):
    with pytest.raises(ArgumentError) as err:
        sd1.source(PROMPT, num_inference_steps=STEPS, cross_replace_steps={"circle": 1.0})
    assert err.value.argument == "cross_replace_steps"


# --------------------------------------------------------------------------- what is kept, save and load


def test_nbytes_is_the_sum_of_the_tensors_and_the_shapes_predict_it(sd1, passes):
    src = passes["sd1", 7.5]
    assert src.nbytes == sum(t.numel() * t.element_size() for t in src.tensors().values())
    assert all(t.device.type == "cpu" for t in src.tensors().values())
    assert src.latents.dtype == sd1.unet.dtype and all(m.dtype == torch.float32 for m in src.cross_maps.values())
    predicted = source_pass_bytes(sd1.unet, (16, 16), STEPS, src.cross_steps, src.self_steps, src.self_max_res, sd1.unet.dtype,
                                  77, 32, generator_bytes=src.step_generator.numel())
    assert predicted == src.nbytes


def test_device_cpu_keeps_the_tensors_on_the_cpu(sd1):
    src = sd1.source(PROMPT, num_inference_steps=2, generator=seed(), device="cpu")
    assert {t.device.type for t in src.tensors().values()} == {"cpu"}
    moved = src.to("cpu")
    assert moved is not src and moved.nbytes == src.nbytes and moved.identity == src.identity
    assert "SourcePass(prompt='a red circle and a blue square', steps=2" in repr(src) and "tensor" not in repr(src)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_pass_kept_on_the_cpu_edits_on_the_gpu(tiny_sd1):
    import copy

    pipe = make(copy.deepcopy(tiny_sd1)).to("cuda")  # a copy: the session's models stay on the CPU
    src = pipe.source(PROMPT, num_inference_steps=STEPS, generator=torch.Generator("cuda").manual_seed(3), device="cpu", **BUDGET)
    assert {t.device.type for t in src.tensors().values()} == {"cpu"}
    kw = dict(output_type="pt", local_blend=LocalBlend("square", "circle"))
    ref = pipe(PROMPT, "a red circle and a blue circle", num_inference_steps=STEPS, generator=torch.Generator("cuda").manual_seed(3), **kw)
    assert_same(ref, pipe(PROMPT, "a red circle and a blue circle", source=src, **kw), atol=1e-3)


def test_save_and_load_round_trip(sd1, passes, tmp_path):
    src = passes["sd1", 7.5]
    path = src.save(tmp_path / "pass")
    assert path.name == "pass.safetensors" and (tmp_path / "pass.json").is_file()
    assert not list(tmp_path.glob("*.tmp"))
    loaded = SourcePass.load(tmp_path / "pass")
    assert loaded.identity == json.loads(json.dumps(src.identity)) and loaded.given == src.given
    mine, theirs = src.tensors(), loaded.tensors()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    kw = dict(output_type="pt", local_blend=LocalBlend("square", "circle"))
    assert_same(sd1(PROMPT, "a red circle and a blue circle", source=src, **kw),
                sd1(PROMPT, "a red circle and a blue circle", source=loaded, **kw), atol=0)


def test_a_corrupted_truncated_or_foreign_file_is_refused(sd1, sd2, passes, tmp_path):
    path = passes["sd1", 7.5].save(tmp_path / "pass.safetensors")
    data = path.read_bytes()
    sidecar = tmp_path / "pass.json"
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="truncated or altered"):
        SourcePass.load(path)
    flipped = bytearray(data)
    flipped[len(data) - 100] ^= 0xFF  # one value changed
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="truncated or altered"):
        SourcePass.load(path)
    path.write_bytes(data)
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(meta, format="prompt2prompt-inversion")))  # another format
    with pytest.raises(ValueError, match="is not a version-1"):
        SourcePass.load(path)
    sidecar.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable"):
        SourcePass.load(path)
    sidecar.unlink()
    with pytest.raises(ValueError, match="does not exist"):
        SourcePass.load(path)
    foreign = sd2.source(PROMPT, num_inference_steps=STEPS, generator=seed()).save(tmp_path / "sd2")
    with pytest.raises(ArgumentError) as err:  # a pass of another model: refused when used
        sd1(PROMPT, "a red circle and a blue circle", source=SourcePass.load(foreign))
    assert err.value.argument == "source"


# --------------------------------------------------------------------------- a full call that keeps its pass (keep_source)


def assert_same_pass(ref: SourcePass, kept: SourcePass, atol=1e-4, same_generator=True):
    """Two passes agree: what identifies them exactly, every tensor to float tolerance (a batch of
    one and a batch of several rows round differently); ``same_generator=False``: but the state of
    the step-noise generator, which each call without a generator seeds afresh."""
    assert kept.identity == ref.identity and kept.given == ref.given
    assert (kept.cross_steps, kept.self_steps, kept.self_max_res) == (ref.cross_steps, ref.self_steps, ref.self_max_res)
    assert kept.self_calls == ref.self_calls and kept.generator_device == ref.generator_device
    mine, theirs = ref.tensors(), kept.tensors()
    assert mine.keys() == theirs.keys()
    if not same_generator:
        mine.pop("step_generator", None), theirs.pop("step_generator", None)
    for name in mine:
        assert theirs[name].dtype == mine[name].dtype and theirs[name].device == mine[name].device, name
        torch.testing.assert_close(theirs[name], mine[name], atol=atol, rtol=1e-4, msg=name)
    torch.testing.assert_close(kept.noise, ref.noise, atol=0, rtol=0)
    torch.testing.assert_close(kept.latents[0], ref.latents[0], atol=0, rtol=0)


#: Full calls that keep their pass: the call's keyword arguments (besides prompt, steps, seed) and the
#: `pipe.source` budget its windows make.
KEEPS = {
    "replace": (dict(edit_prompts="a red circle and a blue circle"),
                dict(cross_replace_steps=0.8, self_replace_steps=0.4)),
    "per-word windows, self windows, blend": (
        dict(edit_prompts=["a red circle and a green square", "a red circle and a blue circle"],
             cross_replace_steps={"default_": 0.5, "green": (0.25, 1.0)}, self_replace_steps=(0.25, 0.75), self_replace_max_res=16,
             local_blend=LocalBlend("square", "circle", start=0.25), equalizer={"red": 2.0}),
        dict(cross_replace_steps=1.0, self_replace_steps=(0.25, 0.75), self_replace_max_res=16)),
    "no guidance": (dict(edit_prompts="a red circle and a blue circle", guidance_scale=1.0),
                    dict(cross_replace_steps=0.8, self_replace_steps=0.4, guidance_scale=1.0)),
    "no targets": (dict(), dict(cross_replace_steps=0.8, self_replace_steps=0.4)),
}


@pytest.mark.parametrize("model", ["sd1", "sd2"])
@pytest.mark.parametrize("kind", list(KEEPS))
def test_a_full_call_keeps_the_pass_source_makes_in_one_batch(request, model, kind):
    pipe = request.getfixturevalue(model)
    call, budget = KEEPS[kind]
    call = dict(call)
    scale = call.pop("guidance_scale", 7.5)
    common = dict(num_inference_steps=STEPS, guidance_scale=scale, output_type="pt", return_self_attention=True, **call)
    ref = pipe(PROMPT, generator=seed(), **common)
    assert ref.source_pass is None
    with counting_unet_calls(pipe) as calls:
        out = pipe(PROMPT, generator=seed(), keep_source=True, **common)
    assert len(calls) == STEPS  # one batch: the source and the targets together
    assert torch.equal(out.images, ref.images) and out.edit_mode == ref.edit_mode  # bit-identical
    assert torch.equal(out.attention.maps, ref.attention.maps) and torch.equal(out.self_attention, ref.self_attention)
    budget = dict(budget)
    made = pipe.source(PROMPT, num_inference_steps=STEPS, guidance_scale=budget.pop("guidance_scale", 7.5), generator=seed(), **budget)
    assert_same_pass(made, out.source_pass)
    if call.get("edit_prompts"):  # an edit from the kept pass is the full edit
        assert_same(ref, pipe(PROMPT, source=out.source_pass, **common))


@pytest.mark.parametrize("scheduler, eta", [("EulerAncestralDiscreteScheduler", 0.0), ("DDIMScheduler", 0.7)])
def test_a_kept_pass_of_a_stochastic_sampler_keeps_its_step_noise(tiny_sd1, scheduler, eta):
    import diffusers

    pipe = make(dict(tiny_sd1, scheduler=getattr(diffusers, scheduler).from_config(tiny_sd1["scheduler"].config)))
    kw = dict(num_inference_steps=STEPS, eta=eta, output_type="pt")
    ref = pipe(PROMPT, "a red circle and a blue circle", generator=seed(), **kw)
    out = pipe(PROMPT, "a red circle and a blue circle", generator=seed(), keep_source=True, **kw)
    assert torch.equal(out.images, ref.images)
    # the sampler's latents are large (init_noise_sigma): a batch's rounding differs by ~1e-5 of them
    assert_same_pass(pipe.source(PROMPT, generator=seed(), num_inference_steps=STEPS, eta=eta), out.source_pass, atol=1e-3)
    assert_same(ref, pipe(PROMPT, "a red circle and a blue circle", source=out.source_pass, **kw))


@pytest.mark.parametrize("method", ["null-text", "direct"])
def test_a_full_call_from_an_inversion_keeps_its_pass(sd1, method):
    inv = sd1.invert(picture(), PROMPT, method=method, num_inference_steps=STEPS, num_inner_steps=2)
    kw = dict(inversion=inv, output_type="pt", local_blend=LocalBlend("square", "circle", start=0.25))
    ref = sd1(PROMPT, "a red circle and a blue circle", **kw)
    out = sd1(PROMPT, "a red circle and a blue circle", keep_source=True, **kw)
    assert torch.equal(out.images, ref.images)
    assert_same_pass(sd1.source(PROMPT, inversion=inv), out.source_pass, same_generator=False)  # DDIM, eta 0: unused
    assert_same(ref, sd1(PROMPT, "a red circle and a blue circle", source=out.source_pass, **kw))


def test_keep_source_on_the_cpu_and_its_refusals(sd1):
    out = sd1(PROMPT, "a red circle and a blue circle", num_inference_steps=2, generator=seed(), keep_source=True, source_device="cpu",
              output_type="latent")
    assert {t.device.type for t in out.source_pass.tensors().values()} == {"cpu"}
    for kwargs in (dict(keep_source="yes"), dict(keep_source=True, return_dict=False),
                   dict(keep_source=True, source=out.source_pass)):
        with counting_unet_calls(sd1) as calls, pytest.raises(ArgumentError) as err:
            sd1(PROMPT, "a red circle and a blue circle", num_inference_steps=2, **kwargs)
        assert err.value.argument == "keep_source" and calls == [], kwargs


@pytest.mark.parametrize("kind", ["replace", "several targets", "no guidance"])
def test_sdxl_a_full_call_keeps_the_pass_source_makes(xl, kind):
    kwargs = dict(KINDS[kind])
    scale = kwargs.pop("guidance_scale", 7.5)
    common = dict(num_inference_steps=STEPS, guidance_scale=scale, original_size=(48, 48), guidance_rescale=0.3,
                  cross_replace_steps=1.0, self_replace_steps=0.5, self_replace_max_res=8)
    ref = xl(PROMPT, generator=seed(), output_type="pt", return_self_attention=True, **common, **kwargs)
    with counting_unet_calls(xl) as calls:
        out = xl(PROMPT, generator=seed(), output_type="pt", return_self_attention=True, keep_source=True, **common, **kwargs)
    assert len(calls) == STEPS
    assert torch.equal(out.images, ref.images) and torch.equal(out.attention.maps, ref.attention.maps)
    assert_same_pass(xl.source(PROMPT, generator=seed(), **common), out.source_pass)
    assert_same(ref, xl(PROMPT, source=out.source_pass, output_type="pt", return_self_attention=True, **common, **kwargs))
