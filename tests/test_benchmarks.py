"""The benchmark scripts run (tiny budgets), so that a lent GPU's minutes are not lost to a broken
script. Their numbers are not checked here: timings belong in benchmarks/, not in tests."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_writes_its_table_and_json(tmp_path, capsys):
    out = tmp_path / "speed.json"
    _script("speed").main(["--model", "tiny", "--steps", "2", "--repeats", "1", "--warmup", "0", "--variants", "replace,none",
                           "--output-type", "latent", "--threads", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["replace", "none"] and all(r["time_ratio"] > 0 for r in rows)
    assert "replace" in capsys.readouterr().out


def test_speed_runs_the_sdxl_pipelines(tmp_path):
    out = tmp_path / "speed_xl.json"
    _script("speed").main(["--model", "sdxl-tiny", "--steps", "2", "--repeats", "1", "--warmup", "0", "--variants", "replace,refine",
                           "--output-type", "latent", "--threads", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["model"] == "sdxl-tiny" and all(r["time_ratio"] > 0 and r["cpu_ratio"] > 0 for r in data["results"])


def test_speed_reads_an_sdxl_folder(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    speed = _script("speed")
    StableDiffusionXLPipeline(**speed.build_components("sdxl-tiny", str(tmp_path), "cpu"), add_watermarker=False).save_pretrained(tmp_path / "xl")
    out = tmp_path / "speed_xl.json"
    speed.main(["--model", f"path:{tmp_path / 'xl'}", "--steps", "2", "--repeats", "1", "--warmup", "0", "--variants", "none",
                "--output-type", "latent", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text())["meta"]["unet_params_m"] == 1.34


def test_sdxl_shape_has_sdxl_base_parameter_counts(tmp_path):
    import torch

    speed = _script("speed")
    tokenizer, tokenizer_2 = speed._xl_tokenizers(str(tmp_path))
    with torch.device("meta"):  # shapes only: no 10 GB of weights
        modules = speed.sdxl_shape_modules(tokenizer, tokenizer_2)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}


def test_operator_counts_see_the_edit(capsys):
    _script("profile_edit").main(["--model", "tiny", "--count-ops", "--steps", "1"])
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert float(lines["plain"][3]) == 0.0 and float(lines["replace"][3]) > 0  # extra kernels: none for plain, some for an edit


def test_inversion_counts_a_pass_and_an_iteration(capsys):
    _script("inversion").main(["--model", "tiny", "--count-ops", "--steps", "2"])
    out = capsys.readouterr().out
    per_pass = float(out.split("UNet pass: ")[1].split()[0])
    per_iteration = float(out.split("Adam): ")[1].split()[0])
    assert per_iteration > per_pass > 0  # an iteration adds a backward and an Adam step to a pass


def test_training_cost_counts_flops_and_kernels(capsys):
    _script("shapes_training_cost").main(["--batch", "256"])
    out = capsys.readouterr().out
    per_sample = float(out.split("together ")[1].split()[0])  # GFLOP
    per_step = float(out.split("batch 256: ")[1].split()[0])  # TFLOP
    assert per_sample > 0 and per_step == pytest.approx(per_sample * 256 / 1000, rel=0.02)
    assert int(out.split("kernels (not views): ")[1].split()[0]) > 100


def test_learning_curve_world_and_timesteps():
    curve = _script("shapes_learning_curve")
    from prompt2prompt.shapes import world

    for k in range(40):
        spec = curve.narrow_spec(k)
        (obj,) = spec.objects  # one object
        assert (obj.colour, obj.shape) not in world.HELDOUT_PAIRS and obj.pattern is None and spec.style is None
        assert spec.background.kind == "plain" and spec.background.name != obj.colour
    assert curve.narrow_spec(7) == curve.narrow_spec(7)  # deterministic in k
    # the refinement world: the narrow world's scene k, plus a pattern word or a style in a share of scenes
    patterns = styles = 0
    for k in range(400):
        narrow, wide = curve.narrow_spec(k), curve.world_spec("refine", k)
        (a,), (b,) = narrow.objects, wide.objects
        assert (a.shape, a.colour, a.size, narrow.background) == (b.shape, b.colour, b.size, wide.background)
        patterns += b.pattern is not None
        styles += wide.style is not None
        if b.pattern is not None:
            assert b.pattern in wide.caption and world.pattern_visible(b.colour, wide.background)
    assert 0.2 < patterns / 400 < 0.4 and 0.1 < styles / 400 < 0.3
    assert set(world.PATTERNS) <= set(curve.world_words("refine")) and not set(world.PATTERNS) & set(curve.world_words())
    import torch

    uniform = curve.sample_timesteps(("uniform",), 20_000, 1000, torch.Generator().manual_seed(0))
    shifted = curve.sample_timesteps(("logit_normal", 0.5, 1.0), 20_000, 1000, torch.Generator().manual_seed(0))
    assert 0 <= int(shifted.min()) and int(shifted.max()) <= 999
    assert shifted.float().median() > uniform.float().median() + 50  # mean 0.5 puts more steps at high noise


def test_learning_curve_trains_evaluates_and_resumes(tmp_path):
    curve = _script("shapes_learning_curve")
    results = tmp_path / "curves.json"
    common = ["--eval-samples", "1", "--eval-steps", "2", "--cache-scenes", "64", "--threads", "1", "--results", str(results)]
    curve.main([str(tmp_path), "--candidate", "lean_b32", "--steps", "2", "--eval-every", "2", *common])
    curve.main([str(tmp_path), "--candidate", "lean_b32", "--steps", "3", "--eval-every", "3", *common])  # resumes at 2
    points = json.loads(results.read_text())["lean_b32"]["points"]
    assert [p["step"] for p in points] == [2, 3] and all("train_colour" in p for p in points)
    assert json.loads((tmp_path / "lean_b32" / "state.json").read_text())["step"] == 3
    # a candidate that continues another's run on the refinement world starts from its checkpoint
    curve.CANDIDATES["lean_b32_then_refine"] = dict(unet=curve.LEAN_UNET, world="refine", init="lean_b32")
    try:
        curve.main([str(tmp_path), "--candidate", "lean_b32_then_refine", "--steps", "4", "--eval-every", "4", *common])
    finally:
        del curve.CANDIDATES["lean_b32_then_refine"]
    wide = json.loads(results.read_text())["lean_b32_then_refine"]
    assert wide["init"]["candidate"] == "lean_b32" and wide["init"]["step"] == 3
    assert [p["step"] for p in wide["points"]] == [4] and "refine_pattern_shown" in wide["points"][0]
    assert (tmp_path / "refine_cache_64.safetensors").exists()
    # one that continues it on a zero-terminal-SNR schedule with v-prediction, and exports with it
    curve.CANDIDATES["lean_b32_then_zsnr"] = dict(unet=curve.LEAN_UNET, init="lean_b32", schedule="zero_snr_v")
    try:
        curve.main([str(tmp_path), "--candidate", "lean_b32_then_zsnr", "--steps", "4", "--eval-every", "4", *common])
        curve.main([str(tmp_path), "--candidate", "lean_b32_then_zsnr", "--export", str(tmp_path / "zsnr")])
    finally:
        del curve.CANDIDATES["lean_b32_then_zsnr"]
    zsnr = json.loads(results.read_text())["lean_b32_then_zsnr"]
    assert zsnr["recipe"]["schedule"] == "zero_snr_v" and 0 <= zsnr["points"][0]["train_background"] <= 1
    sched = json.loads((tmp_path / "zsnr" / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["prediction_type"], sched["rescale_betas_zero_snr"], sched["timestep_spacing"]) == ("v_prediction", True, "trailing")
    from prompt2prompt import Prompt2PromptPipeline

    pipe = Prompt2PromptPipeline.from_pretrained(tmp_path / "zsnr")
    assert float(pipe.scheduler.alphas_cumprod[-1]) == 0  # sampling starts from pure noise at t = 999
    image = pipe("a big red circle on a blue background", num_inference_steps=2, output_type="np").images
    assert np.isfinite(image).all()


def test_learning_curve_autoencoder_stage_logs_its_round_trip_and_resumes(tmp_path):
    curve = _script("shapes_learning_curve")
    args = [str(tmp_path), "--stage", "autoencoder", "--eval-every", "2", "--eval-samples", "1", "--threads", "1"]
    curve.main([*args, "--steps", "2"])
    curve.main([*args, "--steps", "4"])  # resumes from the saved weights at step 2
    log = json.loads((tmp_path / "autoencoder_f2" / "autoencoder_log.json").read_text())
    assert [p["step"] for p in log["points"]] == [2, 4]
    assert all(0 < p["round_trip_db"] < 100 for p in log["points"])
    config = json.loads((tmp_path / "autoencoder_f2" / "vae" / "config.json").read_text())
    assert config["scaling_factor"] > 0 and len(config["block_out_channels"]) == 2  # one downsampling: factor 2



class _Interrupted(Exception):
    pass


def test_learning_curve_decoder_stage_resumes_exactly_and_exports_a_loadable_model(tmp_path, monkeypatch):
    """The decoder fine-tune leaves the encoder (so every latent) as it was; a run stopped after its
    checkpoint at step 2 of 4 and rerun ends with the weights of an uninterrupted run; and a factor-2
    candidate exports with that decoder as a folder the pipeline loads, holding the EMA weights and
    the narrow world's words."""
    import torch
    from safetensors.torch import load_file

    from prompt2prompt import Prompt2PromptPipeline

    curve = _script("shapes_learning_curve")
    common = ["--eval-every", "2", "--eval-samples", "1", "--threads", "1"]
    curve.main([str(tmp_path), "--stage", "autoencoder", "--steps", "2", *common])
    straight = tmp_path / "straight"
    shutil.copytree(tmp_path / "autoencoder_f2", straight / "autoencoder_f2")
    curve.main([str(straight), "--stage", "decoder", "--steps", "4", *common])

    real_lr_at = curve.lr_at

    def stop_after_step_2(step, *args):
        if step == 2:  # the third update, after step 2's checkpoint
            raise _Interrupted
        return real_lr_at(step, *args)

    monkeypatch.setattr(curve, "lr_at", stop_after_step_2)
    with pytest.raises(_Interrupted):
        curve.main([str(tmp_path), "--stage", "decoder", "--steps", "4", *common])
    monkeypatch.setattr(curve, "lr_at", real_lr_at)
    curve.main([str(tmp_path), "--stage", "decoder", "--steps", "4", *common])  # resumes at step 2

    name = "diffusion_pytorch_model.safetensors"
    first = load_file(str(tmp_path / "autoencoder_f2" / "vae" / name))
    resumed = load_file(str(tmp_path / "autoencoder_f2_decoder" / "vae" / name))
    uninterrupted = load_file(str(straight / "autoencoder_f2_decoder" / "vae" / name))
    assert all(torch.equal(first[k], resumed[k]) for k in first if k.startswith(("encoder.", "quant_conv.")))
    assert not all(torch.equal(first[k], resumed[k]) for k in first if k.startswith("decoder."))
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in first)
    log = json.loads((tmp_path / "autoencoder_f2_decoder" / "decoder_log.json").read_text())
    assert [p["step"] for p in log["points"]] == [0, 2, 4]
    assert all(0 < p["narrow_db"] < 100 and 0 < p["drawn_db"] < 100 for p in log["points"])

    # the encoder stage trains both halves on the whole world, its narrow latents anchored to the start's
    curve.main([str(tmp_path), "--stage", "encoder", "--steps", "2", *common])
    wide = load_file(str(tmp_path / "autoencoder_f2_wide" / "vae" / name))
    assert not all(torch.equal(resumed[k], wide[k]) for k in resumed if k.startswith("encoder."))
    points = json.loads((tmp_path / "autoencoder_f2_wide" / "wide_log.json").read_text())["points"]
    assert points[0]["anchor_rmse"] == 0 and points[-1]["anchor_rmse"] > 0 and 0 < points[-1]["whole_db"] < 100

    curve.main([str(tmp_path), "--candidate", "lean_f2_b32", "--steps", "1", "--eval-every", "1", "--eval-samples", "1",
                "--eval-steps", "2", "--cache-scenes", "32", "--threads", "1", "--results", str(tmp_path / "curves.json")])
    out = tmp_path / "exported"
    curve.main([str(tmp_path), "--candidate", "lean_f2_b32", "--export", str(out), "--decoder"])
    pipe = Prompt2PromptPipeline.from_pretrained(out)
    state = load_file(str(tmp_path / "lean_f2_b32" / "state.safetensors"))
    assert all(torch.equal(v, state[f"ema.unet.{k}"]) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(v, state[f"ema.text.{k}"]) for k, v in pipe.text_encoder.state_dict().items())
    assert all(torch.equal(v, resumed[k]) for k, v in pipe.vae.state_dict().items())
    assert pipe.vocabulary == set(curve.world_words()) and "striped" not in pipe.vocabulary and "circle" in pipe.vocabulary
    assert json.loads((out / "training.json").read_text())["unet_step"] == 1
    image = pipe("a big red circle on a blue background", num_inference_steps=2, output_type="np").images
    side = pipe.vae.config.sample_size
    assert image.shape == (1, side, side, 3) and np.isfinite(image).all()

    # a candidate on the encoder stage's latents builds its own cache and exports that autoencoder
    curve.CANDIDATES["lean_f2_wide"] = dict(unet=curve.LEAN_UNET, autoencoder="f2_wide")
    try:
        curve.main([str(tmp_path), "--candidate", "lean_f2_wide", "--steps", "1", "--eval-every", "1", "--eval-samples", "1",
                    "--eval-steps", "2", "--cache-scenes", "32", "--threads", "1", "--results", str(tmp_path / "curves.json")])
        curve.main([str(tmp_path), "--candidate", "lean_f2_wide", "--export", str(tmp_path / "wide_export")])
    finally:
        del curve.CANDIDATES["lean_f2_wide"]
    assert (tmp_path / "narrow_cache_32_f2_wide.safetensors").exists()
    assert "whole_db" in json.loads((tmp_path / "wide_export" / "training.json").read_text())["autoencoder"]
    exported = load_file(str(tmp_path / "wide_export" / "vae" / name))
    assert all(torch.equal(exported[k], wide[k]) for k in wide)
