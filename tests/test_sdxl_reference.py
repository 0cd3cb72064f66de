"""On SDXL's conditioning, the engine equals the reference algorithm (tests/reference_p2p.py).

`Prompt2PromptXLPipeline` against `reference_p2p.run_reference_xl` (both text encoders' penultimate
states side by side, the second's pooled projection per row, the time ids, a zero unconditional
half) on the tiny random SDXL model of conftest - the cases tests/test_reference_equality.py covers
for SD, with its tolerances.  The oracle's word indices and mappers are computed with either of the
two tokenizers (``word_tokenizer``): both must give the engine's result, i.e. address the same token
positions of the concatenated states.  Some prompts contain "!", which SDXL's second tokenizer
turns into its pad token "!" (id 0) where the first has "!</w>": the padding differs inside the prompt.

The tiny SDXL UNet has attention at one side only (its first level has none, like SDXL's at 128);
that side plays the role of the paper's 16 at SD 512 for self_replace_max_res and LocalBlend.
"""

import pytest
import torch

import reference_p2p as ref
from _util import assert_close_to_scale
from prompt2prompt import LocalBlend, Prompt2PromptPipeline, Prompt2PromptXLPipeline

T = 6
G = 7.5
TH = 0.99  # random weights give flat maps: only a high threshold leaves a partial mask
TOKENIZERS = ["tokenizer", "tokenizer_2"]


