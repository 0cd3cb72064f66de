"""The pipeline end to end on tiny random SD-1.x / SD-2.x-shaped models."""

import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from _util import assert_close_to_scale
from prompt2prompt import EditMode, LocalBlend, Prompt2PromptPipeline

STEPS = 4


def make(components):
    pipe = Prompt2PromptPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain(components):
    sd = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    return sd


def noise(seed=0):
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["tiny_sd1", "tiny_sd2"])
def test_no_injection_equals_plain_generation(kind, request):
    components = request.getfixturevalue(kind)
    prompts = ["a cat riding a bicycle", "a dog riding a car", "a red house"]
    lat = noise(1)
    out = make(components)(prompts[0], prompts[1:], edit="none", num_inference_steps=STEPS, latents=lat, output_type="np")
    assert out.images.shape == (3, 32, 32, 3) and out.edit_mode is EditMode.NONE
    sd = plain(components)
    for k, p in enumerate(prompts):
        expected = sd(p, num_inference_steps=STEPS, latents=lat, output_type="np").images[0]
        np.testing.assert_allclose(out.images[k], expected, atol=1e-5)


def test_generator_draws_one_noise_for_all_prompts(tiny_sd1):
    pipe = make(tiny_sd1)
    out = pipe("a cat", ["a cat", "a cat"], edit="none", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7), output_type="np")
    np.testing.assert_allclose(out.images[1], out.images[0], atol=1e-5)
    np.testing.assert_allclose(out.images[2], out.images[0], atol=1e-5)
    # and the source is what plain diffusers makes from the same seed
    sd = plain(tiny_sd1)
    expected = sd("a cat", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    np.testing.assert_allclose(out.images[0], expected, atol=1e-5)
    again = pipe("a cat", ["a cat", "a cat"], edit="none", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7), output_type="np")
    np.testing.assert_array_equal(again.images, out.images)  # reproducible


@pytest.mark.parametrize("scheduler, eta", [("EulerAncestralDiscreteScheduler", 0.0), ("DDPMScheduler", 0.0), ("DDIMScheduler", 1.0)])
def test_stochastic_schedulers_add_one_noise_to_all_prompts(tiny_sd1, scheduler, eta):
    """Algorithm 1's one seed holds for samplers that add noise at every step: each prompt row gets
    the same step noise, so identical prompts stay identical and the source matches plain diffusers."""
    import diffusers

    components = dict(tiny_sd1, scheduler=getattr(diffusers, scheduler).from_config(tiny_sd1["scheduler"].config))
    pipe = make(components)
    seed = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    out = pipe("a cat", ["a cat"], edit="replace", num_inference_steps=STEPS, generator=seed(), eta=eta, output_type="np")
    np.testing.assert_allclose(out.images[1], out.images[0], atol=1e-5)
    expected = plain(components)("a cat", num_inference_steps=STEPS, generator=seed(), eta=eta, output_type="np").images[0]
    np.testing.assert_allclose(out.images[0], expected, atol=1e-5)
    # unseeded runs follow torch's global seed
    torch.manual_seed(5)
    first = pipe("a cat", ["a dog"], num_inference_steps=STEPS, eta=eta, output_type="np").images
    torch.manual_seed(5)
    np.testing.assert_array_equal(pipe("a cat", ["a dog"], num_inference_steps=STEPS, eta=eta, output_type="np").images, first)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(edit_prompts=["a cat riding a motorcycle"]),
        dict(edit_prompts=["a fluffy cat riding a bicycle"]),
        dict(edit_prompts=["a cat riding a motorcycle"], equalizer={"motorcycle": 3.0}, local_blend=LocalBlend("bicycle", "motorcycle")),
        dict(edit_prompts=["a cat riding a motorcycle"], cross_replace_steps={"default_": 1.0, "motorcycle": (0.0, 0.5)}, self_replace_steps=(0.25, 1.0)),
    ],
)
def test_source_is_the_same_whatever_the_edit(tiny_sd1, kwargs):
    pipe = make(tiny_sd1)
    lat = noise(2)
    alone = pipe("a cat riding a bicycle", num_inference_steps=STEPS, latents=lat, output_type="latent").images
    out = pipe("a cat riding a bicycle", num_inference_steps=STEPS, latents=lat, output_type="latent", **kwargs)
    assert_close_to_scale(out.images[0], alone[0])
    assert (out.images[1] - out.images[0]).abs().max() > 1e-3  # the target was edited


