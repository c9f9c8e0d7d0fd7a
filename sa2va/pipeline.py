"""Image preprocessing off the GPU's critical path.

`prepare_images` (PIL resizes to the ViT tiles and the SAM2 input, normalisation) costs about
25 ms of CPU per 512 px image, done in series it left the GPU idle for a third of the forward
path at the 26B shape (docs/performance.md). Here each image is prepared in a thread pool (PIL
and numpy release the GIL while they work), up to `ahead` chunks before the GPU needs them, so
the next chunk is ready when the current one leaves the GPU. On CUDA each chunk is joined and
page-locked in the pool too, so `to_device` copies it without the host waiting for the GPU.
Results are the same tensors.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch

from .model import SegInputs, prepare_images


def prepared_chunks(sa2va: Any, images: list[np.ndarray], batch_size: int, workers: int | None = None,
                    ahead: int = 2) -> Iterator[tuple[int, SegInputs]]:
    """(start index, prepared inputs) of each chunk of `batch_size` images, prepared ahead in
    threads (page-locked on CUDA)."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    pin = sa2va.device.type == "cuda"

    def join(futures: list[Future]) -> SegInputs:
        # Its images were queued before it, and the pool takes work first in, first out: they run
        # (or ran) on other workers, so waiting here cannot starve them.
        chunk = SegInputs.cat([f.result() for f in futures])
        return chunk.pin_memory() if pin else chunk  # pinned after the join: cat makes a new tensor

    starts = list(range(0, len(images), batch_size))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()

        def submit(k: int) -> None:
            if k < len(starts):
                chunk = images[starts[k]:starts[k] + batch_size]
                futures = [pool.submit(prepare_images, sa2va, [image]) for image in chunk]
                pending.append((starts[k], pool.submit(join, futures)))

        for k in range(ahead):
            submit(k)
        for k in range(len(starts)):
            start, joined = pending.popleft()
            submit(k + ahead)
            yield start, joined.result()


def to_device(inputs: SegInputs, device: torch.device) -> SegInputs:
    """The chunk's pixels on `device`; from page-locked memory the copy joins the stream's queue
    (`non_blocking`) instead of making the host wait for the GPU to drain."""
    return SegInputs(inputs.vit_pixels.to(device, non_blocking=True), inputs.tiles,
                     inputs.sam_pixels.to(device, non_blocking=True), inputs.sizes, inputs.layouts)
