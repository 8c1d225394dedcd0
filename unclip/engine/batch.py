"""Requests in one sampling batch: whose rows are where, and dropping the ones that left.

A batch is several callers' requests run as one set of network calls. Each request owns a
contiguous block of rows (its prompts, each repeated `num_images` times) and its own noise
generator, so its images do not depend on who else is in the batch. A request whose caller
left (disconnected, deadline passed) is dropped between two denoising steps: its rows are
taken out of every tensor of the stage, and the other rows are not touched.

An image-conditioned request (a variation, an interpolation frame, a text diff) brings its CLIP
image embedding, or the pixels to compute it from, and skips the prior: it batches only with
others of its kind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from unclip.errors import UnclipError

log = logging.getLogger("unclip")
PartialCallback = Callable[[int, torch.Tensor], None]  # (partial image index, [rows, 3, H, W] in [0, 1])


@dataclass
class Request:
    """One caller's share of a batch. `cancelled` is polled before every denoising step."""

    prompts: list[str]  # image-conditioned: the decoder's caption of each image ("", as diffusers has it)
    settings: object  # unclip.engine.settings.GenerationSettings (validated)
    generator: torch.Generator
    cancelled: Callable[[], bool] | None = None
    # Image-conditioned requests give one of these, one row per prompt: the embedding in the space
    # the decoder reads (Pipeline.encode_images), or the image encoder's input, encoded in the batch.
    image_embeds: torch.Tensor | None = None  # [len(prompts), clip_dim]
    pixel_values: torch.Tensor | None = None  # [len(prompts), 3, S, S]
    # Streaming: up to `partial_images` previews, each handed to on_partial(index, images) on the
    # sampling thread as [rows, 3, H, W] float32 in [0, 1] on the CPU at the output size (see
    # partial_steps). They do not enter batch_key: requests that stream batch with those that don't.
    partial_images: int = 0
    on_partial: PartialCallback | None = None
    partials_sent: int = 0

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.settings.num_images

    @property
    def image_conditioned(self) -> bool:
        return self.image_embeds is not None or self.pixel_values is not None

    @property
    def batch_key(self):
        """Requests with equal keys can share a batch: everything but the image count must agree,
        and text and image-conditioned requests do not mix (only the first run the prior)."""
        return replace(self.settings, num_images=1), self.image_conditioned


