"""The shapes model's tokenizer and the resumable training run (no real training here)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer

from prompt2prompt.alignment import tokenize_words
from prompt2prompt.shapes import world
from prompt2prompt.shapes.tokenizer import learn_merges, word_counts, write_tokenizer
from prompt2prompt.shapes.checkpoints import load_optimizer, load_sharded, optimizer_tensors, save_sharded
from prompt2prompt.shapes.data import batch_images, images_to_tensor
from prompt2prompt.shapes.objective import lr_at
from prompt2prompt.shapes.training import Run


def test_bpe_is_deterministic_and_splits_rare_words(tmp_path):
    captions = [world.sample_spec(s).caption for s in range(3000)]
    counts = word_counts(captions)
    merges = learn_merges(counts, 110)
    assert merges == learn_merges(counts, 110)
    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_path, merges, 32)))
    assert tok.model_max_length == 32
    lengths = {w: len(tok(w, add_special_tokens=False).input_ids) for w in counts}
    assert lengths["red"] == 1 and lengths["circle"] == 1  # frequent words are one token
    assert any(n > 1 for n in lengths.values())  # and some words split into several
    # every caption maps words to tokens exactly (the engine's requirement)
    for caption in captions[:200]:
        p = tokenize_words(caption, tok)
        assert [i for pos in p.word_positions for i in pos] == list(range(1, len(p.ids) - 1))
    assert tok("zebra!").input_ids[0] == tok.bos_token_id  # out-of-vocabulary text still tokenizes


def test_sharded_checkpoints_round_trip_under_the_size_limit(tmp_path):
    tensors = {f"w{i}": torch.randn(300, 300) for i in range(5)}  # 360 kB each
    names = save_sharded(tensors, tmp_path / "m", max_bytes=800_000)
    assert len(names) == 3
    assert all((tmp_path / n).stat().st_size <= 800_000 + 10_000 for n in names)
    back = load_sharded(tmp_path, names)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_optimizer_state_round_trips_without_pickle():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = optimizer_tensors(opt)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_optimizer(fresh, tensors, meta)
    for a, b in zip(opt.state.values(), fresh.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and float(a["step"]) == float(b["step"])


def test_lr_warms_up_then_decays():
    lrs = [lr_at(s, 1000, 1e-3, 100) for s in range(1000)]
    assert lrs[0] < lrs[50] < lrs[99] <= 1e-3
    assert lrs[999] < lrs[500] < lrs[100]
    assert min(lrs[100:]) >= 1e-4 - 1e-12


def test_run_resumes_where_it_stopped(tmp_path):
    run = Run(tmp_path / "run", "cpu")
    run.train_vae(steps=2, batch=2, minutes=5)
    assert run.state["vae_step"] == 2
    again = Run(tmp_path / "run", "cpu")
    assert again.state["vae_step"] == 2
    for (k, a), b in zip(run.vae.state_dict().items(), again.vae.state_dict().values()):
        assert torch.equal(a, b), k
    again.train_vae(steps=3, batch=2, minutes=5)
    assert again.state["vae_step"] == 3 and again.state["samples_seen"]["vae"] == 6


def test_exported_run_loads_as_a_diffusers_folder_and_edits(tmp_path):
    from prompt2prompt import LocalBlend, Prompt2PromptPipeline

    run = Run(tmp_path / "run", "cpu")
    run.train_vae(steps=1, batch=2, minutes=5)
    run.train_unet(steps=1, batch=2, minutes=5)
    folder = run.export(tmp_path / "model")
    assert (folder / "model_index.json").is_file() and (folder / "training.json").is_file()
    assert all(f.stat().st_size <= 16 * 2**20 for f in folder.rglob("*.safetensors"))
    pipe = Prompt2PromptPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.scaling_factor == run.state["scaling_factor"]
    assert pipe.tokenizer.model_max_length == 32
    out = pipe("a red circle on grass", ["a red square on grass"], local_blend=LocalBlend("circle", "square"),
               num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 64, 64, 3)
    assert out.attention.maps.shape[-1] == 32

    from prompt2prompt.shapes.evaluation import evaluate_model

    result = evaluate_model(pipe, n=1, steps=2, parts=("adherence", "swap", "blend"))
    assert 0 <= result["adherence"]["colour"] <= 1 and result["adherence"]["n"] == 1
    assert set(result["word_swap"]) == {"shape_p2p", "shape_none", "colour_p2p", "colour_none"}
    assert "median_background_psnr_db" in result["local_blend"]


def test_parallel_batches_match_the_serial_stream(tmp_path):
    from prompt2prompt.shapes import MODEL_DIR
    from prompt2prompt.shapes.data import Batches

    tok_dir = str(MODEL_DIR / "tokenizer")
    serial, parallel = Batches(3, 4, 100, 0, tok_dir), Batches(3, 4, 100, 1, tok_dir)
    try:
        for _ in range(3):
            (xs, cs, ids, ts), (xp, cp, idp, tp) = serial.get(), parallel.get()
            assert np.array_equal(xs, xp) and cs == cp and torch.equal(ids, idp) and ts is None and tp is None
            assert xs.shape == (4, 64, 64, 3) and xs.dtype == np.uint8 and ids.shape == (4, 32)  # bytes: floats are made on the device
    finally:
        serial.close()
        parallel.close()
    images, captions = batch_images(100 + 5 * 4, 4)  # batch 5 of the stream = scenes 120..123
    assert captions == cs and torch.equal(images, images_to_tensor(xs))


def test_images_become_floats_in_minus_one_to_one_channels_first():
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    x = images_to_tensor(images)
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[1, 2, 5, 4], torch.tensor(float(images[1, 5, 4, 2]), dtype=torch.float32) / 127.5 - 1.0)  # float32 arithmetic
    assert x[images.transpose(0, 3, 1, 2) == 0].eq(-1).all() and x[images.transpose(0, 3, 1, 2) == 255].eq(1).all()


def test_fitted_total_ends_the_chunk_on_time():
    from prompt2prompt.shapes.objective import fit_total

    # 30 steps took 3 s (0.1 s/step) after 60 s of a 10-minute chunk: 540 s left -> 5400 more steps
    assert fit_total(step=35, started_step=5, elapsed=3.0, minutes=9.0 + 3.0 / 60) == 35 + 5400


def test_loss_plot(tmp_path):
    from PIL import Image

    from prompt2prompt.shapes.plots import plot_loss

    csv = tmp_path / "loss.csv"
    csv.write_text("stage,step,loss,lr,time\n" + "".join(f"{st},{s},{1 / s:.6f},1e-3,0\n" for st in ("vae", "unet") for s in range(50, 501, 50)))
    png = plot_loss(csv, tmp_path / "loss.png", width=400, height=200)
    with Image.open(png) as im:
        assert im.size == (400, 400)
        assert len(set(im.getdata())) > 2  # something was drawn
    (tmp_path / "empty.csv").write_text("stage,step,loss,lr,time\n")
    with pytest.raises(ValueError, match="no loss rows"):
        plot_loss(tmp_path / "empty.csv", tmp_path / "x.png")


def test_a_run_initialised_from_an_export_continues_it(tmp_path):
    """--init: weights, EMA, scaling factor and step counts carry over; the lr schedule restarts."""
    from prompt2prompt.shapes.train import main

    run = Run(tmp_path / "run", "cpu")
    run.train_vae(steps=1, batch=2, minutes=5)
    run.train_unet(steps=2, batch=2, minutes=5)
    first = run.export(tmp_path / "first")
    more = Run(tmp_path / "run2", "cpu", init=first)
    assert more.state["unet_step"] == 2 and more.state["unet_from"] == 2
    assert more.state["scaling_factor"] == run.state["scaling_factor"]
    for k, v in run.ema["unet"].items():
        assert torch.equal(more.unet.state_dict()[k], v) and torch.equal(more.ema["unet"][k], v), k
    for k, v in run.vae.state_dict().items():
        assert torch.equal(more.vae.state_dict()[k], v), k
    lrs = []
    real_log = more.log
    more.log = lambda stage, step, loss, lr: lrs.append(lr) or real_log(stage, step, loss, lr)
    more.train_unet(steps=52, batch=2, minutes=5, lr=1e-3, warmup=10)  # logs after step 49 = step 47 of the new chunk
    assert more.state["unet_step"] == 52 and more.state["samples_seen"]["unet"] == 2 * 2 + 50 * 2
    assert lrs == [pytest.approx(lr_at(47, 50, 1e-3, 10))]
    second = more.export(tmp_path / "second")
    import json

    info = json.loads((second / "training.json").read_text())
    assert info["unet_step"] == 52 and info["history"][0]["unet_step"] == 2
    assert info["history"][0]["samples_seen"]["unet"] == 4 and info["samples_seen"]["unet"] == 104
    # Every chunk is logged with its steps, settings and hardware, and travels with the export.
    (chunk,) = info["chunks"]
    assert chunk["stage"] == "unet" and chunk["steps"] == [2, 52] and chunk["samples"] == 100
    assert (chunk["batch"], chunk["lr"], chunk["warmup"], chunk["total"]) == (2, 1e-3, 10, 52)
    assert chunk["grounding"] == 0.0 and chunk["ema_decay"] == 0.999 and chunk["command"] is None
    assert chunk["hardware"].startswith("CPU") and chunk["precision"] == "float32"
    assert chunk["seconds"] > 0 and 0 <= chunk["data_wait_seconds"] <= chunk["seconds"]
    assert [c["stage"] for c in info["history"][0]["chunks"]] == ["vae", "unet"]  # the first export's own log
    assert info["history"][0]["chunks"][1]["steps"] == [0, 2]
    assert (second / "tokenizer" / "tokenizer_config.json").is_file()
    with pytest.raises(SystemExit) as e:  # a folder that is not an export: exit 2 before any work
        main([str(tmp_path / "run3"), "--init", str(tmp_path / "nothing"), "--stage", "unet"])
    assert e.value.code == 2 and not (tmp_path / "run3").exists()


def test_the_command_line_is_logged_with_its_chunk(tmp_path):
    import json
    import shlex

    from prompt2prompt.shapes.train import main

    argv = [str(tmp_path / "run dir"), "--stage", "vae", "--steps", "1", "--batch", "2", "--lr", "5e-4"]
    main(argv)
    (chunk,) = json.loads((tmp_path / "run dir" / "state.json").read_text())["chunks"]
    assert shlex.split(chunk["command"]) == ["python", "-m", "prompt2prompt.shapes.train", *argv]
    assert (chunk["stage"], chunk["steps"], chunk["batch"], chunk["lr"]) == ("vae", [0, 1], 2, 5e-4)


def test_offset_noise_moves_each_channel_mean():
    from prompt2prompt.shapes.objective import training_noise

    plain = training_noise((256, 4, 16, 16), torch.Generator().manual_seed(0))
    offset = training_noise((256, 4, 16, 16), torch.Generator().manual_seed(0), offset=0.5)
    # a channel's mean over 16x16 positions has variance 1/256 without the offset, 1/256 + 0.25 with it
    assert plain.mean((2, 3)).var().item() < 0.01
    assert 0.18 < offset.mean((2, 3)).var().item() < 0.34
    assert torch.equal(training_noise((2, 4, 8, 8), torch.Generator().manual_seed(3), 0.1),
                       training_noise((2, 4, 8, 8), torch.Generator().manual_seed(3), 0.1))  # deterministic per generator


def test_min_snr_weights_follow_the_papers_formula():
    from prompt2prompt.shapes.objective import min_snr_weights

    alpha_bar = torch.tensor([0.999, 0.9, 5 / 6, 0.5, 0.01])  # SNR 999, 9, 5, 1, 0.0101
    w = min_snr_weights(alpha_bar, 5.0)
    assert torch.allclose(w, torch.tensor([5 / 999, 5 / 9, 1.0, 1.0, 1.0]), rtol=1e-4)
    assert torch.equal(min_snr_weights(alpha_bar, 0.0), torch.ones(5))  # off


def test_training_target_matches_diffusers_velocity_and_the_zero_snr_limit():
    from diffusers import DDPMScheduler

    from prompt2prompt.shapes.objective import SCHEDULE, training_target

    sched = DDPMScheduler(**SCHEDULE, rescale_betas_zero_snr=True)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 500, 999])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)  # (batch, 1, 1, 1)
    v = training_target(eps, x0, a, "v_prediction")
    assert torch.allclose(v, sched.get_velocity(x0, eps, t), atol=1e-6)  # diffusers' own velocity
    assert float(a[-1]) == 0 and torch.allclose(v[-1], -x0[-1])  # at zero terminal SNR, v = -x0
    assert torch.equal(training_target(eps, x0, a, "epsilon"), eps)
    with pytest.raises(ValueError, match="prediction_type"):
        training_target(eps, x0, a, "sample")


def _tiny_export(tmp_path):
    """A one-step model exported by a run (the starting point of the --init comparisons)."""
    base = Run(tmp_path / "base", "cpu")
    base.train_vae(steps=1, batch=2, minutes=5)
    base.train_unet(steps=1, batch=2, minutes=5)
    return base.export(tmp_path / "first")


def test_min_snr_changes_the_update_only_through_the_weights(tmp_path):
    import json

    first = _tiny_export(tmp_path)
    after = {}
    for name, gamma in (("off", 0.0), ("huge", 1e9), ("five", 5.0)):
        run = Run(tmp_path / name, "cpu", init=first)
        run.train_unet(steps=3, batch=16, minutes=5, min_snr_gamma=gamma)  # two steps from the same state
        after[name] = run.unet.state_dict()
        assert json.loads((run.export(tmp_path / f"{name}.model") / "training.json").read_text())["min_snr_gamma"] == gamma
    key = next(k for k in after["off"] if k.endswith("conv_in.weight"))
    assert torch.equal(after["off"][key], after["huge"][key])  # weights of 1: the plain loss
    assert not torch.equal(after["off"][key], after["five"][key])


@pytest.mark.parametrize("flag", ["--offset-noise", "--min-snr", "--grounding", "--grounding-share"])
def test_negative_training_settings_exit_2_before_any_work(tmp_path, flag, capsys):
    from prompt2prompt.shapes.train import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "run"), "--stage", "unet", flag, "-1"])
    assert e.value.code == 2 and flag in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_decoder_stage_trains_the_decoder_alone_and_keeps_the_latent_space(tmp_path):
    """--stage decoder after --init: only post_quant_conv and the decoder change, the round trip
    improves, the UNet, text encoder and scaling factor are exported as they were, and it resumes."""
    import json


    run = Run(tmp_path / "run", "cpu")
    run.train_vae(steps=1, batch=2, minutes=5)
    run.train_unet(steps=1, batch=2, minutes=5)
    first = run.export(tmp_path / "first")
    more = Run(tmp_path / "run2", "cpu", init=first)
    before = {k: v.clone() for k, v in more.vae.state_dict().items()}
    x, _ = batch_images(40_000_000, 8)

    def round_trip_mse():
        with torch.no_grad():
            return F.mse_loss(more.vae.decode(more.vae.encode(x).latent_dist.mean).sample, x).item()

    mse0 = round_trip_mse()
    more.train_decoder(steps=12, batch=4, minutes=5, lr=2e-3, warmup=2)
    changed = {k for k, v in more.vae.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("decoder.") for k in changed) and any(k.startswith("post_quant_conv.") for k in changed)
    assert all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), changed - {k for k in changed if k.startswith("decoder.")}
    assert not any(p.requires_grad for p in more.vae.parameters())  # frozen again for any later stage
    assert round_trip_mse() < mse0
    second = more.export(tmp_path / "second")
    info = json.loads((second / "training.json").read_text())
    assert info["decoder_step"] == 12 and info["samples_seen"]["decoder"] == 48
    assert info["scaling_factor"] == run.state["scaling_factor"] and info["unet_step"] == 1
    for k, v in run.ema["unet"].items():
        assert torch.equal(more.ema["unet"][k], v), k
    again = Run(tmp_path / "run2", "cpu")  # resumes with the decoder's optimizer state
    assert again.decoder_opt.state and again.state["decoder_step"] == 12
    again.train_decoder(steps=13, batch=4, minutes=5)
    assert again.state["decoder_step"] == 13
    third = Run(tmp_path / "run3", "cpu", init=second)  # an export with a decoder stage carries its count on
    assert third.state["decoder_step"] == 12 and third.state["decoder_from"] == 12
    encoder = {k: v.clone() for k, v in again.vae.encoder.state_dict().items()}
    again.train_vae(steps=again.state["vae_step"] + 1, batch=2, minutes=5)  # the vae stage trains the encoder again
    assert any(not torch.equal(v, encoder[k]) for k, v in again.vae.encoder.state_dict().items())


def test_the_trainer_leaves_the_rendering_workers_their_cores(tmp_path, monkeypatch):
    import os

    from prompt2prompt.shapes.train import main

    csv = tmp_path / "loss.csv"
    csv.write_text("stage,step,loss,lr,time\nunet,50,0.5,0.0001,0\nunet,100,0.4,0.0001,1\n")
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    try:
        main([str(csv), "--plot", str(tmp_path / "a.png"), "--workers", "14"])
        assert torch.get_num_threads() == 2  # 16 cores, 14 of them rendering
        main([str(csv), "--plot", str(tmp_path / "b.png"), "--workers", "14", "--threads", "3"])
        assert torch.get_num_threads() == 3  # an explicit --threads wins
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- grounding loss

def _shipped_tokenizer():
    from prompt2prompt.shapes import MODEL_DIR

    return CLIPTokenizer.from_pretrained(str(MODEL_DIR / "tokenizer"))


@pytest.mark.parametrize("template", range(world.NUM_TEMPLATES))
def test_grounding_targets_point_each_phrase_at_its_pixels(template):
    from prompt2prompt.shapes.grounding import BACKGROUND_REGION, grounding_targets

    tok = _shipped_tokenizer()
    objects = [dict(shape="star", colour="red", size="big", pattern="striped"), dict(shape="star", colour="blue", size="small")]
    spec = world.make_spec(objects, "green", relation="left of", seed=3, template=template)
    scene = world.render(spec)
    masks, regions = grounding_targets(spec, scene.filled, tok)
    tokens = tokenize_words(spec.caption, tok)
    words = list(tokens.words)
    named = {}  # region -> its words, in caption order
    for k, w in enumerate(words):
        for pos in tokens.word_positions[k]:
            named.setdefault(int(regions[pos]), []).append(w)
    # the same shape word twice: each occurrence points at its own object, in caption order
    assert named[0] == ["big", "striped", "red", "star"] and named[1] == ["small", "blue", "star"]
    assert named[BACKGROUND_REGION] == ["green", "background"]
    assert set(named[-1]) <= {"a", "left", "of", "on", ","}
    assert (regions[len(tokens.ids):] == -1).all() and regions[0] == -1  # padding and the start token
    assert np.array_equal(masks[0], scene.filled[0]) and np.array_equal(masks[1], scene.filled[1])
    assert np.array_equal(masks[BACKGROUND_REGION], ~scene.filled.any(0))


def _top_half_scene(side=8):
    """An object over the top half of a 64x64 scene, the background below; token 1 names the
    object, token 2 the background. Returns (masks, regions, top), `top` the object's cells
    on a side x side map."""
    masks = torch.zeros(1, 3, 64, 64)
    masks[0, 0, :32] = 1  # object 0: the top half
    masks[0, 2] = 1 - masks[0, 0]  # background: the rest
    regions = torch.tensor([[-1, 0, 2, -1]])  # (batch, tokens): region each token names, -1 none
    top = torch.zeros(side, side)
    top[: side // 2] = 1
    return masks, regions, top.flatten()  # top: (pixels,)


def test_grounding_loss_is_zero_inside_and_grows_outside():
    from prompt2prompt.shapes.grounding import grounding_loss

    side = 8
    masks, regions, top = _top_half_scene(side)

    def maps(w1, w2):
        a = torch.full((1, side * side, 4), 1.0)
        a[0, :, 1], a[0, :, 2] = w1, w2
        return [a / a.sum(-1, keepdim=True)]  # a distribution over the tokens at each pixel

    assert grounding_loss(maps(top * 5, (1 - top) * 5), masks, regions).item() == pytest.approx(0.0, abs=1e-6)
    uniform = grounding_loss(maps(torch.ones(side * side), torch.ones(side * side)), masks, regions).item()
    assert uniform == pytest.approx(0.25, abs=1e-6)  # half of each token's attention outside: (1 - 1/2)^2
    swapped = grounding_loss(maps((1 - top) * 5, top * 5), masks, regions).item()
    assert swapped > uniform
    assert grounding_loss(maps(top, top), masks, torch.full((1, 4), -1)).item() == 0.0  # nothing supervised


def test_grounding_share_loss_asks_each_regions_words_to_hold_its_pixels():
    from prompt2prompt.shapes.grounding import grounding_share_loss

    side = 8
    masks, regions, top = _top_half_scene(side)

    def maps(w0, w1, w2):
        a = torch.stack([w0, w1, w2, torch.full_like(w0, 1e-9)], -1)[None]  # (1, pixels, tokens)
        return [a / a.sum(-1, keepdim=True)]

    ones = torch.ones(side * side)
    held = maps(ones * 1e-9, top, 1 - top)  # each region's word holds all of its pixels' attention
    assert grounding_share_loss(held, masks, regions).item() == pytest.approx(0.0, abs=1e-6)
    # the start token holds a quarter everywhere: share 3/4 on every covered cell
    assert grounding_share_loss(maps(ones / 3, top, 1 - top), masks, regions).item() == pytest.approx(1 / 16, abs=1e-6)
    # the words attend to the wrong halves: share 0
    assert grounding_share_loss(maps(ones * 1e-9, 1 - top, top), masks, regions).item() == pytest.approx(1.0, abs=1e-6)
    # only the object is named: the background's cells do not count
    only_object = torch.tensor([[-1, 0, -1, -1]])
    assert grounding_share_loss(maps(ones * 1e-9, top, 1 - top), masks, only_object).item() == pytest.approx(0.0, abs=1e-6)
    assert grounding_share_loss(held, masks, torch.full((1, 4), -1)).item() == 0.0  # nothing supervised
    # against a direct sum on random maps, two regions named by two tokens each
    a = torch.rand(2, side * side, 6).softmax(-1)
    regs = torch.tensor([[-1, 0, 0, 2, 2, -1], [0, -1, 2, -1, 2, 0]])
    m = masks.expand(2, -1, -1, -1)
    per_region = []
    for b in range(2):
        for r in (0, 2):
            cover = F.adaptive_avg_pool2d(m[b, r][None, None], side).flatten()
            share = a[b][:, regs[b] == r].sum(-1)
            per_region.append(((cover * (1 - share) ** 2).sum() / cover.sum()).item())
    assert grounding_share_loss([a], m, regs).item() == pytest.approx(sum(per_region) / 4, rel=1e-5)
    # a small object weighs as much as the background: only the object's cells miss their words
    small = torch.zeros(1, 3, 64, 64)
    small[0, 0, :8, :8] = 1  # one cell of 64
    small[0, 2] = 1 - small[0, 0]
    background_everywhere = maps(ones * 1e-9, ones * 1e-9, ones)  # the object's one cell attends to the background word
    assert grounding_share_loss(background_everywhere, small, regions).item() == pytest.approx(0.5, abs=1e-6)  # not 1/64


def test_grounding_share_among_the_words_leaves_the_start_token_and_padding_alone():
    from prompt2prompt.shapes.grounding import grounding_share_loss

    side = 8
    masks, regions, top = _top_half_scene(side)  # tokens: start, object word, background word, padding
    words = torch.tensor([[False, True, True, False]])
    ones = torch.ones(side * side)

    def maps(start, w1, w2, pad):
        return [torch.stack([start, w1, w2, pad], -1)[None]]  # (1, pixels, tokens), rows sum to 1

    # the start token and the padding hold 90%; each region's word the rest of its own cells
    mostly_padding = maps(ones * 0.5, top * 0.1, (1 - top) * 0.1, ones * 0.4)
    assert grounding_share_loss(mostly_padding, masks, regions, words).item() == pytest.approx(0.0, abs=1e-6)
    assert grounding_share_loss(mostly_padding, masks, regions).item() == pytest.approx(0.81, abs=1e-5)  # (1 - 0.1)^2
    # the two words split every cell evenly: half of the words' share, whatever the padding holds
    even = maps(ones * 0.5, ones * 0.05, ones * 0.05, ones * 0.4)
    assert grounding_share_loss(even, masks, regions, words).item() == pytest.approx(0.25, abs=1e-5)
    # the wrong word holds each region: the full loss
    swapped = maps(ones * 0.5, (1 - top) * 0.1, top * 0.1, ones * 0.4)
    assert grounding_share_loss(swapped, masks, regions, words).item() == pytest.approx(1.0, abs=1e-5)


def test_grounding_processor_keeps_the_unets_output_and_collects_each_cross_attention_map():
    from diffusers import UNet2DConditionModel

    from prompt2prompt.shapes.grounding import GroundingAttnProcessor
    from prompt2prompt.shapes.training import model_configs

    unet = UNet2DConditionModel(**model_configs(_shipped_tokenizer())["unet"]).eval()
    x = torch.randn(2, unet.config.in_channels, 16, 16)
    states = torch.randn(2, 32, unet.config.cross_attention_dim)
    with torch.no_grad():
        plain = unet(x, 10, encoder_hidden_states=states).sample
        maps = []
        original = unet.attn_processors
        unet.set_attn_processor(GroundingAttnProcessor(maps, latent_hw=(16, 16)))
        try:
            grounded = unet(x, 10, encoder_hidden_states=states).sample
        finally:
            unet.set_attn_processor(original)
    torch.testing.assert_close(grounded, plain, atol=1e-5, rtol=1e-4)
    n_cross = sum(bool(getattr(m, "is_cross_attention", False)) for m in unet.modules())
    assert len(maps) == n_cross
    for a in maps:
        assert a.shape[0] == 2 and a.shape[2] == 32
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:2]), atol=1e-5, rtol=0)


def test_grounding_sides_pick_the_maps_and_are_checked_against_the_model():
    from diffusers import UNet2DConditionModel

    from prompt2prompt.shapes.grounding import GroundingAttnProcessor, check_grounding_sides, map_sides
    from prompt2prompt.shapes.training import model_configs

    unet = UNet2DConditionModel(**model_configs(_shipped_tokenizer())["unet"]).eval()
    side = unet.config.sample_size
    levels = len(unet.config.block_out_channels)
    assert map_sides(unet) == [side // 2**i for i in range(levels)]  # one side per level, largest first
    x = torch.randn(2, unet.config.in_channels, side, side)
    states = torch.randn(2, 32, unet.config.cross_attention_dim)
    collected = {}
    with torch.no_grad():
        plain = unet(x, 10, encoder_hidden_states=states).sample
        for name, sides in (("all", None), ("coarse", frozenset({side // 2, side // 4}))):
            maps = []
            original = unet.attn_processors
            unet.set_attn_processor(GroundingAttnProcessor(maps, sides, latent_hw=(side, side)))
            try:
                out = unet(x, 10, encoder_hidden_states=states).sample
            finally:
                unet.set_attn_processor(original)
            torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-4)
            collected[name] = [math.isqrt(a.shape[1]) for a in maps]  # a: (batch, pixels, tokens)
    assert collected["coarse"] == [s for s in collected["all"] if s < side] and 0 < len(collected["coarse"]) < len(collected["all"])
    check_grounding_sides(unet, (side // 2, side // 4))
    for bad in ((3,), (), (side, side * 2)):
        with pytest.raises(ValueError, match="cross-attention map sides"):
            check_grounding_sides(unet, bad)


def test_grounding_attention_installs_the_processor_and_restores_the_originals_when_the_body_raises():
    from diffusers import UNet2DConditionModel

    from prompt2prompt.shapes.grounding import GroundingAttnProcessor, grounding_attention
    from prompt2prompt.shapes.training import unet_config

    unet = UNet2DConditionModel(**unet_config()).eval()
    before = unet.attn_processors
    maps = []
    with pytest.raises(RuntimeError, match="inside"):
        with grounding_attention(unet, maps, frozenset({8})):
            installed = set(map(type, unet.attn_processors.values()))
            assert installed == {GroundingAttnProcessor}
            side = unet.config.sample_size
            with torch.no_grad():
                unet(torch.randn(1, unet.config.in_channels, side, side), 10, encoder_hidden_states=torch.randn(1, 32, unet.config.cross_attention_dim))
            assert maps and {math.isqrt(a.shape[1]) for a in maps} == {8}  # the 8x8 maps only
            raise RuntimeError("inside")
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


def test_backward_split_gives_the_extra_loss_to_its_parameters_only():
    from prompt2prompt.shapes.grounding import backward_split

    torch.manual_seed(0)
    text, unet = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    x = torch.randn(5, 3)

    def losses():
        out = unet(torch.tanh(text(x)))  # (5, 2)
        return out.pow(2).mean(), out[:, 0].sum()  # a "diffusion" loss and an "extra" one

    grads = {}
    for name in ("main", "extra", "split"):
        text.zero_grad(set_to_none=True), unet.zero_grad(set_to_none=True)
        main, extra = losses()
        if name == "split":
            backward_split(main, extra, list(unet.parameters()))
        else:
            (main if name == "main" else main + extra).backward()
        grads[name] = [p.grad.clone() for p in (*text.parameters(), *unet.parameters())]
    n_text = len(list(text.parameters()))
    for k in range(n_text):  # the text side learns from the main loss alone
        torch.testing.assert_close(grads["split"][k], grads["main"][k])
        assert not torch.allclose(grads["extra"][k], grads["main"][k])
    for k in range(n_text, len(grads["split"])):  # the other side from both
        torch.testing.assert_close(grads["split"][k], grads["extra"][k])


@pytest.mark.parametrize("args", [["--grounding-sides", "3", "--grounding", "0.05"], ["--grounding-sides", "x,4", "--grounding", "0.05"],
                                  ["--grounding-sides", "0", "--grounding", "0.05"], ["--grounding-sides", "8,4"], ["--grounding-no-text"],
                                  ["--grounding-share-words", "--grounding", "0.05"]])
def test_bad_grounding_sides_exit_2_before_the_run_folder_is_made(tmp_path, args, capsys):
    from prompt2prompt.shapes.train import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "run"), "--stage", "unet", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "grounding" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_grounding_changes_the_update_and_the_processors_are_restored(tmp_path):
    import json

    first = _tiny_export(tmp_path)
    after = {}
    cases = (("off", 0.0, 0.0, None, True), ("on", 1.0, 0.0, None, True), ("share", 0.0, 1.0, None, True),
             ("coarse", 1.0, 0.0, (8, 4), True), ("unet_only", 1.0, 0.0, None, False), ("share_words", 0.0, 1.0, None, True))
    for name, w, share, sides, text in cases:
        run = Run(tmp_path / name, "cpu", init=first)
        before = run.unet.attn_processors
        run.train_unet(steps=3, batch=8, minutes=5, grounding=w, grounding_share=share, grounding_sides=sides, grounding_text=text,
                       grounding_share_words=name == "share_words")
        assert {k: type(v) for k, v in run.unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}
        after[name] = run.unet.state_dict()
        info = json.loads((run.export(tmp_path / f"{name}.model") / "training.json").read_text())
        assert (info["grounding"], info["grounding_share"]) == (w, share)
        assert info["grounding_sides"] == (list(sides) if sides else None)
        assert info["grounding_text"] == (text if w or share else None)
        assert info["grounding_share_words"] == ((name == "share_words") if share else None)
    key = next(k for k in after["off"] if k.endswith("attn2.to_k.weight"))
    assert not torch.equal(after["off"][key], after["on"][key])
    assert not torch.equal(after["off"][key], after["share"][key])
    assert not torch.equal(after["on"][key], after["share"][key])
    # restricted to the 8x8 and 4x4 maps (`test_grounding_sides_pick_the_maps_...` checks which maps
    # it sees), the loss still moves a coarse layer's keys, and the update differs from the all-layer one
    fine = next(k for k in after["off"] if k.startswith("down_blocks.0.") and k.endswith("attn2.to_k.weight"))
    coarse = next(k for k in after["off"] if k.startswith("down_blocks.2.") and k.endswith("attn2.to_k.weight"))
    assert not torch.equal(after["on"][fine], after["coarse"][fine])
    assert not torch.equal(after["off"][coarse], after["coarse"][coarse])
    assert not torch.equal(after["on"][key], after["unet_only"][key])
    assert not torch.equal(after["share"][key], after["share_words"][key])


def test_grounded_batches_are_the_same_scenes_as_the_plain_stream():
    from prompt2prompt.shapes.data import render_grounded, render_range

    images, captions, masks, regions = render_grounded(100, 3, _shipped_tokenizer())
    plain_images, plain_captions = render_range(100, 3)
    assert np.array_equal(images, plain_images) and captions == plain_captions
    assert masks.shape == (3, 3, 64, 64) and regions.shape == (3, 32) and (regions >= 0).any(1).all()
