"""The paper's equations on hand-made tensors: edits, schedules, LocalBlend."""

import math

import pytest
import torch

from prompt2prompt.edit_ops import blend_latents, edit_cross_attention, local_blend_mask, value_weights
from prompt2prompt.schedules import cross_step_weights, parse_window, step_window
from prompt2prompt.alignment import tokenize_words

L = 5


def maps(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, L, generator=g).softmax(-1)


def test_word_swap_is_source_through_mapper():
    src, tgt = maps(2, 3), maps(1, 2, 3, seed=1)
    mapper = torch.zeros(1, L, L)
    mapper[0, [0, 1, 2, 3, 4], [0, 2, 1, 3, 4]] = 1  # swap tokens 1 and 2
    out = edit_cross_attention(src, tgt, mapper, torch.ones(1, L), torch.ones(1, L))
    assert torch.equal(out[0][..., 1], src[..., 2]) and torch.equal(out[0][..., 2], src[..., 1])
    assert torch.equal(out[0][..., 0], src[..., 0])


def test_refine_keeps_own_maps_of_new_tokens():
    src, tgt = maps(2, 3), maps(1, 2, 3, seed=1)
    mapper = torch.eye(L)[None]
    alphas = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]])
    out = edit_cross_attention(src, tgt, mapper, alphas, torch.ones(1, L))
    assert torch.equal(out[0][..., 2], tgt[0][..., 2])
    assert torch.equal(out[0][..., [0, 1, 3, 4]], src[..., [0, 1, 3, 4]])


@pytest.mark.parametrize("c", [0.0, -1.0, 2.5])
def test_reweight_scales_without_renormalising(c):
    src, tgt = maps(2, 3), maps(1, 2, 3, seed=1)
    eq = torch.ones(1, L)
    eq[0, 3] = c
    out = edit_cross_attention(src, tgt, torch.eye(L)[None], torch.ones(1, L), torch.ones(1, L), eq)
    assert torch.allclose(out[0][..., 3], c * src[..., 3])
    assert torch.equal(out[0][..., :3], src[..., :3])
    if c != 1:
        assert not torch.allclose(out.sum(-1), torch.ones(1, 2, 3))


def test_outside_injection_target_keeps_own_maps_per_token():
    src, tgt = maps(2, 3), maps(1, 2, 3, seed=1)
    weights = torch.tensor([[0.0, 1.0, 0.0, 0.0, 1.0]])
    out = edit_cross_attention(src, tgt, torch.eye(L)[None], torch.ones(1, L), weights, torch.full((1, L), 3.0))
    assert torch.equal(out[0][..., [0, 2, 3]], tgt[0][..., [0, 2, 3]])
    assert torch.allclose(out[0][..., [1, 4]], 3 * src[..., [1, 4]])


def test_parse_window_and_rounding():
    assert parse_window(0.8, "x") == (0.0, 0.8)
    assert parse_window((0.2, 1), "x") == (0.2, 1.0)  # ints are fine
    assert step_window((0.0, 0.8), 50) == (0, 40)
    assert step_window((0.3, 0.99), 10) == (3, 9)  # int() truncation, as the paper's code
    for bad, msg in [(1.5, r"\[0, 1\]"), (-0.1, r"\[0, 1\]"), ((0.6, 0.2), "start"), (math.nan, "finite"), ("0.5", "fraction"), ((0.1, 0.2, 0.3), "fraction")]:
        with pytest.raises(ValueError, match=msg):
            parse_window(bad, "cross_replace_steps")


def test_cross_step_weights_per_word_and_object_preservation(clip_tokenizer):
    t = tokenize_words("a butterfly on a flower", clip_tokenizer)
    w = cross_step_weights([t], {"default_": 0.0, "butterfly": 1.0}, 10)
    (b,) = t.positions("butterfly")
    assert w.shape == (10, 1, 77)
    assert w[:, 0, b].eq(1).all() and w[:, 0, :b].eq(0).all() and w[:, 0, b + 1 :].eq(0).all()
    w = cross_step_weights([t], {"default_": 0.8, "flower": (0.2, 0.4)}, 10)
    (f,) = t.positions("flower")
    assert w[:, 0, f].tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert w[:, 0, 1].tolist() == [1] * 8 + [0, 0]
    with pytest.raises(ValueError, match="'car', which is in none of the prompts"):
        cross_step_weights([t], {"car": 0.5}, 10)


