"""The training data: batches of the scene stream, rendered here or ahead in worker processes.

Scene ``k`` of the stream is rendered from seed ``k``, so a batch is the same wherever it is made.
"""

from __future__ import annotations

import numpy as np
import torch

from . import world
from .grounding import REGIONS, grounding_targets


def render_range(start: int, size: int, split: str = "train") -> tuple[np.ndarray, list[str]]:
    """Scenes ``start .. start+size-1`` of the stream: uint8 ``(batch, h, w, 3)`` and captions."""
    images, captions = world.render_batch(list(range(start, start + size)), split)
    return images, list(captions)


def batch_images(start: int, size: int, split: str = "train") -> tuple[torch.Tensor, list[str]]:
    """Scenes ``start .. start+size-1`` of the stream as ``(batch, 3, 64, 64)`` in [-1, 1] and captions."""
    images, captions = render_range(start, size, split)
    return images_to_tensor(images), captions


def images_to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``(batch, h, w, 3)`` -> float ``(batch, 3, h, w)`` in [-1, 1] on ``device``. The bytes
    travel and the floats are made there (a quarter of the transfer; the same values on any device)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)  # (batch, h, w, 3) uint8
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (batch, 3, h, w)


def render_grounded(start: int, size: int, tokenizer) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Scenes ``start .. start+size-1`` of the training stream with their `grounding_targets`:
    uint8 images (batch, h, w, 3), captions, masks (batch, regions, h, w) bool, regions (batch, max_length) int8."""
    images = np.empty((size, world.SIZE, world.SIZE, 3), np.uint8)
    masks = np.empty((size, REGIONS, world.SIZE, world.SIZE), bool)
    regions = np.empty((size, int(tokenizer.model_max_length)), np.int8)
    captions = []
    for i in range(size):
        scene = world.sample_scene(start + i)
        images[i] = scene.image
        masks[i], regions[i] = grounding_targets(scene.spec, scene.filled, tokenizer)
        captions.append(scene.spec.caption)
    return images, captions, masks, regions


_WORKER_TOKENIZER = None


def _worker_init(tok_dir: str | None) -> None:
    """Set up a rendering worker: one torch thread, and the tokenizer of ``tok_dir`` if given."""
    global _WORKER_TOKENIZER
    torch.set_num_threads(1)
    if tok_dir is not None:
        from transformers import CLIPTokenizer

        _WORKER_TOKENIZER = CLIPTokenizer.from_pretrained(tok_dir)


def _render(start: int, size: int, tokenizer, grounding: bool) -> tuple:
    """One batch: images, captions, token ids (None without a tokenizer) and, with ``grounding``,
    ``(masks, regions)`` of `render_grounded` (else None)."""
    targets = None
    if grounding:
        images, captions, masks, regions = render_grounded(start, size, tokenizer)
        targets = (masks, regions)
    else:
        images, captions = render_range(start, size)
    ids = None
    if tokenizer is not None:
        ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="np").input_ids
    return images, captions, ids, targets


def _render_job(start: int, size: int, grounding: bool = False) -> tuple:
    """One batch rendered (and tokenized, if the worker has a tokenizer) in a worker process (`_render`)."""
    return _render(start, size, _WORKER_TOKENIZER, grounding)


class Batches:
    """Batches ``first, first+1, ...`` of the scene stream, rendered ahead by ``workers`` processes.

    Batch ``k`` is always scenes ``offset + k*size ..`` so the stream is the same with any number of
    workers (or none); at most ``2*workers`` batches are in flight, so memory stays bounded.
    """

    def __init__(self, first: int, size: int, offset: int, workers: int, tok_dir: str | None, grounding: bool = False):
        self.next, self.size, self.offset, self.grounding = first, size, offset, grounding
        if grounding and tok_dir is None:
            raise ValueError("grounding targets need the tokenizer (tok_dir)")
        self.tok_dir, self.pool, self.pending = tok_dir, None, []
        self.tokenizer = None
        if workers > 0:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(workers, _worker_init, (tok_dir,))
            self.depth = 2 * workers
        elif tok_dir is not None:
            from transformers import CLIPTokenizer

            self.tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    def _submit(self) -> None:
        start = self.offset + self.next * self.size
        self.pending.append(self.pool.apply_async(_render_job, (start, self.size, self.grounding)))
        self.next += 1

    def get(self) -> tuple[np.ndarray, list[str], torch.Tensor | None, tuple | None]:
        """The next batch: uint8 images ``(batch, h, w, 3)``, captions, token ids (or None), and
        with ``grounding`` the `render_grounded` masks and regions as tensors (else None)."""
        if self.pool is None:
            images, captions, ids, targets = _render(self.offset + self.next * self.size, self.size, self.tokenizer, self.grounding)
            self.next += 1
        else:
            while len(self.pending) < self.depth:
                self._submit()
            images, captions, ids, targets = self.pending.pop(0).get()
            self._submit()
        ids = None if ids is None else torch.from_numpy(ids)
        if targets is not None:
            targets = tuple(torch.from_numpy(t) for t in targets)
        return images, captions, ids, targets

    def close(self) -> None:
        """Stop the workers (batches in flight are dropped)."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
