"""The images a command writes into its --out folder, all or nothing, and the folder's reuse rule.

A run writes OUT/0000.png, OUT/0001.png, ... (plus, for a sequence, strip.png and frames.gif), each
marked as unclip's (PNG text software=unclip, the GIF's comment). A new run into the same folder
replaces an earlier run's outputs; a file of one of those names that unclip did not write is the
user's, and the run is refused before any work.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path

from unclip.errors import UnclipError
from unclip.folders import interrupt_after

IMAGE_NAME = re.compile(r"\d{4}\.png")  # what every image command writes: 0000.png, 0001.png, ...
STRIP, GIF = "strip.png", "frames.gif"  # a sequence's frames side by side, and as an animation
SOFTWARE = "unclip"
GIF_FRAME_MS = 250


def _is_output(name: str) -> bool:
    return bool(IMAGE_NAME.fullmatch(name)) or name in (STRIP, GIF)


def _ours(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            mark = img.info.get("software") if path.suffix == ".png" else img.info.get("comment")
    except (OSError, ValueError):
        return False
    return mark in (SOFTWARE, SOFTWARE.encode())


def earlier_images(out: Path) -> list[Path]:
    """The outputs an earlier run wrote into `out` (NNNN.png, strip.png, frames.gif marked as
    unclip's): a new run replaces them. One of those names that unclip did not write is the user's,
    and is refused before any work."""
    found = []
    for path in sorted(out.iterdir()) if out.is_dir() else []:
        if _is_output(path.name):
            if not _ours(path):
                raise UnclipError(f"--out {out} holds {path.name}, which unclip did not write; a run would "
                                  "replace it: move it away or choose another folder", param="out")
            found.append(path)
    return found


def png_bytes(image, metadata: dict[str, str]) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in {**metadata, "software": SOFTWARE}.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def strip_files(images: list, metadata: dict[str, str]) -> dict[str, bytes]:
    """A sequence's extras: its frames side by side (strip.png) and as a looping GIF (frames.gif)."""
    from PIL import Image

    width, height = images[0].size
    strip = Image.new("RGB", (width * len(images), height))
    for i, image in enumerate(images):
        strip.paste(image, (i * width, 0))
    gif = io.BytesIO()
    images[0].save(gif, format="GIF", save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0,
                   comment=SOFTWARE)
    return {STRIP: png_bytes(strip, metadata), GIF: gif.getvalue()}


def write_images(images: list, out: Path, metadata: list[dict[str, str]],
                 extras: dict[str, bytes] | None = None) -> list[Path]:
    """All or nothing: each PNG (and each extra file) goes to a temporary name, renamed into place
    once all are written; then an earlier run's outputs that this run did not overwrite are removed.
    Returns every path written, the images' first, then the extras' (what a command prints)."""
    out.mkdir(parents=True, exist_ok=True)
    earlier = earlier_images(out)
    files = [(f"{i:04d}.png", png_bytes(image, meta))
             for i, (image, meta) in enumerate(zip(images, metadata, strict=True))]
    files += list((extras or {}).items())
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in files:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
            staged.append((Path(tmp), out / name))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    except BaseException as exc:  # an error or a Ctrl-C: no temporary file stays behind
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UnclipError(f"cannot write images to {out}: {exc.strerror or exc}") from None
        raise
    umask = os.umask(0)
    os.umask(umask)
    with interrupt_after():
        for tmp, final in staged:
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; images should read like any other file
            os.replace(tmp, final)
        written = {final for _, final in staged}
        for path in earlier:
            if path not in written:
                path.unlink(missing_ok=True)
    return [final for _, final in staged]
