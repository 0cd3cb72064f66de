"""Print the size of a `SourcePass` at Stable Diffusion 1.5's architecture, from shapes alone.

The UNet is built on the ``meta`` device (its config is SD 1.5's: no weights are read or made)
and `source_pass.source_pass_bytes` adds up what `Prompt2PromptPipeline.source` keeps: 512 px
(64 x 64 latent), fp16, 50 steps, the default windows (cross 0.8, self 0.4, self-attention at
sides <= 16), CLIP's 77 tokens of width 768, a CUDA generator's 16-byte state.

Run: ``PYTHONPATH=src python docs/source_pass_size.py``
"""

import torch
from diffusers import UNet2DConditionModel

from prompt2prompt.arguments import default
from prompt2prompt.schedules import parse_window, step_window
from prompt2prompt.source_pass import source_pass_bytes

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8)


def main() -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15)
    steps = default("num_inference_steps")
    cross = step_window(parse_window(default("cross_replace_steps"), "cross_replace_steps"), steps)
    self_ = step_window(parse_window(default("self_replace_steps"), "self_replace_steps"), steps)
    size = source_pass_bytes(unet, (64, 64), steps, cross, self_, 16, torch.float16, 77, 768, generator_bytes=16)
    print(f"SourcePass at SD 1.5, 512 px, fp16, {steps} steps, cross {cross}, self {self_} at sides <= 16: "
          f"{size:,} bytes = {size / 1e9:.3f} GB ({size / 2**30:.3f} GiB)")


if __name__ == "__main__":
    main()
