"""The ONNX Runtime backend: same images as the torch backend, no PyTorch network code, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli_helpers import assert_one_line_error, run_cli
from tests.conftest import FAST_STEPS
from tests.onnx_artifacts import copy_of, exported, siblings

REPO = Path(__file__).resolve().parents[1]
# The bound for fp32 artifacts; tiny measures ~1e-7 (per-network differences ~1e-6).
FP32_TOLERANCE = 2 / 255


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    return exported(tmp_path_factory, "tiny")


@pytest.mark.parametrize("prompts,settings", [
    (["a red circle on a blue background", "A Green SQUARE!!"], dict(num_images=2, **FAST_STEPS)),
    (["an unguided drawing"], dict(prior_guidance=1.0, decoder_guidance=1.0, **FAST_STEPS)),
    (["no prior, just text"], dict(use_prior=False, **FAST_STEPS)),
])
def test_matches_torch_backend(tiny_onnx, tiny_pipeline, prompts, settings):
    import unclip

    runtime = unclip.load(tiny_onnx, backend="onnxruntime")
    ours = runtime.generate(prompts, seed=5, output_type="np", **settings)
    reference = tiny_pipeline.generate(prompts, seed=5, output_type="np", **settings)
    assert ours.shape == reference.shape and reference.std() > 0.05
    assert float(np.abs(ours - reference).max()) <= FP32_TOLERANCE


def test_fp16_artifact_difference(tmp_path_factory, tiny_pipeline):
    """fp16 networks are within 3e-2 of torch each, but the random-weight tiny model turns pixels
    near its clip thresholds black or white on tiny input changes, so the image bound is on the
    mean and on the share of pixels off by more than 2/255. Measured: mean 0.0136, 1.4 %."""
    import unclip

    folder = exported(tmp_path_factory, "tiny", "fp16")
    prompts = ["a red circle on a blue background", "A green SQUARE!!"]
    runtime = unclip.load(folder, backend="onnxruntime")
    ours = runtime.generate(prompts, seed=3, output_type="np", **FAST_STEPS)
    diff = np.abs(ours - tiny_pipeline.generate(prompts, seed=3, output_type="np", **FAST_STEPS))
    assert float(diff.mean()) <= 0.03
    assert float((diff > 2 / 255).mean()) <= 0.05


def test_cli_generate_imports_neither_diffusers_nor_transformers(tiny_onnx, tiny_pipeline, tmp_path):
    """A fresh interpreter runs `unclip generate --backend onnxruntime` and reports what it imported."""
    out = tmp_path / "images"
    steps = [f"--{k.replace('_', '-')}={v}" for k, v in FAST_STEPS.items()]
    code = ("import sys\nfrom unclip.cli import main\n"
            f"sys.argv = ['unclip', 'generate', 'a red circle', '--model', {str(tiny_onnx)!r}, "
            f"'--backend', 'onnxruntime', '--seed', '4', '--out', {str(out)!r}, *{steps!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "top = {m.split('.')[0] for m in sys.modules}\n"
            "print('IMPORTED', sorted(top & {'diffusers', 'transformers'}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORTED []" in proc.stdout, proc.stdout
    from PIL import Image

    image = np.asarray(Image.open(out / "0000.png")).astype(np.int16)
    reference = tiny_pipeline.generate("a red circle", seed=4, output_type="pil", **FAST_STEPS)[0]
    assert int(np.abs(image - np.asarray(reference).astype(np.int16)).max()) <= 2  # the 2/255 bound


def _generate(folder, out):
    return run_cli("generate", "a red circle", "--model", str(folder), "--backend", "onnxruntime",
                   "--out", str(out), "--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2")


def test_corrupt_file_is_named(tiny_onnx, tmp_path):
    folder = copy_of(tiny_onnx, tmp_path / "artifact")
    data = bytearray((folder / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "decoder.onnx").write_bytes(bytes(data))
    assert_one_line_error(_generate(folder, tmp_path / "out"), "decoder.onnx", "sha256", "re-run")
    assert not (tmp_path / "out").exists()


def test_swapped_file_is_named(tiny_onnx, tmp_path):
    folder = copy_of(tiny_onnx, tmp_path / "artifact")
    (folder / "prior.onnx").write_bytes((folder / "text_proj.onnx").read_bytes())
    assert_one_line_error(_generate(folder, tmp_path / "out"), "prior.onnx", "sha256")
    assert not (tmp_path / "out").exists()


def test_missing_manifest_entry(tiny_onnx, tmp_path):
    folder = copy_of(tiny_onnx, tmp_path / "artifact")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["networks"]["decoder"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(_generate(folder, tmp_path / "out"), "no entry for network 'decoder'")
    assert not (tmp_path / "out").exists()


def test_folder_without_manifest_or_a_preset_name(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(_generate(tmp_path / "empty", tmp_path / "out"), "no manifest.json")
    assert_one_line_error(_generate("tiny", tmp_path / "out"), "must be an artifact folder")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("opset", ["13", "21"])
def test_unsupported_opset(tmp_path, opset):
    result = run_cli("export", "onnx", "--model", "tiny", "--out", str(tmp_path / "art"), "--opset", opset)
    assert_one_line_error(result, f"--opset {opset} is not supported", "14..20")
    assert list(tmp_path.iterdir()) == []


def test_export_into_a_file(tmp_path):
    target = tmp_path / "artifact"
    target.write_text("not a folder")
    result = run_cli("export", "onnx", "--model", "tiny", "--out", str(target))
    assert_one_line_error(result, "is a file")
    assert target.read_text() == "not a folder" and siblings(target) == []


def test_bad_batch_sizes(tmp_path):
    result = run_cli("export", "onnx", "--model", "tiny", "--out", str(tmp_path / "a"),
                     "--batch-sizes", "1,x")
    assert_one_line_error(result, "--batch-sizes")
    assert list(tmp_path.iterdir()) == []


def cuda_io_binding_missing() -> list[str]:
    """What the CUDA I/O-binding test needs besides a GPU. Read at collection, so that its skip mark
    skips it before any fixture runs: the GPU image has CPU onnxruntime and no onnxsim, which the
    export in `tiny_onnx` imports (an error at setup, not a skip, if the body checked)."""
    missing = []
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            missing.append("onnxruntime-gpu (CUDAExecutionProvider is not available)")
    except ImportError:
        missing.append("onnxruntime")
    try:
        import onnxsim  # noqa: F401
    except ImportError:
        missing.append("onnxsim (the ONNX export's graph clean-up)")
    return missing


CUDA_IO_BINDING_MISSING = cuda_io_binding_missing()


@pytest.mark.gpu
@pytest.mark.skipif(bool(CUDA_IO_BINDING_MISSING), reason="needs " + " and ".join(CUDA_IO_BINDING_MISSING))
def test_cuda_io_binding_matches_cpu(tiny_onnx):
    """CUDA execution provider with I/O binding (needs onnxruntime-gpu) against the CPU provider."""
    import torch

    import unclip

    gpu = unclip.load(tiny_onnx, backend="onnxruntime", device="cuda")
    x = torch.randn(2, 32, device="cuda")
    assert gpu.backend.constants()["clip_mean"].is_cuda
    flags = torch.tensor([True, False], device="cuda")
    out = gpu.backend.run("text_proj", image_embeds=x, unconditional=flags, text_embeds=x,
                          text_hidden=torch.randn(2, 77, 32, device="cuda"))
    assert out["decoder_hidden"].is_cuda and out["decoder_hidden"].shape[0] == 2
    cpu_pipeline = unclip.load(tiny_onnx, backend="onnxruntime")
    cpu = cpu_pipeline.generate("a red circle", output_type="np", **FAST_STEPS)
    cuda = gpu.generate("a red circle", output_type="np", **FAST_STEPS)
    assert float(np.abs(cpu - cuda).max()) <= FP32_TOLERANCE


def test_model_sampler_defaults_travel_into_the_artifact(tiny_folder, tmp_path):
    """A model's sampler_defaults.json serves from its export too: same defaults on every backend."""
    import shutil

    import unclip
    from unclip.export.onnx_export import export_onnx

    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    (model / "sampler_defaults.json").write_text('{"decoder_guidance": 2.5}')
    export_onnx(model, tmp_path / "artifact")
    pipe = unclip.load(tmp_path / "artifact", backend="onnxruntime")
    assert pipe.settings().decoder_guidance == 2.5 and pipe.settings().prior_guidance == 4.0