@pytest.mark.parametrize("kind", ["tiny_sd1", "tiny_sd2"])
def test_identity_edit_reproduces_source(kind, request):
    pipe = make(request.getfixturevalue(kind))
    p = "a cat riding a bicycle"
    out = pipe(p, [p], edit="replace", cross_replace_steps=1.0, self_replace_steps=1.0, self_replace_max_res=16, num_inference_steps=STEPS, latents=noise(3), output_type="latent")
    assert_close_to_scale(out.images[1], out.images[0])


def test_target_maps_at_injected_steps_are_the_mapped_source_maps(tiny_sd1, monkeypatch):
    import prompt2prompt.attention as attention

    calls = []
    real = attention.edit_cross_attention

    def spy(source, targets, mapper, alphas, weights, equalizer=None):
        out = real(source, targets, mapper, alphas, weights, equalizer)
        calls.append((source.clone(), targets.clone(), weights, out.clone()))
        return out

    monkeypatch.setattr(attention, "edit_cross_attention", spy)
    # The explicit path, which layers with an attention mask take; the value path that the others
    # take is checked against it in test_value_injection_equals_the_explicit_edit.
    monkeypatch.setattr(attention.EditPlan, "value_injection", lambda self, step: None)
    pipe = make(tiny_sd1)
    out = pipe("a cat riding a bicycle", ["a cat riding a tricycle"], cross_replace_steps=0.5, num_inference_steps=STEPS, latents=noise(), output_type="latent")
    # 2 of 4 steps inject, in every cross-attention layer
    layers = sum(getattr(m, "is_cross_attention", False) for m in pipe.unet.modules())
    assert layers > 0 and len(calls) == 2 * layers
    src_tokens, tgt_tokens = out.attention.prompts
    (bike,) = src_tokens.positions("bicycle")
    tri = tgt_tokens.positions("tricycle")
    for source, targets, weights, edited in calls:
        assert weights is None or weights.eq(1).all()  # None: all tokens injected
        torch.testing.assert_close(edited[0][..., tri[0]], source[..., bike] / 2)  # split over 2 tokens
        torch.testing.assert_close(edited[0][..., tri[1]], source[..., bike] / 2)
        after = [j for j in range(tri[1] + 1, 77)]
        torch.testing.assert_close(edited[0][..., after], source[..., [j - 1 for j in after]])
        assert not torch.allclose(edited[0], targets[0])


def test_targets_are_independent_of_batch_companions(tiny_sd1):
    pipe = make(tiny_sd1)
    kw = dict(num_inference_steps=STEPS, latents=noise(5), output_type="latent")
    both = pipe("a cat riding a bicycle", ["a cat riding a motorcycle", "a dog riding a bicycle"], **kw).images
    one = pipe("a cat riding a bicycle", ["a dog riding a bicycle"], **kw).images
    assert_close_to_scale(both[2], one[1])


def test_auto_mode_choice_is_reported(tiny_sd1, caplog):
    pipe = make(tiny_sd1)
    kw = dict(num_inference_steps=2, latents=noise(), output_type="latent")
    with caplog.at_level(logging.INFO, logger="prompt2prompt.pipeline"):
        assert pipe("a cat", ["a dog"], **kw).edit_mode is EditMode.REPLACE
        assert pipe("a cat", ["a big cat"], **kw).edit_mode is EditMode.REFINE
    assert "chose replace" in caplog.text and "chose refine" in caplog.text


def test_attention_maps_per_prompt_and_token(tiny_sd1):
    pipe = make(tiny_sd1)
    out = pipe("a cat riding a bicycle", ["a cat riding a motorcycle"], num_inference_steps=STEPS, latents=noise(), output_type="latent")
    att = out.attention
    assert att.maps.shape == (2, att.resolution, att.resolution, 77) and att.maps.dtype == torch.float32
    assert att.resolution in (8, 16)
    # each pixel's map is an average of softmax rows: it sums to one over tokens
    torch.testing.assert_close(att.maps.sum(-1), torch.ones(2, att.resolution, att.resolution))
    assert att.word(1, "motorcycle").shape == (att.resolution, att.resolution)
    none = pipe("a cat", num_inference_steps=2, latents=noise(), output_type="latent", return_attention=False)
    assert none.attention is None and none.edit_mode is None


