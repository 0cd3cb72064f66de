"""User-facing edit settings (typed, validated) and the EditPlan of tensors they compile to."""

from __future__ import annotations

import copy
import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .alignment import PromptTokens, positions_in_each, refinement_mapper, replacement_mapper
from .arguments import ARGUMENTS, ArgumentError, default, fraction, integer, number
from .edit_ops import value_weights
from .schedules import Window, cross_step_weights, self_step_windows


class EditMode(str, enum.Enum):
    """How the target prompts relate to the source prompt."""

    AUTO = "auto"  # replace when the word counts match, refine otherwise
    REPLACE = "replace"  # word swap
    REFINE = "refine"  # words added or removed
    NONE = "none"  # same noise only, no injection

    @classmethod
    def parse(cls, value: "EditMode | str") -> "EditMode":
        """The `EditMode` that ``value`` names.

        Args:
            value: an `EditMode`, or its name (``"auto"``, ``"replace"``, ``"refine"``, ``"none"``; any case).

        Returns:
            The `EditMode`.

        Raises:
            ArgumentError: (of ``edit``) ``value`` names no mode; the message lists the choices.
        """
        try:
            if not isinstance(value, (EditMode, str)):  # str(None) would read as "none"
                raise ValueError
            return cls(value.value if isinstance(value, EditMode) else value.lower())
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ArgumentError("edit", f"edit must be one of {choices}, got {value!r}") from None


