"""Train the bundled shapes-world text-to-image model (latent diffusion, the Stable Diffusion stack).

Stages of one resumable run folder:
1. ``vae``: a small `AutoencoderKL` (64x64x3 -> 16x16x4) on rendered scenes;
2. ``unet``: a `UNet2DConditionModel` and a `CLIPTextModel` trained together from scratch on the
   frozen autoencoder's latents, epsilon prediction, SD's noise schedule, 10% empty captions for
   classifier-free guidance, an EMA of the weights, learning-rate warm-up and cosine decay;
3. ``decoder`` (optional, at any time): the autoencoder's decoder alone, fine-tuned on the frozen
   encoder's latent means. The encoder, and so the latent space the UNet learned, stays bit for
   bit the same, so this can improve a trained model's pictures without retraining its UNet.

Every run is deterministic: scene ``k`` of the data stream is rendered from seed ``k``, and each
step's noise comes from a generator seeded by the step. A run stops after ``--minutes`` and writes
its state; the same command resumes it. Checkpoint files are safetensors of at most 16 MB each.

    python -m prompt2prompt.shapes.train RUN_DIR --stage vae --steps 3000 --minutes 10
    python -m prompt2prompt.shapes.train RUN_DIR --stage unet --steps 200000 --minutes 10
    python -m prompt2prompt.shapes.train RUN_DIR --export src/prompt2prompt/shapes/model
    python -m prompt2prompt.shapes.train RUN2 --init src/prompt2prompt/shapes/model --stage unet --minutes 10 --export OUT
    python -m prompt2prompt.shapes.train RUN3 --init src/prompt2prompt/shapes/model --stage decoder --minutes 60 --export OUT
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

# The training code's public names, re-exported for code that imports them from the CLI module.
from .checkpoints import MAX_FILE_BYTES, load_optimizer, load_sharded, optimizer_tensors, save_sharded  # noqa: F401
from .data import Batches, batch_images, images_to_tensor, render_grounded, render_range  # noqa: F401
from .grounding import (  # noqa: F401
    BACKGROUND_REGION, GroundingAttnProcessor, backward_split, check_grounding_sides, grounding_attention, grounding_loss,
    grounding_share_loss, grounding_targets, map_sides,
)
from .objective import SCHEDULE, fit_total, lr_at, min_snr_weights, training_noise  # noqa: F401
from .plots import plot_loss
from .training import Run, chunk_record, model_configs, unet_config  # noqa: F401


def _parser() -> argparse.ArgumentParser:
    """The command line's options (the module docstring is its description)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--stage", choices=("vae", "unet", "decoder"), default=None,
                        help="vae, then unet; decoder fine-tunes the autoencoder's decoder alone (keeps the latent space)")
    parser.add_argument("--steps", type=int, default=None,
                        help="total steps of the stage (the run stops there; default: fitted so that the first chunk ends after --minutes)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=10.0, help="stop and checkpoint after this long")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of this process (default: torch's, or with --workers the cores the workers leave)")
    parser.add_argument("--workers", type=int, default=0, help="processes that render batches ahead (0: render in the training loop)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: vae 1e-3, unet 3e-4, decoder 1e-4)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: min(vae 200 | unet 1000 | decoder 100, total/10))")
    parser.add_argument("--offset-noise", type=float, default=0.0, metavar="S",
                        help="add S * N(0,1) per sample and channel to the training noise (e.g. 0.1), so that "
                             "flat colours come from the caption, not from the starting noise's mean")
    parser.add_argument("--min-snr", type=float, default=0.0, metavar="GAMMA",
                        help="weight each sample's loss by min(SNR, GAMMA) / SNR (Min-SNR-gamma, e.g. 5; 0: off)")
    parser.add_argument("--grounding", type=float, default=0.0, metavar="W",
                        help="add W x a token grounding loss on the cross-attention maps (TokenCompose's L_token; "
                             "object and background words attend to their own pixels), e.g. 0.05; 0: off")
    parser.add_argument("--grounding-share", type=float, default=0.0, metavar="W",
                        help="add W x the pixel side of the grounding loss (each region's words hold its pixels' "
                             "attention, so that re-weighting and LocalBlend act there), e.g. 0.05; 0: off")
    parser.add_argument("--grounding-sides", default=None, metavar="SIDES",
                        help="comma-separated square sides of the cross-attention maps the grounding losses act on "
                             "(e.g. 8,4 for the shapes model's two coarsest levels; default: every layer)")
    parser.add_argument("--grounding-no-text", action="store_true",
                        help="keep the grounding losses' gradient out of the text encoder (it still learns from the "
                             "diffusion loss); the losses then train the UNet only (a second backward pass)")
    parser.add_argument("--grounding-share-words", action="store_true",
                        help="take --grounding-share's share among the caption's words only, so that the start token "
                             "and the padding keep their attention")
    parser.add_argument("--init", default=None, metavar="MODEL_DIR",
                        help="start a new run from an exported model (e.g. the shipped one) instead of random weights; "
                             "training accumulates across machines without carrying optimizer state")
    parser.add_argument("--export", default=None, metavar="DIR", help="write the EMA model as a diffusers folder")
    parser.add_argument("--plot", default=None, metavar="PNG", help="draw RUN_DIR/loss.csv (or RUN_DIR itself, if it is a CSV) and exit")
    return parser


