"""Injection windows per target prompt (issue 30): ``cross_replace_steps`` and ``self_replace_steps``
as lists, one window per target, as the paper's code keeps its alphas per target. A call with the
targets ``[t, t, t]`` and windows ``[w1, w2, w3]`` gives, per target, the image of the single-target
call with that window, in the full edit and from a kept `SourcePass`."""

import pytest
import torch

from conftest import counting_unet_calls
from prompt2prompt.arguments import ArgumentError
from prompt2prompt.schedules import per_target

STEPS = 5
PROMPT = "a red circle and a blue square"
TARGET = "a red circle and a blue circle"
BUDGET = dict(cross_replace_steps=1.0, self_replace_steps=1.0, self_replace_max_res=16)

#: (cross windows, self windows) per target; each entry is what a single target takes.
CASES = {
    "cross": ([0.0, 0.4, (0.2, 1.0)], 0.4),
    "cross and self": ([0.2, 0.6, 1.0], [0.0, (0.2, 0.6), 1.0]),
    "per-word": ([{"default_": 0.4, "circle": (0.2, 1.0)}, 0.8, {"default_": 1.0, "circle": 0.0}], [0.4, 0.0, 0.8]),
}


@pytest.fixture(scope="module")
def kept(pipe):
    return pipe.source(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3), **BUDGET)


def seed():
    return torch.Generator().manual_seed(3)


def _call(pipe, targets, cross, self_steps, source=None):
    extra = dict(source=source) if source is not None else dict(generator=seed())
    return pipe(PROMPT, targets, num_inference_steps=STEPS, cross_replace_steps=cross, self_replace_steps=self_steps,
                self_replace_max_res=16, output_type="pt", return_attention=False, **extra)


@pytest.mark.parametrize("from_pass", [False, True], ids=["full", "source pass"])
@pytest.mark.parametrize("case", list(CASES))
def test_windows_per_target_equal_single_target_calls(pipe, kept, case, from_pass):
    cross, self_steps = CASES[case]
    n = len(cross)
    source = kept if from_pass else None
    with counting_unet_calls(pipe) as calls:
        batch = _call(pipe, [TARGET] * n, cross, self_steps, source)
    assert len(calls) == STEPS  # one denoising loop for every window
    assert batch.images.shape[0] == 1 + n
    ones = [_call(pipe, TARGET, cross[k], self_steps[k] if isinstance(self_steps, list) else self_steps, source) for k in range(n)]
    for k, one in enumerate(ones):
        torch.testing.assert_close(batch.images[1 + k], one.images[1], atol=1e-4, rtol=0)
        torch.testing.assert_close(batch.images[0], one.images[0], atol=1e-5, rtol=0)
    # each target matches its own window's image much more closely than another window's
    for k in range(n):
        own = (batch.images[1 + k] - ones[k].images[1]).abs().max()
        other = min((batch.images[1 + k] - ones[j].images[1]).abs().max() for j in range(n) if j != k)
        assert other > 10 * own


def test_the_same_window_for_every_target_equals_one_window(pipe):
    one = _call(pipe, [TARGET, TARGET], (0.2, 0.8), 0.4)
    listed = _call(pipe, [TARGET, TARGET], [(0.2, 0.8), (0.2, 0.8)], [0.4, 0.4])
    torch.testing.assert_close(listed.images, one.images, atol=1e-6, rtol=0)


def test_different_targets_take_their_own_windows(pipe):
    targets = [TARGET, "a green circle and a blue square"]
    batch = _call(pipe, targets, [0.2, 1.0], [0.0, 0.6])
    for k, (c, s) in enumerate(zip([0.2, 1.0], [0.0, 0.6])):
        one = _call(pipe, targets[k], c, s)
        torch.testing.assert_close(batch.images[1 + k], one.images[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("argument", ["cross_replace_steps", "self_replace_steps"])
def test_a_list_of_the_wrong_length_is_refused_before_any_unet_call(pipe, argument):
    kwargs = {"cross_replace_steps": 0.8, "self_replace_steps": 0.4, argument: [0.2, 0.4, 0.6]}
    with counting_unet_calls(pipe) as calls, pytest.raises(ArgumentError) as err:
        pipe(PROMPT, [TARGET, TARGET], num_inference_steps=STEPS, generator=seed(), output_type="latent", **kwargs)
    assert calls == []
    assert err.value.argument == argument
    assert argument in str(err.value) and "3 windows for 2 target prompts" in str(err.value) and "one window per target" in str(err.value)


def test_a_bad_window_in_the_list_names_its_target(pipe):
    with pytest.raises(ArgumentError) as err:
        _call(pipe, [TARGET, TARGET], [0.2, (0.9, 0.1)], 0.4)
    assert err.value.argument == "cross_replace_steps" and "cross_replace_steps[1]" in str(err.value)
    with pytest.raises(ArgumentError) as err:
        _call(pipe, [TARGET, TARGET], [0.2, {"default_": 0.4, "horse": 1.0}], 0.4)
    assert err.value.argument == "cross_replace_steps" and "horse" in str(err.value)
    with pytest.raises(ArgumentError) as err:
        _call(pipe, [TARGET, TARGET], 0.8, [0.2, [0.1, 0.2, 0.3]])
    assert err.value.argument == "self_replace_steps" and "self_replace_steps[1]" in str(err.value)


def test_a_pair_of_numbers_is_still_one_window_unless_there_are_two_targets():
    assert per_target([0.2, 0.8], 1, "cross_replace_steps") is None
    assert per_target([0.2, 0.8], 3, "cross_replace_steps") is None
    assert per_target([0.2, 0.8], 2, "cross_replace_steps") == [0.2, 0.8]
    assert per_target((0.2, 0.8), 2, "cross_replace_steps") is None
    assert per_target(0.8, 2, "cross_replace_steps") is None


def test_the_source_pass_budget_takes_the_widest_window_of_the_list(pipe):
    narrow = pipe.source(PROMPT, num_inference_steps=STEPS, generator=seed(), cross_replace_steps=0.4, self_replace_steps=0.4,
                        self_replace_max_res=16)
    _call(pipe, [TARGET, TARGET], [0.2, 0.4], [0.2, 0.4], narrow)  # within the budget
    for cross, self_steps, argument in (([0.2, 0.8], 0.2, "cross_replace_steps"), ([0.2, 0.4], [0.0, 0.8], "self_replace_steps")):
        with counting_unet_calls(pipe) as calls, pytest.raises(ArgumentError) as err:
            _call(pipe, [TARGET, TARGET], cross, self_steps, narrow)
        assert calls == [] and err.value.argument == argument and "pipe.source(" in str(err.value)
