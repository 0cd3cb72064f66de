"""``p2p dataset --clip`` (`prompt2prompt.clip_filter`): InstructPix2Pix's CLIP filter on a tiny random CLIP.

The CLIP folder is made here (random weights, 32-wide, 2 layers, 64 px images in 16 px patches,
16-dim projections) with the session's CLIP tokenizer, so nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from prompt2prompt import clip_filter, dataset  # noqa: E402
from prompt2prompt.cli import main  # noqa: E402

PAIRS = [
    {"input": "a red circle on a blue background", "output": "a red square on a blue background", "edit": "make it a square"},
    {"input": "a green star on a yellow background", "output": "a blue star on a yellow background"},
]
#: N=2, K=1, every CLIP threshold at its least (-1), so every candidate passes and each pair keeps one row.
FLAGS = ["--samples-per-pair", "2", "--keep", "1", "--steps", "2", "--seed", "3", "--quiet"]
OPEN = ["--min-directional", "-1", "--min-image-similarity", "-1", "--min-caption-similarity", "-1"]


@pytest.fixture(scope="module")
def clip_folder(clip_tokenizer, tmp_path_factory) -> Path:
    """A tiny random CLIPModel saved with its tokenizer and image processor (safetensors)."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    common = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 16}
    text = common | {"vocab_size": len(clip_tokenizer), "max_position_embeddings": 77,
                     "eos_token_id": clip_tokenizer.eos_token_id, "pad_token_id": clip_tokenizer.pad_token_id}
    vision = common | {"image_size": 64, "patch_size": 16}
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(folder)
    clip_tokenizer.save_pretrained(folder)
    clip_filter.image_processor_class()(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(folder)
    assert list(folder.glob("*.safetensors"))
    return folder


def write_pairs(path: Path) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def picture(seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


# ============================================================================ arithmetic


def test_clip_scores_of_known_vectors():
    e1, e2, e3 = np.eye(3)
    # the image moved from e1 to e2 as the caption did; input and edited images orthogonal
    assert clip_filter.clip_scores(e1, e2, e1, e2) == pytest.approx({"directional": 1.0, "image": 0.0, "caption": 1.0})
    # the scores are of the normalised embeddings: scaling changes nothing
    assert clip_filter.clip_scores(3 * e1, 0.5 * e2, 2 * e1, 7 * e2) == pytest.approx({"directional": 1.0, "image": 0.0, "caption": 1.0})
    # the image moved against the caption's change
    got = clip_filter.clip_scores(e2, e1, e1, e2)
    assert got["directional"] == pytest.approx(-1.0) and got["caption"] == pytest.approx(0.0)
    # a generic case against the formulas by hand
    rng = np.random.default_rng(1)
    i0, i1, t0, t1 = rng.normal(size=(4, 8))
    n = lambda v: v / np.linalg.norm(v)  # noqa: E731
    d_img, d_txt = n(i1) - n(i0), n(t1) - n(t0)
    want = {"directional": d_img @ d_txt / np.linalg.norm(d_img) / np.linalg.norm(d_txt),
            "image": n(i0) @ n(i1), "caption": n(i1) @ n(t1)}
    assert clip_filter.clip_scores(i0, i1, t0, t1) == pytest.approx(want)


def test_scorer_matches_the_models_own_embeddings(clip_folder):
    """The scorer's three scores equal the formulas on CLIPModel.forward's normalised embeddings."""
    scorer = clip_filter.load_clip(clip_folder)
    before, after = picture(0), picture(1)
    pair = dataset.Pair(1, *PAIRS[0].values())
    got = scorer.score(before, after, pair)

    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_folder).eval()
    tokens = AutoTokenizer.from_pretrained(clip_folder)([pair.input, pair.output], padding=True, return_tensors="pt")
    pixels = clip_filter.image_processor_class().from_pretrained(clip_folder)(images=[before, after], return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels["pixel_values"])
    image, text = out.image_embeds.double().numpy(), out.text_embeds.double().numpy()  # (2, 16) each, unit rows
    d_img, d_txt = image[1] - image[0], text[1] - text[0]
    want = {"directional": float(d_img @ d_txt / (np.linalg.norm(d_img) * np.linalg.norm(d_txt))),
            "image": float(image[0] @ image[1]), "caption": float(image[1] @ text[1])}
    assert got == pytest.approx(want, abs=1e-5)
    assert all(-1.0 <= v <= 1.0 for v in got.values())
    assert scorer.score(before, after, pair) == got  # the same inputs, the same scores


def test_thresholds_pass_and_keep_the_best_by_directional():
    t = clip_filter.ClipThresholds()
    assert (t.directional, t.image, t.caption) == (0.2, 0.75, 0.2)
    assert t.passes({"directional": 0.2, "image": 0.75, "caption": 0.2})
    for key in clip_filter.SCORE_KEYS:
        scores = {"directional": 0.5, "image": 0.9, "caption": 0.5} | {key: getattr(t, key) - 1e-6}
        assert not t.passes(scores), key
    with pytest.raises(clip_filter.ClipError, match="image threshold"):
        clip_filter.ClipThresholds(image=1.5)

    class Fixed:
        """A scorer whose scores are given, one candidate after another."""

        def __init__(self, scores):
            self.scores = iter(scores)

        def score(self, input_image, edited_image, pair):
            return next(self.scores)

    settings = dataset.DatasetSettings(samples_per_pair=4, keep=2, clip="unused")
    scores = [{"directional": 0.9, "image": 0.5, "caption": 0.9},  # best direction, but the image changed too much
              {"directional": 0.3, "image": 0.8, "caption": 0.3},
              {"directional": 0.6, "image": 0.8, "caption": 0.1},  # does not show its caption
              {"directional": 0.4, "image": 0.9, "caption": 0.25}]
    scorer, pair = Fixed(scores), dataset.Pair(1, "a", "b")
    results = [dataset.score_candidate(scorer, settings, None, None, pair) for _ in scores]
    assert [r["passed"] for r in results] == [False, True, False, True]
    assert [r["score"] for r in results] == [s["directional"] for s in scores]
    assert results[3]["clip_image"] == 0.9 and results[3]["clip_caption"] == 0.25 and results[3]["score_checks"] is None
    assert dataset.choose_passing([r["score"] for r in results], [r["passed"] for r in results], settings.keep) == [1, 3]
    assert dataset.choose_passing([r["score"] for r in results], [r["passed"] for r in results], 1) == [3]


def test_settings_record_the_filter_and_refuse_bad_thresholds():
    detector = dataset.DatasetSettings().record()
    assert detector["filter"] == "detector" and "min_score" in detector and "clip" not in detector
    clip = dataset.DatasetSettings(clip="some/folder", min_directional=0.1).record()
    assert clip["filter"] == "clip" and clip["clip"] == "some/folder" and clip["min_directional"] == 0.1
    assert clip["min_image_similarity"] == 0.75 and "min_score" not in clip
    for name in dataset.CLIP_THRESHOLDS:
        with pytest.raises(dataset.DatasetError, match=name):
            dataset.DatasetSettings(clip="x", **{name: -1.01})
    with pytest.raises(dataset.DatasetError, match="clip-filtered|CLIP"):
        dataset.run_pair(None, dataset.DatasetSettings(clip="x"), dataset.Pair(1, "a", "b"))


# ============================================================================ the command


@pytest.fixture(scope="module")
def clip_run(clip_folder, tmp_path_factory):
    """A detector run, then a CLIP run in the same folder: refused, then done with --overwrite."""
    base = tmp_path_factory.mktemp("dataset_clip")
    pairs = write_pairs(base / "pairs.jsonl")
    out = base / "out"
    assert main(["dataset", str(pairs), "-o", str(out), *FLAGS, "--min-score", "0", "--steps", "1"]) == 0
    refused = main(["dataset", str(pairs), "-o", str(out), *FLAGS, "--clip", str(clip_folder), *OPEN])
    detector_rows = pq.read_table(out / dataset.DATA_DIR).num_rows
    code = main(["dataset", str(pairs), "-o", str(out), *FLAGS, "--clip", str(clip_folder), *OPEN, "--overwrite"])
    assert code == 0
    return {"pairs": pairs, "out": out, "refused": refused, "detector_rows": detector_rows}


def test_a_clip_run_in_a_detector_runs_folder_is_refused(clip_run):
    assert clip_run["refused"] == 2 and clip_run["detector_rows"] == 2


def test_end_to_end_rows_carry_the_clip_scores(clip_run, clip_folder):
    out = clip_run["out"]
    table = pq.read_table(out / dataset.DATA_DIR)
    for column in dataset.CLIP_COLUMNS:
        assert pa.types.is_float64(table.schema.field(column).type)
    rows = sorted(table.to_pylist(), key=lambda r: r["line"])
    assert [r["line"] for r in rows] == [1, 2]
    run = json.loads((out / dataset.RUN_FILE).read_text())
    assert run["settings"]["filter"] == "clip" and run["settings"]["min_directional"] == -1.0
    manifest = {e["line"]: e for e in map(json.loads, (out / dataset.MANIFEST).read_text().splitlines())}
    scorer = clip_filter.load_clip(clip_folder)
    for row, pair in zip(rows, PAIRS):
        entry = manifest[row["line"]]
        assert row["score_checks"] is None
        assert row["score"] == row["clip_directional"] == max(entry["scores"])
        assert entry["kept"] == [row["candidate"]] and len(entry["candidate_scores"]) == 2
        stored = entry["candidate_scores"][row["candidate"]]
        assert [stored[c] for c in dataset.CLIP_COLUMNS] == [row[c] for c in dataset.CLIP_COLUMNS]
        # the scores are those of the stored images (PNG: lossless) and the row's captions
        images = [PIL.Image.open(io.BytesIO(row[key]["bytes"])) for key in dataset.IMAGE_COLUMNS]
        again = scorer.score(*images, dataset.Pair(row["line"], row["input_caption"], row["output_caption"]))
        assert [again[k] for k in clip_filter.SCORE_KEYS] == pytest.approx([row[c] for c in dataset.CLIP_COLUMNS], abs=1e-6)
    card = (out / dataset.CARD).read_text()
    assert "--clip" in card and "clip_directional" in card and "--min-score" not in card


def test_a_finished_clip_run_resumes_as_the_same_run(clip_run, clip_folder, capsys):
    before = pq.read_table(clip_run["out"] / dataset.DATA_DIR).to_pylist()
    code, out, _ = run_cli(capsys, "dataset", clip_run["pairs"], "-o", clip_run["out"], *FLAGS, "--clip", clip_folder, *OPEN)
    assert code == 0 and "0 pairs done (2 finished earlier)" in out
    assert pq.read_table(clip_run["out"] / dataset.DATA_DIR).to_pylist() == before
    # other thresholds are another run's data
    code, _, err = run_cli(capsys, "dataset", clip_run["pairs"], "-o", clip_run["out"], *FLAGS, "--clip", clip_folder)
    assert code == 2 and "another run's data" in err


# ============================================================================ bad input


def test_bad_clip_folders_are_one_line_usage_errors(clip_folder, tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    pickled = tmp_path / "pickled"
    shutil.copytree(clip_folder, pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    from transformers import CLIPModel

    torch.save(CLIPModel.from_pretrained(clip_folder).state_dict(), pickled / "pytorch_model.bin")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    no_processor = tmp_path / "no_processor"
    shutil.copytree(clip_folder, no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    capsys.readouterr()  # the loading bar above
    cases = [(tmp_path / "missing", "no such folder"), (pickled, "--allow-pickle"), (other, "not a CLIP model"),
             (no_processor, "preprocessor_config.json"), (tmp_path, "config.json: missing")]
    for folder, words in cases:
        out = tmp_path / f"out-{folder.name}"
        code, _, err = run_cli(capsys, "dataset", pairs, "-o", out, *FLAGS, "--clip", folder)
        assert code == 2 and words in err and str(folder) in err and len(err.strip().splitlines()) == 1, (folder, err)
        assert not out.exists()  # refused before any folder or model work
    clip_filter.check_clip_folder(pickled, allow_pickle=True)  # allowed explicitly
    scorer = clip_filter.load_clip(pickled, allow_pickle=True)
    image = picture(2)
    assert scorer.score(image, image, dataset.Pair(1, "a", "b"))["image"] == pytest.approx(1.0)


@pytest.mark.parametrize("flags, words", [
    (["--min-directional", "1.5"], "--min-directional must be a number in [-1, 1]"),
    (["--min-image-similarity", "-2"], "--min-image-similarity must be a number in [-1, 1]"),
    (["--min-caption-similarity", "high"], "--min-caption-similarity must be a number in [-1, 1]"),
    (["--min-score", "0.5"], "--min-score is the shapes detector's threshold"),
])
def test_bad_thresholds_are_usage_errors(flags, words, clip_folder, tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    code, _, err = run_cli(capsys, "dataset", pairs, "-o", tmp_path / "out", *FLAGS, "--clip", clip_folder, *flags)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_clip_thresholds_without_clip_are_usage_errors(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    code, _, err = run_cli(capsys, "dataset", pairs, "-o", tmp_path / "out", *FLAGS, "--min-directional", "0.3")
    assert code == 2 and "--clip" in err and len(err.strip().splitlines()) == 1


def test_a_pool_worker_loads_its_clip_scorer_once_and_gives_the_same_rows(clip_run, clip_folder):
    """A worker's start (`_worker_init`, as the process pool runs it) loads the pipeline and the CLIP
    scorer; its rows are the in-process run's."""
    settings = dataset.DatasetSettings(samples_per_pair=2, keep=1, steps=2, seed=3, clip=str(clip_folder),
                                       min_directional=-1.0, min_image_similarity=-1.0, min_caption_similarity=-1.0)
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = dict(dataset._WORKER)
    logging = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (dlog, tlog)]  # the worker silences them
    try:
        with warnings.catch_warnings():  # the worker ignores warnings
            dataset._worker_init(settings, "cpu", False)
            assert isinstance(dataset._WORKER["worker"].scorer, clip_filter.ClipScorer)
            result = dataset._worker_pair(dataset.Pair(1, *PAIRS[0].values()))
    finally:
        dataset._WORKER.clear()
        dataset._WORKER.update(saved)
        for module, level, bars in logging:
            module.set_verbosity(level)
            (module.enable_progress_bar if bars else module.disable_progress_bar)()
    stored = [r for r in pq.read_table(clip_run["out"] / dataset.DATA_DIR).to_pylist() if r["line"] == 1]
    assert [{k: r[k] for k in ("candidate", "seed", *dataset.SCORE_COLUMNS)} for r in result["rows"]] == \
        [{k: r[k] for k in ("candidate", "seed", *dataset.SCORE_COLUMNS)} for r in stored]


def test_a_pair_that_keeps_nothing_leaves_a_shard_every_reader_loads(clip_run, tmp_path):
    """A filter that keeps none of a pair's candidates (common with CLIP thresholds) writes a shard
    of no rows; `datasets`, pyarrow and pandas read the folder with it."""
    datasets = pytest.importorskip("datasets")
    pandas = pytest.importorskip("pandas")
    data = tmp_path / "out" / dataset.DATA_DIR
    shutil.copytree(clip_run["out"] / dataset.DATA_DIR, data)
    (data / dataset.shard_name(9)).write_bytes(dataset.parquet_bytes([]))
    assert pq.read_table(data / dataset.shard_name(9)).schema.equals(dataset.row_schema(), check_metadata=False)
    loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / "out"), split="train")
    assert sorted(loaded["line"]) == [1, 2] and loaded[0]["clip_image"] is not None
    assert pq.read_table(data).num_rows == 2 and len(pandas.read_parquet(data)) == 2