def _grounding_sides(parser: argparse.ArgumentParser, args) -> tuple[int, ...] | None:
    """Check the loss settings (exit 2 on a bad one, before the run folder is made); return
    ``--grounding-sides`` as a tuple of sides, checked against the model's (None: every layer)."""
    for flag, value in (("--offset-noise", args.offset_noise), ("--min-snr", args.min_snr), ("--grounding", args.grounding),
                        ("--grounding-share", args.grounding_share)):
        if not value >= 0:  # also catches nan
            parser.exit(2, f"error: {flag} must be a number >= 0 (0: off), got {value}\n")
    if (args.grounding_sides is not None or args.grounding_no_text) and not (args.grounding > 0 or args.grounding_share > 0):
        parser.exit(2, "error: --grounding-sides and --grounding-no-text set how the grounding losses act; "
                       "add --grounding W and/or --grounding-share W\n")
    if args.grounding_share_words and not args.grounding_share > 0:
        parser.exit(2, "error: --grounding-share-words sets how --grounding-share's loss is taken; add --grounding-share W\n")
    if args.grounding_sides is None:
        return None
    try:
        sides = tuple(int(v) for v in args.grounding_sides.split(","))
    except ValueError:
        sides = ()
    if not sides or min(sides) < 1:
        parser.exit(2, f"error: --grounding-sides takes positive integers separated by commas (e.g. 8,4), got {args.grounding_sides!r}\n")
    from diffusers import UNet2DConditionModel

    try:
        check_grounding_sides(UNet2DConditionModel(**unet_config()), sides)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    return sides


def main(argv=None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.workers > 0:  # the rendering workers busy their own cores: more threads here would oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - args.workers))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.plot:
        csv = Path(args.run_dir)
        print(plot_loss(csv if csv.suffix == ".csv" else csv / "loss.csv", args.plot))
        return
    sides = _grounding_sides(parser, args)
    try:
        run = Run(args.run_dir, args.device, init=args.init)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    run.command = shlex.join(["python", "-m", "prompt2prompt.shapes.train", *(sys.argv[1:] if argv is None else argv)])
    if args.stage == "vae":
        run.train_vae(args.steps, args.batch, args.minutes, workers=args.workers, lr=args.lr or 1e-3, warmup=args.warmup)
        print(f"vae step {run.state['vae_step']}")
    elif args.stage == "unet":
        run.train_unet(args.steps, args.batch, args.minutes, workers=args.workers, lr=args.lr or 3e-4, warmup=args.warmup,
                       offset_noise=args.offset_noise, min_snr_gamma=args.min_snr, grounding=args.grounding,
                       grounding_share=args.grounding_share, grounding_sides=sides, grounding_text=not args.grounding_no_text,
                       grounding_share_words=args.grounding_share_words)
        print(f"unet step {run.state['unet_step']}")
    elif args.stage == "decoder":
        run.train_decoder(args.steps, args.batch, args.minutes, workers=args.workers, lr=args.lr or 1e-4, warmup=args.warmup)
        print(f"decoder step {run.state['decoder_step']}")
    if args.export:
        print(run.export(args.export))


if __name__ == "__main__":
    main()