def _words(value, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not value or not all(isinstance(w, str) and w.strip() for w in value):
        raise ArgumentError("local_blend", f"LocalBlend {name} must be a word or a list of words, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class LocalBlend:
    """Keep everything outside the edited words' region from the source image (paper Sec. 3.2).

    After each step from ``start``, the latents of each target outside a mask are replaced by the
    source's. The mask is the union of the source words' region in the source and the target
    words' region in the target: their cross-attention maps, summed over the steps so far and
    averaged over heads and the layers at ``resolution``, max-pooled 3x3, divided by their maximum
    and thresholded. Regions of ``subtract_words`` (thresholded without pooling) are removed.

    Args:
        source_words: word(s) of the source prompt whose region may change.
        target_words: word(s) of the target prompts whose region may change; each is looked up in
            every target that contains it (``("dog", "horse")`` for two targets), and each target
            must contain at least one.
        threshold: mask threshold in [0, 1]; a pair ``(mask, subtract)`` sets both thresholds.
        start: fraction of the steps after which blending begins (the paper's code uses 0.2).
        subtract_words: word(s) whose region is kept from the source even inside the mask; each is
            looked up in every prompt that contains it.
        resolution: side of the attention maps used; None = the latent side // 4 (16 at SD 512),
            or the nearest side the UNet has.
    """

    source_words: Sequence[str] | str
    target_words: Sequence[str] | str
    threshold: float | tuple[float, float] = default("local_blend.threshold")
    start: float = default("local_blend.start")
    subtract_words: Sequence[str] | str | None = None
    resolution: int | None = default("local_blend.resolution")

    def __post_init__(self):
        object.__setattr__(self, "source_words", _words(self.source_words, "source_words"))
        object.__setattr__(self, "target_words", _words(self.target_words, "target_words"))
        if self.subtract_words is not None:
            object.__setattr__(self, "subtract_words", _words(self.subtract_words, "subtract_words"))
        th = self.threshold
        pair = tuple(th) if isinstance(th, Sequence) and not isinstance(th, str) else (th, th)
        if len(pair) != 2:
            raise ArgumentError("local_blend.threshold", f"LocalBlend threshold must be a number or a (mask, subtract) pair, got {th!r}")
        object.__setattr__(self, "threshold", tuple(fraction(t, "local_blend.threshold", "LocalBlend threshold", text=False) for t in pair))
        object.__setattr__(self, "start", fraction(self.start, "local_blend.start", "LocalBlend start", text=False))
        if self.resolution is not None:
            side = ARGUMENTS["local_blend.resolution"]
            integer(self.resolution, side.name, "LocalBlend resolution", f"{side.what} or None", side.minimum, text=False)


@dataclass
class BlendPlan:
    """LocalBlend compiled against the prompts: token indicators per prompt row."""

    words: torch.Tensor  # (prompts, tokens) 1 for the blend words of each prompt
    subtract: torch.Tensor | None  # (prompts, tokens) or None
    threshold: float
    subtract_threshold: float
    start_step: int
    resolution: int


@dataclass(frozen=True)
class ValueInjection:
    """One step's cross-attention edit as weights on the targets' values (`edit_ops.value_weights`):
    target ``k``'s output is ``softmax(Q_src K_src^T) (S_k V_k) + softmax(Q_k K_k^T) (o_k * V_k)``."""

    source: torch.Tensor | None  # (targets, tokens_src, tokens_tgt) S; None when nothing comes from the source
    source_diagonal: torch.Tensor | None  # (targets, tokens) S's diagonal when S is diagonal (no matrix product)
    source_is_identity: bool  # S = I: the values are the target's own
    own: torch.Tensor | None  # (targets, tokens) o; None only when it is all zero and ``source`` is given

    @property
    def both_terms(self) -> bool:
        """Whether the target needs both attentions (some tokens take the source's map, some keep their own)."""
        return self.source is not None and self.own is not None

    def to(self, device: torch.device) -> "ValueInjection":
        """A copy with the tensors on ``device``.

        Args:
            device: the device to move ``source``, ``source_diagonal`` and ``own`` to (None stays None).

        Returns:
            A new `ValueInjection` (this one is frozen and unchanged).
        """
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ValueInjection(move(self.source), move(self.source_diagonal), self.source_is_identity, move(self.own))


def value_injection(mapper: torch.Tensor, alphas: torch.Tensor, weights: torch.Tensor, equalizer: torch.Tensor | None) -> ValueInjection:
    """The `ValueInjection` of one step, with the terms that are all zero left out.

    Args:
        mapper: ``(targets, tokens_src, tokens_tgt)`` source position -> target position weights.
        alphas: ``(targets, tokens)`` 1 where the target token takes the mapped source map.
        weights: ``(targets, tokens)`` this step's injection weights (a step of ``EditPlan.cross_weights``).
        equalizer: ``(targets, tokens)`` re-weighting factors, or None (all ones).

    Returns:
        A `ValueInjection` of ``S`` and ``o`` from `edit_ops.value_weights`: ``source`` is None when
        ``S`` is all zero; ``source_diagonal`` is set when ``S`` is diagonal and ``source_is_identity``
        when it is the identity; ``own`` is None when ``o`` is all zero (and ``S`` is not).
    """
    source, own = value_weights(mapper, alphas, weights, equalizer)
    if not bool(source.any()):
        return ValueInjection(None, None, False, own)
    diagonal = torch.diagonal(source, dim1=1, dim2=2)  # (targets, tokens)
    is_diagonal = bool(torch.equal(source, torch.diag_embed(diagonal)))
    return ValueInjection(source, diagonal if is_diagonal else None, is_diagonal and bool(diagonal.eq(1).all()),
                          own if bool(own.any()) else None)


@dataclass
class EditPlan:
    """Everything the attention processors and the loop need, as tensors per step.

    The edited cross-attention of target ``k`` at step ``i`` is (see `edit_ops.edit_cross_attention`)
    ``w * eq * ((M_src @ mapper_k) * a_k + M_k * (1 - a_k)) + (1 - w) * M_k`` with ``w = cross_weights[i, k]``.
    The processors apply it on the values instead (`injections`, `edit_ops.value_weights`), and
    form the maps only in layers that the value form does not cover (see `attention`).
    """

    mode: EditMode
    num_steps: int
    mapper: torch.Tensor  # (targets, tokens_src, tokens_tgt)
    alphas: torch.Tensor  # (targets, tokens) 1 = take the (mapped) source's map
    cross_weights: torch.Tensor  # (steps, targets, tokens)
    equalizer: torch.Tensor | None  # (targets, tokens)
    self_steps: tuple[int, int]  # the steps of any target's self-injection: the widest of ``self_windows``
    self_max_res: int
    blend: BlendPlan | None
    source: PromptTokens
    targets: list[PromptTokens]
    cross_active: list[bool] = field(default_factory=list)
    self_windows: list[tuple[int, int]] | None = None  # per target ``(first, stop)``; None: ``self_steps`` for all

    cross_full: list[bool] = field(default_factory=list)
    injections: list[ValueInjection | None] = field(default_factory=list)  # per step; None where inactive

    def __post_init__(self):
        # Self-injection per target: None at steps where every target (or none) takes the source's
        # queries and keys, else a (targets,) bool tensor of the targets that do.
        windows = self.self_windows or [self.self_steps] * len(self.targets)
        self.self_masks: list[torch.Tensor | None] = []
        for i in range(self.num_steps):
            active = [a <= i < b for a, b in windows]
            self.self_masks.append(None if all(active) or not any(active) else torch.tensor(active))
        weights = self.cross_weights.tolist()  # (steps, targets, tokens) as lists: no tensor work per step
        self.cross_active = [any(any(row) for row in step) for step in weights]
        if self.mode is EditMode.NONE and self.equalizer is None:
            self.cross_active = [False] * self.num_steps
        self.cross_full = [all(w == 1 for row in step for w in row) for step in weights]
        # Cheaper equivalents for the explicit edit: nothing for an identity mapper, a gather
        # instead of a one-hot matrix product, and no blending with weights or alphas that are all one.
        one_hot = self.mapper.eq(1).sum(1).eq(1).all() and self.mapper.eq(0).logical_or(self.mapper.eq(1)).all()
        self.fast_mapper = self.mapper.argmax(1) if one_hot else self.mapper  # (targets, tokens) long or dense
        if one_hot and bool(self.fast_mapper.eq(torch.arange(self.mapper.shape[-1])).all()):
            self.fast_mapper = None  # the identity: no gather at all
        self.fast_alphas = None if bool(self.alphas.eq(1).all()) else self.alphas
        # One ValueInjection per distinct step schedule, decided here on the CPU so that the
        # processors never synchronise with the device to choose a path.
        by_weights: dict[str, ValueInjection] = {}
        self.injections = []
        for i, step_weights in enumerate(weights):
            if not self.cross_active[i]:
                self.injections.append(None)
                continue
            key = repr(step_weights)
            if key not in by_weights:
                by_weights[key] = value_injection(self.mapper, self.alphas, self.cross_weights[i], self.equalizer)
            self.injections.append(by_weights[key])

    def step_weights(self, step: int) -> torch.Tensor | None:
        """This step's ``(targets, tokens)`` injection weights, None when all are one.

        Args:
            step: the denoising step index, ``0 <= step < num_steps``.
        """
        return None if self.cross_full[step] else self.cross_weights[step]

    def value_injection(self, step: int) -> ValueInjection | None:
        """The cross-attention edit of ``step`` on the values, None when no cross-attention is edited.

        Args:
            step: the denoising step index, ``0 <= step < num_steps``.

        Returns:
            The step's `ValueInjection` (steps with the same weights share one), or None.
        """
        return self.injections[step]

    def self_active(self, step: int, side: int) -> bool:
        """Whether the source's self-attention is injected into the targets at ``step`` and ``side``.

        Args:
            step: the denoising step index.
            side: the attention map's side (``max(height, width)``).

        Returns:
            True when the mode is not ``none``, ``step`` lies in ``self_steps`` (end excluded; with
            windows per target, in any target's window, see `self_targets`) and ``side <= self_max_res``.
        """
        if self.self_windows is not None:  # windows per target: any of them
            on = any(a <= step < b for a, b in self.self_windows)
        else:
            on = self.self_steps[0] <= step < self.self_steps[1]
        return self.mode is not EditMode.NONE and on and side <= self.self_max_res

    def self_targets(self, step: int) -> torch.Tensor | None:
        """The targets whose self-attention takes the source's at ``step`` (where `self_active`):
        None for all of them, else a ``(targets,)`` bool tensor (windows given per target).

        Args:
            step: the denoising step index.
        """
        return self.self_masks[step]

    def to(self, device: torch.device) -> "EditPlan":
        """A copy of the plan with its tensors on ``device`` (the plan itself is left as it is).

        Moves the mapper, alphas, step weights, equalizer, their fast forms, every `ValueInjection`
        (steps that shared one still share it) and the LocalBlend indicators.

        Args:
            device: the device of the UNet the plan will run on.

        Returns:
            The moved copy.
        """
        plan = copy.copy(self)  # shallow: the derived per-step lists are rebuilt below, never shared mutably
        for name in ("mapper", "alphas", "cross_weights", "equalizer", "fast_mapper", "fast_alphas"):
            value = getattr(self, name)
            if value is not None:
                setattr(plan, name, value.to(device))
        moved: dict[int, ValueInjection] = {}
        for inj in self.injections:
            if inj is not None and id(inj) not in moved:
                moved[id(inj)] = inj.to(device)
        plan.injections = [None if inj is None else moved[id(inj)] for inj in self.injections]
        masks: dict[int, torch.Tensor] = {}
        for mask in self.self_masks:
            if mask is not None and id(mask) not in masks:
                masks[id(mask)] = mask.to(device)
        plan.self_masks = [None if m is None else masks[id(m)] for m in self.self_masks]
        if self.blend is not None:
            subtract = None if self.blend.subtract is None else self.blend.subtract.to(device)
            plan.blend = dataclasses.replace(self.blend, words=self.blend.words.to(device), subtract=subtract)
        return plan


def resolve_mode(mode: EditMode | str, source: PromptTokens, targets: Sequence[PromptTokens]) -> EditMode:
    """``auto`` -> replace when every target has the source's number of words, else refine.

    Args:
        mode: an `EditMode` or its name.
        source: the tokenized source prompt.
        targets: the tokenized target prompts.

    Returns:
        ``REPLACE`` or ``REFINE`` for ``auto``; any other mode as parsed.

    Raises:
        ValueError: ``mode`` names no `EditMode`.
    """
    mode = EditMode.parse(mode)
    if mode is EditMode.AUTO:
        same = all(len(t.words) == len(source.words) for t in targets)
        return EditMode.REPLACE if same else EditMode.REFINE
    return mode


def _factor(value, name: str, dtype: torch.dtype) -> float:
    """A re-weighting factor: a finite number that the factors' tensor of ``dtype`` can hold.

    Raises:
        ArgumentError: of ``equalizer``, naming ``name``.
    """
    what = "a finite number (0, negative and > 1 are fine)"
    factor = number(value, "equalizer", name, what, text=False)
    largest = torch.finfo(dtype).max
    if abs(factor) > largest:
        raise ArgumentError("equalizer", f"{name} must be {what} of at most {largest:.3g} in size (the factors are {dtype}), "
                                         f"got {value!r}; use a moderate factor such as 2 or 0.5")
    return factor


def _equalizer(targets: Sequence[PromptTokens], equalizer: Mapping) -> torch.Tensor:
    """Re-weighting factors per target token (paper Sec. 3.2: ``c * M_{i,j*}``); 1 elsewhere."""
    if not isinstance(equalizer, Mapping) or not equalizer:
        raise ArgumentError("equalizer", f"equalizer must be a non-empty dict of word -> factor, got {equalizer!r}")
    factors = torch.ones(len(targets), targets[0].max_length)  # (targets, tokens)
    for word, value in equalizer.items():
        values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value] * len(targets)
        if len(values) != len(targets):
            raise ArgumentError("equalizer", f"equalizer[{word!r}] gives {len(values)} factors for {len(targets)} target prompts")
        values = [_factor(v, f"equalizer[{word!r}]", factors.dtype) for v in values]
        for k, positions in enumerate(positions_in_each(list(targets), word, "equalizer")):
            factors[k, positions] = values[k]
    return factors


def _blend_plan(blend: LocalBlend, source: PromptTokens, targets: Sequence[PromptTokens], num_steps: int, resolution: int) -> BlendPlan:
    prompts = [source, *targets]
    words = torch.zeros(len(prompts), source.max_length)  # (prompts, tokens)
    try:
        for w in blend.source_words:
            words[0, source.positions(w)] = 1.0
    except ValueError as err:
        raise ArgumentError("local_blend", f"LocalBlend source_words: {err}") from None
    for w in blend.target_words:  # each word marks every target that has it ("dog" in one, "horse" in another)
        for k, positions in enumerate(positions_in_each(list(targets), w, "LocalBlend target_words", "local_blend"), start=1):
            words[k, positions] = 1.0
    for k, target in enumerate(targets, start=1):
        if not bool(words[k].any()):  # an empty mask would silently copy the source
            raise ArgumentError("local_blend", f"LocalBlend target_words {tuple(blend.target_words)} has no word of the target prompt "
                                               f"{target.prompt!r}; name at least one word of each target")
    subtract = None
    if blend.subtract_words:
        subtract = torch.zeros_like(words)
        for w in blend.subtract_words:
            for k, positions in enumerate(positions_in_each(prompts, w, "LocalBlend subtract_words", "local_blend")):
                subtract[k, positions] = 1.0
    return BlendPlan(words, subtract, blend.threshold[0], blend.threshold[1], int(blend.start * num_steps), resolution)


def build_edit_plan(
    source: PromptTokens,
    targets: Sequence[PromptTokens],
    mode: EditMode | str,
    num_steps: int,
    cross_replace_steps: Window | Mapping[str, Window] | list = default("cross_replace_steps"),
    self_replace_steps: Window | list = default("self_replace_steps"),
    self_max_res: int = 0,
    equalizer: Mapping | None = None,
    local_blend: LocalBlend | None = None,
    blend_resolution: int | None = None,
) -> EditPlan:
    """Compile the edit settings into tensors, validating every word and window first.

    Args:
        source: the tokenized source prompt.
        targets: the tokenized target prompts.
        mode: an `EditMode` or its name; ``auto`` is resolved here.
        num_steps: number of denoising steps T.
        cross_replace_steps: cross-attention injection window(s), see `cross_step_weights`; a list
            gives one per target prompt.
        self_replace_steps: self-attention injection window; a list gives one per target prompt.
        self_max_res: largest attention-map side whose self-attention is injected (0: none; the
            pipeline passes the latent side // 4, 16 for SD at 512 px).
        equalizer: word -> factor (or one factor per target) re-weighting the target's attention.
        local_blend: optional `LocalBlend`.
        blend_resolution: the map side LocalBlend reads (already resolved against the UNet);
            required with ``local_blend``.

    Raises:
        ArgumentError: on any bad setting, before any work is done; its ``.argument`` names the setting.
        ValueError: ``local_blend`` without ``blend_resolution`` (a caller's mistake, not a setting's).
    """
    if not targets:
        raise ArgumentError("edit_prompts", "edit_prompts is empty; give at least one target prompt")
    mode = resolve_mode(mode, source, targets)
    length = source.max_length
    n = len(targets)
    if mode is EditMode.REPLACE:
        mapper = torch.stack([replacement_mapper(source, t) for t in targets])  # (targets, L, L)
        alphas = torch.ones(n, length)
    elif mode is EditMode.REFINE:
        pairs = [refinement_mapper(source, t) for t in targets]
        mapper = torch.zeros(n, length, length)  # (targets, L, L) one-hot columns
        for k, (index, _) in enumerate(pairs):
            mapper[k, index, torch.arange(length)] = 1.0
        alphas = torch.stack([a for _, a in pairs])  # (targets, L)
    else:  # NONE: a target keeps its own maps (an equalizer then scales them)
        mapper = torch.eye(length).expand(n, length, length).clone()
        alphas = torch.zeros(n, length)
    weights = cross_step_weights(targets, cross_replace_steps, num_steps)
    self_windows = self_step_windows(self_replace_steps, n, num_steps)
    if isinstance(self_replace_steps, list) and len(set(self_windows)) > 1:
        used = [w for w in self_windows if w[0] < w[1]] or [(0, 0)]
        self_steps = (min(a for a, _ in used), max(b for _, b in used))  # the widest: what a SourcePass must keep
    else:
        self_steps, self_windows = self_windows[0], None  # one window for all: the plan as before
    eq = _equalizer(targets, equalizer) if equalizer is not None else None
    if local_blend is not None and blend_resolution is None:
        raise ValueError("build_edit_plan needs blend_resolution with local_blend: the map side of the UNet at this size")
    blend = _blend_plan(local_blend, source, targets, num_steps, blend_resolution) if local_blend is not None else None
    return EditPlan(mode, num_steps, mapper, alphas, weights, eq, self_steps, self_max_res, blend, source, list(targets),
                    self_windows=self_windows)
