"""Words <-> tokens, and the token alignments of Prompt-to-Prompt's edits.

Everything here is a pure function of prompts and a tokenizer (any Hugging Face tokenizer
whose words tokenize independently, as CLIP's BPE does). Token positions index the padded
sequence the text encoder sees, so position 0 is the start token when the tokenizer has one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .arguments import ArgumentError

# A prompt's "words": runs of letters/digits (with inner apostrophes and hyphens), and runs of
# punctuation. "a cat's bicycle." -> ["a", "cat's", "bicycle", "."]
_WORD_RE = re.compile(r"[^\W_]+(?:['\-_][^\W_]+)*|[^\w\s]+|_+")


def split_words(prompt: str) -> list[str]:
    """Split a prompt into the words that edits name and that word swap compares.

    Args:
        prompt: the text.

    Returns:
        The words in order: runs of letters/digits (with inner apostrophes, hyphens and
        underscores), runs of punctuation and runs of underscores; whitespace is dropped.
    """
    return _WORD_RE.findall(prompt)


def count_words(prompt: str) -> int:
    """``len(split_words(prompt))``, without making the list (a hostile prompt may be megabytes).

    Args:
        prompt: the text.
    """
    return sum(1 for _ in _WORD_RE.finditer(prompt))


def normalize_word(word: str) -> str:
    """Case-folded form used to compare words (CLIP lower-cases its input too).

    Args:
        word: a word, as `split_words` returns it.

    Returns:
        ``word.casefold()``.
    """
    return word.casefold()


@dataclass(frozen=True)
class PromptTokens:
    """A prompt tokenized word by word.

    Attributes:
        prompt: the text.
        words: its words (see `split_words`).
        word_positions: for each word, the positions of its tokens in the padded sequence.
        ids: the token ids with special tokens, unpadded.
        max_length: the tokenizer's `model_max_length` (the padded length the encoder sees).
    """

    prompt: str
    words: tuple[str, ...]
    word_positions: tuple[tuple[int, ...], ...]
    ids: tuple[int, ...]
    max_length: int

    @property
    def num_tokens(self) -> int:
        """The number of token ids with special tokens, unpadded (``len(ids)``)."""
        return len(self.ids)

    def positions(self, word: str | int) -> list[int]:
        """Token positions of a word (all its occurrences), a phrase of words, or a word index.

        Args:
            word: a word or a phrase of consecutive words (split with `split_words`, compared
                case-insensitively, every occurrence), or an index into ``words`` (negative counts
                from the end).

        Returns:
            Positions in the padded sequence: for a string, sorted and without repeats; for an
            index, that word's positions.

        Raises:
            ValueError: when the word is not in the prompt, naming the prompt's words; also for a
                string with no word, an index out of range, or a value that is neither str nor int.
        """
        if isinstance(word, bool) or not isinstance(word, (str, int)):
            raise ValueError(f"a word must be a string or a word index, got {word!r}")
        if isinstance(word, int):
            if not -len(self.words) <= word < len(self.words):
                raise ValueError(
                    f"word index {word} is out of range for {self.prompt!r}, which has {len(self.words)} words"
                )
            return list(self.word_positions[word])
        query = [normalize_word(w) for w in split_words(word)]
        if not query:
            raise ValueError(f"{word!r} names no word; give a word of the prompt {self.prompt!r}")
        words = [normalize_word(w) for w in self.words]
        found: list[int] = []
        for start in range(len(words) - len(query) + 1):
            if words[start : start + len(query)] == query:
                for k in range(start, start + len(query)):
                    found.extend(self.word_positions[k])
        if not found:
            raise ValueError(
                f"{word!r} is not a word of the prompt {self.prompt!r} (its words: {', '.join(self.words)}); "
                "name a word that occurs in that prompt"
            )
        return sorted(set(found))


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, truncation=False, verbose=False)["input_ids"])


def tokenize_words(prompt: str, tokenizer, truncate: bool = False) -> PromptTokens:
    """Tokenize `prompt` and find which token positions belong to each word.

    Each word is tokenized on its own; CLIP's pre-tokenizer splits at the same places, so the
    pieces concatenate to the tokenization of the whole prompt (checked).

    Args:
        prompt: the text.
        tokenizer: a Hugging Face tokenizer with `model_max_length`.
        truncate: cut a prompt longer than `model_max_length` tokens instead of raising.

    Returns:
        The `PromptTokens`; when truncated, only the words that fit whole are kept.

    Raises:
        ValueError: the prompt is too long (and `truncate` is False), or the tokenizer does not
            tokenize words independently; also when ``prompt`` is not a string.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
    max_length = int(tokenizer.model_max_length)
    full = _encode(tokenizer, prompt, special=True)
    words = split_words(prompt)
    pieces = [_encode(tokenizer, w, special=False) for w in words]
    body = [t for p in pieces for t in p]
    offset = next((o for o in range(len(full) - len(body) + 1) if full[o : o + len(body)] == body), None)
    if offset is None:
        raise ValueError(
            f"this tokenizer does not tokenize the words of {prompt!r} independently, so words cannot be "
            "mapped to tokens; use a CLIP-style (BPE) tokenizer"
        )
    prefix, suffix = full[:offset], full[offset + len(body) :]
    if len(full) > max_length and not truncate:
        raise ValueError(
            f"the prompt {prompt!r} is {len(full)} tokens long but the text encoder takes at most "
            f"{max_length}; shorten it, or pass truncate_prompts=True to cut it"
        )
    budget = max_length - len(prefix) - len(suffix)
    kept_words, positions, cursor = [], [], len(prefix)
    for word, piece in zip(words, pieces):
        if cursor + len(piece) - len(prefix) > budget:  # truncation cuts at a word boundary
            break
        kept_words.append(word)
        positions.append(tuple(range(cursor, cursor + len(piece))))
        cursor += len(piece)
    ids = prefix + body[: cursor - len(prefix)] + suffix
    return PromptTokens(prompt, tuple(kept_words), tuple(positions), tuple(ids), max_length)


