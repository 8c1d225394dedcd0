"""The command line: images written as promised, and every bad input is one line, exit 1."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.cli_helpers import assert_one_line_error, run_cli

FAST = ["--prior-steps", "3", "--decoder-steps", "3", "--super-res-steps", "2"]


def test_generate_writes_pngs_prompt_major(tmp_path):
    out = tmp_path / "out"
    result = run_cli("generate", "a red circle", "a blue square", "--num-images", "2", "--seed", "5",
                 "--model", "tiny", "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    paths = [Path(p) for p in result.stdout.split()]
    assert [p.name for p in paths] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            img.load()
            assert img.size == (32, 32) and img.mode == "RGB"
            assert img.text["prompt"] == ("a red circle" if i < 2 else "a blue square")
            assert img.text["image_index"] == str(i % 2)
            assert img.text["seed"] == "5" and img.text["model"] == "tiny"
            assert "decoder 3" in img.text["steps"] and "decoder 8.0" in img.text["guidance"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    umask = os.umask(0)
    os.umask(umask)
    assert paths[0].stat().st_mode & 0o777 == 0o666 & ~umask  # the usual file mode, not mkstemp's 0600


@pytest.mark.slow
def test_generate_small_preset(tmp_path):
    result = run_cli("generate", "a red circle", "--model", "small", "--out", str(tmp_path), *FAST)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "0000.png") as img:
        assert img.size == (128, 128)
        assert np.asarray(img).std() > 1.0


def test_saved_preset_reloads_to_identical_outputs(tmp_path):
    assert run_cli("init", "--preset", "tiny", "--out", str(tmp_path / "ckpt")).exit_code == 0
    assert (tmp_path / "ckpt" / "model_index.json").exists()
    assert (tmp_path / "ckpt" / "tokenizer" / "vocab.json").exists()
    for model, out in (("tiny", "a"), (str(tmp_path / "ckpt"), "b")):
        assert run_cli("generate", "a red circle", "--model", model, "--out", str(tmp_path / out),
                   *FAST).exit_code == 0
    a = np.asarray(Image.open(tmp_path / "a" / "0000.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "0000.png"))
    assert np.array_equal(a, b)


def test_no_prior_mode_runs_and_differs(tmp_path):
    first = run_cli("generate", "a red circle", "--model", "tiny", "--out", str(tmp_path / "p"), *FAST)
    assert first.exit_code == 0, first.output
    result = run_cli("generate", "a red circle", "--model", "tiny", "--no-prior",
                     "--out", str(tmp_path / "n"),
                 *FAST)
    assert result.exit_code == 0, result.output
    with_prior = np.asarray(Image.open(tmp_path / "p" / "0000.png"), dtype=float)
    without = np.asarray(Image.open(tmp_path / "n" / "0000.png"), dtype=float)
    assert np.abs(with_prior - without).max() > 1


def test_info_counts_karlo_parameters_without_allocating():
    result = run_cli("info", "--model", "karlo")
    assert result.exit_code == 0, result.output
    counts = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in result.stdout.splitlines()
              if line.strip().endswith("parameters")}
    assert counts["prior"] > 900_000_000  # Karlo's prior is a 1B-parameter transformer
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_over_long_prompt_is_truncated_with_a_warning(tmp_path):
    result = run_cli("generate", "a red circle " * 40, "--model", "tiny", "--out", str(tmp_path), *FAST)
    assert result.exit_code == 0, result.output
    assert "unclip: warning:" in result.stderr and "truncated to the tokenizer's limit of 77" in result.stderr
    assert (tmp_path / "0000.png").exists()


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args,needles", [
    (["", "--model", "tiny"], ["prompt 1 is empty"]),
    (["   \t"], ["prompt 1 is empty"]),
    (["ok", "  "], ["prompt 2 is empty"]),
    (["a", "--prior-steps", "0"], ["--prior-steps", "at least 2"]),
    (["a", "--decoder-steps", "-3"], ["--decoder-steps"]),
    (["a", "--super-res-steps", "1"], ["--super-res-steps"]),
    (["a", "--num-images", "0"], ["--num-images", "positive"]),
    (["a", "--num-images", "-2"], ["--num-images"]),
    (["a", "--prior-guidance", "nan"], ["--prior-guidance", "finite"]),
    (["a", "--decoder-guidance", "inf"], ["--decoder-guidance", "finite"]),
    (["a", "--model", "no-such-model"], ["neither an existing folder nor a preset", "'demo'"]),
    (["a", "--backend", "nope"], ["unknown backend 'nope'"]),
    (["a", "--device", "tpu"], ["unknown device 'tpu'"]),
])
def test_bad_generate_arguments(tmp_path, args, needles):
    out = tmp_path / "out"
    assert_one_line_error(run_cli("generate", *args, "--out", str(out)), *needles)
    assert not out.exists()


def test_output_path_that_is_a_file(tmp_path):
    target = tmp_path / "file.png"
    target.write_bytes(b"keep me")
    assert_one_line_error(run_cli("generate", "a", "--out", str(target)), "is a file")
    assert target.read_bytes() == b"keep me"
    assert_one_line_error(run_cli("generate", "a", "--out", str(target / "sub")), "is a file")


def test_output_path_not_writable():
    # /sys refuses new files even to root; permission bits alone would not stop root.
    assert_one_line_error(run_cli("generate", "a", "--out", "/sys/unclip-out"), "not writable")


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def _expect_model_error(model: Path, tmp_path: Path, *needles: str) -> None:
    out = tmp_path / "out"
    result = run_cli("generate", "a red circle", "--model", str(model), "--out", str(out))
    assert_one_line_error(result, *needles)
    assert not out.exists()


def test_model_folder_missing_index(tiny_folder, tmp_path):
    model = _copy(tiny_folder, tmp_path)
    (model / "model_index.json").unlink()
    _expect_model_error(model, tmp_path, "model_index.json is missing")


def test_model_folder_malformed_index(tiny_folder, tmp_path):
    model = _copy(tiny_folder, tmp_path)
    (model / "model_index.json").write_text("{not json")
    _expect_model_error(model, tmp_path, "not valid JSON")


def test_model_folder_missing_component(tiny_folder, tmp_path):
    model = _copy(tiny_folder, tmp_path)
    shutil.rmtree(model / "decoder")
    _expect_model_error(model, tmp_path, "no 'decoder' component")


def test_model_folder_missing_tokenizer(tiny_folder, tmp_path):
    model = _copy(tiny_folder, tmp_path)
    shutil.rmtree(model / "tokenizer")
    _expect_model_error(model, tmp_path, "no tokenizer")


def test_corrupt_weight_file(tiny_folder, tmp_path):
    model = _copy(tiny_folder, tmp_path)
    weights = model / "decoder" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _expect_model_error(model, tmp_path, "weights of 'decoder' are corrupt")


def test_weights_from_another_model(tiny_folder, tmp_path):
    model = _copy(tiny_folder, tmp_path)
    shutil.copy(model / "super_res_first" / "diffusion_pytorch_model.safetensors",
                model / "decoder" / "diffusion_pytorch_model.safetensors")
    _expect_model_error(model, tmp_path, "do not match its config")


def test_pickle_checkpoint_needs_opt_in(tiny_folder, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = _copy(tiny_folder, tmp_path)
    weights = model / "prior" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "prior" / "diffusion_pytorch_model.bin")
    weights.unlink()
    _expect_model_error(model, tmp_path, "pickle", "--allow-pickle")
    result = run_cli("generate", "a", "--model", str(model), "--allow-pickle", "--out", str(tmp_path / "ok"),
                 *FAST)
    assert result.exit_code == 0, result.output


def test_init_rejects_unknown_preset_and_file_target(tmp_path):
    assert_one_line_error(run_cli("init", "--preset", "huge", "--out", str(tmp_path / "x")), "unknown preset")
    target = tmp_path / "f"
    target.write_text("x")
    assert_one_line_error(run_cli("init", "--preset", "tiny", "--out", str(target)), "is a file")


# -- a model's own sampler defaults (sampler_defaults.json) ----------------------------------------


def test_model_sampler_defaults_apply_and_explicit_options_win(tiny_folder, tmp_path):
    model = _copy(tiny_folder, tmp_path)
    (model / "sampler_defaults.json").write_text('{"decoder_guidance": 1.5, "decoder_steps": 3}')
    import unclip

    pipe = unclip.load(model)
    assert (pipe.settings().decoder_guidance, pipe.settings().decoder_steps) == (1.5, 3)
    assert pipe.settings().prior_guidance == 4.0  # not set by the model: the engine's default
    assert pipe.settings(decoder_guidance=6.0).decoder_guidance == 6.0
    for args, guidance in (([], "decoder 1.5"), (["--decoder-guidance", "6"], "decoder 6.0")):
        out = tmp_path / f"out{len(args)}"
        result = run_cli("generate", "a red circle", "--model", str(model), "--out", str(out),
                         "--prior-steps", "3", "--super-res-steps", "2", *args)
        assert result.exit_code == 0, result.output
        with Image.open(out / "0000.png") as img:
            assert guidance in img.text["guidance"] and "decoder 3" in img.text["steps"]
    # a checkpoint saved from loaded components keeps them
    from unclip.models.checkpoint import load_components, save_components

    save_components(load_components(model), tmp_path / "resaved")
    resaved = load_components(tmp_path / "resaved")
    assert resaved.sampler_defaults == {"decoder_guidance": 1.5, "decoder_steps": 3}


@pytest.mark.parametrize("text, needles", [
    ("{not json", ["sampler_defaults.json cannot be read"]),
    ('{"decoder_guidanse": 1.0}', ["unknown key 'decoder_guidanse'", "allowed:", "decoder_guidance"]),
    ('{"decoder_steps": 1}', ["sampler_defaults.json: decoder_steps must be an integer of at least 2"]),
    ('{"decoder_guidance": 0.5}', ["sampler_defaults.json: decoder_guidance must be", "1.0 is unguided"]),
    ('[1, 2]', ["must hold a JSON object"]),
])
def test_bad_sampler_defaults(tiny_folder, tmp_path, text, needles):
    model = _copy(tiny_folder, tmp_path)
    (model / "sampler_defaults.json").write_text(text)
    _expect_model_error(model, tmp_path, *needles)
