"""Word positions and token alignments with SDXL's two real CLIP tokenizations.

SDXL's tokenizers share CLIP's BPE vocabulary; the first pads with end-of-text, the second with "!"
(id 0), and the second also reads every "!" of a prompt as that pad token where the first has
"!</w>" (or "!!</w>" for two).  The edit addresses the concatenated states (first encoder's features,
then the second's, position by position) by the first tokenizer's positions, so word positions,
the mappers, the equalizer and LocalBlend's words must fall on the same tokens in both halves.
"""

import pytest
import torch

import reference_p2p as ref
from conftest import counting_unet_calls
from prompt2prompt import LocalBlend, Prompt2PromptPipeline
from prompt2prompt.alignment import refinement_mapper, replacement_mapper, tokenize_words
from prompt2prompt.arguments import ArgumentError


@pytest.fixture(scope="module")
def toks(tiny_xl):
    t1, t2 = tiny_xl["tokenizer"], tiny_xl["tokenizer_2"]
    assert t1.pad_token_id == t1.eos_token_id and t2.pad_token == "!" and t2.pad_token_id != t1.pad_token_id
    return t1, t2


def plan_of(pipe, prompt, targets, **kw):
    """The compiled edit of a call (no UNet call)."""
    steps = 4
    inputs = pipe.check_inputs(prompt, targets, kw.pop("edit", "auto"), kw.get("equalizer"), kw.get("local_blend"), None, steps)
    return pipe._plan_edit(inputs, steps, kw.get("cross_replace_steps", 0.8), kw.get("self_replace_steps", 0.4),
                           kw.get("equalizer"), kw.get("local_blend"), "cpu")


