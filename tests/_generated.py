"""Helpers of the generated-input tests (test_properties.py, test_fuzz_files.py): hypothesis
strategies of hostile values, a per-example time limit, and a count of the inputs tried per target."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st

#: Seconds one generated example may run before it counts as a hang.
EXAMPLE_LIMIT_S = 60

#: Inputs tried per target in this process, and of those, how many the code accepted.
TRIED: Counter = Counter()
ACCEPTED: Counter = Counter()


class Hang(BaseException):
    """One example ran past `EXAMPLE_LIMIT_S` (a BaseException, so that no ``except Exception`` hides it)."""


@contextlib.contextmanager
def time_limit(seconds: int = EXAMPLE_LIMIT_S):
    """Raise `Hang` in the block when it runs longer than ``seconds`` (SIGALRM; main thread only)."""

    def alarm(signum, frame):
        raise Hang(f"the example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def tried(target: str, accepted: bool) -> None:
    """Count one generated input of ``target`` (accepted: the code returned rather than refused it)."""
    TRIED[target] += 1
    ACCEPTED[target] += bool(accepted)


def examples(share: float = 1.0) -> settings:
    """The loaded profile's settings with ``share`` of its examples (at least 10): the pipeline's
    targets, a few times dearer per example than the parsers', take a share."""
    return settings(max_examples=max(10, int(settings.default.max_examples * share)))


def write_counts(path: str | os.PathLike | None = None) -> None:
    """Merge this process's counts into the JSON file ``path`` (default: env ``P2P_GENERATED_COUNTS``;
    nothing when neither is set): ``{target: {"tried": n, "accepted": m}}``."""
    path = path or os.environ.get("P2P_GENERATED_COUNTS")
    if not path or not TRIED:
        return
    file = Path(path)
    counts = json.loads(file.read_text()) if file.is_file() else {}
    for target, n in TRIED.items():
        counts[target] = {"tried": n, "accepted": ACCEPTED[target]}
    file.write_text(json.dumps(counts, indent=1, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------ strategies

#: Characters that break naive text handling: combining marks, emoji (with joiners and skin tones),
#: right-to-left text and marks, NUL and other controls, zero-width and odd spaces, quotes and
#: shell metacharacters.
AWKWARD = ["\u0301", "\u0308", "e\u0301", "\U0001F600", "\U0001F469\u200d\U0001F4BB", "\U0001F44D\U0001F3FD", "\u05e9\u05dc\u05d5\u05dd",
           "\u0645\u0631\u062d\u0628\u0627", "\u202e", "\u200f", "\x00", "\x07", "\x1b[31m", "\u200b", "\u00a0", "\u3000", "\t", "\n",
           "\r\n", "'", '"', "`", "$(touch /tmp/p2p-pwned)", ";", "|", "&&", "\\", "<|endoftext|>", "<|startoftext|>", "\ufffd",
           "\ud7ff", "\U0010ffff"]
#: Ordinary words (some in the prompts the tests edit), so that generated prompts often align.
WORDS = ["a", "cat", "dog", "riding", "bicycle", "red", "circle", "blue", "square", "the", "of", "on", "big", "tiny", "horse"]

words = st.one_of(st.sampled_from(WORDS), st.sampled_from(AWKWARD), st.text(max_size=12),
                  st.text(alphabet=st.characters(categories=["P", "S"]), min_size=1, max_size=6))
#: Prompts: ordinary, awkward, empty, punctuation or whitespace only, or longer than CLIP's 77 tokens.
prompts = st.one_of(
    st.lists(words, max_size=8).map(" ".join),
    st.text(max_size=40),
    st.sampled_from(["", " ", "\n\t", "...", "!!!", ",", "\x00", "a" * 500]),
    st.integers(78, 120).map(lambda n: " ".join(["cat"] * n)),
)
#: Any float, including NaN, the infinities, negative zero, huge and subnormal values.
any_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]))
#: A fraction's neighbourhood: in [0, 1], just outside, or anything.
fractions = st.one_of(st.floats(0, 1), st.floats(-2, 3), any_float)
#: Odd values of the wrong type.
junk = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.text(max_size=8),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
#: `junk` with bytes too (what JSON cannot hold).
any_junk = st.one_of(junk, st.binary(max_size=4))
#: Injection windows: a fraction, a pair (tuple or list, any floats), a list of any length, or junk.
windows = st.one_of(fractions, st.tuples(fractions, fractions), st.lists(fractions, max_size=3), st.lists(st.tuples(fractions, fractions), max_size=3), junk)


@pytest.fixture(scope="module", autouse=True)
def record_counts():
    """At the end of a module that imports it: `write_counts` (autouse there)."""
    yield
    write_counts()


def mostly(good, bad):
    """``good`` about three times in four and ``bad`` otherwise (`one_of` alone would mostly pick
    the bad branch), so that enough generated calls pass the checks to test what follows them."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: good if ok else bad)
