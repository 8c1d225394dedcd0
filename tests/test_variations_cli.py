"""`unclip vary | interpolate | textdiff`: images written as promised, PNG text, the strip and GIF,
the --out reuse rule, and every bad input as one line, exit 1, nothing written."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.cli_helpers import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny", "--decoder-steps", "3", "--super-res-steps", "2"]
PRIOR = ["--prior-steps", "2"]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for i, size in enumerate([(40, 30), (24, 24)]):
        path = folder / f"picture{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def written(result) -> list[Path]:
    assert result.exit_code == 0, result.output
    return [Path(p) for p in result.stdout.split()]


def text_of(path: Path) -> dict:
    with Image.open(path) as img:
        img.load()
        return dict(img.text)


def test_vary_writes_image_major(pictures, tmp_path):
    out = tmp_path / "out"
    paths = written(run_cli("vary", *map(str, pictures), "--num-images", "2", "--seed", "4",
                            "--out", str(out), *FAST))
    assert [p.name for p in paths] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    for i, path in enumerate(paths):
        meta = text_of(path)
        assert meta["source"] == str(pictures[i // 2]) and meta["image_index"] == str(i % 2)
        assert meta["mode"] == "variation" and meta["seed"] == "4" and meta["software"] == "unclip"
        assert meta["steps"] == "decoder 3, super-res 2" and "prior" not in meta["guidance"]
    import unclip

    expected = unclip.load("tiny").vary([Image.open(p) for p in pictures], seed=4, num_images=2,
                                        decoder_steps=3, super_res_steps=2)
    for path, image in zip(paths, expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))


def test_interpolate_writes_frames_strip_and_gif(pictures, tmp_path):
    out = tmp_path / "out"
    printed = written(run_cli("interpolate", str(pictures[0]), "a green square", "--frames", "4",
                              "--out", str(out), *FAST, *PRIOR))
    assert printed == [out / f"{i:04d}.png" for i in range(4)] + [out / "strip.png", out / "frames.gif"]
    paths = printed[:4]
    meta = [text_of(p) for p in paths]
    assert [m["t"] for m in meta] == ["0.0000", "0.3333", "0.6667", "1.0000"]
    assert meta[0]["a"] == str(pictures[0]) and meta[0]["b"] == "a green square"
    assert meta[0]["steps"].startswith("prior 2,")  # B went through the prior
    with Image.open(out / "strip.png") as strip:
        assert strip.size == (4 * 32, 32) and strip.text["mode"] == "interpolation"
        frames = np.asarray(strip.convert("RGB"))
    assert np.array_equal(frames[:, 32:64], np.asarray(Image.open(paths[1])))
    with Image.open(out / "frames.gif") as gif:
        assert gif.n_frames == 4 and gif.info["comment"] == b"unclip"


def test_textdiff_writes_one_image_per_amount(pictures, tmp_path):
    out = tmp_path / "out"
    printed = written(run_cli("textdiff", str(pictures[1]), "--from", "a red circle", "--to", "a blue circle",
                              "--amounts", "0,0.5,1", "--out", str(out), *FAST))
    assert printed[3:] == [out / "strip.png", out / "frames.gif"]  # the strip and GIF are named too
    paths = printed[:3]
    assert [text_of(p)["amount"] for p in paths] == ["0", "0.5", "1"]
    assert text_of(paths[0])["from"] == "a red circle" and text_of(paths[0])["to"] == "a blue circle"
    assert all(p.is_file() for p in printed)


def test_a_later_run_replaces_an_earlier_runs_outputs(pictures, tmp_path):
    out = tmp_path / "out"
    written(run_cli("interpolate", str(pictures[0]), str(pictures[1]), "--frames", "3", "--out", str(out),
                    *FAST))
    (out / "notes.txt").write_text("mine")
    written(run_cli("vary", str(pictures[0]), "--out", str(out), *FAST))
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "notes.txt"]  # strip, GIF and frames gone


def test_a_users_strip_is_refused_before_any_work(pictures, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (4, 4)).save(out / "strip.png")  # not unclip's
    result = run_cli("interpolate", str(pictures[0]), str(pictures[1]), "--out", str(out), *FAST)
    assert_one_line_error(result, "holds strip.png, which unclip did not write")
    assert sorted(p.name for p in out.iterdir()) == ["strip.png"]


def huge_png(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def no_encoder_model(tiny_folder, tmp_path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    shutil.rmtree(model / "image_encoder")
    index = json.loads((model / "model_index.json").read_text())
    del index["image_encoder"]
    (model / "model_index.json").write_text(json.dumps(index))
    return model


@pytest.mark.parametrize("args,needles", [
    (["vary", "missing.png"], ["image 'missing.png' does not exist"]),
    (["vary", "{text}"], ["is not an image unclip reads"]),
    (["vary", "{huge}"], ["more pixels than PIL decodes safely", "10000000000 pixels"]),
    (["vary", "{big}"], ["5000x5000 = 25,000,000 pixels, above the limit of 16,777,216"]),
    (["vary", "{picture}", "--num-images", "0"], ["--num-images must be a positive integer"]),
    (["vary", "{picture}", "--decoder-guidance", "0.5"], ["--decoder-guidance must be"]),
    (["interpolate", "{picture}", "typo.png"], ["image 'typo.png' does not exist"]),
    (["interpolate", "{picture}", "   "], ["prompt 1 is empty"]),
    (["interpolate", "{picture}", "{picture}", "--frames", "1"],
     ["--frames must be an integer from 2 to 16"]),
    (["textdiff", "{picture}", "--from", "", "--to", "a blue circle"], ["--from is empty"]),
    (["textdiff", "{picture}", "--from", "a red circle", "--to", "a blue circle", "--amounts", "0,x"],
     ["--amounts '0,x' must be comma-separated numbers"]),
    (["textdiff", "{picture}", "--from", "a red circle", "--to", "a blue circle", "--amounts", "2"],
     ["amounts must be numbers from 0"]),
    (["vary", "{picture}", "--model", "{no_encoder}"], ["vary needs a CLIP image encoder", "has none"]),
    (["textdiff", "{picture}", "--model", "{no_encoder}", "--from", "a", "--to", "b"],
     ["text_diff needs a CLIP image encoder"]),
])
def test_bad_input_is_one_line_and_writes_nothing(pictures, no_encoder_model, tmp_path, args, needles):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    huge = huge_png(tmp_path / "huge.png", 10**5, 10**5)
    big = huge_png(tmp_path / "big.png", 5000, 5000)  # under PIL's guard, over unclip's pixel limit
    names = {"picture": str(pictures[0]), "text": str(text), "huge": str(huge), "big": str(big),
             "no_encoder": str(no_encoder_model)}
    args = [a.format(**names) for a in args]
    model = [] if "--model" in args else ["--model", "tiny"]
    out = tmp_path / "out"
    result = run_cli(*args, *model, "--decoder-steps", "3", "--super-res-steps", "2", "--out", str(out))
    assert_one_line_error(result, *needles)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("doc", ["README.md", "docs/variations.md"])
def test_documented_text_diff_stays_in_the_demo_world(doc):
    """Its captions must be scenes the demo draws (shape colour != background): blue on blue went blank."""
    from unclip.models.shapes import all_combinations

    captions = re.findall(r'--(?:from|to) "([^"]+)"', (REPO / doc).read_text())
    assert len(captions) >= 2
    for text in captions:
        words = text.split()
        assert (words[1], words[2], words[5]) in all_combinations(), f"{doc}: {text!r} is outside the world"
