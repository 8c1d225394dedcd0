"""Output folders written all-or-nothing: checked before any work, staged, then renamed into place.

Standard library only, so every layer (CLI, checkpoints, ONNX artifacts) can use it.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unclip.errors import UnclipError


def check_output_folder(out: Path) -> None:
    """Fail before any work if `out` could not become a folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UnclipError(f"--out {out} is a file; give a folder path")
    existing = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise UnclipError(f"--out {out} cannot be created: {existing} is a file; choose another folder")
    try:  # a real probe: permission bits do not tell for root or read-only file systems
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise UnclipError(f"--out {out} is not writable ({existing}: {exc.strerror or exc}); "
                          "choose another folder") from None


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out`; on success it replaces `out`, on any error it is
    deleted and `out` is untouched. The swap is two renames on one file system; the old folder is
    removed only after the new one is in place."""
    out = Path(out)
    check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp.", dir=out.parent))
    try:
        yield tmp
        _readable_by_all(tmp)
        with interrupt_after():
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def interrupt_after() -> Iterator[None]:
    """A Ctrl-C during the block is raised when it ends: a sequence of renames is never left half
    done (two renames swap a folder; a run's images are renamed into place one by one)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # signal handlers can only be set from the main thread (and by Python)
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _readable_by_all(folder: Path) -> None:
    """mkdtemp (and some writers) create owner-only modes; give the folder the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_file_atomic(path: Path, data: str | bytes) -> None:
    """A reader (or a Ctrl-C) never sees half a file: write a sibling, then rename over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
