"""Self-checks of the test oracle in ``reference_p2p.py`` (its pure parts plus a few tiny runs)."""

from __future__ import annotations

import torch

import reference_p2p as ref
from _util import assert_close_to_scale


def test_get_word_inds(clip_tokenizer):
    text = "a photo of a squirrel eating a burger"
    assert ref.get_word_inds(text, "squirrel", clip_tokenizer).tolist() == [5]
    assert ref.get_word_inds(text, "a", clip_tokenizer).tolist() == [1, 4, 7]
    assert ref.get_word_inds(text, 7, clip_tokenizer).tolist() == [8]
    assert ref.get_word_inds(text, "zebra", clip_tokenizer).tolist() == []


def test_replacement_mapper_one_word_swap(clip_tokenizer):
    prompts = ["a cat sitting on a car", "a dog sitting on a car"]
    mapper = ref.get_replacement_mapper(prompts, clip_tokenizer)
    assert mapper.shape == (1, 77, 77)
    m = mapper[0]
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    # permutation-like: one 1 per row and per column; here the identity, as both words are one token
    assert torch.equal(m.sum(0), torch.ones(77)) and torch.equal(m.sum(1), torch.ones(77))
    assert torch.equal(m, torch.eye(77))


def test_replacement_mapper_splits_weight_over_target_tokens(clip_tokenizer):
    prompts = ["a cat on the grass", "a xyzzyq on the grass"]
    tgt = ref.get_word_inds(prompts[1], 1, clip_tokenizer)
    assert len(tgt) > 1  # a nonsense word tokenises into several BPE pieces
    m = ref.get_replacement_mapper(prompts, clip_tokenizer)[0]
    src = ref.get_word_inds(prompts[0], 1, clip_tokenizer)
    assert torch.allclose(m[src[0], torch.as_tensor(tgt)], torch.full((len(tgt),), 1 / len(tgt)))


def test_replacement_mapper_rejects_different_word_counts(clip_tokenizer):
    import pytest

    with pytest.raises(ValueError):
        ref.get_replacement_mapper(["a cat", "a big cat"], clip_tokenizer)


def test_refinement_mapper_marks_inserted_tokens(clip_tokenizer):
    prompts = ["a cat on the grass", "a fluffy cat on the green grass"]
    mapper, alphas = ref.get_refinement_mapper(prompts, clip_tokenizer)
    assert mapper.shape == (1, 77) and alphas.shape == (1, 77)
    inserted = [2, 6]  # "fluffy", "green" (BOS is position 0)
    for pos in range(77):
        assert alphas[0, pos].item() == (0.0 if pos in inserted else 1.0)
    # kept tokens point back at their source positions: BOS a cat on the grass EOS
    assert mapper[0, [0, 1, 3, 4, 5, 7, 8]].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert mapper[0, 2].item() == -1 and mapper[0, 6].item() == -1
    # padding positions continue the identity
    assert mapper[0, 9:].tolist() == list(range(9, 77))


def test_global_align_tie_breaking_prefers_left_then_up():
    score = ref.ScoreParams(0, 1, -1)
    _, tb = ref.global_align([5], [7], score)
    # left = 0, up = 0, diag = -1 -> left wins
    assert tb[1, 1] == 1
    _, tb = ref.global_align([5], [5], score)
    assert tb[1, 1] == 3


def test_time_words_alpha_has_T_rows(clip_tokenizer):
    prompts = ["a cat on the grass", "a dog on the grass"]
    T = 10
    alpha = ref.get_time_words_attention_alpha(prompts, T, 0.8, clip_tokenizer)
    assert alpha.shape == (T, 1, 1, 1, 77)
    assert alpha[:8].eq(1).all() and alpha[8:].eq(0).all()
    alpha = ref.get_time_words_attention_alpha(prompts, T, {"default_": 1.0, "dog": 0.3}, clip_tokenizer)
    dog = ref.get_word_inds(prompts[1], "dog", clip_tokenizer)[0]
    assert alpha[:3, 0, 0, 0, dog].eq(1).all() and alpha[3:, 0, 0, 0, dog].eq(0).all()
    assert alpha[:, 0, 0, 0, 1].eq(1).all()


def test_equalizer(clip_tokenizer):
    eq = ref.get_equalizer("a smiling cat", ("smiling",), (5.0,), clip_tokenizer)
    assert eq.shape == (1, 77)
    assert eq[0, 2].item() == 5.0 and eq.sum().item() == 76 + 5.0


def test_processor_with_empty_control_matches_diffusers(tiny_sd1):
    unet = tiny_sd1["unet"]
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        expected = unet(sample, 10, encoder_hidden_states=context).sample
        control = ref.EmptyControl()
        original = ref.register_attention_control(unet, control)
        try:
            got = unet(sample, 10, encoder_hidden_states=context).sample
        finally:
            unet.set_attn_processor(dict(original))
    assert control.num_att_layers == len(unet.attn_processors)
    assert control.cur_step == 1 and control.cur_att_layer == 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(p, ref.P2PReferenceProcessor) for p in unet.attn_processors.values())


def _latent():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))


def test_run_reference_replace_smoke(tiny_sd1):
    tok = tiny_sd1["tokenizer"]
    prompts = ["a cat sitting on a car", "a dog sitting on a car"]
    T = 3
    # high thresholds (random weights give flat maps) so the blend mask is partial; subtract "car"
    lb = ref.LocalBlend(prompts, ("cat", "dog"), substruct_words=("car", "car"), start_blend=0.0,
                        th=(0.95, 0.95), tokenizer=tok, num_steps=T, blend_res=8)
    controller = ref.AttentionReplace(prompts, T, cross_replace_steps=0.8, self_replace_steps=0.4,
                                      local_blend=lb, tokenizer=tok, self_max_res=8)
    out = ref.run_reference(tiny_sd1, prompts, controller, T, 7.5, _latent())
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()
    assert controller.cur_step == T and lb.counter == T
    # the source prompt is never edited: it equals a plain run of that prompt alone
    plain = ref.run_reference(tiny_sd1, prompts[:1], None, T, 7.5, _latent())
    assert_close_to_scale(out[:1], plain)
    # LocalBlend: outside the last mask the edited latent is copied from the source latent
    same = (out[1] == out[0]).all(dim=0).float().mean().item()
    assert 0.0 < same < 1.0


def test_run_reference_reweight_on_refine_smoke(tiny_sd1):
    tok = tiny_sd1["tokenizer"]
    prompts = ["a cat on the grass", "a fluffy cat on the grass"]
    T = 3
    refine = ref.AttentionRefine(prompts, T, 0.8, 0.4, tokenizer=tok, self_max_res=8)
    eq = ref.get_equalizer(prompts[1], ("fluffy",), (4.0,), tok)
    controller = ref.AttentionReweight(prompts, T, 0.8, 0.4, equalizer=eq, controller=refine,
                                       tokenizer=tok, self_max_res=8)
    out = ref.run_reference(tiny_sd1, prompts, controller, T, 7.5, _latent())
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()
    img = ref.decode_latents(tiny_sd1["vae"], out)
    assert img.shape == (2, 3, 32, 32) and img.min() >= 0 and img.max() <= 1