def test_local_blend_mask_pool_normalise_threshold_union():
    m = torch.zeros(2, 4, 4, L)  # (prompts, h, w, tokens)
    m[0, 0, 0, 1] = 1.0  # source word at the top-left corner
    m[1, 3, 3, 2] = 4.0  # target word at the bottom-right corner
    m[1, 0, 3, 2] = 1.0  # a weak spot, below threshold after normalising by 4
    words = torch.zeros(2, L)
    words[0, 1] = 1
    words[1, 2] = 1
    mask = local_blend_mask(m, words, 0.3, (8, 8))
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    src = torch.zeros(8, 8, dtype=torch.bool)
    src[:4, :4] = True  # 3x3 max-pool grows the corner pixel to 2x2 cells, nearest-upsampled x2
    assert torch.equal(mask[0, 0], src)
    tgt = torch.zeros(8, 8, dtype=torch.bool)
    tgt[4:, 4:] = True
    assert torch.equal(mask[1, 0], src | tgt)  # union with the source's mask; weak spot excluded
    no_pool = local_blend_mask(m, words, 0.3, (4, 4), pool=False)
    assert no_pool[0, 0].sum() == 1


def test_local_blend_mask_of_empty_maps_is_empty():
    mask = local_blend_mask(torch.zeros(2, 4, 4, L), torch.ones(2, L), 0.3, (4, 4))
    assert not mask.any()


def test_blend_latents_takes_source_outside_mask():
    lat = torch.stack([torch.zeros(2, 2, 2), torch.ones(2, 2, 2)])  # (prompts, C, h, w)
    mask = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    mask[1, 0, 0, 0] = True
    out = blend_latents(lat, mask)
    assert torch.equal(out[0], lat[0])
    assert out[1, :, 0, 0].eq(1).all() and out[1, :, 1, 1].eq(0).all()


