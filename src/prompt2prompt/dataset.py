"""Paired edit datasets (InstructPix2Pix style) from a file of caption pairs: ``p2p dataset``.

A ``PAIRS.jsonl`` line is ``{"input": CAPTION, "output": CAPTION, "edit": TEXT (optional)}``. Each
pair gets ``samples_per_pair`` candidates; a candidate's seed and sampled settings (self-attention
injection fraction, cross-attention fraction, guidance) come from a hash of the run seed, the
line's content and the candidate's index, never from the worker count or from restarts
(`candidate_plan`). The pipeline denoises one noise per call (its rows share the source's), so
rows of different seeds cannot share a call: with ``candidates_per_seed`` M (default 1, one seed
per candidate, as InstructPix2Pix) candidates are drawn in groups of M sharing a seed, and a
group runs as one call, the source once and the output caption once per candidate, each with its
own injection windows (`generate`); ``batch_rows`` caps the targets of a call.

Each candidate is scored by the run's filter through `score_candidate`: the bundled shapes model's
detector scores the edited image against the output caption's words (`detector_score`; a candidate
passes when its score reaches ``min_score``), or, with ``clip`` (a local CLIP folder), InstructPix2Pix's
three CLIP similarities (`clip_filter`; a candidate passes when each reaches its threshold, and is
ranked by its directional similarity). The best ``keep`` candidates that pass are kept.

Output folder layout (`DatasetWriter`): ``data/pair-<line>.parquet`` (one shard per pair, written
atomically), ``README.md`` (the card), and in the hidden ``.p2p/``: ``manifest.jsonl`` (one JSON
line per finished pair: its candidates, their ranking scores and all their score columns, the kept
ones), ``run.json`` (the settings, the filter's included, which a resumed run must match) and
``counts.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .clip_filter import (MIN_CAPTION_SIMILARITY, MIN_DIRECTIONAL, MIN_IMAGE_SIMILARITY, SCORE_KEYS, ClipError,
                          ClipThresholds, load_clip)
from .imageio import append_bytes, atomic_write_bytes, atomic_write_json, json_bytes, png_bytes, remove_stale_temps, writing_into
from .options import OptionError, json_lines, json_object

#: The files of an output folder.
DATA_DIR = "data"
#: The run's bookkeeping, in a hidden folder: `datasets.load_dataset("parquet", data_dir=OUT)` reads
#: every file it sees as Parquet but skips hidden folders.
STATE_DIR = ".p2p"
MANIFEST = f"{STATE_DIR}/manifest.jsonl"
RUN_FILE = f"{STATE_DIR}/run.json"
COUNTS = f"{STATE_DIR}/counts.json"
CARD = "README.md"
#: A seed is 63 bits of the candidate's hash (a non-negative int64, as Parquet stores it).
SEED_MASK = 2**63 - 1
#: The keys a line may have.
LINE_KEYS = ("input", "output", "edit")
#: The filters: the shapes detector (offline, the bundled model) or a CLIP model folder.
FILTERS = ("detector", "clip")
#: The CLIP filter's settings (recorded only for a CLIP run) and its thresholds, in `clip_filter.SCORE_KEYS` order.
CLIP_THRESHOLDS = ("min_directional", "min_image_similarity", "min_caption_similarity")
CLIP_SETTINGS = ("clip", *CLIP_THRESHOLDS)
#: A row's score columns: the ranking score, the detector's check count, the three CLIP similarities
#: (in `clip_filter.SCORE_KEYS` order); the other filter's columns are null.
CLIP_COLUMNS = ("clip_directional", "clip_image", "clip_caption")
SCORE_COLUMNS = ("score", "score_checks", *CLIP_COLUMNS)


class DatasetError(OptionError):
    """Bad settings, a bad line or a bad output folder (a usage error for the CLI: exit status 2)."""


# ============================================================================ settings


@dataclass(frozen=True)
class Range:
    """A number drawn uniformly from ``[low, high]`` (``low == high``: always that number)."""

    low: float
    high: float

    def __post_init__(self):
        for value in (self.low, self.high):
            if not isinstance(value, (int, float)) or not np.isfinite(value):
                raise DatasetError(f"a range's ends must be finite numbers, got {value!r}")
        if self.low > self.high:
            raise DatasetError(f"a range's start {self.low:g} is above its end {self.high:g}")

    @classmethod
    def parse(cls, text, name: str) -> Range:
        """``"0.8"`` or ``"0.1:0.9"`` (or a number) -> a Range; `DatasetError` naming ``name`` if malformed."""
        parts = str(text).split(":")
        try:
            if len(parts) > 2:
                raise ValueError
            low, high = float(parts[0]), float(parts[-1])
            return cls(low, high)
        except (ValueError, DatasetError) as err:
            detail = f" ({err})" if isinstance(err, DatasetError) else ""
            raise DatasetError(f"{name} must be a number F or a range LOW:HIGH, got {text!r}{detail}") from None

    def sample(self, rng: np.random.Generator) -> float:
        """One draw (the generator advances even for a fixed range, so later draws do not shift)."""
        u = float(rng.random())
        return float(self.low + (self.high - self.low) * u)

    def within(self, low: float, high: float, name: str) -> Range:
        """This range, or `DatasetError` if it reaches outside ``[low, high]``."""
        if self.low < low or self.high > high:
            raise DatasetError(f"{name} must lie in [{low:g}, {high:g}], got {self.low:g}:{self.high:g}")
        return self

    def __str__(self) -> str:
        return f"{self.low:g}" if self.low == self.high else f"{self.low:g}:{self.high:g}"


@dataclass(frozen=True)
class DatasetSettings:
    """Everything that decides a run's data (recorded in ``run.json``; a resumed run must match).

    Defaults as InstructPix2Pix: self-injection fraction uniform in [0.1, 0.9], cross 0.8, guidance 7.5,
    a seed per candidate (``candidates_per_seed`` 1; M > 1: groups of M candidates share a seed and
    a guidance, `candidate_plan`). ``batch_rows`` alone is not recorded (see below).
    The filter: the shapes detector with ``min_score``, or, when ``clip`` names a CLIP model folder,
    InstructPix2Pix's CLIP thresholds ``min_directional``, ``min_image_similarity`` and
    ``min_caption_similarity`` (`clip_filter`; each in [-1, 1]).
    """

    samples_per_pair: int = 8
    keep: int = 2
    seed: int = 0
    steps: int = 50
    self_steps: Range = Range(0.1, 0.9)
    cross_steps: Range = Range(0.8, 0.8)
    guidance: Range = Range(7.5, 7.5)
    min_score: float = 0.5
    model: str | None = None
    dtype: str = "float32"
    clip: str | None = None
    min_directional: float = MIN_DIRECTIONAL
    min_image_similarity: float = MIN_IMAGE_SIMILARITY
    min_caption_similarity: float = MIN_CAPTION_SIMILARITY
    candidates_per_seed: int = 1
    #: The most target rows one pipeline call denoises (None: a whole group). How, not what: the
    #: rows equal to float tolerance whatever it is, so it is not recorded and a resumed run may change it.
    batch_rows: int | None = None

    def __post_init__(self):
        for name, value, low in (("samples_per_pair", self.samples_per_pair, 1), ("keep", self.keep, 1),
                                 ("seed", self.seed, 0), ("steps", self.steps, 1),
                                 ("candidates_per_seed", self.candidates_per_seed, 1),
                                 ("batch_rows", 1 if self.batch_rows is None else self.batch_rows, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DatasetError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.keep > self.samples_per_pair:
            raise DatasetError(f"keep ({self.keep}) must be at most samples_per_pair ({self.samples_per_pair})")
        if self.candidates_per_seed > self.samples_per_pair:
            raise DatasetError(f"candidates_per_seed ({self.candidates_per_seed}) must be at most "
                               f"samples_per_pair ({self.samples_per_pair})")
        self.self_steps.within(0.0, 1.0, "self_steps")
        self.cross_steps.within(0.0, 1.0, "cross_steps")
        self.guidance.within(0.0, 100.0, "guidance")
        if not isinstance(self.min_score, (int, float)) or not 0.0 <= self.min_score <= 1.0:
            raise DatasetError(f"min_score must be in [0, 1], got {self.min_score!r}")
        if self.clip is not None and (not isinstance(self.clip, str) or not self.clip):
            raise DatasetError(f"clip must be a CLIP model folder's path or None, got {self.clip!r}")
        self.clip_thresholds  # noqa: B018 - validates the three thresholds

    @property
    def filter(self) -> str:
        """Which filter scores the candidates: one of `FILTERS`."""
        return "detector" if self.clip is None else "clip"

    @property
    def clip_thresholds(self) -> ClipThresholds:
        """The CLIP filter's thresholds (`DatasetError` naming the setting if one is out of [-1, 1])."""
        values = [getattr(self, name) for name in CLIP_THRESHOLDS]
        try:
            return ClipThresholds(*values)
        except ClipError:
            name, value = next((n, v) for n, v in zip(CLIP_THRESHOLDS, values)
                               if isinstance(v, bool) or not isinstance(v, (int, float)) or not -1.0 <= v <= 1.0)
            raise DatasetError(f"{name} must be a number in [-1, 1] (a cosine similarity), got {value!r}") from None

    def record(self) -> dict:
        """The settings that decide the data as JSON values (ranges as their text), with the filter; only
        the filter's own settings (``min_score`` for the detector, the CLIP folder and thresholds for
        CLIP), and not ``batch_rows``."""
        unused = (CLIP_SETTINGS if self.clip is None else ("min_score",)) + ("batch_rows",)
        return {k: (str(v) if isinstance(v, Range) else v) for k, v in asdict(self).items() if k not in unused} | {
            "self_steps": str(self.self_steps), "cross_steps": str(self.cross_steps), "guidance": str(self.guidance),
            "filter": self.filter}


