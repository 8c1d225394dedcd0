"""Scores the demo model: does the image show the prompt's colours and shape?

For each prompt, images are generated with the model's default sampler settings and read
back from the pixels (unclip.models.shapes.score); an image counts as correct when background
colour, shape colour and shape kind all match. A CLIP retrieval score asks the trained CLIP
whether the image is closer to its own caption than to every other caption of the world.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unclip.errors import UnclipError
from unclip.models.shapes import HELD_OUT, all_combinations, score, training_combinations


def caption(combination: tuple[str, str, str]) -> str:
    colour, shape, background = combination
    return f"a {colour} {shape} on a {background} background"


def evaluation_prompts(trained: int, held_out: int, seed: int = 0) -> dict[str, list[str]]:
    """A seeded subset of the trained combinations, and the first `held_out` held-out ones."""
    rng = np.random.default_rng(seed)
    combos = training_combinations()
    picked = [combos[i] for i in rng.permutation(len(combos))[:trained]]
    return {"trained": [caption(c) for c in picked], "held_out": [caption(c) for c in HELD_OUT[:held_out]]}


@dataclass
class PromptResult:
    prompt: str
    group: str
    predictions: list[dict[str, str]]
    correct: list[bool]
    retrieved: list[bool]


class ClipScorer:
    """The demo's trained CLIP: its text tower is the pipeline's, its image tower ships beside it."""

    def __init__(self, model_folder: Path, text_encoder: torch.nn.Module, tokenizer):
        from transformers import CLIPVisionModelWithProjection

        folder = Path(model_folder) / "image_encoder"
        if not folder.is_dir():
            raise UnclipError(f"{model_folder} has no image_encoder/ (the CLIP image tower); the "
                              "retrieval score needs a model that ships one, such as the demo model")
        self.image_encoder = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
        self.size = self.image_encoder.config.image_size
        captions = [caption(c) for c in all_combinations()]
        self.captions = captions
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        with torch.inference_mode():
            text = text_encoder.to("cpu")(ids).text_embeds
        self.text = torch.nn.functional.normalize(text, dim=-1)

    def retrieved(self, images: np.ndarray, prompt: str) -> list[bool]:
        """images: N x H x W x 3 uint8. True where the prompt's caption is the top match."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = torch.nn.functional.interpolate(x, size=[self.size, self.size], mode="area")
        with torch.inference_mode():
            emb = torch.nn.functional.normalize(self.image_encoder(pixel_values=x).image_embeds, dim=-1)
        best = (emb @ self.text.T).argmax(dim=1)
        return [self.captions[int(i)] == prompt for i in best]


def evaluate(model: str | Path, trained: int = 24, held_out: int = len(HELD_OUT), images_per_prompt: int = 4,
             seed: int = 0, progress: bool = False, **settings) -> dict:
    """Generate and score; `settings` override the model's sampler defaults (steps, guidance)."""
    import unclip
    from unclip.models import resolve_model_path

    folder = resolve_model_path(model)
    return evaluate_pipeline(unclip.load(folder), folder, trained, held_out, images_per_prompt, seed,
                             progress, **settings)


def evaluation_images(trained: int = 24, held_out: int = len(HELD_OUT), images_per_prompt: int = 4) -> int:
    """How many images an evaluation generates (what its progress bars count)."""
    return sum(map(len, evaluation_prompts(trained, held_out).values())) * images_per_prompt


def evaluate_pipeline(pipe, model_folder: str | Path, trained: int = 24, held_out: int = len(HELD_OUT),
                      images_per_prompt: int = 4, seed: int = 0, progress: bool = False,
                      on_images: Callable[[int], None] | None = None, **settings) -> dict:
    """`evaluate` for an already loaded pipeline of any backend (`unclip bench` scores each runner):
    the scorer's CLIP towers come from `model_folder`, the checkpoint the pipeline was made from.
    `on_images(n)` is told after each prompt's n images (the bench's progress bar, in another process)."""
    from unclip.models import load_model

    folder = Path(model_folder)
    components = getattr(pipe.backend, "components", None) or load_model(folder)
    scorer = ClipScorer(folder, components.text_encoder, components.tokenizer)
    from tqdm.auto import tqdm

    results: list[PromptResult] = []
    groups = evaluation_prompts(trained, held_out, seed)
    total = sum(map(len, groups.values())) * images_per_prompt
    bar = tqdm(total=total, desc="evaluate", unit="image", disable=not progress)  # one bar for the whole run
    for group, prompts in groups.items():
        for prompt in prompts:
            images = pipe.generate(prompt, seed=seed, num_images=images_per_prompt, output_type="np",
                                   **settings)
            bar.update(images_per_prompt)
            if on_images is not None:
                on_images(images_per_prompt)
            pixels = (images * 255).round().astype(np.uint8)
            predictions = [score(img) for img in pixels]
            expected = prompt.split()
            truth = {"colour": expected[1], "shape": expected[2], "background": expected[5]}
            correct = [p == truth for p in predictions]
            results.append(PromptResult(prompt, group, predictions, correct,
                                        scorer.retrieved(pixels, prompt)))
    bar.close()
    summary = {}
    for group in groups:
        rows = [r for r in results if r.group == group]
        n = sum(len(r.correct) for r in rows)
        if n == 0:
            continue
        summary[group] = {
            "prompts": len(rows), "images": n,
            "attribute_accuracy": sum(sum(r.correct) for r in rows) / n,
            "background_accuracy": _field_accuracy(rows, "background", 5),
            "colour_accuracy": _field_accuracy(rows, "colour", 1),
            "shape_accuracy": _field_accuracy(rows, "shape", 2),
            "clip_retrieval_top1": sum(sum(r.retrieved) for r in rows) / n,
        }
    effective = {k: v for k, v in vars(pipe.settings(**settings)).items()
                 if k not in ("num_images", "use_prior")}
    return {"summary": summary, "images_per_prompt": images_per_prompt, "seed": seed,
            "settings": effective, "settings_given": settings or "none: the model's defaults",
            "prompts": [vars(r) for r in results]}


def _field_accuracy(rows: list[PromptResult], field: str, word: int) -> float:
    hits = [p[field] == r.prompt.split()[word] for r in rows for p in r.predictions]
    return sum(hits) / len(hits)