_VALUE_CASES = {
    "replace": ("a cat riding a car", {}),
    "replace+reweight": ("a cat riding a car", {"equalizer": {"car": 3.0, "cat": -1.0}}),
    "refine": ("a cat riding a red bicycle", {}),
    "refine+reweight": ("a cat riding a red bicycle", {"equalizer": {"red": 2.0}}),
    "replace, more tokens": ("a cat riding a unicycle", {"edit": "replace"}),
    "per-word windows": ("a cat riding a car", {"cross_replace_steps": {"default_": 0.8, "car": 0.3}}),
    "none+reweight": ("a cat riding a bicycle", {"edit": "none", "equalizer": {"bicycle": 2.0}}),
}


@pytest.mark.parametrize("kind", ["tiny_sd1", "tiny_sd2"])
@pytest.mark.parametrize("case", list(_VALUE_CASES))
def test_value_injection_equals_the_explicit_edit(kind, case, request, monkeypatch):
    """Every cross-attention edit runs on the values, SDPA(q_src, k_src, S v) + SDPA(q, k, o * v),
    without forming a map; it must give what forming the maps and editing them gives."""
    from prompt2prompt.edits import EditPlan

    if kind == "tiny_sd2" and case not in ("replace+reweight", "refine+reweight"):
        pytest.skip("the SD-2 layout is checked on the two cases that exercise every term")
    target, extra = _VALUE_CASES[case]
    pipe = make(request.getfixturevalue(kind))
    base = dict(num_inference_steps=STEPS, latents=noise(2), output_type="latent")
    kw = {**base, **extra}
    real, used = EditPlan.value_injection, []
    monkeypatch.setattr(EditPlan, "value_injection", lambda self, step: used.append((step, real(self, step))) or used[-1][1])
    fast = pipe("a cat riding a bicycle", [target], **kw)
    injections = [inj for _, inj in used if inj is not None]
    assert {step for step, inj in used if inj is not None} == {0, 1, 2}  # the value path ran: cross_replace_steps 0.8 of 4
    if case.startswith("replace") and case != "replace, more tokens":
        assert all(inj.source_diagonal is not None and inj.own is None for inj in injections)
    if case.startswith("refine"):
        assert all(inj.source is not None and inj.source_diagonal is None and inj.own is not None for inj in injections)
    if case == "replace, more tokens":
        assert all(inj.source is not None and inj.source_diagonal is None for inj in injections)
    if case == "none+reweight":
        assert all(inj.source is None for inj in injections)
    monkeypatch.setattr(EditPlan, "value_injection", lambda self, step: None)
    explicit = pipe("a cat riding a bicycle", [target], **kw)
    assert_close_to_scale(fast.images, explicit.images)
    torch.testing.assert_close(fast.attention.maps, explicit.attention.maps, atol=1e-5, rtol=1e-4)
    plain = pipe("a cat riding a bicycle", [target], edit="none", **base)
    assert not torch.allclose(fast.images[1], plain.images[1], atol=1e-3)  # the edit did something


@pytest.mark.parametrize("append_targets", [False, True])
def test_source_key_states_give_the_source_keys_once_per_step(append_targets):
    """to_k acts on each row alone, so to_k of the states with the source's row in the target rows
    is the keys with the source's row there: made once per step, shared by every layer."""
    from prompt2prompt.attention import P2PController

    ctrl = P2PController(None, num_prompts=3, guidance=True, latent_hw=(8, 8))
    states = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(0))  # (batch, tokens, channels)
    to_k = torch.nn.Linear(4, 8, bias=True)
    with torch.no_grad():
        keys = to_k(ctrl.source_key_states(7, states, append_targets))
        expected = ctrl.with_source_rows(to_k(states), append_targets)
    torch.testing.assert_close(keys, expected)
    rows = ctrl.source_key_states(7, states, append_targets)
    assert rows.shape[0] == 6 + 2 * append_targets and torch.equal(rows[4], states[3]) and torch.equal(rows[5], states[3])
    assert ctrl.source_key_states(7, states, append_targets) is rows  # the same step: made once
    assert ctrl.source_key_states(8, states, append_targets) is not rows  # the next step: made again


