"""The shapes world: a small rendered world of captioned 64x64 scenes, and the text-to-image model
trained on it.

``prompt2prompt.shapes.world`` renders the scenes (see its docstring and ``vocabulary.json``).
"""

from pathlib import Path

#: The bundled text-to-image model, a diffusers Stable Diffusion folder trained on the shapes world.
MODEL_DIR = Path(__file__).resolve().parent / "model"
