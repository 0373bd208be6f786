"""Sizes a recipe or a saved model may ask for, and the shapes of the known data sets (pure, no torch).

The bounds are far above any real run and far below what would exhaust memory or run for
centuries: a recipe that checks clean should never ask for terabytes because of a typo.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MAX_CLASSES = 100_000
MAX_INPUT_SIDE = 16_384
MAX_INPUT_VALUES = 2**24  # one float32 example of at most 64 MiB (3 x 2048 x 2048 is 12.6M)
MAX_EPOCHS = 100_000
MAX_RANK = 65_536
MAX_BATCH_SIZE = 65_536
MAX_ATTACK_STEPS = 100_000
MAX_RESTARTS = 1_000
MAX_WORKERS = 1_024

# (channels, height, width) and classes of the data sets whose shape is fixed; imagenet folders
# hold images of any size (resized to the input) in RGB, and as many classes as they have folders.
FIXED_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
}
FOLDER_CHANNELS = 3
MIN_FOLDER_SIDE = 8  # the resize-and-crop works at any size, but below 8x8 too little of an image is left


def input_problem(shape: Sequence[int]) -> str | None:
    """Why an input shape ``[C, H, W]`` is too large to allocate, or None."""
    largest = max(shape, default=0)
    if largest > MAX_INPUT_SIDE:
        return f"an input side of {largest} is larger than {MAX_INPUT_SIDE}"
    values = math.prod(shape)
    if values > MAX_INPUT_VALUES:
        return (f"an input of {'x'.join(map(str, shape))} is {values:,} values per example, "
                f"more than {MAX_INPUT_VALUES:,} (64 MiB of float32)")
    return None
