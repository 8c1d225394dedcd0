"""The demo model's world, its scorer, its training recipe and its evaluation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from unclip.models.shapes import (
    COLOURS,
    HELD_OUT,
    SHAPES,
    all_combinations,
    random_scene,
    render,
    score,
    training_combinations,
)


def test_world_and_held_out_split():
    combos = all_combinations()
    assert len(combos) == len(COLOURS) * (len(COLOURS) - 1) * len(SHAPES)
    assert set(HELD_OUT) <= set(combos)
    assert not set(HELD_OUT) & set(training_combinations())
    trained = training_combinations()
    for colour, shape, background in HELD_OUT:  # every held-out pair still appears in training
        assert any(c == colour and s == shape for c, s, _ in trained)
        assert any(s == shape and b == background for _, s, b in trained)
        assert any(c == colour and b == background for c, _, b in trained)


def test_scorer_reads_rendered_scenes_exactly():
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = random_scene(rng, all_combinations())
        for resolution in (32, 64):
            got = score(render(scene, resolution))
            assert (got["colour"], got["shape"], got["background"]) == scene.combination


def test_scorer_rejects_a_blank_image():
    blank = np.full((64, 64, 3), COLOURS["blue"], dtype=np.uint8)
    assert score(blank)["shape"] == "none"


@pytest.mark.slow
def test_training_recipe_runs_and_resumes(tmp_path):
    """The recipe at 1/500 of its steps: a loadable model; a rerun resumes instead of retraining."""
    cmd = [sys.executable, "-m", "training.train_demo", "--scale", "0.002", "--out", str(tmp_path / "model"),
           "--work", str(tmp_path / "work")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "work" / "decoder.pt").exists()
    import unclip

    images = unclip.load(tmp_path / "model").generate("a red circle on a blue background", output_type="np",
                                                      prior_steps=2, decoder_steps=2, super_res_steps=2)
    assert images.shape == (1, 64, 64, 3)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "it/s" not in again.stderr and "s/it" not in again.stderr  # no stage trained again

    # the evaluation runs end to end on it (an untrained model: only the bookkeeping is checked)
    from unclip.models.evaluation import evaluate

    result = evaluate(tmp_path / "model", trained=2, held_out=1, images_per_prompt=2, seed=0,
                      prior_steps=2, decoder_steps=2, super_res_steps=2)
    assert result["summary"]["trained"]["images"] == 4 and result["summary"]["held_out"]["images"] == 2
    for row in result["summary"].values():
        for key in ("attribute_accuracy", "background_accuracy", "colour_accuracy", "shape_accuracy",
                    "clip_retrieval_top1"):
            assert 0.0 <= row[key] <= 1.0
