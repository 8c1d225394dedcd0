"""diffusers and transformers, imported once per process, under a lock, without Triton on CPU machines.

Why a lock. Both packages end their `__init__` by replacing themselves in `sys.modules` with a
lazy module (`_LazyModule`, whose attributes import their submodules on first access). A thread
that imports the package while another thread is still running that `__init__` waits for it, and
then continues with the module object it found before waiting: the plain package, which has none
of the lazy names, so `from diffusers import PriorTransformer` fails with "cannot import name"
(Python's import machinery: reproduced with a ten-line package; 3 of 4 threads failed in each of 8
runs of 4 concurrent `unclip.load("tiny")` before this lock). The lazy submodules (`diffusers.models`,
...) swap themselves the same way. So `LOAD_LOCK` is held while a model is built (`load_model`,
`unclip.load`), and `import_model_libraries` imports, under it, every class the torch backend
builds or patches: afterwards those names are plain attributes of initialised modules, and
`generate` calls in any number of threads import nothing more from either package. The lock
covers the whole build, not only the imports: a preset seeds torch's global generator and draws
its weights from it, so two builds at once would interleave their draws (measured: every thread's
image then differed from a single-threaded run's by up to 1.0), and a checkpoint's loaders import
submodules lazily too.

Why without Triton. Importing diffusers imports `torch._dynamo`, whose module body calls
`torch.utils._triton.has_triton_package()`, i.e. `import triton`. With a CPU build of torch
Triton has nothing to run (the kernels are the GPU fast path; the tests' interpreter sets
TRITON_INTERPRET), and its extension prints nanobind "leaked" warnings at shutdown once
`gc.freeze()` has run (`unclip serve`'s warm-up does: 27 lines). So with such a build the first
import of diffusers sees no Triton: `torch._dynamo` records that it has none (`torch.compile` on
CPU does not use it), and the check's cache is cleared afterwards so that a later `import triton`
(the interpreter, `--kernels`) is seen.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

LOAD_LOCK = threading.RLock()  # held while a model is built: one build at a time per process
_imported = False


def import_model_libraries() -> None:
    """Import, once, every diffusers/transformers name the torch backend uses (see the module doc)."""
    global _imported
    with LOAD_LOCK:
        if _imported:
            return
        with _without_triton_unless_usable():
            import diffusers  # noqa: F401 - the package first, with torch._dynamo under it
        # the names network_classes/build_network/_load_tokenizer/use_sdpa/fuse_group_norm_silu import
        from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel  # noqa: F401
        from diffusers.models import attention_processor, resnet  # noqa: F401
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel  # noqa: F401
        from transformers import (  # noqa: F401
            CLIPTextConfig,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            CLIPVisionConfig,
            CLIPVisionModelWithProjection,
        )

        _imported = True


def triton_usable() -> bool:
    """Whether Triton may run anything here: a torch built for CUDA or ROCm, or Triton's CPU interpreter
    asked for. The build, not `torch.cuda.is_available()`: asking the driver would initialise CUDA in
    this process and break CUDA in its forked children (so a CUDA build on a GPU-less machine, which
    ships Triton, still imports it; the CPU build does not)."""
    import torch

    return (bool(os.environ.get("TRITON_INTERPRET")) or torch.backends.cuda.is_built()
            or torch.version.hip is not None)


@contextlib.contextmanager
def _without_triton_unless_usable() -> Iterator[None]:
    if "triton" in sys.modules or "torch._dynamo" in sys.modules or triton_usable():
        yield  # already decided, or Triton may run: import as usual
        return
    sys.modules["triton"] = None  # `import triton` raises ImportError while this holds
    try:
        yield
    finally:
        if "triton" in sys.modules and sys.modules["triton"] is None:
            del sys.modules["triton"]
        _forget_triton_checks()


def _forget_triton_checks() -> None:
    """torch caches its `import triton` checks (functools.cache): let a later import be seen."""
    try:
        from torch.utils import _triton
    except ImportError:  # a torch without the module: nothing cached
        return
    for value in vars(_triton).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()
