"""The Triton kernels on CPU under Triton's interpreter, in a child process, so nothing leaks.

Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function (triton.jit reads
triton.knobs.runtime.interpret, i.e. the environment, at that moment), and that includes its own
standard library (`tl.sum` is a jit function, decorated when triton is imported). So the
variable must be set before triton is imported, for the whole process: the interpreted kernels
run in one child process started with TRITON_INTERPRET=1, and this process (pytest's, where
`unclip.kernels` must stay compiled CUDA kernels) never sets it.

    remote("unclip.kernels.guidance_step:guidance_step_triton", *args, **kwargs)

pickles the call to the child, which imports the function, runs it and pickles the result back
(tensors included). The child starts on first use (~5 s: torch and triton imports) and serves
the whole session. `python -m tests.triton_interpreter` is the child.
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import struct
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_child: subprocess.Popen | None = None


def _send(stream, value) -> None:
    data = pickle.dumps(value)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    return pickle.loads(stream.read(struct.unpack("<Q", header)[0]))


def _start() -> subprocess.Popen:
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    child = subprocess.Popen([sys.executable, "-m", "tests.triton_interpreter"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env=env, cwd=REPO)
    atexit.register(_stop, child)
    return child


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.stdin.close()  # the child's loop ends at end of input
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()


def remote(target: str, *args, **kwargs):
    """`module:function`(*args, **kwargs), run in the interpreter child; its exception re-raised here."""
    global _child
    if _child is None or _child.poll() is not None:
        _child = _start()
    _send(_child.stdin, (target, args, kwargs))
    reply = _receive(_child.stdout)
    if reply is None:
        raise RuntimeError(f"the Triton interpreter process exited (code {_child.wait()}) during {target}; "
                           f"its stderr is above (triton missing? pip install -e '.[dev]' installs it)")
    ok, value = reply
    if not ok:
        raise AssertionError(f"{target} failed in the Triton interpreter process:\n{value}")
    return value


def _serve() -> None:
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # library prints go to stderr, not into the replies
    sys.stdout = sys.stderr
    import torch

    import unclip.kernels.group_norm_silu as gn
    import unclip.kernels.guidance_step as step

    if not (gn.runs_on(torch.zeros(1)) and step.runs_on(torch.zeros(1))):  # imports the kernels
        sys.exit("tests.triton_interpreter: triton is missing or TRITON_INTERPRET=1 did not take effect")
    while (message := _receive(sys.stdin.buffer)) is not None:
        target, args, kwargs = message
        module, _, name = target.partition(":")
        try:
            _send(replies, (True, getattr(importlib.import_module(module), name)(*args, **kwargs)))
        except Exception:
            _send(replies, (False, traceback.format_exc()))


if __name__ == "__main__":
    _serve()
