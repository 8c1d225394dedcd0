"""Image-conditioned generation: variations (parity with diffusers' UnCLIPImageVariationPipeline),
interpolations, text diffs, the image preprocessing, the checkpoint layouts, and bad input.

Parity tolerance 1e-4 max abs on [0, 1] images (the issue's bound, as for text-to-image): the
variation path repeats diffusers' arithmetic, so the measured difference is 0 or ~1e-5.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FAST_STEPS
from unclip.engine.batch import Batch, Request
from unclip.errors import UnclipError

TOLERANCE = 1e-4
IMAGE_STEPS = dict(decoder_steps=4, super_res_steps=2)


def noise_image(seed: int, height: int = 40, width: int = 30) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def diffusers_variation(tiny_components, tmp_path_factory):
    """diffusers' variation pipeline over the tiny networks, and that pipeline saved by diffusers."""
    import warnings

    from diffusers import UnCLIPImageVariationPipeline, UnCLIPScheduler
    from transformers import CLIPImageProcessor

    c = tiny_components

    def scheduler(name: str) -> UnCLIPScheduler:
        config = c.schedulers[name].to_dict()
        config.pop("_class_name")
        return UnCLIPScheduler(**config)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice, and transformers' torchvision note
        processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        pipe = UnCLIPImageVariationPipeline(
            decoder=c.decoder, text_encoder=c.text_encoder, tokenizer=c.tokenizer, text_proj=c.text_proj,
            feature_extractor=processor, image_encoder=c.image_encoder, super_res_first=c.super_res_first,
            super_res_last=c.super_res_last, decoder_scheduler=scheduler("decoder_scheduler"),
            super_res_scheduler=scheduler("super_res_scheduler"))
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("variation") / "model"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def variation_model(diffusers_variation):
    import unclip

    return unclip.load(diffusers_variation[1])


# -- parity with diffusers ------------------------------------------------------------------------