PROMPTS = [
    "a hippopotamus riding a tricycle",  # multi-token words
    "a cat riding a bicycle!",  # "!": the second tokenizer's pad token inside the prompt
    "wow ! a cat",
    "A Cat's t-shirt, on a bicycle.",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_word_positions_are_the_same_with_both_tokenizers(toks, prompt):
    t1, t2 = toks
    a, b = tokenize_words(prompt, t1), tokenize_words(prompt, t2)
    assert a.words == b.words and a.word_positions == b.word_positions and len(a.ids) == len(b.ids)
    # the same token at every position, but "!": "!</w>" in the first, the pad token in the second
    for i, j in zip(a.ids, b.ids):
        assert i == j or (t1.convert_ids_to_tokens(i) == "!</w>" and j == t2.pad_token_id)
    assert ("!" in prompt) == (t2.pad_token_id in b.ids)
    # padded as the encoders see them, the two sequences differ after the prompt
    pad1 = t1(prompt, padding="max_length", max_length=t1.model_max_length).input_ids
    pad2 = t2(prompt, padding="max_length", max_length=t2.model_max_length).input_ids
    assert len(pad1) == len(pad2) == t1.model_max_length
    assert set(pad1[len(a.ids):]) == {t1.eos_token_id} and set(pad2[len(b.ids):]) == {t2.pad_token_id}
    # the reference's word indices (words split at spaces, case-sensitive) agree, with either tokenizer
    spaced = prompt.split(" ")
    for word in spaced:
        if word.isalpha() and [w.casefold() for w in spaced].count(word.casefold()) == spaced.count(word):
            expected = ref.get_word_inds(prompt, word, t1).tolist()
            assert a.positions(word) == expected == ref.get_word_inds(prompt, word, t2).tolist(), word


REFINEMENTS = [
    ("a cat riding a bicycle!", "a fluffy cat riding a red bicycle!"),
    ("a cat!", "a cat wearing a hat!"),
    ("a hippopotamus on grass", "a big hippopotamus on green grass !"),
]


@pytest.mark.parametrize("src, tgt", REFINEMENTS)
def test_refinement_mapper_is_the_same_with_both_tokenizers(toks, src, tgt):
    t1, t2 = toks
    m1, a1 = refinement_mapper(tokenize_words(src, t1), tokenize_words(tgt, t1))
    m2, a2 = refinement_mapper(tokenize_words(src, t2), tokenize_words(tgt, t2))
    assert torch.equal(m1, m2) and torch.equal(a1, a2)
    assert 0 < a1.sum() < a1.numel()  # some inserted tokens
    for tok in (t1, t2):
        ref_mapper, ref_alphas = ref.get_refinement_mapper([src, tgt], tok)
        assert torch.equal(a1, ref_alphas[0])
        keep = a1.bool()
        assert torch.equal(m1[keep], ref_mapper[0][keep])


SWAPS = [
    ("a cat riding a bicycle on grass", "a cat riding a tricycle on grass"),  # 1 -> 2 tokens
    ("a hippopotamus riding a bicycle", "a cat riding a bicycle"),  # 3 -> 1
    ("a cat riding a bicycle !", "a hippopotamus riding a tricycle !"),  # two swaps, and the pad token "!"
]


@pytest.mark.parametrize("src, tgt", SWAPS)
def test_replacement_mapper_is_the_same_with_both_tokenizers(toks, src, tgt):
    """Word swaps with multi-token words: one mapper for both tokenizers, the reference's with the tokens
    after a word of changed token count kept aligned (its ``aligned_tail`` option)."""
    t1, t2 = toks
    m1 = replacement_mapper(tokenize_words(src, t1), tokenize_words(tgt, t1))
    m2 = replacement_mapper(tokenize_words(src, t2), tokenize_words(tgt, t2))
    assert torch.equal(m1, m2)
    assert len(t1.encode(src)) != len(t1.encode(tgt))
    for tok in (t1, t2):
        assert torch.equal(m1, ref.get_replacement_mapper([src, tgt], tok, aligned_tail=True)[0])
    # the end-of-text token of the source feeds the target's
    assert m1[len(t1.encode(src)) - 1, len(t1.encode(tgt)) - 1] == 1


@pytest.mark.parametrize("src, tgt", [*SWAPS, *REFINEMENTS])
def test_xl_plans_the_edit_as_sd_does(xl, tiny_sd1, src, tgt):
    """Prompts of different token counts compile to the same mapper on XL as on SD (same tokenizer)."""
    sd = Prompt2PromptPipeline(**tiny_sd1)
    assert sd.tokenizer is xl.tokenizer
    ours, theirs = plan_of(xl, src, tgt), plan_of(sd, src, tgt)
    assert ours.mode is theirs.mode
    assert torch.equal(ours.mapper, theirs.mapper) and torch.equal(ours.alphas, theirs.alphas)
    assert torch.equal(ours.cross_weights, theirs.cross_weights)


def _first_changed_position(a: torch.Tensor, b: torch.Tensor) -> int:
    """First token position where two (tokens, features) states differ."""
    changed = (a - b).abs().amax(-1) > 0  # (tokens,)
    return int(changed.nonzero()[0])


@pytest.mark.parametrize("prompt, other, word", [
    ("a cat riding a bicycle!", "a dog riding a bicycle!", "cat"),
    ("a cat riding a bicycle!", "a cat riding a bicycle.", "!"),  # the second tokenizer's pad token
    ("a hippopotamus riding a bicycle", "a hippopotamus riding a tricycle", "bicycle"),
])
def test_both_halves_of_the_states_hold_a_word_at_its_positions(xl, prompt, other, word):
    """CLIP's text encoders are causal: changing a word changes the states from its first token on,
    in the first encoder's features and in the second's alike."""
    inputs = xl.check_inputs(prompt, other, "auto", None, None, None, 2)
    embeds = xl.encode_prompt(inputs.prompts, "cpu", False, ids_2=inputs.ids_2)[0]  # (prompts, tokens, dim_1 + dim_2)
    dim_1 = xl.text_encoder.config.hidden_size
    assert embeds.shape[-1] == dim_1 + xl.text_encoder_2.config.hidden_size
    first, second = embeds[..., :dim_1], embeds[..., dim_1:]  # (prompts, tokens, dim_k)
    start = inputs.source.positions(word)[0]
    assert _first_changed_position(first[0], first[1]) == start == _first_changed_position(second[0], second[1])


def test_equalizer_and_local_blend_address_the_words_tokens_in_both_tokenizers(xl, toks):
    t1, t2 = toks
    src, tgt = "a cat riding a bicycle on grass!", "a smiling cat riding a tricycle on grass!"
    blend = LocalBlend(["bicycle"], ["tricycle"], subtract_words="grass")
    plan = plan_of(xl, src, tgt, edit="refine", equalizer={"smiling": 3.0, "!": 0.5}, local_blend=blend)
    ids = [(t1.encode(p), t2.encode(p)) for p in (src, tgt)]

    def words_at(row_ids, positions, tok):
        return [tok.convert_ids_to_tokens(row_ids[i]) for i in positions]

    eq = plan.equalizer[0]  # (tokens,)
    assert words_at(ids[1][0], (eq == 3.0).nonzero().flatten().tolist(), t1) == ["smiling</w>"]
    assert words_at(ids[1][1], (eq == 3.0).nonzero().flatten().tolist(), t2) == ["smiling</w>"]
    bang = (eq == 0.5).nonzero().flatten().tolist()
    assert words_at(ids[1][0], bang, t1) == ["!</w>"] and words_at(ids[1][1], bang, t2) == ["!"]
    assert eq.eq(1).sum() == eq.numel() - 2
    expected = {0: ["bicycle</w>"], 1: ["tric", "ycle</w>"]}
    for row in (0, 1):
        positions = plan.blend.words[row].nonzero().flatten().tolist()
        assert words_at(ids[row][0], positions, t1) == expected[row] == words_at(ids[row][1], positions, t2)
        subtract = plan.blend.subtract[row].nonzero().flatten().tolist()
        assert words_at(ids[row][0], subtract, t1) == ["grass</w>"] == words_at(ids[row][1], subtract, t2)


def test_a_word_the_tokenizers_split_differently_is_named_before_the_unet(xl):
    """"!!" is one token of the first tokenizer ("!!</w>") but two pad tokens of the second: refused,
    naming the word and how to write it; written "! !" it runs."""
    with counting_unet_calls(xl) as calls:
        with pytest.raises(ArgumentError, match=r"'!!' is 1 token with tokenizer but 2 with tokenizer_2.*'! !'") as info:
            xl("a cat riding a bicycle!!", "a dog riding a bicycle!!", num_inference_steps=1, output_type="latent")
        assert info.value.argument == "prompt" and calls == []
    out = xl("a cat riding a bicycle! !", "a dog riding a bicycle! !", num_inference_steps=1, output_type="latent")
    assert out.images.shape[0] == 2 and torch.isfinite(out.images).all()
