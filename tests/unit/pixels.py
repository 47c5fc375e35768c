"""What the model actor makes of the pixels the prepare stage ships: the comparison every faithfulness test needs."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.generator import scale_pixels
from pipeline.inputs import PixelScaling


def model_pixels(processor, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """`arrays["pixel_values"]` as the model receives them: scaled by the processor's own settings."""
    pixels = torch.from_numpy(arrays["pixel_values"])
    return scale_pixels(pixels, PixelScaling.of(processor.image_processor)).numpy()
