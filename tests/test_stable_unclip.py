"""Stable unCLIP (the second family) against diffusers: tiny random components written in both diffusers
layouts, loaded by unclip and by diffusers' StableUnCLIPPipeline / StableUnCLIPImg2ImgPipeline from the
same folder; the same images for the same seed, for each sampler, several noise levels, guidance on
and off, several images per prompt; and one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unclip.errors import UnclipError

# Float32 on the CPU, the same networks and the same draws: the bound for the arrays; measured 0
# on the text-to-image cases (the samplers are step-for-step equal, tests/test_sd_schedulers.py).
PARITY = 1e-4
STEPS = dict(prior_steps=3, decoder_steps=4)
CLASSES = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from unclip.models.stable_unclip import build_stable_preset, save_stable_unclip

    root = tmp_path_factory.mktemp("stable_unclip")
    return {
        layout: save_stable_unclip(build_stable_preset(layout), root / layout) for layout in ("text", "image")
    }


@pytest.fixture(scope="module")
def pipes(folders):
    import diffusers

    from unclip.engine.stable_unclip import load_stable_pipeline

    return {
        "text": (
            load_stable_pipeline(folders["text"]),
            diffusers.StableUnCLIPPipeline.from_pretrained(folders["text"]),
        ),
        "image": (
            load_stable_pipeline(folders["image"]),
            diffusers.StableUnCLIPImg2ImgPipeline.from_pretrained(folders["image"]),
        ),
    }


def with_scheduler(theirs, name: str | None):
    """diffusers' pipeline with the checkpoint's scheduler (None) or `name` made from its config, as a
    user switches (the pipeline is shared by the tests: the original is kept and restored)."""
    import diffusers

    original = theirs.__dict__.setdefault("_unclip_original_scheduler", theirs.scheduler)
    theirs.scheduler = (
        original if name is None else getattr(diffusers, CLASSES[name]).from_config(original.config)
    )
    return theirs


@pytest.mark.parametrize(
    "scheduler,noise_level,prior_guidance,decoder_guidance,num_images",
    [
        (None, 0, 4.0, 10.0, 1),  # the checkpoint's PNDM, diffusers' defaults
        ("ddim", 100, 4.0, 1.0, 2),  # decoder unguided
        ("dpm++", 999, 1.0, 7.5, 2),  # prior unguided, the last noise level
    ],
)
def test_text_to_image_matches_diffusers(
    pipes, scheduler, noise_level, prior_guidance, decoder_guidance, num_images
):
    ours, theirs = pipes["text"]
    prompts = ["a red circle", "a blue square on green"]
    got = ours.generate(
        prompts,
        seed=3,
        output_type="np",
        scheduler=scheduler,
        noise_level=noise_level,
        prior_guidance=prior_guidance,
        decoder_guidance=decoder_guidance,
        num_images=num_images,
        **STEPS,
    )
    want = with_scheduler(theirs, scheduler)(
        prompt=prompts,
        num_images_per_prompt=num_images,
        prior_num_inference_steps=STEPS["prior_steps"],
        num_inference_steps=STEPS["decoder_steps"],
        prior_guidance_scale=prior_guidance,
        guidance_scale=decoder_guidance,
        noise_level=noise_level,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images
    assert got.shape == want.shape == (2 * num_images, 32, 32, 3)
    assert float(np.abs(got - want).max()) <= PARITY


@pytest.mark.parametrize(
    "scheduler,noise_level,decoder_guidance,num_images",
    [(None, 0, 10.0, 2), ("ddim", 250, 1.0, 1), ("dpm++", 50, 5.0, 3)],
)
def test_image_variations_match_diffusers(pipes, scheduler, noise_level, decoder_guidance, num_images):
    ours, theirs = pipes["image"]
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    got = ours.vary(
        image,
        seed=2,
        output_type="np",
        scheduler=scheduler,
        noise_level=noise_level,
        decoder_guidance=decoder_guidance,
        num_images=num_images,
        decoder_steps=STEPS["decoder_steps"],
    )
    want = with_scheduler(theirs, scheduler)(
        image=image,
        prompt="",
        num_images_per_prompt=num_images,
        num_inference_steps=STEPS["decoder_steps"],
        guidance_scale=decoder_guidance,
        noise_level=noise_level,
        generator=torch.Generator().manual_seed(2),
        output_type="np",
    ).images
    assert got.shape == want.shape == (num_images, 32, 32, 3)
    assert float(np.abs(got - want).max()) <= PARITY


def test_png_output_is_the_arrays_rounded(pipes):
    ours, _ = pipes["text"]
    images = ours.generate("a cat", seed=1, **STEPS)
    array = ours.generate("a cat", seed=1, output_type="np", **STEPS)
    assert len(images) == 1 and images[0].size == (32, 32)
    assert np.array_equal(np.asarray(images[0]), (array[0] * 255).round().astype(np.uint8))


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(noise_level=-1), "noise_level must be an integer from 0 to 999"),
        (dict(noise_level=1000), "noise_level must be an integer from 0 to 999"),
        (dict(noise_level=2.5), "noise_level must be an integer"),
        (dict(scheduler="euler"), "scheduler must be one of ddim, pndm, dpm++"),
        (dict(decoder_steps=0), "decoder_steps must be an integer from 1"),
        (dict(super_res_steps=2), "unknown setting 'super_res_steps'"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_field(pipes, settings, message):
    ours, _ = pipes["text"]
    with pytest.raises(UnclipError, match=message) as info:
        ours.generate("x", **settings)
    assert "\n" not in str(info.value) and info.value.param == next(iter(settings))


def test_each_layout_refuses_the_other_task(pipes):
    with pytest.raises(UnclipError, match="image-variation Stable unCLIP"):
        pipes["image"][0].generate("a cat")
    with pytest.raises(UnclipError, match="text-to-image Stable unCLIP"):
        pipes["text"][0].vary(Image.new("RGB", (8, 8)))


def test_a_folder_without_safetensors_is_refused(folders, tmp_path):
    import shutil

    from unclip.models.stable_unclip import load_stable_unclip

    broken = shutil.copytree(folders["text"], tmp_path / "m")
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(UnclipError, match=r"unet has no \.safetensors weights"):
        load_stable_unclip(broken)


def test_cli_generate_and_vary_on_the_folders(folders, pipes, tmp_path):
    """`unclip generate` / `unclip vary` on folders in the diffusers layouts: the pipeline's images, and
    PNG text with the settings; a noise level past the schedule or below 0 is one line, exit 1, nothing
    written; a Karlo model refuses the option."""
    from tests.cli_helpers import assert_one_line_error, run_cli

    steps = ["--prior-steps", "2", "--decoder-steps", "3"]
    result = run_cli(
        "generate",
        "a red circle",
        "--model",
        str(folders["text"]),
        "--noise-level",
        "50",
        "--scheduler",
        "dpm++",
        "--seed",
        "4",
        "--out",
        str(tmp_path / "g"),
        *steps,
    )
    assert result.exit_code == 0, result.output
    png = Image.open(tmp_path / "g" / "0000.png")
    want = pipes["text"][0].generate(
        "a red circle", seed=4, noise_level=50, scheduler="dpm++", prior_steps=2, decoder_steps=3
    )[0]
    assert np.array_equal(np.asarray(png), np.asarray(want))
    assert png.text["noise_level"] == "50" and png.text["scheduler"] == "dpm++"
    result = run_cli(
        "vary",
        str(tmp_path / "g" / "0000.png"),
        "--model",
        str(folders["image"]),
        "--num-images",
        "2",
        "--decoder-steps",
        "3",
        "--out",
        str(tmp_path / "v"),
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["0000.png", "0001.png"]
    for level, fragment in (
        ("1000", "--noise-level must be an integer from 0 to 999"),
        ("-1", "--noise-level must be from 0"),
    ):
        bad = run_cli(
            "generate",
            "x",
            "--model",
            str(folders["text"]),
            "--noise-level",
            level,
            "--out",
            str(tmp_path / f"bad{level}"),
            *steps,
        )
        assert_one_line_error(bad, fragment)
        assert not (tmp_path / f"bad{level}").exists()
    karlo = run_cli("generate", "x", "--model", "tiny", "--noise-level", "3", "--out", str(tmp_path / "k"))
    assert_one_line_error(karlo, "--noise-level applies to Stable unCLIP models")


def test_batched_requests_are_each_requests_images_alone(pipes):
    """The serving engine's batches: requests with their own generators and image counts, one batch;
    each gets the images it gets alone (same draws from its generator)."""
    from unclip.engine.batch import Request

    ours, _ = pipes["text"]
    settings = dict(noise_level=20, decoder_guidance=3.0, **STEPS)
    requests = [
        Request(
            ["a red circle"], ours.settings(num_images=n, **settings), torch.Generator().manual_seed(seed)
        )
        for seed, n in ((5, 1), (6, 2))
    ]
    steps = []
    batched = ours.generate_requests(requests, on_step=lambda stage, i, rows: steps.append((stage, i, rows)))
    for got, seed, n in zip(batched, (5, 6), (1, 2), strict=True):
        alone = ours.generate("a red circle", seed=seed, num_images=n, output_type="pt", **settings)
        assert got.shape == alone.shape and float((got - alone).abs().max()) <= 1e-5
    assert steps[0] == ("prior", 0, 6) and steps[-1] == (
        "decoder",
        4,
        6,
    )  # PNDM: 4 steps, 5 calls; 3 x 2 rows


@pytest.mark.parametrize(
    "stage,after,scheduler,guidance",
    [
        ("decoder", 1, "dpm++", 3.0),  # a multistep sampler's history loses the rows too; guided halves
        ("prior", 0, "pndm", 1.0),  # the prior's DDPM noise draws go on from the stayer's generator
    ],
)
def test_a_cancelled_request_leaves_mid_batch_and_the_others_images_are_unchanged(
    pipes, stage, after, scheduler, guidance
):
    """Three requests in one batch; the middle one is cancelled after call `after` of `stage`: the next
    calls run the others' rows only (on_step's row counts), it gets None, and the others get the
    images they get alone."""
    from unclip.engine.batch import Request

    ours, _ = pipes["text"]
    settings = dict(noise_level=50, scheduler=scheduler, decoder_guidance=guidance, **STEPS)
    gone = {"flag": False}
    requests = [
        Request(
            ["a red circle"] if seed != 6 else ["a blue square", "a cat"],
            ours.settings(num_images=n, **settings),
            torch.Generator().manual_seed(seed),
            cancelled=(lambda: gone["flag"]) if seed == 6 else None,
        )
        for seed, n in ((5, 1), (6, 2), (7, 2))
    ]
    calls = []

    def on_step(name, i, rows):
        calls.append((name, rows))
        if name == stage and i == after:
            gone["flag"] = True

    got = ours.generate_requests(requests, on_step=on_step)
    assert got[1] is None
    for image, seed, n in ((got[0], 5, 1), (got[2], 7, 2)):
        alone = ours.generate("a red circle", seed=seed, num_images=n, output_type="pt", **settings)
        assert float((image - alone).abs().max()) <= 1e-5
    unet = [rows for name, rows in calls if name == "decoder"]
    factor = 2 if guidance > 1 else 1
    if stage == "decoder":
        assert unet[: after + 1] == [7 * factor] * (after + 1) and set(unet[after + 1 :]) == {3 * factor}
    else:
        assert set(unet) == {3 * factor}
    gone["flag"] = True  # every request gone: nothing left to run
    assert ours.generate_requests(requests[1:2]) == [None]


def test_streamed_previews_come_from_the_unet_loop_and_leave_the_images_unchanged(pipes):
    """partial_images k: k previews at even fractions of the UNet loop, each the VAE's image of the
    call's clean-latent estimate, at the output size; the final images equal the unstreamed ones; a
    batch where one request streams and one does not gives each its own."""
    from unclip.engine.batch import Request

    ours, _ = pipes["text"]
    settings = dict(noise_level=10, decoder_steps=6, prior_steps=2)
    plain = ours.generate("a red circle", seed=3, num_images=2, output_type="pt", **settings)
    previews = []
    streamed = ours.generate(
        "a red circle",
        seed=3,
        num_images=2,
        output_type="pt",
        partial_images=3,
        on_partial=lambda i, x: previews.append((i, x)),
        **settings,
    )
    assert float((streamed - plain).abs().max()) == 0
    size = ours.output_size
    assert [i for i, _ in previews] == [0, 1, 2]
    assert all(
        x.shape == (2, 3, size, size) and 0 <= float(x.min()) <= float(x.max()) <= 1 for _, x in previews
    )
    assert all(float((x - plain).abs().max()) > 0 for _, x in previews)  # estimates, not the final image
    # in a batch, a streamed request's previews are those it gets alone
    one = []
    ours.generate(
        "a red circle",
        seed=3,
        num_images=2,
        partial_images=1,
        on_partial=lambda i, x: one.append(x),
        **settings,
    )
    got = []
    batched = ours.generate_requests(
        [
            Request(
                ["a red circle"], ours.settings(num_images=2, **settings), torch.Generator().manual_seed(3)
            ),
            Request(
                ["a red circle"],
                ours.settings(num_images=2, **settings),
                torch.Generator().manual_seed(3),
                partial_images=1,
                on_partial=lambda i, x: got.append(x),
            ),
        ]
    )
    assert all(float((b - plain).abs().max()) <= 1e-5 for b in batched)
    assert len(got) == len(one) == 1 and float((got[0] - one[0]).abs().max()) <= 1e-5
    with pytest.raises(UnclipError, match="partial_images must be an integer from 0 to 3"):
        ours.generate("a red circle", partial_images=4, on_partial=print)


def test_http_generations_and_variations_on_the_folders(folders, pipes):
    """/v1/images/generations and /v1/images/variations serve both layouts with the same routes: the
    pipeline's images for the seed, noise_level and scheduler in the body, PNG text saying so, and a
    400 naming noise_level when it is past the schedule."""
    import base64
    import io
    import json

    import httpx

    from tests.serve_helpers import running_server

    ours, _ = pipes["text"]
    with running_server(ours, model="sd-tiny") as (url, _):
        body = dict(
            prompt="a red circle",
            n=2,
            seed=7,
            noise_level=100,
            scheduler="ddim",
            prior_steps=2,
            decoder_steps=3,
        )
        response = httpx.post(url + "/v1/images/generations", json=body, timeout=60)
        assert response.status_code == 200, response.text
        got = [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in response.json()["data"]]
        want = ours.generate(
            "a red circle",
            seed=7,
            num_images=2,
            noise_level=100,
            scheduler="ddim",
            prior_steps=2,
            decoder_steps=3,
        )
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want, strict=True))
        assert got[0].text["noise_level"] == "100" and got[0].text["scheduler"] == "ddim"
        # streamed: the UNet loop's previews (two per image), then the same images
        response = httpx.post(
            url + "/v1/images/generations", json={**body, "stream": True, "partial_images": 2}, timeout=60
        )
        sent = [
            (block.split("\n")[0][len("event: ") :], json.loads(block.split("data: ", 1)[1]))
            for block in response.text.strip().split("\n\n")
        ]
        assert [kind.split(".")[1] for kind, _ in sent] == ["partial_image"] * 4 + ["completed"] * 2
        for (_, data), image in zip(sent[4:], want, strict=True):
            got = Image.open(io.BytesIO(base64.b64decode(data["b64_json"])))
            assert np.array_equal(np.asarray(got), np.asarray(image))
        bad = httpx.post(url + "/v1/images/generations", json={**body, "noise_level": 1000}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "noise_level"
        assert "noise_level must be an integer from 0 to 999" in bad.json()["error"]["message"]
    vary, _ = pipes["image"]
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    with running_server(vary, model="sd-tiny-variation") as (url, _):
        response = httpx.post(
            url + "/v1/images/variations",
            files={"image": ("a.png", buffer.getvalue())},
            data={"seed": "3", "noise_level": "10", "decoder_steps": "3"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        got = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        want = vary.vary(Image.open(io.BytesIO(buffer.getvalue())), seed=3, noise_level=10, decoder_steps=3)[
            0
        ]
        assert np.array_equal(np.asarray(got), np.asarray(want)) and got.text["mode"] == "variation"


# The fp32 export's bound against diffusers, in uint8 levels: the networks validate within 1e-4 of torch
# (the manifest), and the pipelines run the same draws. Measured 0.0017/255 (ONNX Runtime) and
# 0.0022/255 (OpenVINO) on tiny.
EXPORT_TOLERANCE = 2 / 255


@pytest.fixture(scope="module")
def exported(folders, tmp_path_factory):
    from unclip.export.stable_unclip_onnx import export_stable_onnx

    root = tmp_path_factory.mktemp("stable_onnx")
    # validated at the guided batch only: the tests below compare whole images with diffusers anyway
    return {
        layout: export_stable_onnx(folders[layout], root / layout, batch_sizes=(2,)) and root / layout
        for layout in ("text", "image")
    }


def test_onnx_export_runs_on_onnxruntime_and_openvino_like_diffusers(exported, pipes):
    import unclip

    _, theirs = pipes["text"]
    want = with_scheduler(theirs, "ddim")(
        prompt=["a red circle", "a cat"],
        num_images_per_prompt=2,
        prior_num_inference_steps=3,
        num_inference_steps=4,
        noise_level=40,
        generator=torch.Generator().manual_seed(8),
        output_type="np",
    ).images
    for runtime in ("onnxruntime", "openvino"):
        pipe = unclip.load(exported["text"], backend=runtime)
        assert pipe.backend.name == runtime
        got = pipe.generate(
            ["a red circle", "a cat"],
            seed=8,
            num_images=2,
            scheduler="ddim",
            noise_level=40,
            output_type="np",
            **STEPS,
        )
        assert float(np.abs(got - want).max()) <= EXPORT_TOLERANCE
    _, theirs = pipes["image"]
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (36, 30, 3), dtype=np.uint8))
    want = with_scheduler(theirs, None)(
        image=image,
        num_images_per_prompt=2,
        num_inference_steps=4,
        noise_level=5,
        generator=torch.Generator().manual_seed(1),
        output_type="np",
    ).images
    got = unclip.load(exported["image"], backend="onnxruntime").vary(
        image, seed=1, num_images=2, noise_level=5, decoder_steps=4, output_type="np"
    )
    assert float(np.abs(got - want).max()) <= EXPORT_TOLERANCE


def test_a_changed_export_file_is_refused(exported, tmp_path):
    import shutil

    import unclip

    damaged = shutil.copytree(exported["text"], tmp_path / "x")
    (damaged / "stable_unclip.json").write_text("{}")
    with pytest.raises(UnclipError, match=r"stable_unclip.json is changed since the export"):
        unclip.load(damaged, backend="onnxruntime")
    with pytest.raises(UnclipError, match="is an export folder: load it with --backend onnxruntime"):
        unclip.load(exported["text"])


def test_bench_runners_time_and_count_the_stable_stages():
    """unclip bench's two runners on this family, in process: diffusers' pipeline with hooks on its
    networks and ours, the same first image, stages with a VAE and no super-resolution, FLOPs per call."""
    from unclip.bench.worker import BASELINE, Runner

    spec = {
        "model": "sd-unclip-tiny",
        "device": "cpu",
        "prompt": "a red circle",
        "seed": 0,
        "settings": dict(
            prior_steps=2, decoder_steps=2, super_res_steps=7, prior_guidance=4.0, decoder_guidance=8.0
        ),
    }
    baseline = Runner({**spec, "runner": BASELINE})
    ours = Runner({**spec, "runner": "torch-fp32", "backend": "torch", "dtype": "fp32"})
    first = [runner.cmd_cold_start()["image"]["uint8"] for runner in (baseline, ours)]
    assert first[0] == first[1]
    for runner in (baseline, ours):
        sample = runner.cmd_run(1)
        calls = [c[0] for c in sample["calls"]]
        assert calls.count("unet") == 3 and calls.count("vae_decoder") == 1 and calls.count("prior") == 2
        assert sample["stages_ms"]["vae"] > 0 and sample["stages_ms"]["super_res"] == 0
    flops = baseline.cmd_flops([["unet", 2], ["vae_decoder", 1]])["flops"]
    assert all(f > 0 for _, _, f in flops)