def test_index_mapper_equals_one_hot_matrix_and_none_means_ones():
    src, tgt = maps(2, 3), maps(2, 2, 3, seed=1)
    index = torch.tensor([[0, 2, 1, 3, 4], [0, 1, 1, 3, 4]])
    dense = torch.zeros(2, L, L)
    for k in range(2):
        dense[k, index[k], torch.arange(L)] = 1
    alphas = torch.tensor([[1.0, 1, 0, 1, 1], [1, 1, 1, 1, 0]])
    weights = torch.tensor([[1.0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    eq = torch.full((2, L), 0.5)
    torch.testing.assert_close(
        edit_cross_attention(src, tgt, index, alphas, weights, eq), edit_cross_attention(src, tgt, dense, alphas, weights, eq)
    )
    torch.testing.assert_close(
        edit_cross_attention(src, tgt, index, None, None), edit_cross_attention(src, tgt, dense, torch.ones(2, L), torch.ones(2, L))
    )


def test_identity_mapper_none_equals_the_identity_matrix():
    src, tgt = maps(2, 3), maps(2, 2, 3, seed=1)
    eye = torch.eye(L).expand(2, L, L)
    alphas = torch.tensor([[1.0, 1, 0, 1, 1], [1, 1, 1, 1, 0]])
    weights = torch.tensor([[1.0, 0, 1, 1, 1], [0.5, 1, 1, 1, 1]])
    torch.testing.assert_close(edit_cross_attention(src, tgt, None, alphas, weights), edit_cross_attention(src, tgt, eye, alphas, weights))
    out = edit_cross_attention(src, tgt, None, None, None)
    assert out.shape == tgt.shape and torch.equal(out[1], src)  # every target takes the source's maps


def test_plan_uses_no_mapper_for_same_length_swaps_only(clip_tokenizer):
    from prompt2prompt.alignment import tokenize_words
    from prompt2prompt.edits import build_edit_plan

    src = tokenize_words("a cat riding a bicycle", clip_tokenizer)
    same = build_edit_plan(src, [tokenize_words("a cat riding a car", clip_tokenizer)], "replace", 10)
    assert same.fast_mapper is None and same.fast_alphas is None
    longer = build_edit_plan(src, [tokenize_words("a cat riding a red bicycle", clip_tokenizer)], "refine", 10)
    assert longer.fast_mapper is not None and longer.fast_mapper.dtype == torch.long
    assert longer.fast_alphas is not None and longer.fast_alphas.eq(0).any()  # "red" keeps its own map
    # The value form: a same-length swap changes no value; a refinement maps them and keeps "red"'s own term.
    active = [i for i in range(10) if same.cross_active[i]]
    assert active == list(range(8)) and all(same.injections[i] is same.injections[0] for i in active)
    assert same.injections[0].source_is_identity and same.injections[0].own is None and same.injections[9] is None
    inj = longer.injections[0]
    assert inj.source is not None and inj.source_diagonal is None and not inj.source_is_identity
    (red,) = longer.targets[0].positions("red")
    assert inj.own[0, red] == 1 and inj.source[0, :, red].eq(0).all() and inj.own.sum() == 1


def test_local_blend_words_per_target(clip_tokenizer):
    """Each target may name its own blend word (the paper's code: one word list per prompt)."""
    from prompt2prompt import LocalBlend
    from prompt2prompt.edits import build_edit_plan

    src = tokenize_words("a cat riding a bicycle", clip_tokenizer)
    targets = [tokenize_words(p, clip_tokenizer) for p in ("a dog riding a bicycle", "a horse riding a bicycle")]
    plan = build_edit_plan(src, targets, "replace", 10, local_blend=LocalBlend("cat", ("dog", "horse")), blend_resolution=4)
    words = plan.blend.words  # (prompts, tokens)
    assert words[0, src.positions("cat")].eq(1).all() and words[0].sum() == len(src.positions("cat"))
    assert words[1, targets[0].positions("dog")].eq(1).all() and words[1].sum() == len(targets[0].positions("dog"))
    assert words[2, targets[1].positions("horse")].eq(1).all() and words[2].sum() == len(targets[1].positions("horse"))
    # a target with none of the words would get an empty mask and silently copy the source
    with pytest.raises(ValueError, match="has no word of the target prompt 'a horse riding a bicycle'"):
        build_edit_plan(src, targets, "replace", 10, local_blend=LocalBlend("cat", "dog"), blend_resolution=4)
    with pytest.raises(ValueError, match="needs blend_resolution"):
        build_edit_plan(src, targets, "replace", 10, local_blend=LocalBlend("cat", ("dog", "horse")))
    # moving a plan returns a moved copy and leaves the caller's plan where it was
    moved = plan.to(torch.device("meta"))
    assert moved.mapper.device.type == "meta" and moved.blend.words.device.type == "meta"
    assert plan.mapper.device.type == "cpu" and plan.blend.words.device.type == "cpu"
    assert all(i is None or i.own is None or i.own.device.type == "cpu" for i in plan.injections)


@pytest.mark.parametrize("case", ["swap", "refine", "reweight", "partial", "none"])
def test_value_weights_give_the_edited_maps_times_the_values(case):
    """M^ V = M_src (S V) + M_k (o * V): the edit moved onto the values, for every mode."""
    g = torch.Generator().manual_seed(3)
    src, tgt = maps(2, 3, seed=4), maps(2, 2, 3, seed=5)
    values = torch.randn(2, 2, L, 6, generator=g)  # (targets, heads, tokens, dim)
    mapper = torch.eye(L).repeat(2, 1, 1)  # (targets, L, L)
    alphas, weights, eq = torch.ones(2, L), torch.ones(2, L), None
    if case == "swap":  # a swap that changes token positions (a dense, non-one-hot mapper)
        mapper[0] = torch.rand(L, L, generator=g)
        mapper[1, [1, 2]] = mapper[1, [2, 1]]
    if case == "refine":  # inserted tokens keep their own maps
        mapper[:, :, 2:] = torch.eye(L)[:, 1:-1]
        alphas[:, 2] = 0
    if case in ("reweight", "partial", "none"):
        eq = torch.tensor([[1.0, 2.0, -1.0, 0.0, 1.0], [0.5, 1.0, 1.0, 3.0, 1.0]])
    if case == "partial":  # per-word schedules: some tokens outside their window at this step
        weights = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0, 0.5]])
        alphas[1, 3] = 0
    if case == "none":
        alphas = torch.zeros(2, L)
    edited = edit_cross_attention(src, tgt, mapper, alphas, weights, eq)  # (targets, heads, pixels, tokens)
    source, own = value_weights(mapper, alphas, weights, eq)
    expected = edited @ values  # (targets, heads, pixels, dim)
    got = src @ (source[:, None] @ values) + tgt @ (own[:, None, :, None] * values)
    torch.testing.assert_close(got, expected)
    if case == "none":
        assert source.eq(0).all()  # nothing comes from the source: one attention suffices
    if case in ("swap", "reweight"):
        assert own.eq(0).all()  # everything comes from the source
