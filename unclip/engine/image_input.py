"""Images going in: reading them safely, and preprocessing them for the CLIP image encoder.

Plain PIL, numpy and torch, so a serving process needs no transformers: the steps are those of
transformers' CLIPImageProcessor (convert to RGB, resize the shorter side, centre crop, rescale,
normalise), reproduced to the same float32 values. A model states its preprocessing in one of two
files, both read into `ImagePreprocess`:

* diffusers' UnCLIPImageVariationPipeline layout: `feature_extractor/preprocessor_config.json`
  (a CLIPImageProcessor config), read by `from_clip_processor`;
* ours (the demo model, checkpoints we save, ONNX artifacts): `image_encoder/preprocess.json`,
  the fields of `ImagePreprocess` as JSON, which can also say "area" resizing and that the decoder
  reads the embedding L2-normalised (the demo was trained so).

Reading is bounded: the pixel count is checked from the file's header before anything is decoded,
and only common formats are decoded at all.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass
from torch.nn import functional as F

from unclip.errors import UnclipError, schema_error

PREPROCESS_FILE = "preprocess.json"  # ours, inside image_encoder/ (and in an artifact folder)
CLIP_PROCESSOR_FILE = "preprocessor_config.json"  # diffusers', inside feature_extractor/
# What is decoded at all: the formats people send, not every codec PIL carries (each is attack surface).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

Side = Annotated[int, Field(ge=1, le=4096)]
Channels = tuple[float, float, float]


@dataclass(frozen=True, config=ConfigDict(strict=True, extra="forbid"))
class ImagePreprocess:
    """How an image becomes the image encoder's `pixel_values`, and what the decoder reads of its output."""

    size: Side  # the shorter side after resizing (the aspect ratio is kept)
    crop: Side  # the side of the centre crop: the encoder's image_size
    resample: Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos", "area"]
    mean: Channels = (0.0, 0.0, 0.0)  # per channel, after rescaling
    std: Channels = (1.0, 1.0, 1.0)
    rescale: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1 / 255
    # True: the decoder (and the prior's statistics) live on the unit sphere, so the encoder's
    # embedding is L2-normalised before use. diffusers' variation pipeline uses it as it comes.
    normalize_embeds: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.crop > self.size:
            raise ValueError(f"crop {self.crop} is larger than the resized shorter side {self.size}")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)) or min(self.std) <= 0:
            raise ValueError("mean and std must be finite and std positive")
        return self

    def to_dict(self) -> dict:
        return {"size": self.size, "crop": self.crop, "resample": self.resample, "mean": list(self.mean),
                "std": list(self.std), "rescale": self.rescale, "normalize_embeds": self.normalize_embeds}


def clip_preprocess(image_size: int) -> ImagePreprocess:
    """OpenAI CLIP's preprocessing at `image_size` (what CLIPImageProcessor does by default)."""
    return ImagePreprocess(size=image_size, crop=image_size, resample="bicubic", mean=OPENAI_CLIP_MEAN,
                           std=OPENAI_CLIP_STD)


