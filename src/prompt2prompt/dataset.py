"""Paired edit datasets (InstructPix2Pix style) from a file of caption pairs: ``p2p dataset``.

A ``PAIRS.jsonl`` line is ``{"input": CAPTION, "output": CAPTION, "edit": TEXT (optional)}``. Each
pair gets ``samples_per_pair`` candidates; a candidate's seed and sampled settings (self-attention
injection fraction, cross-attention fraction, guidance) come from a hash of the run seed, the
line's content and the candidate's index, never from the worker count or from restarts
(`candidate_plan`). Each candidate is one pipeline call: candidates have different seeds, so
different source images, and the pipeline denoises one noise per call (its rows share the
source's noise), so rows of different seeds cannot share a batch.

The bundled shapes model's detector scores each edited image against the output caption's words
(`detector_score`); the best ``keep`` candidates whose score reaches ``min_score`` are kept.

Output folder layout (`DatasetWriter`): ``data/pair-<line>.parquet`` (one shard per pair, written
atomically), ``README.md`` (the card), and in the hidden ``.p2p/``: ``manifest.jsonl`` (one JSON
line per finished pair: its candidates, their scores, the kept ones), ``run.json`` (the settings,
which a resumed run must match) and ``counts.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

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

    Defaults as InstructPix2Pix: self-injection fraction uniform in [0.1, 0.9], cross 0.8, guidance 7.5.
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

    def __post_init__(self):
        for name, value, low in (("samples_per_pair", self.samples_per_pair, 1), ("keep", self.keep, 1),
                                 ("seed", self.seed, 0), ("steps", self.steps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DatasetError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.keep > self.samples_per_pair:
            raise DatasetError(f"keep ({self.keep}) must be at most samples_per_pair ({self.samples_per_pair})")
        self.self_steps.within(0.0, 1.0, "self_steps")
        self.cross_steps.within(0.0, 1.0, "cross_steps")
        self.guidance.within(0.0, 100.0, "guidance")
        if not isinstance(self.min_score, (int, float)) or not 0.0 <= self.min_score <= 1.0:
            raise DatasetError(f"min_score must be in [0, 1], got {self.min_score!r}")

    def record(self) -> dict:
        """The settings as JSON values (ranges as their text)."""
        return {k: (str(v) if isinstance(v, Range) else v) for k, v in asdict(self).items()} | {
            "self_steps": str(self.self_steps), "cross_steps": str(self.cross_steps), "guidance": str(self.guidance)}


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
    """One candidate's seed and settings."""

    index: int
    seed: int
    self_steps: float
    cross_steps: float
    guidance: float


