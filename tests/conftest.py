"""Shared fixtures: a real CLIP BPE tokenizer built offline and tiny random SD-shaped models.

Nothing here downloads: the CLIP merges come from open_clip's wheel (installed with
``--no-deps``; we never import ``open_clip`` itself, because it imports torchvision).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch


#: Hypothesis profiles: "ci" (the default: few examples, derandomized so that CI is reproducible)
#: and "full" (``--slow`` or ``P2P_HYPOTHESIS_PROFILE=full``). Examples per test, in each profile.
HYPOTHESIS_EXAMPLES = {"ci": 30, "full": 1000}


def register_hypothesis_profiles(config) -> None:
    """Register and load the hypothesis profile of this run (tests/test_properties.py, tests/test_fuzz_files.py)."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # only the property tests need hypothesis (the test extra installs it)
        return
    quiet = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=HYPOTHESIS_EXAMPLES["ci"], deadline=None, derandomize=True,
                              suppress_health_check=quiet, print_blob=True)
    settings.register_profile("full", max_examples=HYPOTHESIS_EXAMPLES["full"], deadline=None, derandomize=False,
                              suppress_health_check=quiet, print_blob=True)
    full = config.getoption("--slow") or os.environ.get("P2P_HYPOTHESIS_PROFILE") == "full"
    settings.load_profile("full" if full else "ci")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table, in the order byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def build_clip_tokenizer_files(out_dir: Path) -> Path:
    """Write CLIP's vocab.json and merges.txt, derived from open_clip's BPE merge list."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is needed for its BPE file: pip install --no-deps open_clip_torch")
    bpe = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out_dir


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = build_clip_tokenizer_files(tmp_path_factory.mktemp("clip_tokenizer"))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def make_tiny_components(tokenizer, kind: str = "sd1", seed: int = 0) -> dict:
    """Tiny random models with the SD 1.x (epsilon) or SD 2.x (v-prediction, linear projections) layout.

    Latent side 16 (image 32 px, VAE factor 2); UNet attention at 16, 8 and 4 (mid).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    sd2 = kind == "sd2"
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


@pytest.fixture(scope="session")
def tiny_sd1(clip_tokenizer):
    return make_tiny_components(clip_tokenizer, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(clip_tokenizer):
    return make_tiny_components(clip_tokenizer, "sd2", seed=1)


def make_tokenizer_2(folder, max_length: int):
    """SDXL's second tokenizer: CLIP's BPE, padded with "!" (id 0) rather than end-of-text."""
    from transformers import CLIPTokenizer

    build_clip_tokenizer_files(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length, pad_token="!")


def make_tiny_xl(tokenizer, tokenizer_2, seed: int = 0) -> dict:
    """Latent side 16 (image 32 px, VAE factor 2); cross-attention at side 8 only (SDXL has none at
    the top level); text states 16 + 32 wide, pooled projection 24, time ids embedded 8 wide."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, pad_token_id=tokenizer.pad_token_id, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=24, pad_token_id=tokenizer_2.pad_token_id, **common))
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 + 32, attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=time_dim * 6 + 24, norm_num_groups=16,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4, norm_num_groups=16, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                unet=unet, scheduler=scheduler)


@pytest.fixture(scope="module")
def tiny_xl(clip_tokenizer, tmp_path_factory):
    tokenizer_2 = make_tokenizer_2(tmp_path_factory.mktemp("clip_tokenizer_2"), clip_tokenizer.model_max_length)
    assert tokenizer_2.pad_token_id == 0
    return make_tiny_xl(clip_tokenizer, tokenizer_2)


@pytest.fixture(scope="module")
def xl(tiny_xl):
    """A `Prompt2PromptXLPipeline` of the tiny SDXL components, progress bar off."""
    from prompt2prompt import Prompt2PromptXLPipeline

    pipe = Prompt2PromptXLPipeline(**tiny_xl)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_sd1):
    """A `Prompt2PromptPipeline` of the tiny SD 1.x model, no progress bar (a module may define its own)."""
    from prompt2prompt import Prompt2PromptPipeline

    p = Prompt2PromptPipeline(**tiny_sd1)
    p.set_progress_bar_config(disable=True)
    return p


@contextlib.contextmanager
def counting_unet_calls(pipe):
    """A list that grows by one at each UNet call of ``pipe`` while the block runs."""
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.fixture
def unet_calls(pipe):
    """`counting_unet_calls` of ``pipe`` for one test (bad input must make none)."""
    with counting_unet_calls(pipe) as calls:
        yield calls


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Give every test the thread count the session started with: a script's ``--threads 1`` run
    in-process must not change the float reductions, and so the pixels, of the tests after it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="run the heavy forms of the reliability tests (e.g. 20 kills instead of 3)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a heavy test, or the heavy form of one, that runs only with --slow")
    register_hypothesis_profiles(config)


@pytest.fixture(scope="session")
def slow_mode(request) -> bool:
    """Whether the run asked for the heavy forms (``pytest --slow``); the reduced forms run otherwise."""
    return bool(request.config.getoption("--slow"))
