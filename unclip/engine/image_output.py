"""The pipeline's images as the caller asked for them: PIL images, an NHWC array or an NCHW tensor.

Its own module so that the pipeline and the image-conditioned entry points (which the pipeline
calls) both use it without importing each other.
"""

from __future__ import annotations

import numpy as np
import torch


def convert_images(images: torch.Tensor, output_type: str) -> list | np.ndarray | torch.Tensor:
    """NCHW float images in [0, 1] as the caller asked: "pil", "np" (NHWC) or "pt" (NCHW)."""
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).numpy()
    return array if output_type == "np" else to_pil(array)


def to_pil(array: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(img) for img in (array * 255).round().astype("uint8")]
