"""Configured like the paper's code, the engine equals the reference algorithm (tests/reference_p2p.py).

The oracle computes softmax explicitly in every layer, stores every map and counts layer calls,
as the released code does; the engine uses SDPA, records only what it needs and is told the step.
Tiny model: attention at sides 16 and 8, so self_replace_max_res=8 / LocalBlend resolution=8
play the roles of the paper's 16 at SD 512.
"""

import pytest
import torch

import reference_p2p as ref
from _util import assert_close_to_scale
from prompt2prompt import LocalBlend

T = 6
G = 7.5
TH = 0.99  # random weights give flat maps: only a high threshold leaves a partial mask


@pytest.fixture(scope="module")
def noise():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))


def engine(pipe, noise, prompts, **kw):
    kw.setdefault("self_replace_max_res", 8)
    return pipe(prompts[0], prompts[1:], num_inference_steps=T, guidance_scale=G, latents=noise, output_type="latent", **kw).images


def oracle(tiny_sd1, noise, prompts, controller):
    return ref.run_reference(tiny_sd1, prompts, controller, T, G, noise)




def test_replace_with_self_injection(pipe, tiny_sd1, noise):
    prompts = ["a cat riding a bicycle", "a cat riding a motorcycle", "a dog riding a bicycle"]
    tok = tiny_sd1["tokenizer"]
    ctrl = ref.AttentionReplace(prompts, T, 0.8, 0.4, tokenizer=tok, self_max_res=8)
    assert_close_to_scale(engine(pipe, noise, prompts, edit="replace", cross_replace_steps=0.8, self_replace_steps=0.4), oracle(tiny_sd1, noise, prompts, ctrl))


def test_refine(pipe, tiny_sd1, noise):
    prompts = ["a cat riding a bicycle", "a fluffy cat riding a red bicycle"]
    ctrl = ref.AttentionRefine(prompts, T, 0.6, 0.2, tokenizer=tiny_sd1["tokenizer"], self_max_res=8)
    assert_close_to_scale(engine(pipe, noise, prompts, edit="refine", cross_replace_steps=0.6, self_replace_steps=0.2), oracle(tiny_sd1, noise, prompts, ctrl))


def test_reweight_on_refine(pipe, tiny_sd1, noise):
    prompts = ["a cat riding a bicycle", "a fluffy cat riding a bicycle"]
    tok = tiny_sd1["tokenizer"]
    refine = ref.AttentionRefine(prompts, T, 0.8, 0.4, tokenizer=tok, self_max_res=8)
    eq = ref.get_equalizer(prompts[1], ("fluffy",), (4.0,), tok)
    ctrl = ref.AttentionReweight(prompts, T, 0.8, 0.4, equalizer=eq, controller=refine, tokenizer=tok, self_max_res=8)
    got = engine(pipe, noise, prompts, equalizer={"fluffy": 4.0})
    assert_close_to_scale(got, oracle(tiny_sd1, noise, prompts, ctrl))


def test_reweight_alone_negative_factor(pipe, tiny_sd1, noise):
    prompts = ["a smiling cat on a red sofa"] * 2
    tok = tiny_sd1["tokenizer"]
    eq = ref.get_equalizer(prompts[1], ("smiling",), (-2.0,), tok)
    ctrl = ref.AttentionReweight(prompts, T, 0.8, 0.4, equalizer=eq, tokenizer=tok, self_max_res=8)
    got = engine(pipe, noise, prompts, equalizer={"smiling": -2.0})
    assert_close_to_scale(got, oracle(tiny_sd1, noise, prompts, ctrl))
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # the re-weighting changed the target


def test_per_word_schedule_object_preservation(pipe, tiny_sd1, noise):
    prompts = ["a butterfly on a flower", "a butterfly on a cake"]
    steps = {"default_": 0.0, "butterfly": 1.0}
    ctrl = ref.AttentionReplace(prompts, T, dict(steps), 0.0, tokenizer=tiny_sd1["tokenizer"], self_max_res=8)
    assert_close_to_scale(engine(pipe, noise, prompts, cross_replace_steps=steps, self_replace_steps=0.0), oracle(tiny_sd1, noise, prompts, ctrl))


@pytest.mark.parametrize("subtract", [None, ("on", "on")])
def test_local_blend(pipe, tiny_sd1, noise, subtract):
    prompts = ["a cat riding a bicycle on grass", "a cat riding a motorcycle on grass"]
    tok = tiny_sd1["tokenizer"]
    lb = ref.LocalBlend(prompts, ("bicycle", "motorcycle"), substruct_words=subtract, start_blend=0.0, th=(TH, TH), tokenizer=tok, num_steps=T, blend_res=8)
    ctrl = ref.AttentionReplace(prompts, T, 0.8, 0.4, local_blend=lb, tokenizer=tok, self_max_res=8)
    blend = LocalBlend(["bicycle"], ["motorcycle"], threshold=TH, start=0.0, resolution=8, subtract_words=subtract[0] if subtract else None)
    got = engine(pipe, noise, prompts, local_blend=blend)
    assert_close_to_scale(got, oracle(tiny_sd1, noise, prompts, ctrl))
    inside = (got[1] - got[0]).abs().amax(0) > 1e-6
    assert 0 < inside.float().mean() < 1  # a partial mask: part of the target kept from the source


def test_replace_without_guidance(pipe, tiny_sd1, noise):
    """guidance_scale <= 1: the batch has no unconditional half; the oracle runs with g = 1."""
    prompts = ["a cat riding a bicycle", "a cat riding a motorcycle"]
    ctrl = ref.AttentionReplace(prompts, T, 0.8, 0.4, tokenizer=tiny_sd1["tokenizer"], self_max_res=8)
    got = pipe(prompts[0], prompts[1:], num_inference_steps=T, guidance_scale=1.0, latents=noise, output_type="latent", self_replace_max_res=8).images
    assert_close_to_scale(got, ref.run_reference(tiny_sd1, prompts, ctrl, T, 1.0, noise))
