"""Measure the bundled model in the shapes world, where the truth of every pixel is known.

A detector segments objects against a plain background, and classifies them with the renderer's
own definitions: shape and size by fitting its shapes to the filled silhouette, filled or outlined
(and circle or ring) by comparing the drawn pixels with the renderer's drawing of each variant,
colour as the nearest canonical colour of the un-blended pixels, and stripes or dots by whether
the off-colour pixels follow the renderer's stripe period or dot grid. A component that covers
much of the image border is the background itself, not an object:
when the model paints the background in another colour than the prompt's, nothing is detected (the
scene fails). The detector is checked on rendered scenes first (`detector_accuracy`). For styled
images, whose background is no longer the plain colour, a looser segmentation (`foreground`) is used.
The evaluation then generates with the model and scores (the parts of ``--parts``):

- ``adherence``: plain generation on held-out colour/shape pairs (colour, shape);
- ``adherence_train``: the same on colour/shape pairs seen in training, with the same prompt form,
  which separates undertraining (both low) from a failure to generalise (held-out pairs lower);
- ``swap``: word swap with Prompt-to-Prompt against "same seed, no injection": target shape /
  colour rate, median centroid shift, median mask IoU between source and edit;
- ``blend``: LocalBlend: PSNR between source and edit outside the edited object's region;
- ``two_objects``: two objects and a relation (training pairs): both present, relation correct;
- ``two_objects_held_out``: the same with held-out pairs (the prompts of the issue's two-object goal);
- ``refine``: adding a pattern word (object kept, pattern shown) and a global style (layout kept);
- ``reweight``: attention re-weighting of a pattern or colour word over factors -2..2: Spearman's
  rho between the factor and the measured effect;
- ``sweep``: shape word swaps with cross-attention injected for 0..100% of the steps: structure
  kept (mask IoU) and target-shape rate at each value, against no injection;
- ``reconstruction``: the autoencoder alone (no generation): PSNR of rendered held-out scenes
  through encode (latent mean) and decode, over the whole image, the objects and the background;
  and the detector's accuracy on single-object scenes after that round trip, the ceiling the
  autoencoder sets on every generation figure;
- ``localisation``: whether the cross-attention maps bind the caption's words to the object's
  pixels, on rendered scenes noised to several levels (no generation; `eval_localisation`);
- ``blend_sides``: ``blend``'s prompts and seeds with LocalBlend's mask taken from each side of
  cross-attention map the UNet has, not only the default (a diagnostic; `eval_blend_sides`).

Every part also scores the rendered (ground-truth) scenes of its own prompts where that makes sense
(``rendered``): the ceiling that the detector allows.

    python -m prompt2prompt.shapes.evaluate [--model DIR] [--samples 16] [--steps 30] [--parts a,b] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os

# The evaluation's public names, re-exported for code that imports them from the CLI module.
from .detector import (  # noqa: F401
    Detection, border_colour, colour_strength, convex_hull, detect, detector_accuracy, dot_strength, foreground,
    pattern_strength, stripe_fit, stripe_phase,
)
from .evaluation import (  # noqa: F401
    LOCALISATION_ROLES, LOCALISATION_TIMESTEPS, PARTS, RECONSTRUCTION_SCENES_PER_SAMPLE, REWEIGHT_FACTORS, SWEEP_STEPS,
    autoencoder_round_trip, cross_attention_of, eval_adherence, eval_adherence_train, eval_blend_sides, eval_local_blend,
    eval_localisation, eval_reconstruction, eval_refine, eval_reweight, eval_sweep, eval_two_objects,
    eval_two_objects_held_out, eval_word_swap, evaluate_model,
)
from .metrics import PSNR_CEILING_DB, relation_holds, spearman, wilson_interval  # noqa: F401
from .report import format_table, summary_rows  # noqa: F401


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector-only", action="store_true", help="only check the detector on rendered scenes")
    parser.add_argument("--n", type=int, default=300, help="rendered scenes for the detector check")
    parser.add_argument("--detector-seed", type=int, default=0, help="draw the detector check's scenes from this seed")
    parser.add_argument("--model", default=None, help="a diffusers folder (default: the bundled model)")
    parser.add_argument("--samples", type=int, default=16, help="generations (prompts) per measured figure")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {','.join(PARTS)}")
    if args.n < 1:
        parser.error(f"--n must be a positive number of scenes, got {args.n}")
    if args.samples < 1 or args.steps < 1:
        parser.error(f"--samples and --steps must be positive, got {args.samples} and {args.steps}")
    result = {"detector": detector_accuracy(args.n, args.detector_seed)}
    for k, v in result["detector"].items():
        print(f"detector {k:17s} {v:6.1%}")
    if not args.detector_only:
        import torch

        from ..pipeline import Prompt2PromptPipeline

        torch.manual_seed(0)
        pipe = Prompt2PromptPipeline.from_pretrained(args.model)
        pipe.set_progress_bar_config(disable=True)
        result["model"] = evaluate_model(pipe, args.samples, args.steps, args.guidance, args.seed, parts)
        print(json.dumps(result["model"], indent=1))
        print()
        print(format_table(result["model"]))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