GPU_IMAGE = """
# A pytest plugin that makes this CPU machine look like the GPU image to the test above: CUDA
# available, onnxsim absent (onnxruntime is the CPU build in both).
import sys

import torch

torch.cuda.is_available = lambda: True
sys.modules["onnxsim"] = None  # `import onnxsim` raises ImportError
"""


def test_cuda_io_binding_skips_before_its_fixture_on_the_gpu_image(tmp_path):
    """On the GPU image the gpu mark does not skip (there is a GPU): the test must skip on what else it
    needs, before its export fixture runs."""
    (tmp_path / "gpu_image.py").write_text(GPU_IMAGE)
    path = os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "gpu_image", "-p", "no:cacheprovider", "-q",
                           "-rs", "--setup-show", f"{__file__}::test_cuda_io_binding_matches_cpu"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 skipped" in proc.stdout
    assert "needs onnxruntime-gpu (CUDAExecutionProvider is not available) and onnxsim" in proc.stdout
    setups = [line for line in proc.stdout.splitlines() if "SETUP" in line]
    assert not any("tiny_onnx" in line for line in setups), setups  # --setup-show lists each fixture set up


# -- issue 11, item 3: the manifest is checked by schema before any file is opened ----------------------


def _edit_manifest(folder, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _swap_decoder_for_prior(m):
    m["networks"]["decoder"]["file"] = "prior.onnx"
    m["networks"]["decoder"]["sha256"] = m["networks"]["prior"]["sha256"]


def _fp16_everywhere(m):
    m["precision"] = "fp16"
    for entry in m["networks"].values():
        entry["precision"] = "fp16"


@pytest.mark.parametrize("change,needles", [
    (lambda m: m.update(networks="oops"), ["networks must be a JSON object, got 'oops'"]),
    (_swap_decoder_for_prior, ["networks.decoder.file is 'prior.onnx'", "its own file, 'decoder.onnx'"]),
    (lambda m: m.pop("files"), ["files is missing"]),
    (lambda m: m.update(precision="fp8"), ["precision must be 'fp32' or 'fp16', got 'fp8'"]),
    (lambda m: m.update(precision="fp16"),
     ["networks.text_encoder.precision is fp32, the artifact's is fp16"]),
    (_fp16_everywhere, ["text_encoder.onnx holds float32 weights", "precision fp16"]),
    (lambda m: m["networks"]["decoder"]["inputs"][0]["shape"].__setitem__(1, 4),
     ["networks.decoder inputs[0]", "'batch', 4, 16, 16", "must be", "'batch', 3, 16, 16"]),
    (lambda m: m["networks"]["prior"]["inputs"][4].update(dtype="float32"), ["networks.prior inputs[4]"]),
    (lambda m: m["configs"].update(schedulers="../../../etc/passwd"),
     ["configs.schedulers must be a relative path inside the artifact folder", "'../../../etc/passwd'"]),
    (lambda m: m["configs"].update(schedulers="/etc/passwd"), ["configs.schedulers must be a relative path"]),
    (lambda m: m["files"].pop("tokenizer/vocab.json"), ["tokenizer/vocab.json is read by the runtime but not "
                                                        "listed"]),
    (lambda m: m["networks"]["decoder"].update(sha256="0" * 64), ["networks.decoder.sha256 disagrees with"]),
    (lambda m: m["networks"].update(upscaler=m["networks"]["decoder"]), ["networks.upscaler.file is"]),
    (lambda m: m["networks"]["decoder"].update(extra="x"), ["unknown key 'extra'"]),
])
def test_item_3_manifest_refusals(tiny_onnx, tmp_path, change, needles):
    folder = copy_of(tiny_onnx, tmp_path / "artifact")
    _edit_manifest(folder, change)
    assert_one_line_error(_generate(folder, tmp_path / "out"), "manifest.json" if "holds" not in needles[0]
                          else "text_encoder.onnx", *needles)
    assert not (tmp_path / "out").exists()


def test_a_network_file_from_another_network_is_caught_by_its_graph(tiny_onnx, tmp_path):
    """Even under the right name and with a matching sha256, prior.onnx is not the decoder: the
    tensors the ONNX file itself declares are compared with the spec table."""
    from unclip.export.manifest import sha256_file

    folder = copy_of(tiny_onnx, tmp_path / "artifact")
    (folder / "decoder.onnx").write_bytes((folder / "prior.onnx").read_bytes())
    digest = sha256_file(folder / "decoder.onnx")

    def rehash(m):
        m["networks"]["decoder"]["sha256"] = m["files"]["decoder.onnx"] = digest

    _edit_manifest(folder, rehash)
    assert_one_line_error(_generate(folder, tmp_path / "out"), "decoder.onnx: the graph's inputs[0]",
                          "['batch', 32]", "another network's file")


def test_a_link_leading_out_of_the_folder(tiny_onnx, tmp_path):
    import shutil

    folder = copy_of(tiny_onnx, tmp_path / "artifact")
    outside = tmp_path / "elsewhere"
    shutil.move(folder / "tokenizer", outside)
    (folder / "tokenizer").symlink_to(outside, target_is_directory=True)
    assert_one_line_error(_generate(folder, tmp_path / "out"), "leads outside the artifact folder")


def test_a_runtime_file_added_after_export_must_be_listed(tiny_onnx, tmp_path):
    folder = copy_of(tiny_onnx, tmp_path / "artifact")
    (folder / "sampler_defaults.json").write_text('{"decoder_guidance": 3.0}')
    assert_one_line_error(_generate(folder, tmp_path / "out"), "sampler_defaults.json is read by the runtime "
                          "but not listed")


def test_torch_backend_on_an_artifact_folder_says_which_backend(tiny_onnx, tmp_path):
    result = run_cli("generate", "a", "--model", str(tiny_onnx), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "is an exported ONNX artifact folder", "--backend onnxruntime")


def test_sessions_do_not_spin(tiny_onnx):
    """Spinning intra-op threads take the CPU from the sampling loop between calls and from other
    processes (docs/cpu.md measures it); every session of the backend runs with spinning off."""
    import unclip

    pipe = unclip.load(tiny_onnx, backend="onnxruntime")
    for session in pipe.backend.sessions.values():
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert options.inter_op_num_threads == 1


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/hostname", "sub/../../outside.bin"])
def test_weights_stored_outside_the_artifact_folder_are_refused(tiny_onnx, tmp_path, location):
    """A crafted .onnx (its manifest hash updated to match) names a weight file outside the folder:
    ONNX Runtime would read it as given; the artifact is refused before any session opens."""
    import hashlib

    import onnx

    from unclip.engine.artifact import load_artifact
    from unclip.errors import UnclipError

    folder = copy_of(tiny_onnx, tmp_path / "artifact")
    model = onnx.load(str(folder / "prior.onnx"))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (tmp_path / "outside.bin").write_bytes(weight.raw_data)
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    onnx.save(model, str(folder / "prior.onnx"))
    new_hash = hashlib.sha256((folder / "prior.onnx").read_bytes()).hexdigest()

    def rehash(m: dict) -> None:  # the crafter rewrites every record of the file's hash
        m["networks"]["prior"]["sha256"] = new_hash
        m["files"]["prior.onnx"] = new_hash

    _edit_manifest(folder, rehash)
    with pytest.raises(UnclipError, match=r"prior\.onnx: weight .* is stored at .*, outside the artifact"):
        load_artifact(folder)
