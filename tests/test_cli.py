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


def test_info_names_the_clip_input_size_apart_from_the_output_size():
    """The demo outputs 64x64; its CLIP tower reads 32x32: one number must not pass for the other."""
    result = run_cli("info", "--model", "demo")
    assert result.exit_code == 0, result.output
    sizes = {line.split()[0]: line.split(None, 2)[1:] for line in result.stdout.splitlines()[1:]
             if not line.strip().endswith("parameters")}
    assert "image_size" not in sizes
    assert sizes["clip_image_size"] == ["32", "(the CLIP image tower's input side, not the output)"]
    assert sizes["super_res_size"] == ["64", "(the output image side)"]
    karlo = run_cli("info", "--model", "karlo")  # no image tower: said so, not "None"
    assert "clip_image_size   none  (no CLIP image tower: no variations)" in karlo.stdout


def test_readme_says_cpu_torch_before_the_first_install_command():
    """A newcomer runs the first command as they read it: the CPU build must come before it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.split("## Start here", 1)[1]
    assert "download.pytorch.org/whl/cpu" in start.split("```bash", 1)[0]


def test_init_out_has_help():
    result = run_cli("init", "--help")
    out_help = " ".join(result.output.split("--out PATH", 1)[1].split("--seed", 1)[0].split())
    assert out_help.startswith("the checkpoint folder to write") and "--model OUT" in out_help


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


# -- issue 11: checkpoint folders, Ctrl-C, bench --out -----------------------------------------------


@pytest.mark.parametrize("component,entry,needles", [
    ("decoder", ["diffusers", "UNet9000Model"],
     ["decoder.1 must be 'UNet2DConditionModel'", "got 'UNet9000Model'"]),
    ("prior", ["mylib", "PriorTransformer"], ["prior.0 must be 'diffusers'", "'mylib'"]),
    ("decoder_scheduler", ["diffusers", "DDIMScheduler"], ["decoder_scheduler.1 must be 'UnCLIPScheduler'"]),
    ("tokenizer", "CLIPTokenizer", ["tokenizer must be"]),
    ("feature_extractor", ["transformers", "ViTImageProcessor"],
     ["feature_extractor must be 'CLIPImageProcessor'", "'ViTImageProcessor'"]),
    ("safety_checker", ["stable_diffusion", "StableDiffusionSafetyChecker"],
     ["unknown key 'safety_checker'"]),
    ("_class_name", "StableDiffusionPipeline", ["_class_name must be 'UnCLIPPipeline'"]),
])
def test_item_5_model_index_names_the_classes_we_load(tiny_folder, tmp_path, component, entry, needles):
    import json

    model = _copy(tiny_folder, tmp_path)
    index = json.loads((model / "model_index.json").read_text())
    index[component] = entry
    (model / "model_index.json").write_text(json.dumps(index))
    _expect_model_error(model, tmp_path, "model_index.json", *needles)


def test_model_index_accepts_diffusers_spellings(tiny_folder, tmp_path):
    """What newer diffusers writes, and an image-conditioned checkpoint's extra components."""
    import json

    model = _copy(tiny_folder, tmp_path)
    index = json.loads((model / "model_index.json").read_text())
    index.update(text_proj=["diffusers", "UnCLIPTextProjModel"], image_encoder=[None, None],
                 tokenizer=["transformers", "CLIPTokenizerFast"], _name_or_path="kakaobrain/karlo-v1-alpha")
    (model / "model_index.json").write_text(json.dumps(index))
    result = run_cli("generate", "a", "--model", str(model), "--out", str(tmp_path / "o"), *FAST)
    assert result.exit_code == 0, result.output


def test_network_config_of_another_class(tiny_folder, tmp_path):
    import json

    model = _copy(tiny_folder, tmp_path)
    config = json.loads((model / "decoder" / "config.json").read_text())
    config["_class_name"] = "UNet2DModel"
    (model / "decoder" / "config.json").write_text(json.dumps(config))
    _expect_model_error(model, tmp_path, "describes a 'UNet2DModel'", "must be a UNet2DConditionModel")


def test_item_6_garbage_vocab_is_refused_not_ignored(tiny_folder, tmp_path):
    model = _copy(tiny_folder, tmp_path)
    (model / "tokenizer" / "vocab.json").write_text('{"garbage": 0}')
    _expect_model_error(model, tmp_path, "vocab.json and tokenizer.json disagree", "delete tokenizer.json")
    (model / "tokenizer" / "vocab.json").write_text("not json at all")
    _expect_model_error(model, tmp_path, "vocab.json cannot be read")
    # the export copies the tokenizer folder: it is refused there too, before anything is written
    result = run_cli("export", "onnx", "--model", str(model), "--out", str(tmp_path / "onnx"))
    assert_one_line_error(result, "vocab.json cannot be read")
    assert not (tmp_path / "onnx").exists()


