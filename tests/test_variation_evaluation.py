"""The issue-14 evaluation's bookkeeping (unclip.models.variation_evaluation), on stand-in pipelines
whose answers are known: a perfect one scores 100 %, one that draws nothing or the wrong thing
scores what it got right. The demo model's own numbers: benchmarks/variations.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unclip.models import variation_evaluation as evaluation
from unclip.models.shapes import Scene, render, score


def as_np(images: list[np.ndarray]) -> np.ndarray:
    return np.stack(images).astype(np.float32) / 255


class Copier:
    """vary and interpolate return the inputs themselves; text_diff returns the target caption's
    scene in the same place, or (`wrong_kind`) a square whatever was asked."""

    def __init__(self, wrong_kind: bool = False, blank: bool = False):
        self.wrong_kind, self.blank = wrong_kind, blank

    def _out(self, image: np.ndarray) -> np.ndarray:
        if self.blank:  # the background only: what a decoder that drops the shape draws
            return np.broadcast_to(image[0, 0], image.shape).copy()
        return image

    def vary(self, images, *, num_images: int, generator, output_type, **settings):
        return as_np([self._out(img) for img in images for _ in range(num_images)])

    def interpolate(self, a, b, frames, *, generator, output_type, **settings):
        return as_np([self._out(a)] * (frames - 1) + [self._out(b)])

    def text_diff(self, image, from_text, to_text, amounts, *, generator, output_type, **settings):
        words = to_text.split()  # "a blue circle on a green background"
        colour, shape, background = words[1], words[2], words[5]
        found = score(image)
        assert found["shape"] == from_text.split()[2]  # the caption names what is drawn
        target = Scene(colour, "square" if self.wrong_kind else shape, background)
        return as_np([image] * (len(amounts) - 1) + [render(target)])


def test_perfect_variations_score_every_field():
    result = evaluation.evaluate_variations(Copier(), per_scene=2)
    assert result["scenes"] == 84 and result["summary"]["images"] == 168
    assert result["summary"]["all_three"] == 1.0
    assert all(all(row["correct"]) for row in result["per_combination"])


def test_a_decoder_that_drops_the_shape_keeps_only_the_background():
    summary = evaluation.evaluate_variations(Copier(blank=True), per_scene=1)["summary"]
    assert summary["background_accuracy"] == 1.0
    assert summary["shape_accuracy"] == 0.0 and summary["all_three"] == 0.0


def test_interpolation_ends_and_similarity():
    def encode(images: np.ndarray) -> torch.Tensor:  # mean colour as a stand-in embedding
        means = torch.from_numpy(images.reshape(len(images), -1, 3).mean(1))
        return torch.nn.functional.normalize(means, dim=-1)

    result = evaluation.evaluate_interpolations(Copier(), encode, pairs=3, frames=4)
    assert result["first_frame_reads_as_a"]["all_three"] == 1.0
    assert result["last_frame_reads_as_b"]["all_three"] == 1.0
    # A repeated, then B: flat, then a drop, so no pair falls strictly frame by frame
    assert result["pairs_monotonic"] == 0.0 and not result["mean_falls_monotonically"]
    assert all(sims[0] == pytest.approx(1.0) for sims in result["similarity_to_a"])


@pytest.mark.parametrize("wrong_kind", [False, True])
def test_text_diff_full_amount(wrong_kind):
    """The target is blue at full amount in both; the kind is kept for all, or only for squares."""
    result = evaluation.evaluate_text_diffs(Copier(wrong_kind=wrong_kind), per_combination=1)
    combinations = result["combinations"]
    assert len(combinations) == 11 and all(c.startswith("a red ") for c in combinations)
    assert result["by_amount"]["1"]["colour_accuracy"] == 1.0
    assert result["by_amount"]["0"]["colour_accuracy"] == 0.0  # still red
    squares = sum("square" in c for c in combinations) / len(combinations)
    assert result["full_amount_blue_and_kind_kept"] == pytest.approx(squares if wrong_kind else 1.0)