def test_recorded_maps_are_the_head_average_summed():
    from prompt2prompt.attention import P2PController

    ctrl = P2PController(None, num_prompts=2, guidance=True, latent_hw=(4, 4), record_sides=(4,))
    probs = [torch.rand(2, 5, 16, 3, generator=torch.Generator().manual_seed(k)).softmax(-1) for k in range(3)]  # (prompts, heads, pixels, tokens)
    for p in probs:
        ctrl.record(4, (4, 4), p)
    expected = sum(p.mean(1) for p in probs).reshape(2, 4, 4, 3)  # (prompts, h, w, tokens)
    torch.testing.assert_close(ctrl.maps[4], expected)
    assert ctrl.layer_calls[4] == 3 and ctrl.maps[4].dtype == torch.float32


def test_a_biased_value_projection_takes_the_explicit_edit(tiny_sd1, monkeypatch):
    """to_v(S E) = S to_v(E) only without a bias: with one, the edit forms the maps, and matches the
    edit of the same model through the explicit path (the reference's maps times the values)."""
    from prompt2prompt.attention import P2PController
    from prompt2prompt.edits import EditPlan

    pipe = make(tiny_sd1)
    layers = [m for m in pipe.unet.modules() if getattr(m, "is_cross_attention", False)]
    originals = [m.to_v for m in layers]
    try:
        for m in layers:
            biased = torch.nn.Linear(m.to_v.in_features, m.to_v.out_features, bias=True)
            biased.weight.data.copy_(m.to_v.weight.data)
            biased.bias.data.copy_(torch.randn(m.to_v.out_features, generator=torch.Generator().manual_seed(5)))
            m.to_v = biased
        kw = dict(num_inference_steps=STEPS, latents=noise(3), output_type="latent")
        calls = []
        real = P2PController.injected_states
        monkeypatch.setattr(P2PController, "injected_states", lambda self, *a: calls.append(1) or real(self, *a))
        edit = pipe("a cat riding a bicycle", ["a cat riding a red bicycle"], **kw)
        assert not calls  # the value form was not used
        monkeypatch.setattr(EditPlan, "value_injection", lambda self, step: None)
        explicit = pipe("a cat riding a bicycle", ["a cat riding a red bicycle"], **kw)
        assert torch.equal(edit.images, explicit.images)
    finally:
        for m, v in zip(layers, originals):
            m.to_v = v
    calls.clear()
    monkeypatch.undo()
    monkeypatch.setattr(P2PController, "injected_states", lambda self, *a: calls.append(1) or real(self, *a))
    pipe("a cat riding a bicycle", ["a cat riding a red bicycle"], **kw)
    assert calls  # without the bias, the same edit takes the value form