@pytest.mark.parametrize("num_images,guidance,seed", [(1, 8.0, 0), (2, 3.5, 7), (2, 1.0, 123)])
def test_variations_match_diffusers(diffusers_variation, variation_model, num_images, guidance, seed):
    """diffusers' own saved folder (UnCLIPImageVariationPipeline layout: no prior, feature_extractor/),
    loaded by our loader; PIL images of two sizes go through each side's preprocessing."""
    pipe, _ = diffusers_variation
    images = [noise_image(1), noise_image(2, 20, 20)]
    ours = variation_model.vary(images, seed=seed, output_type="np", num_images=num_images,
                                decoder_guidance=guidance, **IMAGE_STEPS)
    theirs = pipe(images, num_images_per_prompt=num_images, decoder_num_inference_steps=4,
                  super_res_num_inference_steps=2, decoder_guidance_scale=guidance,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    assert ours.shape == theirs.shape == (2 * num_images, 32, 32, 3)
    assert ours.std() > 0.05  # a real image, not a constant
    assert float(np.abs(ours - theirs).max()) <= TOLERANCE


def test_preprocessing_matches_clip_image_processor():
    """Plain PIL/numpy, the same float32 values as transformers' CLIPImageProcessor (exactly)."""
    import warnings

    from transformers import CLIPImageProcessor

    from unclip.engine.image_input import from_clip_processor, pixel_values

    for size, crop, (width, height) in [(16, 16, (64, 64)), (224, 224, (300, 517)), (24, 20, (37, 19))]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            processor = CLIPImageProcessor(size={"shortest_edge": size},
                                           crop_size={"height": crop, "width": crop})
            image = noise_image(size, height, width)
            expected = processor(images=[image], return_tensors="pt").pixel_values
        ours = pixel_values([image], from_clip_processor(processor.to_dict(), "config", "fix"))
        assert ours.shape == expected.shape == (1, 3, crop, crop)
        assert torch.equal(ours, expected)


def test_variation_model_has_no_prior(variation_model):
    assert not variation_model.has_prior and "prior" not in variation_model.backend.specs
    with pytest.raises(UnclipError, match="has no prior") as info:
        variation_model.generate("a red circle", **FAST_STEPS)
    assert info.value.param == "use_prior"
    with pytest.raises(UnclipError, match="has no prior"):
        variation_model.interpolate("a red circle", noise_image(0), 3, **IMAGE_STEPS)
    text = variation_model.generate("a red circle", use_prior=False, output_type="np", **FAST_STEPS)
    assert text.shape[0] == 1


# -- interpolations and text diffs ----------------------------------------------------------------

def test_slerp_follows_the_great_circle():
    from unclip.engine.image_conditioned import slerp

    a, b = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    middle = slerp(a, b, 0.5)
    assert torch.allclose(middle, torch.tensor([3.0, 3.0, 0.0]) / 2**0.5, atol=1e-6)  # 45 degrees, length 3
    angles = [float(torch.atan2(slerp(a, b, t)[1], slerp(a, b, t)[0])) for t in (0.25, 0.75)]
    assert angles == pytest.approx([np.pi / 8, 3 * np.pi / 8])
    assert torch.allclose(slerp(a, a * 3, 0.5), a * 2)  # parallel: the length still interpolates


def test_interpolation_frames_share_their_noise(tiny_pipeline):
    """The first frame decodes A's embedding with the same noise whatever B is and however many
    frames; the frames between differ."""
    a, b, c = noise_image(1), noise_image(2), noise_image(3)
    frames = tiny_pipeline.interpolate(a, b, 4, seed=5, output_type="np", **IMAGE_STEPS)
    other = tiny_pipeline.interpolate(a, c, 2, seed=5, output_type="np", **IMAGE_STEPS)
    assert frames.shape == (4, 32, 32, 3)
    assert float(np.abs(frames[0] - other[0]).max()) <= 1e-6  # same embedding, same noise
    assert float(np.abs(frames[1] - frames[2]).max()) > 0.01
    backwards = tiny_pipeline.interpolate(b, a, 4, seed=5, output_type="np", **IMAGE_STEPS)
    assert float(np.abs(frames[-1] - backwards[0]).max()) <= 1e-6


def test_interpolation_from_a_prompt_goes_through_the_prior(tiny_pipeline):
    def frames_for(seed: int) -> np.ndarray:
        return tiny_pipeline.interpolate("a red circle", noise_image(2), 3, seed=seed, output_type="np",
                                         **FAST_STEPS)

    frames, again, seeded = frames_for(1), frames_for(1), frames_for(2)
    assert np.array_equal(frames, again)
    assert float(np.abs(frames[0] - seeded[0]).max()) > 0.01  # the prior's sample follows the seed


def test_text_diff_at_zero_is_the_image_and_moves_with_the_amount(tiny_pipeline):
    image = noise_image(4)
    diffs = tiny_pipeline.text_diff(image, "a red circle", "a blue circle", [0.0, 0.5, 1.0], seed=3,
                                    output_type="np", **IMAGE_STEPS)
    same = tiny_pipeline.interpolate(image, image, 2, seed=3, output_type="np", **IMAGE_STEPS)
    assert diffs.shape == (3, 32, 32, 3)
    assert float(np.abs(diffs[0] - same[0]).max()) <= 1e-5  # amount 0: the image's own embedding
    assert float(np.abs(diffs[2] - diffs[0]).max()) > 0.01


def test_diff_embedding_keeps_the_length_and_moves_towards_the_target():
    from unclip.engine.image_conditioned import diff_embedding

    generator = torch.Generator().manual_seed(0)
    image, start, end = (torch.randn(16, generator=generator) for _ in range(3))
    moved = diff_embedding(image, start, end, 1.0)
    assert float(moved.norm()) == pytest.approx(float(image.norm()))
    towards = torch.nn.functional.normalize(end, dim=0) - torch.nn.functional.normalize(start, dim=0)
    assert float(moved @ towards) > float(image @ towards)
    assert torch.allclose(diff_embedding(image, start, end, 0.0), image, atol=1e-6)


# -- batching -------------------------------------------------------------------------------------

def test_variation_requests_batch_only_with_their_kind(tiny_pipeline):
    s = tiny_pipeline.image_settings(**IMAGE_STEPS)
    pixels = torch.zeros(1, 3, 16, 16)
    text = Request(["a"], s, torch.Generator())
    image = Request([""], s, torch.Generator(), pixel_values=pixels)
    assert text.batch_key != image.batch_key
    assert image.batch_key == Request([""], s, torch.Generator(), image_embeds=torch.zeros(1, 32)).batch_key
    with pytest.raises(UnclipError, match="all text or all image-conditioned"):
        Batch([text, image])


@pytest.mark.slow
def test_merged_variations_equal_each_alone(demo_pipeline):
    """Seed-exact batching for variation requests (pixels and given embeddings mixed), on the trained
    demo model (random weights turn float rounding into flipped pixels): bound 1/255, as for text."""
    from unclip.engine.image_conditioned import preprocess
    from unclip.models.shapes import Scene, render

    scenes = [Scene("red", "circle", "blue"), Scene("green", "square", "white"),
              Scene("yellow", "triangle", "black")]
    pixels = [preprocess(demo_pipeline, [render(s)], "test") for s in scenes]
    s = demo_pipeline.image_settings(decoder_steps=6, super_res_steps=3)
    embeds = demo_pipeline.encode_images(pixels[2])

    def requests():
        return [Request([""], replace(s, num_images=2), torch.Generator().manual_seed(1),
                        pixel_values=pixels[0]),
                Request([""], s, torch.Generator().manual_seed(2), pixel_values=pixels[1]),
                Request([""], s, torch.Generator().manual_seed(3), image_embeds=embeds)]

    merged = demo_pipeline.generate_requests(requests())
    for request, got in zip(requests(), merged, strict=True):
        [alone] = demo_pipeline.generate_requests([request])
        assert got.shape == alone.shape
        assert float((got - alone).abs().max()) <= 1 / 255


# -- checkpoints ----------------------------------------------------------------------------------

def test_saved_checkpoint_keeps_the_image_encoder(tiny_folder, tiny_pipeline):
    import unclip

    assert json.loads((tiny_folder / "model_index.json").read_text())["image_encoder"][1] == \
        "CLIPVisionModelWithProjection"
    reloaded = unclip.load(tiny_folder)
    assert reloaded.image_preprocess == tiny_pipeline.image_preprocess
    a = reloaded.vary(noise_image(0), seed=2, output_type="np", **IMAGE_STEPS)
    b = tiny_pipeline.vary(noise_image(0), seed=2, output_type="np", **IMAGE_STEPS)
    assert np.array_equal(a, b)


def test_image_conditioned_sampler_defaults(tiny_folder, tmp_path):
    """sampler_defaults.json's image_conditioned section sets vary/interpolate/text_diff's defaults
    over the file's own, and leaves generate's alone; a bad value in it is one line."""
    import unclip

    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    defaults = model / "sampler_defaults.json"
    defaults.write_text(json.dumps({"decoder_guidance": 1.0, "decoder_steps": 3,
                                    "image_conditioned": {"decoder_guidance": 2.5}}))
    pipe = unclip.load(model)
    assert (pipe.settings().decoder_guidance, pipe.settings().decoder_steps) == (1.0, 3)
    assert (pipe.image_settings().decoder_guidance, pipe.image_settings().decoder_steps) == (2.5, 3)
    assert pipe.image_settings(decoder_guidance=4.0).decoder_guidance == 4.0
    guided = pipe.vary(noise_image(0), seed=1, output_type="np", super_res_steps=2)
    explicit = pipe.vary(noise_image(0), seed=1, output_type="np", super_res_steps=2, decoder_guidance=2.5)
    unguided = pipe.vary(noise_image(0), seed=1, output_type="np", super_res_steps=2, decoder_guidance=1.0)
    assert float(np.abs(guided - explicit).max()) <= 1e-6  # the same computation up to float32 rounding
    assert float(np.abs(guided - unguided).max()) > 0.05
    defaults.write_text(json.dumps({"image_conditioned": {"decoder_guidance": 0.5}}))
    with pytest.raises(UnclipError) as info:
        unclip.load(model)
    assert "image_conditioned.decoder_guidance must be" in str(info.value) and "\n" not in str(info.value)


def test_demo_preprocessing_is_what_its_clip_was_trained_on(demo_pipeline):
    """The demo's CLIP saw 32 px renders as rgb / 127.5 - 1 (training/train_demo.py): a 32 px render
    given as it is must reach the encoder as exactly that, and its embedding is normalised."""
    from unclip.engine.image_conditioned import preprocess
    from unclip.models.shapes import Scene, render

    scene = render(Scene("red", "circle", "blue"), 32)
    pixels = preprocess(demo_pipeline, [scene], "test")
    expected = torch.from_numpy(scene).permute(2, 0, 1).float() / 127.5 - 1
    assert float((pixels[0] - expected).abs().max()) <= 1e-6  # float32 rounding of two formulas
    assert float(demo_pipeline.encode_images(pixels).norm()) == pytest.approx(1.0)


def preprocess_json(model):
    return model / "image_encoder" / "preprocess.json"


@pytest.mark.parametrize("change,needles", [
    (lambda m: preprocess_json(m).write_text("{"), ["preprocess.json", "not valid JSON"]),
    (lambda m: preprocess_json(m).write_text(json.dumps({"size": 16})), ["crop is missing"]),
    (lambda m: preprocess_json(m).write_text(json.dumps({"size": 8, "crop": 16, "resample": "bicubic"})),
     ["crop 16 is larger than the resized shorter side 8"]),
    (lambda m: preprocess_json(m).unlink(), ["has an image_encoder but no image preprocessing"]),
    (lambda m: shutil.rmtree(m / "image_encoder"), ["no 'image_encoder' component"]),
])
def test_bad_image_encoder_folders(tiny_folder, tmp_path, change, needles):
    from unclip.models import load_model

    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    change(model)
    with pytest.raises(UnclipError) as info:
        load_model(model)
    for needle in needles:
        assert needle in str(info.value)


def test_clip_processor_configs_we_cannot_follow_are_refused():
    from unclip.engine.image_input import from_clip_processor

    for config, needle in [({"do_center_crop": False}, "do_center_crop is False"),
                           ({"size": {"height": 224, "width": 224}}, "shortest_edge"),
                           ({"crop_size": {"height": 224, "width": 200}}, "must be square"),
                           ({"resample": 9}, "resample 9"),
                           ({"image_std": [0, 1, 1]}, "std positive")]:
        with pytest.raises(UnclipError, match=needle):
            from_clip_processor(config, "preprocessor_config.json", "fix it")
    old = from_clip_processor({"size": 224, "crop_size": 224,  # transformers' older spelling
                               "feature_extractor_type": "CLIPFeatureExtractor"}, "x", "y")
    assert (old.size, old.crop, old.resample) == (224, 224, "bicubic")


# -- bad input --------------------------------------------------------------------------------------

def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in a few dozen bytes (no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("source,needles", [
    (b"not an image at all", ["is not an image unclip reads", "PNG"]),
    (png(noise_image(0))[:60], ["cannot be decoded", "corrupt or truncated"]),
    (huge_png_header(5000, 5000), ["5000x5000 = 25,000,000 pixels", "limit of 16,777,216"]),
    (huge_png_header(100_000, 100_000), ["pixels"]),  # past PIL's own decompression-bomb guard too
    ("/no/such/file.png", ["does not exist"]),
    (np.zeros((8, 8), np.uint8), ["HxWx3"]),
    (np.full((8, 8, 3), 2.0), ["float in [0, 1]"]),
    (12, ["must be a file path"]),
])
def test_bad_images_are_one_line(tiny_pipeline, source, needles):
    with pytest.raises(UnclipError) as info:
        tiny_pipeline.vary(source, **IMAGE_STEPS)
    message = str(info.value)
    assert "\n" not in message and info.value.param == "image"
    for needle in needles:
        assert needle in message, message


def test_pixel_limit_is_the_callers(tiny_components):
    import unclip

    pipe = unclip.load(tiny_components, limits=unclip.Limits(max_image_pixels=100))
    with pytest.raises(UnclipError, match="above the limit of 100"):
        pipe.vary(noise_image(0, 11, 10), **IMAGE_STEPS)
    assert pipe.vary(noise_image(0, 10, 10), output_type="np", **IMAGE_STEPS).shape == (1, 32, 32, 3)


def test_model_without_an_image_encoder(tiny_components):
    from unclip.engine.backends.torch_backend import TorchBackend
    from unclip.engine.pipeline import Pipeline
    from unclip.models.networks import model_dims

    c = replace(tiny_components, image_encoder=None, image_preprocess=None)
    pipe = Pipeline(TorchBackend(c), c.tokenizer, model_dims(c), c.schedulers, model_name="no-eyes")
    for call in (lambda: pipe.vary(noise_image(0)), lambda: pipe.interpolate(noise_image(0), "a", 3),
                 lambda: pipe.text_diff(noise_image(0), "a red circle", "a blue circle")):
        with pytest.raises(UnclipError, match="needs a CLIP image encoder, and model no-eyes has none"):
            call()
    assert pipe.interpolate("a red circle", "a blue square", 2, output_type="np", **FAST_STEPS).shape[0] == 2


@pytest.mark.parametrize("call,param,needle", [
    (lambda p: p.text_diff(noise_image(0), "", "a blue circle"), "from_text", "from_text is empty"),
    (lambda p: p.text_diff(noise_image(0), "a red circle", "   "), "to_text", "to_text is empty"),
    (lambda p: p.text_diff(noise_image(0), "a", "b", [0.5, 1.5]), "amounts", "from 0"),
    (lambda p: p.text_diff(noise_image(0), "a", "b", []), "amounts", "list of numbers"),
    (lambda p: p.text_diff([noise_image(0)] * 2, "a", "b"), "image", "takes one image"),
    (lambda p: p.interpolate(noise_image(0), noise_image(1), 1), "frames", "from 2 to 16"),
    (lambda p: p.interpolate(noise_image(0), noise_image(1), 17), "frames", "from 2 to 16"),
    (lambda p: p.interpolate(noise_image(0), noise_image(1), 3, num_images=2), "num_images",
     "one image per frame"),
    (lambda p: p.interpolate(noise_image(0), "", 3), "prompts", "empty"),
    (lambda p: p.vary([noise_image(0)] * 17), "image", "limit of 16 inputs"),
    (lambda p: p.vary([noise_image(0)] * 5, num_images=4), "num_images", "20 images"),
    (lambda p: p.vary([]), "image", "no image given"),
    (lambda p: p.vary(noise_image(0), seed=-1), "seed", "seed must be"),
    (lambda p: p.vary(noise_image(0), output_type="jpeg"), "output_type", "output_type must be"),
])
def test_bad_arguments_are_one_line(tiny_pipeline, call, param, needle):
    with pytest.raises(UnclipError) as info:
        call(tiny_pipeline)
    assert info.value.param == param and needle in str(info.value) and "\n" not in str(info.value)