def replacement_mapper(source: PromptTokens, target: PromptTokens) -> torch.Tensor:
    """Token mapper of a word swap (paper Sec. 3.2, "Word Swap"): target map = source map @ mapper.

    Words that differ between the prompts are swapped; every other token maps one to one.
    A word that becomes a different number of tokens splits its attention as the paper's code
    does: each of the ``n`` target tokens receives the sum of the source word's maps over ``n``.
    Unlike the paper's code, tokens after such a word stay aligned (the code's ``mapper[j, j]``
    shifts them when the token counts differ).

    Args:
        source: the tokenized source prompt.
        target: the tokenized target prompt, with as many words as ``source`` (and the same ``max_length``).

    Returns:
        ``(max_length, max_length)`` float matrix, rows = source positions, columns = target positions.

    Raises:
        ArgumentError: (of ``edit``) the prompts have different numbers of words.
    """
    if len(source.words) != len(target.words):
        raise ArgumentError(
            "edit",
            f"word swap (edit='replace') needs prompts with the same number of words, but {source.prompt!r} has "
            f"{len(source.words)} and {target.prompt!r} has {len(target.words)}; use edit='refine' to add or remove words"
        )
    length = source.max_length
    swaps = {
        source.word_positions[k][0]: (source.word_positions[k], target.word_positions[k])
        for k in range(len(source.words))
        if normalize_word(source.words[k]) != normalize_word(target.words[k])
    }
    mapper = torch.zeros(length, length)  # (source tokens, target tokens)
    i = j = 0
    while i < length and j < length:
        if i in swaps:
            src, tgt = swaps[i]
            if len(src) == len(tgt):
                mapper[list(src), list(tgt)] = 1.0
            else:
                mapper[torch.tensor(src)[:, None], torch.tensor(tgt)[None, :]] = 1.0 / len(tgt)
            i, j = i + len(src), j + len(tgt)
        else:
            mapper[i, j] = 1.0
            i, j = i + 1, j + 1
    while j < length:  # target longer: its trailing padding reads the source's last position
        mapper[length - 1, j] = 1.0
        j += 1
    return mapper