def read_preprocess(path: Path, fix: str) -> ImagePreprocess:
    """Our preprocess.json (strict: every key known, JSON types as written)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UnclipError(f"{path} cannot be read ({exc.strerror or exc}); {fix}") from None
    try:
        return TypeAdapter(ImagePreprocess).validate_json(raw, strict=True)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            raise UnclipError(f"{path} is not valid JSON; {fix}") from None
        raise schema_error(exc, where=f"{path}: ", fix=fix) from None


def from_clip_processor(config: dict, where: str, fix: str) -> ImagePreprocess:
    """A CLIPImageProcessor config (diffusers' feature_extractor/preprocessor_config.json, any
    transformers version's spelling: `size` 224 or {"shortest_edge": 224}, `crop_size` 224 or
    {"height": 224, "width": 224})."""
    def fail(problem: str) -> UnclipError:
        return UnclipError(f"{where}: {problem}; {fix}")

    if not isinstance(config, dict):
        raise fail(f"must be a JSON object, got {type(config).__name__}")
    for flag in ("do_resize", "do_center_crop"):
        if config.get(flag, True) is not True:
            raise fail(f"{flag} is {config[flag]!r}: the image encoder needs a square input of a fixed size, "
                       "which the resize and centre crop make; set it to true")
    size, crop = config.get("size", 224), config.get("crop_size", 224)
    if isinstance(size, dict):
        if set(size) != {"shortest_edge"}:
            raise fail(f"size {size} is not supported: CLIP resizes the shorter side, "
                       "{\"shortest_edge\": N}")
        size = size["shortest_edge"]
    if isinstance(crop, dict):
        if set(crop) != {"height", "width"} or crop["height"] != crop["width"]:
            raise fail(f"crop_size {crop} must be square, {{\"height\": N, \"width\": N}}")
        crop = crop["height"]
    resample = config.get("resample", 3)
    if resample not in PIL_RESAMPLE:
        raise fail(f"resample {resample!r} is not a PIL filter number (0..5; CLIP uses 3, bicubic)")
    normalize, rescale = config.get("do_normalize", True), config.get("do_rescale", True)
    try:
        return ImagePreprocess(
            size=size, crop=crop, resample=PIL_RESAMPLE[resample],
            mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)) if normalize else (0.0, 0.0, 0.0),
            std=tuple(config.get("image_std", OPENAI_CLIP_STD)) if normalize else (1.0, 1.0, 1.0),
            rescale=float(config.get("rescale_factor", 1 / 255)) if rescale else 1.0)
    except (ValidationError, TypeError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            raise schema_error(exc, where=f"{where}: ", fix=fix) from None
        raise fail(str(exc)) from None


# -- reading images ------------------------------------------------------------------------------

def load_image(source, max_pixels: int, name: str = "image") -> Image.Image:  # noqa: F821
    """An RGB PIL image from a path, encoded bytes, a PIL image, an HxWx3 array (uint8, or float in
    [0, 1] as `output_type="np"` gives) or a 3xHxW tensor in [0, 1] (`output_type="pt"`). A file is
    checked against `max_pixels` from its header, before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, name)
        return source.convert("RGB")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _from_array(source, max_pixels, name)
    if isinstance(source, (bytes, bytearray)):
        opener = lambda: io.BytesIO(source)  # noqa: E731
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise UnclipError(f"{name} {str(path)!r} does not exist or is not a file", param="image")
        opener, name = (lambda: open(path, "rb")), f"{name} {str(path)!r}"  # noqa: E731
    else:
        raise UnclipError(f"{name} must be a file path, PNG/JPEG bytes, a PIL image, an HxWx3 array or a "
                          f"3xHxW tensor, got {type(source).__name__}", param="image")
    try:
        with opener() as f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f, formats=IMAGE_FORMATS) as img:  # reads the header only
                _check_pixels(img.size, max_pixels, name)
                img.seek(0)  # an animation's first frame
                return img.convert("RGB")  # decodes
    except UnidentifiedImageError:
        raise UnclipError(f"{name} is not an image unclip reads ({', '.join(IMAGE_FORMATS)}); give a PNG",
                          param="image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnclipError(f"{name} declares more pixels than PIL decodes safely ({exc}); send an image of at "
                          f"most {max_pixels:,} pixels", param="image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's ways of saying corrupt or truncated
        detail = str(exc)[:120] or type(exc).__name__
        raise UnclipError(f"{name} cannot be decoded ({detail}): it is corrupt or truncated",
                          param="image") from None


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise UnclipError(f"{name} is empty ({width}x{height} pixels)", param="image")
    if width * height > max_pixels:
        raise UnclipError(f"{name} is {width}x{height} = {width * height:,} pixels, above the limit of "
                          f"{max_pixels:,} (Limits.max_image_pixels); send a smaller image (it is resized "
                          "to the encoder's input anyway)", param="image")


def _from_array(x, max_pixels: int, name: str):
    from PIL import Image

    if isinstance(x, torch.Tensor):  # CHW in [0, 1], as output_type="pt" gives
        if x.dim() != 3 or x.shape[0] != 3:
            raise UnclipError(f"{name}: a tensor image must be 3xHxW in [0, 1], got shape {tuple(x.shape)}",
                              param="image")
        x = x.detach().cpu().float().permute(1, 2, 0).numpy()
    if x.ndim != 3 or x.shape[2] != 3:
        raise UnclipError(f"{name}: an array image must be HxWx3, got shape {x.shape}", param="image")
    _check_pixels((x.shape[1], x.shape[0]), max_pixels, name)
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise UnclipError(f"{name}: an array image must be uint8, or float in [0, 1] (as "
                              f"output_type='np' gives), got {x.dtype} in [{x.min()}, {x.max()}]",
                              param="image")
        x = (x * 255).round().astype(np.uint8)  # as generate's PIL output rounds
    return Image.fromarray(np.ascontiguousarray(x))


# -- preprocessing -------------------------------------------------------------------------------

def pixel_values(images: list, pre: ImagePreprocess) -> torch.Tensor:
    """[N, 3, crop, crop] float32: CLIPImageProcessor's steps on RGB PIL images."""
    return torch.stack([_preprocess(image, pre) for image in images])


def _preprocess(image, pre: ImagePreprocess) -> torch.Tensor:
    from PIL import Image

    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(pre.size * long / short)  # as transformers rounds (down)
    new_w, new_h = (pre.size, new_long) if width <= height else (new_long, pre.size)
    if pre.resample == "area":  # a plain average over each output pixel's footprint (torch's "area")
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(new_h, new_w), mode="area")[0].numpy()
    else:  # PIL on uint8, exactly as CLIPImageProcessor resizes
        resized = image.resize((new_w, new_h), resample=getattr(Image.Resampling, pre.resample.upper()))
        x = np.asarray(resized).transpose(2, 0, 1)
    top, left = (new_h - pre.crop) // 2, (new_w - pre.crop) // 2
    x = x[:, top:top + pre.crop, left:left + pre.crop]
    x = (x.astype(np.float64) * pre.rescale).astype(np.float32)  # transformers rescales in float64
    mean, std = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (pre.mean, pre.std))
    return torch.from_numpy(np.ascontiguousarray((x - mean) / std))
