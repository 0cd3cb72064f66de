"""Words -> tokens and the edits' token alignments, with the real CLIP BPE vocabulary."""

import pytest
import torch

import reference_p2p as ref
from prompt2prompt.alignment import global_align, refinement_mapper, replacement_mapper, split_words, tokenize_words


def test_split_words_keeps_punctuation_apart():
    assert split_words("A cat's t-shirt, on a bicycle.") == ["A", "cat's", "t-shirt", ",", "on", "a", "bicycle", "."]


def test_word_positions_single_multi_token_repeated_punctuation_case(clip_tokenizer):
    p = tokenize_words("A hippopotamus riding a Bicycle.", clip_tokenizer)
    toks = clip_tokenizer.convert_ids_to_tokens(list(p.ids))
    assert toks[0] == "<|startoftext|>" and toks[-1] == "<|endoftext|>"
    assert [toks[i] for i in p.positions("hippopotamus")] == ["hippo", "potam", "us</w>"]
    assert p.positions("a") == [1, 6]  # case-insensitive, every occurrence
    assert [toks[i] for i in p.positions("bicycle")] == ["bicycle</w>"]  # the "." is its own word
    assert [toks[i] for i in p.positions(".")] == [".</w>"]
    assert p.positions("riding a") == [5, 6]
    assert p.positions(2) == [5]
    # the concatenated word tokens are exactly the tokenizer's own tokenization
    assert [i for pos in p.word_positions for i in pos] == list(range(1, len(p.ids) - 1))
    assert list(p.ids) == clip_tokenizer("A hippopotamus riding a Bicycle.").input_ids


def test_missing_word_names_prompt_words(clip_tokenizer):
    p = tokenize_words("a cat", clip_tokenizer)
    with pytest.raises(ValueError, match="'dog' is not a word of the prompt 'a cat'"):
        p.positions("dog")
    with pytest.raises(ValueError, match="out of range"):
        p.positions(5)


def test_matches_reference_word_indices(clip_tokenizer):
    prompt = "a hippopotamus and a tricycle near a snowmobile"
    p = tokenize_words(prompt, clip_tokenizer)
    for word in ["hippopotamus", "tricycle", "a", "snowmobile", "near"]:
        assert p.positions(word) == ref.get_word_inds(prompt, word, clip_tokenizer).tolist()


def test_too_long_prompt_raises_with_count_and_truncates_on_request(clip_tokenizer):
    prompt = " ".join(["cat"] * 80)
    with pytest.raises(ValueError, match=r"82 tokens long .* at most 77.*truncate_prompts=True"):
        tokenize_words(prompt, clip_tokenizer)
    p = tokenize_words(prompt, clip_tokenizer, truncate=True)
    assert len(p.ids) == 77 and len(p.words) == 75
    assert p.ids[-1] == clip_tokenizer.eos_token_id


def test_replacement_mapper_same_token_counts_matches_reference(clip_tokenizer):
    src, tgt = "a cat riding a bicycle", "a cat riding a motorcycle"
    mine = replacement_mapper(tokenize_words(src, clip_tokenizer), tokenize_words(tgt, clip_tokenizer))
    theirs = ref.get_replacement_mapper([src, tgt], clip_tokenizer)[0]
    assert torch.equal(mine, theirs)
    assert torch.equal(mine, torch.eye(77))  # one token each: a one-to-one map


def test_replacement_mapper_splits_attention_over_extra_tokens(clip_tokenizer):
    s = tokenize_words("a bicycle on grass", clip_tokenizer)
    t = tokenize_words("a tricycle on grass", clip_tokenizer)
    m = replacement_mapper(s, t)
    (bike,) = s.positions("bicycle")
    tri = t.positions("tricycle")
    assert len(tri) == 2
    assert m[bike, tri].tolist() == [0.5, 0.5]  # the paper's code's split: 1 / (target tokens)
    # tokens after the swapped word stay aligned: "on", "grass", end token, padding
    for w in ["on", "grass"]:
        assert m[s.positions(w)[0], t.positions(w)[0]] == 1
    assert m[len(s.ids) - 1, len(t.ids) - 1] == 1
    assert m[bike].sum() == 1  # the word's attention mass is conserved, split over its tokens
    others = [j for j in range(77) if j not in tri]
    assert torch.equal(m[:, others].sum(0), torch.ones(len(others)))  # other columns: one source each


def test_replacement_mapper_rejects_word_count_change(clip_tokenizer):
    with pytest.raises(ValueError, match="same number of words.*edit='refine'"):
        replacement_mapper(tokenize_words("a cat", clip_tokenizer), tokenize_words("a big cat", clip_tokenizer))


def test_global_align_hand_cases():
    assert global_align([1, 2, 3], [1, 2, 3]) == [0, 1, 2]
    assert global_align([1, 3], [1, 2, 3]) == [0, -1, 1]
    assert global_align([1, 2, 3], [1, 3]) == [0, 2]


@pytest.mark.parametrize(
    "src,tgt",
    [
        ("a cat riding a bicycle", "a fluffy cat riding a red bicycle"),
        ("a photo of a house", "a photo of a house in the snow"),
        ("a painting of a squirrel eating a burger", "a painting of a squirrel eating a burger in pixel art style"),
        ("a big red car", "a car"),
    ],
)
def test_refinement_mapper_matches_reference(clip_tokenizer, src, tgt):
    s, t = tokenize_words(src, clip_tokenizer), tokenize_words(tgt, clip_tokenizer)
    mapper, alphas = refinement_mapper(s, t)
    ref_mapper, ref_alphas = ref.get_refinement_mapper([src, tgt], clip_tokenizer)
    assert torch.equal(alphas, ref_alphas[0])
    keep = alphas.bool()
    assert torch.equal(mapper[keep], ref_mapper[0][keep])
    # inserted words get alpha 0, and aligned tokens point at equal source tokens
    for j in range(len(t.ids)):
        if alphas[j]:
            assert s.ids[mapper[j]] == t.ids[j]