def test_tokenizer_files_that_agree_in_either_layout(tiny_folder, tmp_path):
    """Karlo's layout (vocab.json + merges.txt only) and the tokenizer.json-only layout both load."""
    for drop in (["tokenizer.json"], ["vocab.json", "merges.txt"]):
        model = tmp_path / drop[0]
        shutil.copytree(tiny_folder, model)
        for name in drop:
            (model / "tokenizer" / name).unlink()
        result = run_cli("generate", "a", "--model", str(model), "--out", str(tmp_path / f"o{len(drop)}"),
                         *FAST)
        assert result.exit_code == 0, result.output
    model = _copy(tiny_folder, tmp_path)
    (model / "tokenizer" / "merges.txt").unlink()
    _expect_model_error(model, tmp_path, "vocab.json has no merges.txt beside it")


def test_tokenizer_without_a_context_length(tiny_folder, tmp_path):
    """Without tokenizer_config.json transformers pads to 1e30 tokens: refused, not allocated."""
    model = _copy(tiny_folder, tmp_path)
    (model / "tokenizer" / "tokenizer_config.json").unlink()
    _expect_model_error(model, tmp_path, "model_max_length", "max_position_embeddings is 77")


def test_components_of_different_models(tiny_folder, tmp_path, monkeypatch):
    """Each network loads with its own weights, but the prior is another model's (CLIP size 64)."""
    from dataclasses import replace

    from unclip.models.checkpoint import save_components
    from unclip.models.components import build_preset
    from unclip.models.presets import PRESETS

    monkeypatch.setitem(PRESETS, "tiny64", replace(PRESETS["tiny"], clip_dim=64))
    save_components(build_preset("tiny64"), tmp_path / "other")
    model = _copy(tiny_folder, tmp_path)
    shutil.rmtree(model / "prior")
    shutil.copytree(tmp_path / "other" / "prior", model / "prior")
    _expect_model_error(model, tmp_path, "projection_dim is 32, but the prior's embedding_dim is 64",
                        "mixes components of different models")


def _interrupt(args: list[str], ready: str, tmp_path: Path):
    """Run `unclip ARGS` in a child, Ctrl-C it once its stderr shows `ready`; (returncode, stderr)."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "unclip.cli", *args], stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path,
                            # as a terminal does (a test run in the background inherits SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, lines = threading.Event(), []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if ready in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    assert seen.wait(300), "".join(lines)[-2000:]
    time.sleep(1.0)  # into the work that follows the note
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    time.sleep(0.2)
    return proc.returncode, "".join(lines)


@pytest.mark.slow
def test_item_7_ctrl_c_during_generate_exits_130_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    code, stderr = _interrupt(["generate", "a red circle", "--model", "tiny", "--prior-steps", "1000",
                               "--out", str(out)], "building preset tiny", tmp_path)
    assert code == 130, stderr[-2000:]
    assert "unclip: interrupted" in stderr and "Traceback" not in stderr and "Aborted" not in stderr
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.slow
def test_item_7_ctrl_c_during_export_exits_130_and_writes_nothing(tmp_path):
    out = tmp_path / "artifact"
    code, stderr = _interrupt(["export", "onnx", "--model", "tiny", "--out", str(out)], "exporting prior",
                              tmp_path)
    assert code == 130, stderr[-2000:]
    assert "unclip: interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []  # no staged sibling left


def test_item_2_bench_out_on_a_read_only_path():
    assert_one_line_error(run_cli("bench", "--model", "tiny", "--out", "/sys/unclip-bench", "--no-plots"),
                          "--out /sys/unclip-bench is not writable")


def test_generate_serve_and_the_ray_app_take_options_declared_once():
    """unclip/options.py is the one definition: every load option is an option of generate and of
    serve, every replica option one of serve (but the digests, which only Ray is given) and a key
    of the Ray app's args, with the same default everywhere."""
    from unclip.cli import cli
    from unclip.options import LoadOptions, ReplicaOptions, ServeOptions

    commands = {name: {p.name: p for p in cli.commands[name].params} for name in ("generate", "serve")}
    for name, field in LoadOptions.model_fields.items():
        for command in ("generate", "serve"):
            assert name in commands[command], (command, name)
            assert commands[command][name].default == field.default, (command, name)
    hidden = {"api_key_sha256", "torch_threads"}
    for name, field in ServeOptions.model_fields.items():
        if name in hidden:
            continue
        param = commands["serve"][name]
        assert param.default == (field.default if field.default is not None or not param.multiple else ())
        assert param.help == field.description
    assert set(ReplicaOptions.model_fields) - hidden <= set(commands["serve"])
    ReplicaOptions.model_validate({"model": "demo", "backend": "openvino", "kernels": False, "max_steps": 50,
                                   "api_key_sha256": ["0" * 64]})
