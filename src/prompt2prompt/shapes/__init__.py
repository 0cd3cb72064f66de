"""The shapes world: a small rendered world of captioned 64x64 scenes, and the text-to-image model
trained on it.

``prompt2prompt.shapes.world`` renders the scenes (see its docstring and ``vocabulary.json``);
``tokenizer`` builds the model's BPE tokenizer from their captions.

Training, ``python -m prompt2prompt.shapes.train`` (``train`` is the command line): ``training`` (the
resumable run and its stages), ``data`` (batches of the scene stream, worker processes),
``objective`` (noise and learning-rate schedules, loss weights), ``grounding`` (the grounding
losses on the cross-attention maps), ``checkpoints`` (the run's files) and ``plots``.

Evaluation, ``python -m prompt2prompt.shapes.evaluate`` (``evaluate`` is the command line):
``detector`` (objects and their attributes in an image), ``metrics`` (PSNR, IoU, rank correlation,
intervals), ``evaluation`` (the parts that generate and score) and ``report`` (the table and its goals).
"""

from pathlib import Path

#: The bundled text-to-image model, a diffusers Stable Diffusion folder trained on the shapes world.
MODEL_DIR = Path(__file__).resolve().parent / "model"