# ============================================================================ input


@dataclass(frozen=True)
class Pair:
    """One line of the pairs file."""

    line: int
    input: str
    output: str
    edit: str | None = None

    def content(self) -> str:
        """The line's content, canonical (what its candidates' seeds hash)."""
        return json.dumps({"input": self.input, "output": self.output, "edit": self.edit}, sort_keys=True, ensure_ascii=False)


def parse_line(number: int, text: str) -> Pair:
    """One line -> a `Pair`; `DatasetError` with the reason if it is not a valid pair."""
    raw = json_object(text, '{"input": "...", "output": "..."}')
    unknown = sorted(set(raw) - set(LINE_KEYS))
    if unknown:
        raise DatasetError(f"unknown key {', '.join(map(repr, unknown))}; a line has input, output and optionally edit")
    for key in ("input", "output"):
        if key not in raw:
            raise DatasetError(f'missing "{key}"')
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise DatasetError(f'"{key}" must be a non-empty string')
    edit = raw.get("edit")
    if edit is not None and not isinstance(edit, str):
        raise DatasetError('"edit" must be a string')
    return Pair(number, raw["input"].strip(), raw["output"].strip(), edit)


def read_pairs(path: str | os.PathLike) -> tuple[list[Pair], list[tuple[int, str]]]:
    """Read a pairs file: ``([Pair], [(line number, reason)])``; blank and ``#`` lines are skipped."""
    pairs, bad = [], []
    for number, text in json_lines(path, "dataset"):
        try:
            pairs.append(parse_line(number, text))
        except OptionError as err:
            bad.append((number, str(err)))
    return pairs, bad