class Batch:
    """The requests still running, in row order."""

    def __init__(self, requests: list[Request]):
        if not requests:
            raise UnclipError("a batch needs at least one request")
        keys = {r.batch_key for r in requests}
        if len(keys) > 1:
            raise UnclipError(f"requests in one batch must share steps, guidance and prior, and be all text "
                              f"or all image-conditioned; got {len(keys)} different kinds (batch compatible "
                              "requests only)")
        self.requests = list(requests)
        self.active = list(range(len(requests)))  # indices into self.requests
        self.settings = requests[0].settings
        self.image_conditioned = requests[0].image_conditioned

    @property
    def rows(self) -> int:
        return sum(self.requests[i].rows for i in self.active)

    def draw(self, shape: tuple[int, ...], noisy_steps: list[bool],
             device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Each request's initial latents, then one noise tensor per noisy step, drawn from its own
        generator in diffusers' order (as if it ran alone), concatenated in row order."""
        latents, noise = [], []
        for i in self.active:
            r = self.requests[i]
            rows = (r.rows, *shape)
            latents.append(torch.randn(rows, generator=r.generator))
            noise.append([torch.randn(rows, generator=r.generator) if has else None for has in noisy_steps])
        per_step = [torch.cat([n[k] for n in noise]).to(device) if has else None
                    for k, has in enumerate(noisy_steps)]
        return torch.cat(latents).to(device), per_step

    def poll(self) -> torch.Tensor | None:
        """Drop cancelled requests. Returns the indices of the rows that stay (into the current
        rows), or None when nothing changed."""
        leaving = {i for i in self.active if (c := self.requests[i].cancelled) is not None and c()}
        if not leaving:
            return None
        keep, start = [], 0
        for i in self.active:
            rows = self.requests[i].rows
            if i not in leaving:
                keep.extend(range(start, start + rows))
            start += rows
        self.active = [i for i in self.active if i not in leaving]
        return torch.tensor(keep, dtype=torch.long)

    def previews_at(self, step: int, steps: int | None = None,
                    last_is_output: bool = True) -> list[tuple[Request, int, int]]:
        """(request, first row, rows) of the running requests that take a preview after decoder step
        `step` (partial_steps) of `steps` (default: decoder_steps), in row order. `last_is_output`
        False: every preview comes from the loop (a family whose decoder output is the final image)."""
        out, start = [], 0
        steps = self.settings.decoder_steps if steps is None else steps
        for i in self.active:
            r = self.requests[i]
            k = r.partial_images if last_is_output else r.partial_images + 1
            if r.on_partial is not None and step in partial_steps(steps, k):
                out.append((r, start, r.rows))
            start += r.rows
        return out

    def previews_final(self) -> list[tuple[Request, int, int]]:
        """(request, first row, rows) of the running requests whose last preview is the decoder's output."""
        out, start = [], 0
        for i in self.active:
            r = self.requests[i]
            if r.on_partial is not None and r.partial_images > 0:
                out.append((r, start, r.rows))
            start += r.rows
        return out

    def split(self, images: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Per request (in the order given): its images, or None if it was dropped."""
        out: list[torch.Tensor | None] = [None] * len(self.requests)
        start = 0
        for i in self.active:
            rows = self.requests[i].rows
            out[i] = images[start:start + rows]
            start += rows
        return out


MAX_PARTIAL_IMAGES = 3  # OpenAI's images API takes 0 to 3


def partial_steps(decoder_steps: int, partial_images: int) -> list[int]:
    """The decoder steps (0-based) after which a streamed request's first `partial_images` - 1
    previews are taken: the step's prediction of the clean image. They come early, after j/(k+1) of
    the loop for j = 1 .. k-1 (k = partial_images), because a preview is worth most while the wait is
    long; the k-th preview is the decoder's output, before super-resolution. With fewer decoder
    steps than partial images, fewer previews come (as OpenAI allows)."""
    k = partial_images
    done = {round(decoder_steps * j / (k + 1)) for j in range(1, k)}
    return sorted(d - 1 for d in done if 1 <= d <= decoder_steps - 1)


def send_preview(request: Request, images: torch.Tensor) -> None:
    """One preview to a streamed request (images as `PartialCallback` takes them). A callback that
    fails stops that request's previews, not the batch."""
    try:
        request.on_partial(request.partials_sent, images)
        request.partials_sent += 1
    except Exception:  # noqa: BLE001 - the caller's callback; the batch goes on
        log.exception("a partial-image callback failed; no more previews for its request")
        request.on_partial = None


def check_partial_images(partial_images, on_partial) -> None:
    if isinstance(partial_images, bool) or not isinstance(partial_images, int) \
            or not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
        raise UnclipError(f"partial_images must be an integer from 0 to {MAX_PARTIAL_IMAGES} (previews while "
                          f"the images are made), got {partial_images!r}", param="partial_images")
    if partial_images and on_partial is None:
        raise UnclipError("partial_images needs on_partial, the function that receives each preview",
                          param="partial_images")


def take_rows(x: torch.Tensor, keep: torch.Tensor, guided: bool) -> torch.Tensor:
    """Rows `keep` of a stage tensor; a guided stage's tensors hold [unconditional; conditional]."""
    keep = keep.to(x.device)
    if guided:
        half = x.shape[0] // 2
        keep = torch.cat([keep, keep + half])
    return x.index_select(0, keep)


def pad_rows(x: torch.Tensor, rows: int, guided: bool, dim: int = 0) -> torch.Tensor:
    """`x` filled up to `rows` rows (each half, if guided) by repeating its last row: a batch padded to a
    captured row count. The padded rows are computed and dropped; copies of a real row keep them finite."""
    n = x.shape[dim] // 2 if guided else x.shape[dim]
    if n == rows:
        return x
    index = torch.arange(rows, device=x.device).clamp(max=n - 1)
    if guided:
        index = torch.cat([index, index + n])
    return x.index_select(dim, index)


def unpad_rows(x: torch.Tensor, rows: int, padded: int, guided: bool, dim: int = 0) -> torch.Tensor:
    """The first `rows` real rows of a tensor padded to `padded` rows (each half, if guided)."""
    if not guided:
        return x.narrow(dim, 0, rows)
    return torch.cat([x.narrow(dim, 0, rows), x.narrow(dim, padded, rows)], dim=dim)