def attention_sides(unet) -> list[int]:
    """Sides of the UNet's latent grid that have attention (cross-attention blocks), from its config."""
    cfg = unet.config
    sides = {cfg.sample_size // 2**k for k, block in enumerate(cfg.down_block_types) if "CrossAttn" in block}
    if cfg.mid_block_type and "CrossAttn" in cfg.mid_block_type:
        sides.add(cfg.sample_size // 2 ** (len(cfg.down_block_types) - 1))
    return sorted(sides)


@pytest.fixture(scope="module")
def side(tiny_xl):
    sides = attention_sides(tiny_xl["unet"])
    assert len(sides) == 1 and sides[0] < tiny_xl["unet"].config.sample_size  # no attention at the latent's own side
    return sides[0]


@pytest.fixture(scope="module")
def noise(tiny_xl):
    cfg = tiny_xl["unet"].config
    return torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(3))


def engine(pipe, noise, prompts, side, **kw):
    kw.setdefault("self_replace_max_res", side)
    kw.setdefault("guidance_scale", G)
    return pipe(prompts[0], prompts[1:], num_inference_steps=T, latents=noise, output_type="latent", **kw).images


def oracle(components, noise, prompts, controller, guidance_scale=G, **kw):
    return ref.run_reference_xl(components, prompts, controller, T, guidance_scale, noise, **kw)


# --------------------------------------------------------------------------- the reference's own SDXL conditioning


def test_oracle_is_independent_of_the_library():
    """reference_p2p imports neither the library nor diffusers' pipelines (only the UNet it is given)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(ref.__file__).read_text(encoding="utf-8"))
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules and not any(m.split(".")[0] in ("prompt2prompt", "diffusers") for m in modules), modules


def test_oracle_without_edit_equals_diffusers_sdxl(tiny_xl, noise):
    """run_reference_xl's conditioning is diffusers' StableDiffusionXLPipeline's (one prompt, no edit)."""
    from diffusers import StableDiffusionXLPipeline

    sd = StableDiffusionXLPipeline(**tiny_xl, add_watermarker=False)
    sd.set_progress_bar_config(disable=True)
    prompt = "a cat riding a bicycle!"
    expected = sd(prompt, num_inference_steps=T, guidance_scale=G, latents=noise, output_type="latent").images
    assert_close_to_scale(oracle(tiny_xl, noise, [prompt], None), expected)


def test_oracle_gives_each_row_its_own_pooled_embedding(tiny_xl, noise):
    """Two prompts in one batch equal each prompt alone: every row carries its own pooled text."""
    prompts = ["a cat riding a bicycle", "a red house in the snow"]
    both = oracle(tiny_xl, noise, prompts, None)
    for k, p in enumerate(prompts):
        assert_close_to_scale(both[k : k + 1], oracle(tiny_xl, noise, [p], None))
    assert not torch.allclose(both[0], both[1], atol=1e-3)


# --------------------------------------------------------------------------- engine == reference


@pytest.mark.parametrize("word_tokenizer", TOKENIZERS)
def test_replace_with_self_injection(xl, tiny_xl, noise, side, word_tokenizer):
    prompts = ["a cat riding a bicycle", "a cat riding a motorcycle", "a dog riding a bicycle"]
    ctrl = ref.AttentionReplace(prompts, T, 0.8, 0.4, tokenizer=tiny_xl[word_tokenizer], self_max_res=side)
    got = engine(xl, noise, prompts, side, edit="replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    assert_close_to_scale(got, oracle(tiny_xl, noise, prompts, ctrl))
    assert not torch.allclose(got[1], got[2], atol=1e-3)


@pytest.mark.parametrize("word_tokenizer", TOKENIZERS)
def test_refine(xl, tiny_xl, noise, side, word_tokenizer):
    prompts = ["a cat riding a bicycle!", "a fluffy cat riding a red bicycle!"]
    ctrl = ref.AttentionRefine(prompts, T, 0.6, 0.2, tokenizer=tiny_xl[word_tokenizer], self_max_res=side)
    got = engine(xl, noise, prompts, side, edit="refine", cross_replace_steps=0.6, self_replace_steps=0.2)
    assert_close_to_scale(got, oracle(tiny_xl, noise, prompts, ctrl))


@pytest.mark.parametrize("word_tokenizer", TOKENIZERS)
def test_reweight_on_refine(xl, tiny_xl, noise, side, word_tokenizer):
    prompts = ["a cat riding a bicycle", "a fluffy cat riding a bicycle"]
    tok = tiny_xl[word_tokenizer]
    refine = ref.AttentionRefine(prompts, T, 0.8, 0.4, tokenizer=tok, self_max_res=side)
    eq = ref.get_equalizer(prompts[1], ("fluffy",), (4.0,), tok)
    ctrl = ref.AttentionReweight(prompts, T, 0.8, 0.4, equalizer=eq, controller=refine, tokenizer=tok, self_max_res=side)
    got = engine(xl, noise, prompts, side, equalizer={"fluffy": 4.0})
    assert_close_to_scale(got, oracle(tiny_xl, noise, prompts, ctrl))


@pytest.mark.parametrize("word_tokenizer", TOKENIZERS)
def test_reweight_alone_negative_factor(xl, tiny_xl, noise, side, word_tokenizer):
    prompts = ["a smiling cat on a red sofa!"] * 2
    tok = tiny_xl[word_tokenizer]
    eq = ref.get_equalizer(prompts[1], ("smiling",), (-2.0,), tok)
    ctrl = ref.AttentionReweight(prompts, T, 0.8, 0.4, equalizer=eq, tokenizer=tok, self_max_res=side)
    got = engine(xl, noise, prompts, side, equalizer={"smiling": -2.0})
    assert_close_to_scale(got, oracle(tiny_xl, noise, prompts, ctrl))
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # the re-weighting changed the target


def test_reweight_at_the_wrong_word_differs(xl, tiny_xl, noise, side):
    """The re-weighting equality above is not vacuous: the oracle at the next token gives another result."""
    prompts = ["a smiling cat on a red sofa!"] * 2
    tok = tiny_xl["tokenizer_2"]
    eq = ref.get_equalizer(prompts[1], ("cat",), (-2.0,), tok)
    ctrl = ref.AttentionReweight(prompts, T, 0.8, 0.4, equalizer=eq, tokenizer=tok, self_max_res=side)
    got = engine(xl, noise, prompts, side, equalizer={"smiling": -2.0})
    assert not torch.allclose(got, oracle(tiny_xl, noise, prompts, ctrl), atol=1e-3)


@pytest.mark.parametrize("word_tokenizer", TOKENIZERS)
def test_per_word_schedule_object_preservation(xl, tiny_xl, noise, side, word_tokenizer):
    prompts = ["a butterfly on a flower", "a butterfly on a cake"]
    steps = {"default_": 0.0, "butterfly": 1.0}
    ctrl = ref.AttentionReplace(prompts, T, dict(steps), 0.0, tokenizer=tiny_xl[word_tokenizer], self_max_res=side)
    got = engine(xl, noise, prompts, side, cross_replace_steps=steps, self_replace_steps=0.0)
    assert_close_to_scale(got, oracle(tiny_xl, noise, prompts, ctrl))
    plain = engine(xl, noise, prompts, side, edit="none")
    assert not torch.allclose(got[1], plain[1], atol=1e-3)  # the schedule injected something


@pytest.mark.parametrize("word_tokenizer", TOKENIZERS)
@pytest.mark.parametrize("subtract", [None, ("on", "on")])
def test_local_blend(xl, tiny_xl, noise, side, subtract, word_tokenizer):
    prompts = ["a cat riding a bicycle on grass!", "a cat riding a motorcycle on grass!"]
    tok = tiny_xl[word_tokenizer]
    lb = ref.LocalBlend(prompts, ("bicycle", "motorcycle"), substruct_words=subtract, start_blend=0.0, th=(TH, TH),
                        tokenizer=tok, num_steps=T, blend_res=side)
    ctrl = ref.AttentionReplace(prompts, T, 0.8, 0.4, local_blend=lb, tokenizer=tok, self_max_res=side)
    blend = LocalBlend(["bicycle"], ["motorcycle"], threshold=TH, start=0.0, resolution=side,
                       subtract_words=subtract[0] if subtract else None)
    got = engine(xl, noise, prompts, side, local_blend=blend)
    assert_close_to_scale(got, oracle(tiny_xl, noise, prompts, ctrl))
    inside = (got[1] - got[0]).abs().amax(0) > 1e-6
    assert 0 < inside.float().mean() < 1  # a partial mask: part of the target kept from the source


def test_local_blend_default_resolution_is_an_existing_side(xl, tiny_xl, noise, side):
    """LocalBlend without a resolution uses a side the UNet has (latent // 4 does not exist here)."""
    prompts = ["a cat riding a bicycle on grass", "a cat riding a motorcycle on grass"]
    assert tiny_xl["unet"].config.sample_size // 4 not in attention_sides(tiny_xl["unet"])
    tok = tiny_xl["tokenizer"]
    lb = ref.LocalBlend(prompts, ("bicycle", "motorcycle"), start_blend=0.0, th=(TH, TH), tokenizer=tok, num_steps=T, blend_res=side)
    ctrl = ref.AttentionReplace(prompts, T, 0.8, 0.4, local_blend=lb, tokenizer=tok, self_max_res=side)
    got = engine(xl, noise, prompts, side, local_blend=LocalBlend(["bicycle"], ["motorcycle"], threshold=TH, start=0.0))
    assert_close_to_scale(got, oracle(tiny_xl, noise, prompts, ctrl))


def test_replace_without_guidance(xl, tiny_xl, noise, side):
    """guidance_scale <= 1: the batch has no unconditional half; the oracle runs with g = 1."""
    prompts = ["a cat riding a bicycle", "a cat riding a motorcycle"]
    ctrl = ref.AttentionReplace(prompts, T, 0.8, 0.4, tokenizer=tiny_xl["tokenizer"], self_max_res=side)
    got = engine(xl, noise, prompts, side, guidance_scale=1.0)
    assert_close_to_scale(got, oracle(tiny_xl, noise, prompts, ctrl, guidance_scale=1.0))


def test_empty_unconditional_prompt_without_force_zeros(tiny_xl, noise, side):
    """force_zeros_for_empty_prompt=False: the unconditional half is the encoding of "" in both."""
    pipe = Prompt2PromptXLPipeline(**tiny_xl, force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a cat riding a bicycle", "a dog riding a bicycle"]
    ctrl = ref.AttentionReplace(prompts, T, 0.8, 0.4, tokenizer=tiny_xl["tokenizer"], self_max_res=side)
    got = engine(pipe, noise, prompts, side)
    assert_close_to_scale(got, oracle(tiny_xl, noise, prompts, ctrl, zero_uncond=False))
    ctrl = ref.AttentionReplace(prompts, T, 0.8, 0.4, tokenizer=tiny_xl["tokenizer"], self_max_res=side)
    assert not torch.allclose(got, oracle(tiny_xl, noise, prompts, ctrl), atol=1e-3)  # zeros are another run


# --------------------------------------------------------------------------- word swap with multi-token words


MULTI_TOKEN_SWAPS = [
    ["a cat riding a bicycle on grass", "a cat riding a tricycle on grass"],  # 1 -> 2 tokens
    ["a hippopotamus riding a bicycle", "a cat riding a bicycle"],  # 3 -> 1 tokens
    # 1 -> 3 and 1 -> 2 tokens, and a "!" (the second tokenizer's pad token); the reference splits
    # words at spaces only, so the "!" stands alone to be a word of its own there too
    ["a cat riding a bicycle !", "a hippopotamus riding a tricycle !"],
]


@pytest.mark.parametrize("prompts", MULTI_TOKEN_SWAPS, ids=["longer", "shorter", "two-words"])
@pytest.mark.parametrize("word_tokenizer", TOKENIZERS)
def test_multi_token_word_swap(xl, tiny_xl, noise, side, prompts, word_tokenizer):
    """Prompts of different token counts: the paper's split of a word's attention over its target
    tokens, the tokens after it kept aligned (the project's documented mapper, adaptation 8)."""
    tok = tiny_xl[word_tokenizer]
    counts = [len(tok.encode(p)) for p in prompts]
    assert counts[0] != counts[1]
    ctrl = ref.AttentionReplace(prompts, T, 0.8, 0.4, tokenizer=tok, self_max_res=side, aligned_tail=True)
    got = engine(xl, noise, prompts, side, edit="replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    assert_close_to_scale(got, oracle(tiny_xl, noise, prompts, ctrl))
    quirk = ref.AttentionReplace(prompts, T, 0.8, 0.4, tokenizer=tok, self_max_res=side)  # mapper[j, j] after the word
    assert not torch.equal(quirk.mapper, ctrl.mapper)


@pytest.mark.parametrize("prompts", MULTI_TOKEN_SWAPS[:2], ids=["longer", "shorter"])
def test_multi_token_word_swap_on_sd_equals_the_same_reference(tiny_sd1, prompts):
    """The same oracle (aligned tail) holds for the SD pipeline: XL runs the word swap as SD does."""
    pipe = Prompt2PromptPipeline(**tiny_sd1)
    pipe.set_progress_bar_config(disable=True)
    sd_side = attention_sides(tiny_sd1["unet"])[-2]  # the SD model's second-largest side, test_reference_equality's 8
    cfg = tiny_sd1["unet"].config
    lat = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(3))
    ctrl = ref.AttentionReplace(prompts, T, 0.8, 0.4, tokenizer=tiny_sd1["tokenizer"], self_max_res=sd_side, aligned_tail=True)
    got = engine(pipe, lat, prompts, sd_side, edit="replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    assert_close_to_scale(got, ref.run_reference(tiny_sd1, prompts, ctrl, T, G, lat))