@pytest.mark.parametrize("target", ["a cat riding a car", "a cat riding a red bicycle"], ids=["replace", "refine"])
def test_images_do_not_depend_on_what_is_recorded(tiny_sd1, target):
    """The web page records maps for its attention view and the CLI does not: same pixels, bit for bit."""
    pipe = make(tiny_sd1)
    kw = dict(num_inference_steps=STEPS, latents=noise(4), output_type="latent")
    recorded = pipe("a cat riding a bicycle", [target], return_attention=True, **kw)
    unrecorded = pipe("a cat riding a bicycle", [target], return_attention=False, **kw)
    assert recorded.attention is not None and unrecorded.attention is None
    assert torch.equal(recorded.images, unrecorded.images)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_finite(tiny_sd1, dtype):
    pipe = make(tiny_sd1).to(dtype=dtype)
    try:
        out = pipe("a cat riding a bicycle", ["a fluffy cat riding a bicycle"], equalizer={"fluffy": 2.0}, local_blend=LocalBlend("cat", "cat"),
                   num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np")
        assert np.isfinite(out.images).all() and out.images.shape == (2, 32, 32, 3)
        assert torch.isfinite(out.attention.maps).all()
    finally:
        pipe.to(dtype=torch.float32)


def test_processors_restored_after_call_and_after_exception(tiny_sd1, monkeypatch):
    pipe = make(tiny_sd1)
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    originals = dict(pipe.unet.attn_processors)
    pipe("a cat", ["a dog"], num_inference_steps=2, latents=noise(), output_type="latent")
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before

    def boom(*a, **k):
        raise RuntimeError("scheduler failed")

    monkeypatch.setattr(pipe.scheduler, "step", boom)
    with pytest.raises(RuntimeError, match="scheduler failed"):
        pipe("a cat", ["a dog"], num_inference_steps=2, latents=noise(), output_type="latent")
    after = pipe.unet.attn_processors
    assert all(after[k] is originals[k] for k in originals)


@pytest.mark.parametrize("kind", ["tiny_sd1", "tiny_sd2"])
def test_from_pretrained_and_from_pipe(kind, request, tmp_path):
    components = request.getfixturevalue(kind)
    sd = plain(components)
    sd.save_pretrained(tmp_path / "model", safe_serialization=True)
    loaded = Prompt2PromptPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.prediction_type == components["scheduler"].config.prediction_type
    kw = dict(num_inference_steps=STEPS, latents=noise(6), output_type="latent")
    direct = make(components)("a cat riding a bicycle", ["a dog riding a bicycle"], **kw).images
    assert_close_to_scale(loaded("a cat riding a bicycle", ["a dog riding a bicycle"], **kw).images, direct)
    piped = Prompt2PromptPipeline.from_pipe(sd)
    piped.set_progress_bar_config(disable=True)
    assert_close_to_scale(piped("a cat riding a bicycle", ["a dog riding a bicycle"], **kw).images, direct)


def test_from_pretrained_refuses_pickle_unless_allowed(tiny_sd1, tmp_path):
    plain(tiny_sd1).save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(Exception, match="safetensors"):
        Prompt2PromptPipeline.from_pretrained(tmp_path / "pickled")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        Prompt2PromptPipeline.from_pretrained(tmp_path / "pickled", use_safetensors=False)
    pipe = Prompt2PromptPipeline.from_pretrained(tmp_path / "pickled", allow_pickle=True)
    assert pipe.unet is not None


def test_unknown_words_warn_once(tiny_sd1):
    pipe = make(tiny_sd1)
    pipe.vocabulary = frozenset({"a", "cat", "riding", "bicycle"})
    kw = dict(num_inference_steps=1, cross_replace_steps=1.0, latents=noise(), output_type="latent")  # 0.8 of 1 step would warn too
    with pytest.warns(UserWarning, match="outside this model.s vocabulary: car;"):
        pipe("a cat riding a bicycle", ["a cat riding a car"], **kw)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("a cat riding a bicycle", ["a cat riding a car"], **kw)  # the same word: no second warning


def test_self_attention_of_the_source_is_recorded(tiny_sd1):
    """output.self_attention equals softmax(q k^T) of the source's conditional row, computed here by
    a forward hook on the same layers, averaged over heads, layers and steps."""
    pipe = make(tiny_sd1)
    unet = tiny_sd1["unet"]
    seen = []

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        if kwargs.get("encoder_hidden_states") is not None or hidden.shape[1] != 8 * 8:
            return
        row = hidden[2:3]  # batch [uncond src, uncond tgt, cond src, cond tgt] -> conditional source
        q = module.to_q(row).view(1, -1, module.heads, module.to_q.out_features // module.heads).transpose(1, 2)  # (1, heads, pixels, dim)
        k = module.to_k(row).view(1, -1, module.heads, module.to_k.out_features // module.heads).transpose(1, 2)
        seen.append(((q @ k.transpose(-1, -2)) * module.scale).softmax(-1).mean(1)[0])  # (pixels, pixels)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for n, m in unet.named_modules() if n.endswith("attn1")]
    try:
        out = pipe("a cat riding a bicycle", ["a cat riding a car"], num_inference_steps=STEPS, latents=noise(), output_type="np",
                   return_self_attention=True, attention_res=8)
    finally:
        for h in handles:
            h.remove()
    assert out.self_attention_res == 8 and out.self_attention.shape == (64, 64)
    torch.testing.assert_close(out.self_attention.sum(-1), torch.ones(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.self_attention, torch.stack(seen).mean(0), atol=1e-5, rtol=1e-4)
    assert make(tiny_sd1)("a cat", num_inference_steps=1, latents=noise(), output_type="np").self_attention is None