# ============================================================================ candidates


@dataclass(frozen=True)
class Candidate:
    """One candidate's seed and settings; ``group``: the index of the seed group it belongs to."""

    index: int
    seed: int
    self_steps: float
    cross_steps: float
    guidance: float
    group: int = 0


def candidate_seed(run_seed: int, pair: Pair, index: int) -> int:
    """A seed group's seed (with one candidate a seed, the candidate's): 63 bits of SHA-256 of the
    run seed, the line's content and the group's index."""
    digest = hashlib.sha256(f"{run_seed}\0{pair.content()}\0{index}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & SEED_MASK


def candidate_plan(settings: DatasetSettings, pair: Pair) -> list[Candidate]:
    """The pair's candidates, in groups of ``candidates_per_seed`` (the last one may be smaller).

    A group's seed is `candidate_seed` of its index; a generator seeded by it draws each member's
    self- and cross-injection fractions in turn, and the group's guidance (one per pipeline call)
    right after its first member's two. With one candidate a group these are the candidate's
    seed, self, cross and guidance, in that order.
    """
    plan, size, count = [], settings.candidates_per_seed, settings.samples_per_pair
    for group, first in enumerate(range(0, count, size)):
        seed = candidate_seed(settings.seed, pair, group)
        rng = np.random.default_rng(seed)
        guidance = None
        for index in range(first, min(first + size, count)):
            self_steps, cross_steps = settings.self_steps.sample(rng), settings.cross_steps.sample(rng)
            if guidance is None:
                guidance = settings.guidance.sample(rng)
            plan.append(Candidate(index, seed, self_steps, cross_steps, guidance, group))
    return plan


def seed_groups(candidates: list[Candidate]) -> list[list[Candidate]]:
    """Candidates split into their seed groups, in order (consecutive candidates of one ``group``)."""
    groups: list[list[Candidate]] = []
    for candidate in candidates:
        if groups and groups[-1][0].group == candidate.group:
            groups[-1].append(candidate)
        else:
            groups.append([candidate])
    return groups


def row_chunks(group: list[Candidate], batch_rows: int | None) -> list[list[Candidate]]:
    """A group split into runs of at most ``batch_rows`` candidates (None: the whole group)."""
    size = batch_rows or len(group)
    return [group[k:k + size] for k in range(0, len(group), size)]


# ============================================================================ filter


def _caption_targets(caption: str) -> tuple[list[dict], str | None]:
    """The objects (``colour`` and ``shape``) and background colour a shapes caption names."""
    from .shapes import world

    words = re.findall(r"[a-z]+", caption.lower())
    objects, colour, background = [], None, None
    for k, word in enumerate(words):
        if word in world.COLOURS:
            if k + 1 < len(words) and words[k + 1] == "background":
                background = word
            else:
                colour = word
        elif word in world.SHAPES:
            objects.append({"colour": colour, "shape": word})
            colour = None
    return [o for o in objects if o["colour"] is not None], background


def detector_score(image: np.ndarray, caption: str) -> dict:
    """How well a ``(64, 64, 3)`` uint8 image shows a caption's words, by the shapes detector.

    Checks: the background colour (if named: the border's colour) and each named coloured shape
    (a distinct detected object of that colour and shape). ``score`` is the share that hold (1.0
    for a caption that names none of the shapes world's words: nothing to check).
    """
    from .shapes.detector import border_colour, detect
    from .shapes.evaluation import _match

    objects, background = _caption_targets(caption)
    checks = []
    if background is not None:
        checks.append(border_colour(image) == background)
    found = detect(image, background or border_colour(image))
    for obj in objects:
        checks.append(_match(found, [obj]) is not None)
    matched_all = bool(objects) and _match(found, objects) is not None
    score = sum(checks) / len(checks) if checks else 1.0
    return {"score": float(score), "checks": len(checks), "objects_found": bool(matched_all or not objects)}


def choose_kept(scores: list[float], keep: int, min_score: float) -> list[int]:
    """The indices of the best ``keep`` candidates whose score reaches ``min_score`` (ties: lower index first)."""
    return choose_passing(scores, [s >= min_score for s in scores], keep)


def choose_passing(scores: list[float], passed: list[bool], keep: int) -> list[int]:
    """The indices of the best ``keep`` candidates by score among those that passed (ties: lower index first)."""
    passing = [k for k, ok in enumerate(passed) if ok]
    return sorted(sorted(passing, key=lambda k: (-scores[k], k))[:keep])


class DetectorScorer:
    """The shapes detector as a scorer: `detector_score` of the edited image against the output caption."""

    def score(self, input_image, edited_image, pair: Pair) -> dict:
        """``{"score", "checks", "objects_found"}`` of the edited image (the input image is not looked at)."""
        return detector_score(_uint8(edited_image), pair.output)


def load_scorer(settings: DatasetSettings, device: str = "cpu", allow_pickle: bool = False):
    """The scorer of the run's filter: a `DetectorScorer`, or the CLIP folder loaded (`clip_filter.load_clip`)."""
    if settings.clip is None:
        return DetectorScorer()
    return load_clip(settings.clip, device, allow_pickle)


def score_candidate(scorer, settings: DatasetSettings, input_image, edited_image, pair: Pair) -> dict:
    """A candidate scored by the run's filter: ``score`` (what the kept are ranked by: the detector's
    share of checks, or the CLIP directional similarity), ``passed`` (the thresholds hold) and the
    row's other score columns (`SCORE_COLUMNS`; the other filter's are None)."""
    raw = scorer.score(input_image, edited_image, pair)
    if settings.clip is None:
        return {"score": raw["score"], "passed": raw["score"] >= settings.min_score, "score_checks": raw["checks"],
                **dict.fromkeys(CLIP_COLUMNS)}
    return {"score": raw["directional"], "passed": settings.clip_thresholds.passes(raw), "score_checks": None,
            **{column: raw[key] for column, key in zip(CLIP_COLUMNS, SCORE_KEYS)}}


# ============================================================================ running a pair


def _uint8(image) -> np.ndarray:
    """A PIL image as ``(H, W, 3)`` uint8, what the detector reads."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _windows(values: list[float]):
    """The pipeline's window argument for these targets: one fraction for one target, else a
    ``list``, one fraction per target (`schedules.per_target`: a list, never a tuple, which is a
    ``(start, end)`` window)."""
    return values[0] if len(values) == 1 else list(values)


def run_group(pipe, settings: DatasetSettings, pair: Pair, candidates: list[Candidate], output_type: str = "pil") -> list[tuple]:
    """One pipeline call for candidates of one seed group: the input caption once, the output caption
    once per candidate with its own windows. ``[(input image, edited image)]``, PIL images (or the
    pipeline's ``output_type``)."""
    import torch

    first = candidates[0]
    if any((c.seed, c.guidance) != (first.seed, first.guidance) for c in candidates):
        raise ValueError("run_group takes candidates of one seed group (one seed and guidance); split them with seed_groups")
    out = pipe(pair.input, [pair.output] * len(candidates), cross_replace_steps=_windows([c.cross_steps for c in candidates]),
               self_replace_steps=_windows([c.self_steps for c in candidates]), num_inference_steps=settings.steps,
               guidance_scale=first.guidance, generator=torch.Generator().manual_seed(first.seed),
               output_type=output_type, return_attention=False)
    return [(out.images[0], edited) for edited in out.images[1:]]


def run_candidate(pipe, settings: DatasetSettings, pair: Pair, candidate: Candidate, output_type: str = "pil"):
    """One candidate alone, one pipeline call: ``(input image, edited image)`` as PIL images."""
    return run_group(pipe, settings, pair, [candidate], output_type)[0]


def _run_rows(pipe, settings: DatasetSettings, pair: Pair, candidates: list[Candidate], output_type: str) -> list[tuple]:
    """`run_group`, halving the call (recursively) when the device runs out of memory."""
    import torch

    try:
        return run_group(pipe, settings, pair, candidates, output_type)
    except torch.cuda.OutOfMemoryError:
        if len(candidates) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(candidates) // 2
        return (_run_rows(pipe, settings, pair, candidates[:half], output_type)
                + _run_rows(pipe, settings, pair, candidates[half:], output_type))


def generate(pipe, settings: DatasetSettings, pair: Pair, candidates: list[Candidate], output_type: str = "pil") -> list[tuple]:
    """``[(input image, edited image)]``, one per candidate, in order: each seed group as pipeline
    calls of at most ``settings.batch_rows`` targets (a call that runs out of memory is halved)."""
    made = []
    for group in seed_groups(candidates):
        for chunk in row_chunks(group, settings.batch_rows):
            made += _run_rows(pipe, settings, pair, chunk, output_type)
    return made


def run_pair(pipe, settings: DatasetSettings, pair: Pair, scorer=None) -> dict:
    """Every candidate of a pair, scored by ``scorer`` (`load_scorer`; None: the detector, for a
    detector run); the kept ones' rows. Returns the manifest entry with ``rows``."""
    if scorer is None:
        if settings.clip is not None:
            raise DatasetError("a CLIP-filtered run needs its scorer: pass load_scorer(settings, device)")
        scorer = DetectorScorer()
    candidates = candidate_plan(settings, pair)
    made, scores = [], []
    for source, edited in generate(pipe, settings, pair, candidates):
        result = score_candidate(scorer, settings, source, edited, pair)
        made.append((source, edited, result))
        scores.append(result["score"])
    kept = choose_passing(scores, [result["passed"] for _, _, result in made], settings.keep)
    rows = []
    for rank, k in enumerate(sorted(kept, key=lambda k: (-scores[k], k))):
        source, edited, result = made[k]
        c = candidates[k]
        rows.append({"line": pair.line, "candidate": c.index, "rank": rank, "seed": c.seed,
                     "input_caption": pair.input, "output_caption": pair.output, "edit": pair.edit,
                     "input_image": {"bytes": png_bytes(source), "path": None},
                     "edited_image": {"bytes": png_bytes(edited), "path": None},
                     "self_steps": c.self_steps, "cross_steps": c.cross_steps, "guidance": c.guidance,
                     "steps": settings.steps, "model": settings.model or "bundled",
                     **{column: result[column] for column in SCORE_COLUMNS}})
    return {"line": pair.line, "content": pair.content(), "candidates": [c.index for c in candidates],
            "seeds": [c.seed for c in candidates], "scores": scores, "kept": kept,
            "candidate_scores": [result for _, _, result in made], "rows": rows}


# ============================================================================ output


def shard_name(line: int) -> str:
    """The shard of a pair (one per line number: a rerun of the pair replaces it)."""
    return f"pair-{line:08d}.parquet"


def parquet_bytes(rows: list[dict]) -> bytes:
    """Rows as one Parquet file's bytes (the schema and no row group when there are none: `datasets`
    fails on a row group of 0 rows, "BatchSize must be greater than 0")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=row_schema())
    buffer = io.BytesIO()
    if rows:
        pq.write_table(table, buffer)
    else:
        pq.ParquetWriter(buffer, table.schema).close()
    return buffer.getvalue()


#: The image columns: ``{"bytes": PNG, "path": None}``, as `datasets`' ``Image`` feature stores them.
IMAGE_COLUMNS = ("input_image", "edited_image")


def row_schema():
    """The rows' Parquet schema; its ``huggingface`` metadata makes `datasets` decode the images."""
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [
        ("line", pa.int64()), ("candidate", pa.int32()), ("rank", pa.int32()), ("seed", pa.int64()),
        ("input_caption", pa.string()), ("output_caption", pa.string()), ("edit", pa.string()),
        ("input_image", image), ("edited_image", image),
        ("self_steps", pa.float64()), ("cross_steps", pa.float64()), ("guidance", pa.float64()),
        ("steps", pa.int32()), ("model", pa.string()), ("score", pa.float64()), ("score_checks", pa.int32()),
        *((column, pa.float64()) for column in CLIP_COLUMNS),
    ]
    dtypes = {"double": "float64"}  # datasets' name where pyarrow's differs
    features = {name: {"_type": "Image"} if name in IMAGE_COLUMNS else {"dtype": dtypes.get(str(kind), str(kind)), "_type": "Value"}
                for name, kind in fields}
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


@dataclass
class DatasetWriter:
    """An output folder: shards, the manifest of finished pairs, ``run.json`` and the card.

    A pair is finished once its manifest line is written, which happens after its shard is
    renamed into place; a pair killed before that is run again and its shard replaced (the same
    name and, the plan being deterministic, the same rows), so every (line, candidate) is in the
    data once. A torn last manifest line (a kill mid-append) is ignored.
    """

    root: Path
    run: dict
    done: dict = field(default_factory=dict)

    def open(self, overwrite: bool) -> None:
        """Check the folder holds this run's data (or nothing), or clear it with ``overwrite``."""
        run_file = self.root / RUN_FILE
        if overwrite:
            self.clear()
        elif run_file.is_file():
            try:
                stored = json.loads(run_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                stored = None
            if stored != json.loads(json.dumps(self.run)):
                raise DatasetError(f"{self.root} holds another run's data (other input or settings); "
                                   "use --overwrite to start over, or another -o folder")
        elif self.root.is_dir() and any(self.root.iterdir()):
            raise DatasetError(f"{self.root} is not empty and holds no p2p dataset; use --overwrite or another -o folder")
        for folder in (DATA_DIR, STATE_DIR):
            with writing_into(self.root):
                (self.root / folder).mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.root / folder)
        remove_stale_temps(self.root)
        atomic_write_json(run_file, self.run)
        self.done = self.read_manifest()
        # rewritten whole: a torn last line (a kill mid-append) must not swallow the next entry
        atomic_write_bytes(self.root / MANIFEST, b"".join(manifest_line(e) for e in self.done.values()))

    def clear(self) -> None:
        """Remove this command's files from the folder (nothing else)."""
        for folder in (DATA_DIR, STATE_DIR):
            shutil.rmtree(self.root / folder, ignore_errors=True)
        (self.root / CARD).unlink(missing_ok=True)

    def read_manifest(self) -> dict:
        """``{line: entry}`` of the finished pairs whose shard is in place."""
        done = {}
        path = self.root / MANIFEST
        if not path.is_file():
            return done
        for text in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(text)
                line = int(entry["line"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
            if (self.root / DATA_DIR / shard_name(line)).is_file():
                done[line] = entry
        return done

    def finished(self, pair: Pair) -> bool:
        """Whether the pair is done, with this content."""
        entry = self.done.get(pair.line)
        return entry is not None and entry.get("content") == pair.content()

    def add(self, result: dict) -> None:
        """Write a pair's shard atomically, then its manifest line (flushed to disk).

        Raises:
            imageio.WriteError: the folder is full, read-only or gone; a manifest line is written whole
                or not at all (`imageio.append_bytes`), and a shard without one is redone by the next run.
        """
        atomic_write_bytes(self.root / DATA_DIR / shard_name(result["line"]), parquet_bytes(result["rows"]))
        entry = {k: v for k, v in result.items() if k != "rows"}
        append_bytes(self.root / MANIFEST, manifest_line(entry))
        self.done[result["line"]] = entry

    def write_card(self, command: str, failed: int) -> dict:
        """The README card: counts, settings and the command line; returns the counts."""
        entries = list(self.done.values())
        counts = {"pairs": len(entries), "candidates": sum(len(e["candidates"]) for e in entries),
                  "rows": sum(len(e["kept"]) for e in entries), "failed": failed}
        counts["filtered_out"] = counts["candidates"] - counts["rows"]
        settings = "\n".join(f"- {k}: {v}" for k, v in self.run["settings"].items())
        text = (f"---\nconfigs:\n- config_name: default\n  data_files: {DATA_DIR}/*.parquet\n---\n\n"
                f"# Prompt-to-Prompt edit pairs\n\nMade by `{command}` (prompt2prompt `p2p dataset`).\n\n"
                f"- pairs done: {counts['pairs']}\n- candidates: {counts['candidates']}\n"
                f"- rows kept: {counts['rows']}\n- filtered out: {counts['filtered_out']}\n"
                f"- failed pairs (run again to retry): {failed}\n\n## Settings\n\n{settings}\n\n"
                "Columns: line, candidate, rank, seed, input_caption, output_caption, edit, input_image and "
                "edited_image (images: PNG bytes in `bytes`), self_steps, cross_steps, guidance, steps, model, "
                f"{', '.join(SCORE_COLUMNS)} (score: what the kept were ranked by; {self.run['settings'].get('filter', 'detector')} filter).\n")
        atomic_write_bytes(self.root / CARD, text.encode("utf-8"))
        atomic_write_bytes(self.root / COUNTS, json_bytes(counts))
        return counts


def manifest_line(entry: dict) -> bytes:
    """A manifest entry as one JSON line."""
    return json.dumps(entry, ensure_ascii=False).encode("utf-8") + b"\n"


def run_record(settings: DatasetSettings, pairs_sha256: str) -> dict:
    """What ``run.json`` holds: the settings and the input file's hash."""
    return {"settings": settings.record(), "pairs_sha256": pairs_sha256}


# ============================================================================ running


#: ``.p2p/throughput.json``: the last run's rates, per worker and in total.
THROUGHPUT = f"{STATE_DIR}/throughput.json"


def load_worker_pipeline(model: str | None, dtype: str, device: str, allow_pickle: bool = False):
    """The pipeline a worker holds (no progress bar of its own; the libraries' loading bars and
    info logs silenced, as the CLI does in its own process)."""
    import diffusers.utils.logging as dlog
    import torch
    import transformers.utils.logging as tlog

    from . import loading

    for module in (dlog, tlog):
        module.set_verbosity_error()
        module.disable_progress_bar()

    pipe = loading.load_pipeline(model, torch_dtype=getattr(torch, dtype), allow_pickle=allow_pickle).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_workers(device: str, cuda_count: int) -> int:
    """``--workers``' default on one machine: one per CUDA GPU for ``--device cuda``, else 1."""
    return max(1, cuda_count) if device == "cuda" else 1


def worker_device(device: str, index: int, cuda_count: int) -> str:
    """Worker ``index``'s device: ``cuda`` spreads the workers over the GPUs (``cuda:index mod count``);
    any other device (``cpu``, ``cuda:N``, ``mps``) is every worker's."""
    return f"cuda:{index % cuda_count}" if device == "cuda" and cuda_count > 0 else device


def worker_threads(workers: int, cores: int, requested: int | None) -> int:
    """Torch threads per pool worker: ``OMP_NUM_THREADS`` when set (``requested``), else the cores shared out.

    CPU results can round differently with another thread count, so rows made with different
    worker counts match bit for bit only at one thread count: set ``OMP_NUM_THREADS`` for that.
    """
    return requested if requested is not None else max(1, cores // max(1, workers))


def requested_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a positive int, or None when unset or not one."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class PairWorker:
    """One worker: its pipeline and scorer (`load_scorer`), loaded once, then pairs one at a time (`run`).

    The same class serves the in-process run, each process-pool worker and each Ray actor. A
    result carries the worker's ``index`` as ``worker`` and the pair's ``seconds``. ``hook(pair,
    index)`` runs before each pair (instrumentation; the tests kill a worker from it).
    """

    def __init__(self, settings: DatasetSettings, device: str, index: int = 0, threads: int | None = None,
                 allow_pickle: bool = False, pipe=None, hook=None):
        import warnings

        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        warnings.simplefilter("ignore")
        self.settings, self.index, self.hook = settings, index, hook
        self.pipe = pipe if pipe is not None else load_worker_pipeline(settings.model, settings.dtype, device, allow_pickle)
        self.scorer = load_scorer(settings, device, allow_pickle)

    def run(self, pair: Pair) -> dict:
        """`safe_run_pair` with this worker's pipeline, tagged with ``worker`` and ``seconds``."""
        if self.hook is not None:
            self.hook(pair, self.index)
        started = time.perf_counter()
        result = safe_run_pair(self.pipe, self.settings, pair, self.scorer)
        return result | {"worker": self.index, "seconds": time.perf_counter() - started}

    def pid(self) -> int:
        """The worker's process id."""
        return os.getpid()


_WORKER: dict = {}


def _worker_init(settings: DatasetSettings, device: str, allow_pickle: bool, indices=None, threads: int | None = None) -> None:
    """A pool worker's start: take the next worker index from ``indices`` (a queue; None: 0), pick its
    device, load its pipeline and scorer once (`PairWorker`)."""
    import torch

    index = indices.get() if indices is not None else 0
    cuda_count = torch.cuda.device_count() if device == "cuda" else 0
    _WORKER["worker"] = PairWorker(settings, worker_device(device, index, cuda_count), index, threads, allow_pickle)


def _worker_pair(pair: Pair) -> dict:
    """A pool worker's job: one pair with the worker's pipeline."""
    return _WORKER["worker"].run(pair)


def safe_run_pair(pipe, settings: DatasetSettings, pair: Pair, scorer=None) -> dict:
    """`run_pair`, or ``{"line": ..., "error": reason}`` when the pair fails (the others go on)."""
    try:
        return run_pair(pipe, settings, pair, scorer)
    except Exception as err:  # noqa: BLE001 - one pair's failure is reported, not fatal
        reason = " ".join(str(err).split()) or type(err).__name__
        return {"line": pair.line, "error": f"{type(err).__name__}: {reason}"}


def pair_results(pairs: list[Pair], settings: DatasetSettings, device: str | None, workers: int | None = None, pipe=None,
                 allow_pickle: bool = False, ray=None, hook=None):
    """Yield each pair's result (`PairWorker.run`) as it finishes: on Ray when ``ray`` (a
    `dataset_ray.RayCluster`) is given, else in this process with ``pipe`` (loaded here if None)
    for one worker, else from a spawned process pool, one pipeline per worker (``workers`` None:
    one per CUDA GPU for ``cuda``, else 1). No pairs: nothing is loaded."""
    if not pairs:
        return
    if ray is not None:
        yield from ray.pair_results(pairs, settings, device, workers, allow_pickle, hook)
        return
    import torch

    if workers is None:
        workers = default_workers(device, torch.cuda.device_count() if device == "cuda" else 0)
    if workers <= 1 or len(pairs) <= 1:
        worker = PairWorker(settings, device, allow_pickle=allow_pickle, pipe=pipe, hook=hook)
        for pair in pairs:
            yield worker.run(pair)
        return
    import concurrent.futures as futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    workers = min(workers, len(pairs))
    indices = context.Queue()  # each worker takes one index (its GPU, its place in the throughput record)
    for index in range(workers):
        indices.put(index)
    threads = worker_threads(workers, cpu_cores(), requested_threads())
    pool = futures.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init,
                                       initargs=(settings, device, allow_pickle, indices, threads))
    try:
        jobs = {pool.submit(_worker_pair, pair): pair for pair in pairs}
        for job in futures.as_completed(jobs):
            try:
                yield job.result()
            except Exception as err:  # noqa: BLE001 - a worker that died or could not load the model
                yield {"line": jobs[job].line, "error": f"worker failed: {type(err).__name__}: {err}"}
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def unfinished(pairs: list[Pair], writer: DatasetWriter) -> list[Pair]:
    """The pairs the output folder does not hold yet."""
    return [p for p in pairs if not writer.finished(p)]


def _rate(count: float, seconds: float) -> float:
    """``count / seconds`` (0 for no time)."""
    return count / seconds if seconds > 0 else 0.0


@dataclass
class Throughput:
    """A run's rates. A worker's rate is its pairs (candidates) over the seconds it spent running
    them; the total is the sum of the workers' rates, what they sustain together. ``wall`` is pairs
    over the run's wall-clock time (in a pool or on Ray, the workers' model loading included).
    ``writes`` are the driver's seconds writing each pair's shard and manifest line: the driver
    writes one pair at a time, so the total cannot pass ``1 / median(writes)``."""

    wall_seconds: float = 0.0
    writes: list = field(default_factory=list)
    workers: dict = field(default_factory=dict)  # worker index -> {"pairs", "candidates", "seconds"}

    def add(self, worker: int, seconds: float, candidates: int, write_seconds: float) -> None:
        """Count one pair done by ``worker`` in ``seconds``, written by the driver in ``write_seconds``."""
        entry = self.workers.setdefault(int(worker), {"pairs": 0, "candidates": 0, "seconds": 0.0})
        entry["pairs"] += 1
        entry["candidates"] += candidates
        entry["seconds"] += seconds
        self.writes.append(write_seconds)

    def record(self) -> dict:
        """The rates as JSON values (``.p2p/throughput.json``)."""
        workers = {str(k): v | {"pairs_per_s": _rate(v["pairs"], v["seconds"]), "candidates_per_s": _rate(v["candidates"], v["seconds"])}
                   for k, v in sorted(self.workers.items())}
        pairs = sum(v["pairs"] for v in self.workers.values())
        return {"workers": workers, "pairs": pairs,
                "pairs_per_s": sum(v["pairs_per_s"] for v in workers.values()),
                "candidates_per_s": sum(v["candidates_per_s"] for v in workers.values()),
                "wall_seconds": self.wall_seconds, "wall_pairs_per_s": _rate(pairs, self.wall_seconds),
                "write_seconds_median": float(np.median(self.writes)) if self.writes else 0.0}

    def line(self) -> str:
        """One line for the summary, e.g. ``2 workers: 0.21 pairs/s in total (0.84 candidates/s); worker 0: 0.11, worker 1: 0.10``."""
        record = self.record()
        each = ", ".join(f"worker {k}: {v['pairs_per_s']:.2f}" for k, v in record["workers"].items())
        count = len(record["workers"])
        return (f"{count} worker{'s' if count != 1 else ''}: {record['pairs_per_s']:.2f} pairs/s in total "
                f"({record['candidates_per_s']:.2f} candidates/s); {each or 'no pairs run'}; "
                f"{record['wall_pairs_per_s']:.2f} pairs/s wall-clock; "
                f"the driver writes a pair in {record['write_seconds_median'] * 1000:.0f} ms (median)")


@dataclass
class Summary:
    """What a run did: pairs done now and earlier, rows kept, candidates filtered out, failures, rates."""

    done: int = 0
    skipped: int = 0
    kept: int = 0
    filtered_out: int = 0
    failed: list = field(default_factory=list)
    throughput: Throughput = field(default_factory=Throughput)


def make_dataset(pairs: list[Pair], settings: DatasetSettings, writer: DatasetWriter, device: str = "cpu",
                 workers: int | None = None, pipe=None, progress=None, allow_pickle: bool = False,
                 ray=None, hook=None) -> Summary:
    """Run every unfinished pair (`pair_results`) and write its shard and manifest line here, in
    this process, whichever runs the pairs; ``progress(n)`` after each pair. The rates go to
    ``.p2p/throughput.json``."""
    summary = Summary()
    todo = unfinished(pairs, writer)
    summary.skipped = len(pairs) - len(todo)
    started = time.perf_counter()
    for result in pair_results(todo, settings, device, workers, pipe, allow_pickle, ray, hook):
        worker, seconds = result.pop("worker", 0), result.pop("seconds", 0.0)
        if "error" in result:
            summary.failed.append((result["line"], result["error"]))
        else:
            writing = time.perf_counter()
            writer.add(result)
            summary.throughput.add(worker, seconds, len(result["candidates"]), time.perf_counter() - writing)
            summary.done += 1
            summary.kept += len(result["kept"])
            summary.filtered_out += len(result["candidates"]) - len(result["kept"])
        if progress is not None:
            progress(1)
    summary.throughput.wall_seconds = time.perf_counter() - started
    atomic_write_json(writer.root / THROUGHPUT, summary.throughput.record())
    return summary