def global_align(x: list[int], y: list[int], gap: int = 0, match: int = 1, mismatch: int = -1) -> list[int]:
    """Needleman-Wunsch global alignment of two token sequences, as the paper's code scores it.

    Ties prefer a gap in ``x`` (an inserted ``y`` token), then a gap in ``y``, then the diagonal,
    as in the reference implementation.

    Args:
        x: the first sequence (the source's token ids).
        y: the second sequence (the target's token ids).
        gap: score of a gap in either sequence.
        match: score of aligning equal elements.
        mismatch: score of aligning different elements.

    Returns:
        For each position of ``y``, the aligned position of ``x`` or -1 for an inserted token.
    """
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    trace = [[0] * (m + 1) for _ in range(n + 1)]  # 1 = left, 2 = up, 3 = diagonal
    for j in range(1, m + 1):
        score[0][j], trace[0][j] = j * gap, 1
    for i in range(1, n + 1):
        score[i][0], trace[i][0] = i * gap, 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left = score[i][j - 1] + gap
            up = score[i - 1][j] + gap
            diag = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            best = max(left, up, diag)
            score[i][j] = best
            trace[i][j] = 1 if best == left else 2 if best == up else 3
    y_to_x = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        step = trace[i][j]
        if step == 3:
            i, j = i - 1, j - 1
            y_to_x[j] = i
        elif step == 1:
            j -= 1
        else:
            i -= 1
    return y_to_x


def refinement_mapper(source: PromptTokens, target: PromptTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Alignment of a prompt refinement (paper Sec. 3.2, "Adding a New Phrase").

    ``(Edit(M, M*))_{i,j} = M*_{i,j}`` if ``A(j) = None`` else ``M_{i,A(j)}``, with ``A`` the global
    alignment of the two token sequences. Padding positions map to themselves.

    Args:
        source: the tokenized source prompt.
        target: the tokenized target prompt (same ``max_length``); its ``ids`` are aligned to the source's.

    Returns:
        ``(mapper, alphas)``: ``mapper`` (max_length,) long, the source position of each target
        position; ``alphas`` (max_length,) float, 1 where the target token takes the source's map,
        0 where it keeps its own (inserted tokens).
    """
    length = source.max_length
    y_to_x = global_align(list(source.ids), list(target.ids))
    mapper = torch.arange(length)
    alphas = torch.ones(length)
    for j, i in enumerate(y_to_x):
        mapper[j] = i if i >= 0 else 0
        alphas[j] = float(i >= 0)
    return mapper, alphas


def positions_in_each(prompts: "list[PromptTokens]", word: str | int, what: str, argument: str | None = None) -> list[list[int]]:
    """Token positions of ``word`` in each prompt (``[]`` where it is absent).

    Args:
        prompts: the tokenized prompts to search.
        word: a word, phrase or word index, as `PromptTokens.positions` takes it.
        what: the name of the setting that gave ``word``, for the error message.
        argument: the library name of that setting, which the error carries (default: ``what``).

    Returns:
        One list of positions per prompt, in order (see `PromptTokens.positions`).

    Raises:
        ArgumentError: the word is in none of the prompts; ``what`` names the setting in the message.
    """
    found = []
    for p in prompts:
        try:
            found.append(p.positions(word))
        except ValueError:
            found.append([])
    if not any(found):
        listed = "; ".join(repr(p.prompt) for p in prompts)
        raise ArgumentError(argument or what, f"{what} names {word!r}, which is in none of the prompts {listed}; name a word of one of them")
    return found