def candidate_seed(run_seed: int, pair: Pair, index: int) -> int:
    """The candidate's seed: 63 bits of SHA-256 of the run seed, the line's content and the index."""
    digest = hashlib.sha256(f"{run_seed}\0{pair.content()}\0{index}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & SEED_MASK


def candidate_plan(settings: DatasetSettings, pair: Pair) -> list[Candidate]:
    """The pair's candidates, each with its own seed and settings drawn from a generator seeded by it."""
    plan = []
    for index in range(settings.samples_per_pair):
        seed = candidate_seed(settings.seed, pair, index)
        rng = np.random.default_rng(seed)
        plan.append(Candidate(index, seed, settings.self_steps.sample(rng), settings.cross_steps.sample(rng),
                              settings.guidance.sample(rng)))
    return plan


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
    passing = [k for k, s in enumerate(scores) if s >= min_score]
    return sorted(sorted(passing, key=lambda k: (-scores[k], k))[:keep])


# ============================================================================ running a pair


def _uint8(image) -> np.ndarray:
    """A PIL image as ``(H, W, 3)`` uint8, what the detector reads."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def run_candidate(pipe, settings: DatasetSettings, pair: Pair, candidate: Candidate):
    """One pipeline call: ``(input image, edited image)`` as PIL images."""
    import torch

    out = pipe(pair.input, [pair.output], cross_replace_steps=candidate.cross_steps,
               self_replace_steps=candidate.self_steps, num_inference_steps=settings.steps,
               guidance_scale=candidate.guidance, generator=torch.Generator().manual_seed(candidate.seed),
               output_type="pil", return_attention=False)
    return out.images[0], out.images[1]


def run_pair(pipe, settings: DatasetSettings, pair: Pair) -> dict:
    """Every candidate of a pair, scored; the kept ones' rows. Returns the manifest entry with ``rows``."""
    candidates = candidate_plan(settings, pair)
    made, scores = [], []
    for candidate in candidates:
        source, edited = run_candidate(pipe, settings, pair, candidate)
        result = detector_score(_uint8(edited), pair.output)
        made.append((source, edited, result))
        scores.append(result["score"])
    kept = choose_kept(scores, settings.keep, settings.min_score)
    rows = []
    for rank, k in enumerate(sorted(kept, key=lambda k: (-scores[k], k))):
        source, edited, result = made[k]
        c = candidates[k]
        rows.append({"line": pair.line, "candidate": c.index, "rank": rank, "seed": c.seed,
                     "input_caption": pair.input, "output_caption": pair.output, "edit": pair.edit,
                     "input_image": {"bytes": png_bytes(source), "path": None},
                     "edited_image": {"bytes": png_bytes(edited), "path": None},
                     "self_steps": c.self_steps, "cross_steps": c.cross_steps, "guidance": c.guidance,
                     "steps": settings.steps, "model": settings.model or "bundled", "score": result["score"],
                     "score_checks": result["checks"]})
    return {"line": pair.line, "content": pair.content(), "candidates": [c.index for c in candidates],
            "seeds": [c.seed for c in candidates], "scores": scores, "kept": kept, "rows": rows}


# ============================================================================ output


def shard_name(line: int) -> str:
    """The shard of a pair (one per line number: a rerun of the pair replaces it)."""
    return f"pair-{line:08d}.parquet"


def parquet_bytes(rows: list[dict]) -> bytes:
    """Rows as one Parquet file's bytes (an empty table with the schema when there are none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=row_schema())
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
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
                "edited_image (images: PNG bytes in `bytes`), self_steps, cross_steps, guidance, steps, model, score, score_checks.\n")
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


_WORKER: dict = {}


def load_worker_pipeline(model: str | None, dtype: str, device: str, allow_pickle: bool = False):
    """The pipeline a worker holds (no progress bar of its own)."""
    import torch

    from . import loading

    pipe = loading.load_pipeline(model, torch_dtype=getattr(torch, dtype), allow_pickle=allow_pickle).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _worker_init(settings: DatasetSettings, device: str, allow_pickle: bool) -> None:
    """A pool worker's start: load its pipeline once."""
    import warnings

    warnings.simplefilter("ignore")
    _WORKER["settings"] = settings
    _WORKER["pipe"] = load_worker_pipeline(settings.model, settings.dtype, device, allow_pickle)


def _worker_pair(pair: Pair) -> dict:
    """A pool worker's job: one pair with the worker's pipeline."""
    return safe_run_pair(_WORKER["pipe"], _WORKER["settings"], pair)


def safe_run_pair(pipe, settings: DatasetSettings, pair: Pair) -> dict:
    """`run_pair`, or ``{"line": ..., "error": reason}`` when the pair fails (the others go on)."""
    try:
        return run_pair(pipe, settings, pair)
    except Exception as err:  # noqa: BLE001 - one pair's failure is reported, not fatal
        reason = " ".join(str(err).split()) or type(err).__name__
        return {"line": pair.line, "error": f"{type(err).__name__}: {reason}"}


def pair_results(pairs: list[Pair], settings: DatasetSettings, device: str, workers: int, pipe=None, allow_pickle: bool = False):
    """Yield each pair's result (`safe_run_pair`) as it finishes: in this process with ``pipe``
    (loaded here if None) for one worker, else from a spawned process pool, one pipeline per worker."""
    if workers <= 1 or len(pairs) <= 1:
        pipe = pipe if pipe is not None else load_worker_pipeline(settings.model, settings.dtype, device, allow_pickle)
        for pair in pairs:
            yield safe_run_pair(pipe, settings, pair)
        return
    import concurrent.futures as futures
    import multiprocessing

    pool = futures.ProcessPoolExecutor(max_workers=min(workers, len(pairs)), mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init, initargs=(settings, device, allow_pickle))
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


@dataclass
class Summary:
    """What a run did: pairs done now and earlier, rows kept, candidates filtered out, failures."""

    done: int = 0
    skipped: int = 0
    kept: int = 0
    filtered_out: int = 0
    failed: list = field(default_factory=list)


def make_dataset(pairs: list[Pair], settings: DatasetSettings, writer: DatasetWriter, device: str = "cpu",
                 workers: int = 1, pipe=None, progress=None, allow_pickle: bool = False) -> Summary:
    """Run every unfinished pair and write its shard and manifest line; ``progress(n)`` after each pair."""
    summary = Summary()
    todo = unfinished(pairs, writer)
    summary.skipped = len(pairs) - len(todo)
    for result in pair_results(todo, settings, device, workers, pipe, allow_pickle):
        if "error" in result:
            summary.failed.append((result["line"], result["error"]))
        else:
            writer.add(result)
            summary.done += 1
            summary.kept += len(result["kept"])
            summary.filtered_out += len(result["candidates"]) - len(result["kept"])
        if progress is not None:
            progress(1)
    return summary
