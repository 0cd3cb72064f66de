"""Real-image inversion: step formulas, image loading, the four methods, save/load, bad input."""

import io
import json

import numpy as np
import PIL.Image
import pytest
import torch

from _util import assert_close_to_scale
from prompt2prompt import Inversion, InversionMethod, LocalBlend, Prompt2PromptPipeline, load_image
from prompt2prompt.inversion import ddim_inversion_step, ddim_step, null_text_lr, null_text_threshold, predict_eps

STEPS = 5
PROMPT = "a cat riding a bicycle"


def make(components):
    pipe = Prompt2PromptPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(seed=0, size=(32, 32)):
    """A smooth random RGB picture (uint8), so that the tiny VAE sees image-like input."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(small).resize(size, PIL.Image.BICUBIC))


@pytest.fixture(scope="module", params=["tiny_sd1", "tiny_sd2"])
def pipe(request):
    return make(request.getfixturevalue(request.param))


# --------------------------------------------------------------------------- pure functions


def test_ddim_inversion_step_inverts_ddim_step_for_the_same_eps():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a_t, a_prev = torch.tensor(0.3), torch.tensor(0.8)
    up = ddim_inversion_step(x, eps, a_prev, a_t)
    torch.testing.assert_close(ddim_step(up, eps, a_t, a_prev), x, atol=1e-5, rtol=1e-5)
    # x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, with x0 from x_t (DDIM eq. 12, sigma = 0)
    x0 = (up - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    torch.testing.assert_close(ddim_step(up, eps, a_t, a_prev), a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps)


def test_predict_eps_from_v():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, generator=g), torch.randn(3, generator=g)
    a = torch.tensor(0.6)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(predict_eps(v, xt, a, "v_prediction"), eps)
    assert predict_eps(eps, xt, a, "epsilon") is eps
    with pytest.raises(ValueError, match="prediction_type"):
        predict_eps(v, xt, a, "sample")


def test_null_text_schedule_is_the_papers():
    # the paper's 1e-2 * (1 - i/100) at its 50 steps
    assert null_text_lr(0, 50) == pytest.approx(1e-2) and null_text_lr(49, 50) == pytest.approx(1e-2 * 0.51)
    # longer inversions decay to half as well, and never below: Adam refuses a negative rate
    rates = [null_text_lr(i, 250) for i in range(250)]
    assert min(rates) > 0.5e-2 - 1e-12 and rates == sorted(rates, reverse=True)
    assert null_text_threshold(0) == pytest.approx(1e-5) and null_text_threshold(10) == pytest.approx(1e-5 + 10 * 2e-5)


# --------------------------------------------------------------------------- images


def test_load_image_crops_resizes_and_says_so(tmp_path):
    wide = picture(size=(60, 40))
    out, note = load_image(wide, 32, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert "centre-cropped from 60x40 to 40x40" in note and "resized to 32x32" in note
    same, note = load_image(picture(size=(32, 32)), 32, 32)
    assert "used as it is" in note
    np.testing.assert_array_equal(same, picture(size=(32, 32)))


def test_load_image_modes_and_exif(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half
    rgba[:, 16:, 3] = 255
    out, _ = load_image(rgba, 32, 32)
    assert (out[:, :16] == 255).all() and (out[:, 16:] == [255, 0, 0]).all()  # composited on white
    grey, _ = load_image(np.full((32, 32), 0.5, np.float32), 32, 32)
    assert grey.shape == (32, 32, 3) and (grey == 128).all()
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): a 40x20 file displays as 20x40
    img = PIL.Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # left strip red in the file -> top strip when displayed
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    out, note = load_image(path, 20, 20)  # displayed 20 wide, 40 tall -> cropped to 20x20
    assert "input 20x40" in note and "centre-cropped from 20x40 to 20x20" in note
    raw, note = load_image(path, 40, 20)  # height 40, width 20: the displayed picture as is
    assert "used as it is" in note
    assert raw[:5].mean(axis=(0, 1))[0] > 200 and raw[-5:].mean(axis=(0, 1))[2] > 200  # red on top, blue below


def test_load_image_scales_16_bit_grey(tmp_path):
    """A 16-bit greyscale PNG (PIL mode I;16) is scaled to 8 bits, not clipped at 255 (all white)."""
    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))  # (h, w), left dark
    path = tmp_path / "deep.png"
    PIL.Image.fromarray(ramp).save(path)
    with PIL.Image.open(path) as opened:
        assert opened.mode.startswith("I")  # what this test is about: PIL reads it as 16-bit integers
    out, note = load_image(path, 32, 32)
    expected = (ramp.astype(np.float64) * 255 / 65535).round()  # (h, w)
    assert np.abs(out[..., 0].astype(np.float64) - expected).max() <= 1
    assert (out[..., 0] == out[..., 2]).all() and "greyscale scaled from 0..65535 to 8 bits" in note
    # 32-bit integer greyscale within 0..255 is read as 8-bit values
    small, _ = load_image(PIL.Image.fromarray(np.full((8, 8), 200, np.int32), mode="I"), 8, 8)
    assert (small == 200).all()


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda p: p / "missing.png", "does not exist"),
        (lambda p: ((p / "empty.png").write_bytes(b""), p / "empty.png")[1], "is empty"),
        (lambda p: ((p / "text.png").write_text("hello"), p / "text.png")[1], "not a picture"),
        (lambda p: np.zeros((4, 4, 2), np.uint8), "must be"),
        (lambda p: np.full((4, 4, 3), 2.0), r"\[0, 1\]"),
        (lambda p: 42, "must be a file path"),
    ],
)
def test_load_image_bad_input(tmp_path, make_input, message):
    with pytest.raises(ValueError, match=message):
        load_image(make_input(tmp_path), 32, 32)


# --------------------------------------------------------------------------- methods


def test_direct_inversion_reconstructs_the_input_latents_exactly(pipe):
    inv = pipe.invert(picture(), PROMPT, method="direct", num_inference_steps=STEPS)
    assert inv.trajectory.shape == (STEPS + 1, 4, 16, 16)
    out = pipe(PROMPT, ["a cat riding a car"], inversion=inv, output_type="latent")
    torch.testing.assert_close(out.images[:1], inv.image_latent, atol=1e-4, rtol=0)
    assert not torch.allclose(out.images[1:], inv.image_latent, atol=1e-3)  # the target is edited


def latent_error(pipe, inv):
    out = pipe(PROMPT, inversion=inv, output_type="latent")
    return float((out.images[:1] - inv.image_latent).pow(2).mean())


def test_null_text_beats_ddim_and_early_stopping_counts_passes(tiny_sd1):
    pipe = make(tiny_sd1)
    ddim = pipe.invert(picture(), PROMPT, method="ddim", num_inference_steps=STEPS)
    null = pipe.invert(picture(), PROMPT, method="null-text", num_inference_steps=STEPS)
    assert null.null_embeddings.shape == (STEPS, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    e_ddim, e_null = latent_error(pipe, ddim), latent_error(pipe, null)
    assert e_null < 0.8 * e_ddim, (e_null, e_ddim)
    used = null.info["inner_steps_used"]
    assert len(used) == STEPS and all(1 <= u <= 10 for u in used)
    # the recorded losses are the final reconstruction errors of each step, below the threshold when it stopped early
    for i, (u, loss) in enumerate(zip(used, null.info["final_losses"])):
        assert u == 10 or loss < null_text_threshold(i)
    assert null.info["unet_forward_passes"] == 2 * STEPS + sum(used)


def test_a_zero_terminal_snr_model_inverts_and_reconstructs(tiny_sd2):
    """A v-prediction model on a zero-terminal-SNR schedule with trailing timesteps (Lin et al., 2024)
    starts sampling at alpha_bar = 0, where x0 cannot be read back from eps: null-text inversion stays
    finite there and still beats plain DDIM inversion."""
    from diffusers import DDIMScheduler

    components = dict(tiny_sd2, scheduler=DDIMScheduler.from_config(
        tiny_sd2["scheduler"].config, rescale_betas_zero_snr=True, timestep_spacing="trailing"))
    pipe = make(components)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and float(pipe.scheduler.alphas_cumprod[-1]) == 0
    ddim = pipe.invert(picture(), PROMPT, method="ddim", num_inference_steps=STEPS)
    null = pipe.invert(picture(), PROMPT, method="null-text", num_inference_steps=STEPS)
    assert int(null.timesteps[0]) == pipe.scheduler.config.num_train_timesteps - 1  # the first step is at alpha_bar = 0
    assert torch.isfinite(null.null_embeddings).all() and all(np.isfinite(null.info["final_losses"]))
    e_ddim, e_null = latent_error(pipe, ddim), latent_error(pipe, null)
    assert np.isfinite(e_null) and e_null < 0.8 * e_ddim, (e_null, e_ddim)


def test_negative_prompt_inversion_uses_the_source_embedding_as_null(tiny_sd1, monkeypatch):
    pipe = make(tiny_sd1)
    inv = pipe.invert(picture(), PROMPT, method="negative-prompt", num_inference_steps=STEPS)
    seen = []
    forward = pipe.unet.forward

    def spy(sample, t, encoder_hidden_states, **kw):
        seen.append(encoder_hidden_states.clone())
        return forward(sample, t, encoder_hidden_states=encoder_hidden_states, **kw)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    pipe(PROMPT, ["a cat riding a car"], inversion=inv, output_type="latent")
    states = seen[0]  # (4, tokens, dim): [null x2, source, target]
    torch.testing.assert_close(states[0], states[2]) and torch.testing.assert_close(states[1], states[2])
    assert not torch.allclose(states[3], states[2])
    e_neg, e_ddim = latent_error(pipe, inv), latent_error(pipe, pipe.invert(picture(), PROMPT, method="ddim", num_inference_steps=STEPS))
    assert e_neg < e_ddim


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(edit_prompts=["a cat riding a car"], cross_replace_steps=0.8, self_replace_steps=0.4),
        dict(edit_prompts=["a cat riding a red bicycle"], edit="refine"),
        dict(edit_prompts=["a cat riding a bicycle"], equalizer={"bicycle": 3.0}),
        dict(edit_prompts=["a cat riding a car"], local_blend=LocalBlend("bicycle", "car"), cross_replace_steps={"default_": 0.8, "car": 0.4}),
    ],
)
def test_every_edit_runs_on_an_inverted_image_and_keeps_the_source(tiny_sd1, kwargs):
    pipe = make(tiny_sd1)
    inv = pipe.invert(picture(), PROMPT, method="null-text", num_inference_steps=STEPS, num_inner_steps=3)
    alone = pipe(PROMPT, inversion=inv, output_type="latent").images
    out = pipe(PROMPT, inversion=inv, output_type="latent", **kwargs).images
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert_close_to_scale(out[:1], alone, 1e-5)


def test_save_and_load_round_trip(tiny_sd1, tmp_path):
    pipe = make(tiny_sd1)
    for method in InversionMethod:
        inv = pipe.invert(picture(), PROMPT, method=method, num_inference_steps=STEPS, num_inner_steps=2)
        path = inv.save(tmp_path / f"inv-{method.value}")
        assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
        assert not list(tmp_path.glob("*.tmp"))
        back = Inversion.load(path)
        assert back.method is method and back.prompt == PROMPT and back.num_inference_steps == STEPS
        np.testing.assert_array_equal(back.image, inv.image)
        for name in ("timesteps", "latent", "image_latent", "null_embeddings", "trajectory"):
            a, b = getattr(inv, name), getattr(back, name)
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b)
        a = pipe(PROMPT, ["a cat riding a car"], inversion=inv, output_type="latent").images
        b = pipe(PROMPT, ["a cat riding a car"], inversion=back, output_type="latent").images
        torch.testing.assert_close(a, b)


def test_load_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Inversion.load(tmp_path / "nothing")
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    (tmp_path / "x.json").write_text(json.dumps({"format": "prompt2prompt-inversion", "version": 1}))
    with pytest.raises(ValueError, match="not a readable inversion"):
        Inversion.load(tmp_path / "x.safetensors")
    # a readable file that lacks what its method needs is refused here, not at edit time
    from safetensors.torch import save_file

    save_file({"timesteps": torch.zeros(2), "latent": torch.zeros(1, 4, 2, 2), "image_latent": torch.zeros(1, 4, 2, 2),
               "image": torch.zeros(8, 8, 3, dtype=torch.uint8)}, str(tmp_path / "y.safetensors"))
    meta = {"format": "prompt2prompt-inversion", "version": 1, "method": "null-text", "prompt": "a cat",
            "num_inference_steps": 2, "guidance_scale": 7.5}
    (tmp_path / "y.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="lacks null_embeddings, which a null-text inversion needs"):
        Inversion.load(tmp_path / "y.safetensors")
    (tmp_path / "y.json").write_text(json.dumps({**meta, "method": None}))
    with pytest.raises(ValueError, match="names no inversion method"):
        Inversion.load(tmp_path / "y.safetensors")


@pytest.fixture(scope="module")
def null_inv(clip_tokenizer):
    from conftest import make_tiny_components

    pipe = make(make_tiny_components(clip_tokenizer, "sd1"))
    return pipe, pipe.invert(picture(), PROMPT, method="null-text", num_inference_steps=STEPS, num_inner_steps=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="a dog riding a bicycle"), "inverted with the prompt"),
        (dict(num_inference_steps=STEPS + 1), "num_inference_steps"),
        (dict(guidance_scale=3.0), "optimised for"),
        (dict(latents=torch.zeros(1, 4, 16, 16)), "latents and inversion"),
        (dict(eta=0.5), "eta=0"),
        (dict(negative_prompt="blurry"), "drop negative_prompt"),
        (dict(height=64), "height=64"),
        (dict(inversion="inv.safetensors"), "must be an Inversion"),
    ],
)
def test_bad_edit_arguments_with_an_inversion(null_inv, kwargs, message):
    pipe, inv = null_inv
    args = dict(prompt=PROMPT, edit_prompts=["a cat riding a car"], inversion=inv)
    args.update(kwargs)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            pipe(**args)
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="textual"), "inversion method must be one of"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inner_steps=0), "num_inner_steps"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(prompt=""), "prompt"),
        (dict(image=b"\x89PNG"), "must be a file path"),
        (dict(height=31), "multiple of"),
        (dict(cuda_graph=True), "needs the pipeline on a CUDA device"),
        (dict(cuda_graph=True, method="ddim"), "null-text inversion only"),
        (dict(cuda_graph="yes"), "cuda_graph must be True or False"),
    ],
)
def test_bad_invert_arguments(null_inv, kwargs, message):
    pipe, _ = null_inv
    args = dict(image=picture(), prompt=PROMPT)
    args.update(kwargs)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            pipe.invert(**args)
    finally:
        handle.remove()
    assert not calls


def test_inverting_a_png_file_with_alpha(tiny_sd1, tmp_path):
    buf = io.BytesIO()
    PIL.Image.fromarray(np.dstack([picture(size=(48, 32)), np.full((32, 48), 255, np.uint8)])).save(buf, format="PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(buf.getvalue())
    inv = make(tiny_sd1).invert(path, PROMPT, method="ddim", num_inference_steps=2)
    assert inv.image.shape == (32, 32, 3) and "centre-cropped from 48x32 to 32x32" in inv.info["preprocessing"]


# --------------------------------------------------------------------------- CUDA graphs (plumbing; the capture needs a GPU)


@pytest.fixture
def eps_setup(tiny_sd1):
    """The tiny UNet frozen as null-text inversion freezes it (restored after the test), inputs, and
    the eager prediction."""
    from prompt2prompt.inversion import predict_eps

    unet = tiny_sd1["unet"]
    state = [p.requires_grad for p in unet.parameters()]
    for p in unet.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=gen)  # (1, C, h, w)
    t = torch.tensor(500)
    states = torch.randn(1, 77, 32, generator=gen)  # (1, tokens, dim)

    def eager(latent, t, states):
        out = unet(latent, t, encoder_hidden_states=states, return_dict=False)[0].float()
        return predict_eps(out, latent, torch.tensor(0.5), "epsilon")

    yield unet, latent, t, states, eager
    for p, g in zip(unet.parameters(), state):
        p.requires_grad_(g)


def test_graphed_eps_replays_what_the_eager_loop_computes(eps_setup, monkeypatch):
    """With the capture replaced by the function itself, the wrapper must give the eager loop's
    prediction and gradient: its dtype casts, its copy out of the reused buffer, its alpha."""
    from prompt2prompt.inversion import graphed_eps

    unet, latent, t, states, eager = eps_setup
    captured = []
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda fn, sample: captured.append(sample) or fn)
    sample = (latent.clone(), t.clone(), states.clone().requires_grad_(True))
    eps, graphed = graphed_eps(unet, sample, lambda step: torch.tensor(0.5), "epsilon", eager)
    assert graphed and captured and captured[0][2].requires_grad
    a = states.clone().requires_grad_(True)
    b = states.clone().requires_grad_(True)
    with torch.enable_grad():
        fast, slow = eps(latent, t, a), eager(latent, t, b)
        fast.pow(2).mean().backward()
        slow.pow(2).mean().backward()
    assert torch.equal(fast, slow) and a.grad is not None and torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_capture_sample_shares_no_memory_with_the_inversion(dtype):
    """Replays overwrite the capture's inputs: x_T must not be one of them (in float32 a bare
    ``.to(dtype)`` is a view of it)."""
    from prompt2prompt.inversion import capture_sample

    trajectory = torch.randn(4, 4, 8, 8)  # (steps + 1, C, h, w)
    timesteps, uncond = torch.tensor([750, 500, 250]), torch.randn(1, 7, 16)
    latent, t, states = capture_sample(trajectory, timesteps, uncond, dtype)
    x_t = trajectory[0].clone()
    for buffer in (latent, t, states):
        buffer.data.fill_(0)  # what a replay does to its static inputs
    assert torch.equal(trajectory[0], x_t) and timesteps[0] == 750 and uncond.abs().sum() > 0
    assert latent.dtype == dtype and states.requires_grad and not uncond.requires_grad


def test_graphed_eps_falls_back_to_the_eager_loop_when_the_capture_fails(eps_setup, monkeypatch, caplog):
    from prompt2prompt.inversion import graphed_eps

    unet, latent, t, states, eager = eps_setup

    def refuse(fn, sample):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", refuse)
    with caplog.at_level("WARNING", logger="prompt2prompt.inversion"):
        eps, graphed = graphed_eps(unet, (latent, t, states.clone().requires_grad_(True)), lambda step: torch.tensor(0.5), "epsilon", eager)
    assert eps is eager and not graphed
    assert "CUDA graph capture failed" in caplog.text and "not permitted" in caplog.text
