"""`unclip export tensorrt`: one TensorRT engine per exported ONNX network.

Per network: check that the fp16 graph kept its fragile nodes in fp32 -> optimisation profile
from the batch sizes -> build a strongly typed engine (the ONNX types decide each layer's
precision: fp16 matmuls/convs, fp32 norms, softmax, exp and timestep embedding) with a persistent
timing cache. Strong typing is the only way to get mixed precision that exists in both TensorRT
10 and 11 (11 removed BuilderFlag.FP16 and OBEY_PRECISION_CONSTRAINTS), so the precision is
chosen when the ONNX files are exported (`unclip export onnx --precision fp16`).

The build itself is Polygraphy's (`network_from_onnx_path`, `CreateConfig`, `engine_bytes_from_network`):
it tracks TensorRT's API changes for us. Ours are the profiles, the engine cache and manifest,
the fp32-island check and the one-line errors; all of it is tested without TensorRT.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import onnx

from unclip.errors import UnclipError
from unclip.export.fp16 import FRAGILE_OPS
from unclip.folders import write_file_atomic as write_atomic

log = logging.getLogger("unclip")

BATCH_AXIS = "batch"  # the one dynamic axis of the spec table (unclip.specs)
DEFAULT_WORKSPACE_GB = 4.0
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default; 0..5, higher = longer build, maybe faster engine

# How many rows each network sees for a call that makes B images (read off Pipeline.generate):
# encode_text runs the prompts plus one "" row when guided; prior, text_proj and decoder run the
# unconditional and conditional rows as one batch of 2B when guided; super-resolution is unguided;
# the image encoder runs once per input image of a variation call (at most B), never guided.
# (guided rows, unguided rows) as functions of B.
ROWS = {
    "text_encoder": (lambda b: b + 1, lambda b: b),
    "image_encoder": (lambda b: b, lambda b: b),
    "prior": (lambda b: 2 * b, lambda b: b),
    "text_proj": (lambda b: 2 * b, lambda b: b),
    "decoder": (lambda b: 2 * b, lambda b: b),
    "super_res_first": (lambda b: b, lambda b: b),
    "super_res_last": (lambda b: b, lambda b: b),
    # Stable unCLIP (engine/stable_unclip.py): its text encoders see the prompts and the "" prompts in
    # two calls of at most B rows; the latent UNet runs guided pairs like the decoder; the VAE decodes
    # B latents, or a streamed request's previews (from one row)
    "prior_text_encoder": (lambda b: b, lambda b: b),
    "unet": (lambda b: 2 * b, lambda b: b),
    "vae_decoder": (lambda b: b, lambda b: b),
}
# networks whose calls may have a single row whatever B is
ONE_ROW = ("text_encoder", "image_encoder", "prior_text_encoder", "vae_decoder")
# networks that take another's rows: the step cache's pair (`unclip export onnx --step-cache`) replaces
# the decoder's calls one for one
SAME_ROWS = {"decoder_full": "decoder", "decoder_shallow": "decoder"}


@dataclass(frozen=True)
class Profile:
    """Rows of the batch axis an engine accepts: min <= opt <= max (opt is what TensorRT tunes for)."""

    min: int
    opt: int
    max: int

    def tag(self) -> str:
        return f"b{self.min}-{self.opt}-{self.max}"

    def shapes(self, shape: list[int | str]) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) concrete shapes of a tensor whose spec shape has the batch axis."""
        return tuple(tuple(rows if a == BATCH_AXIS else int(a) for a in shape)
                     for rows in (self.min, self.opt, self.max))

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def profile_for(network: str, batch_sizes: list[int]) -> Profile:
    """min: the smallest call without guidance (one prompt for the text encoder and one image for
    the image encoder, which may see a single input whatever B is, as num_images repeats rows after
    them); opt: the middle batch size, guided; max: the largest batch size, guided."""
    rule = SAME_ROWS.get(network, network)
    if rule not in ROWS:
        raise UnclipError(f"no batch rule for network {network!r}; known: {', '.join([*ROWS, *SAME_ROWS])}")
    sizes = sorted(set(batch_sizes))
    guided, unguided = ROWS[rule]
    low = 1 if network in ONE_ROW else unguided(sizes[0])
    return Profile(min=low, opt=guided(sizes[len(sizes) // 2]), max=guided(sizes[-1]))


def check_build_args(workspace_gb: float, opt_level: int) -> None:
    if not (workspace_gb > 0 and workspace_gb == workspace_gb and workspace_gb < 1024):
        raise UnclipError(f"--workspace {workspace_gb} GB must be above 0 and below 1024 GB, e.g. 4")
    if not 0 <= opt_level <= 5:
        raise UnclipError(f"--opt-level {opt_level} must be 0..5 (TensorRT's builder optimisation level; "
                          f"default {DEFAULT_OPT_LEVEL})")


def fp16_fragile_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes of a FRAGILE_OPS type whose first input is fp16: in a strongly typed build they would
    run in fp16 (normalisation variances overflow, softmax/exp saturate). Empty for a good export."""
    typed = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*typed.graph.value_info, *typed.graph.input, *typed.graph.output]}
    types.update({t.name: t.data_type for t in typed.graph.initializer})
    return [f"{n.op_type} {n.name}" for n in typed.graph.node
            if n.op_type in FRAGILE_OPS and n.input and types.get(n.input[0]) == onnx.TensorProto.FLOAT16]


def check_fp32_islands(onnx_path: Path, network: str) -> None:
    model = onnx.load(str(onnx_path), load_external_data=False)  # types only: no weights needed
    bad = fp16_fragile_nodes(model)
    if bad:
        raise UnclipError(f"{network}: {len(bad)} node(s) that must compute in fp32 take fp16 inputs in "
                          f"{onnx_path.name} ({', '.join(bad[:3])}); re-export with this unclip's "
                          f"`unclip export onnx --precision fp16`")


def build_failure_message(network: str, profile: Profile, errors: list[str], workspace_gb: float) -> str:
    """One line: what failed, for which profile, TensorRT's own words, and the likely fix."""
    text = " ".join(errors).lower()
    if any(k in text for k in ("out of memory", "insufficient memory", "cudaerrormemoryallocation",
                               "memory allocation", "workspace")):
        fix = (f"out of GPU memory while choosing tactics: lower the largest --batch-sizes "
               f"(max {profile.max} rows) or raise --workspace (now {workspace_gb:g} GB) if the GPU has room")
    elif any(k in text for k in ("no implementation", "could not find any implementation",
                                 "no valid tactic", "impossible to find")):
        fix = (f"no kernel for a layer at these shapes: raise --workspace (now {workspace_gb:g} GB) or lower "
               f"the largest --batch-sizes (max {profile.max} rows)")
    else:
        fix = ("re-run with a smaller maximum batch and a larger --workspace; if it persists, report "
               "TensorRT's message above with your TensorRT version")
    said = "; ".join(errors[-2:]) or "TensorRT returned no engine and logged no error"
    return f"TensorRT failed to build {network} (batch rows min/opt/max {profile.tag()[1:]}): {said}; {fix}"


@dataclass(frozen=True)
class BuildOptions:
    workspace_gb: float = DEFAULT_WORKSPACE_GB
    opt_level: int = DEFAULT_OPT_LEVEL
    timing_cache: Path | None = None


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise UnclipError("TensorRT is not installed (import tensorrt failed); install TensorRT 10.1 or "
                          "newer with its builder, and Polygraphy (pip install tensorrt polygraphy, on a "
                          "machine with an NVIDIA GPU and driver); see docs/tensorrt.md") from None
    return tensorrt


def build_engine(onnx_path: Path, network: str, inputs: list[dict], profile: Profile,
                 options: BuildOptions) -> bytes:
    """A serialized engine for one network; `inputs` are the manifest's input entries (name, shape)."""
    trt = import_tensorrt()
    check_fp32_islands(onnx_path, network)
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath, Profile, engine_bytes_from_network
    from polygraphy.exception import PolygraphyException

    from unclip.export.tensorrt_check import polygraphy_log

    shapes = Profile()
    for tensor in inputs:
        low, opt, high = profile.shapes(tensor["shape"])
        shapes.add(tensor["name"], min=low, opt=opt, max=high)
    cache = options.timing_cache
    with ExitStack() as files, polygraphy_log() as errors:
        # file objects, not paths: given a path, Polygraphy leaves a .lock file and writes in place
        old = files.enter_context(open(cache, "rb")) if cache and cache.is_file() else None
        new = files.enter_context(tempfile.TemporaryFile()) if cache else None
        # TF32 stays off (Polygraphy's default, not TensorRT's): fp32 layers compute in fp32
        workspace = {trt.MemoryPoolType.WORKSPACE: int(options.workspace_gb * 2**30)}
        config = CreateConfig(profiles=[shapes], load_timing_cache=old, memory_pool_limits=workspace,
                              builder_optimization_level=options.opt_level)
        # STRONGLY_TYPED: required for mixed precision on 10.x, accepted (always on) on 11.x; the
        # parser reads <network>.onnx.data next to the file itself
        parse = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
        try:
            serialized = engine_bytes_from_network(parse, config=config, save_timing_cache=new)
        except PolygraphyException as exc:
            said = errors[:-1]  # the last is Polygraphy's own summary, the exception's text
            failure = build_failure_message(network, profile, said, options.workspace_gb)
            if "parse ONNX" in str(exc):
                failure = (f"TensorRT's ONNX parser rejected {onnx_path.name} ({'; '.join(said) or exc}); "
                           f"check `tensorrt_unsupported_ops` in the manifest and docs/tensorrt.md")
            raise UnclipError(failure) from None
        if new:  # tactic timings found here speed up every later build on this GPU
            new.seek(0)
            write_atomic(cache, new.read())
    return bytes(serialized)


def export_tensorrt(folder: Path, precision: str, batch_sizes: list[int], options: BuildOptions,
                    rebuild: bool = False, target=None) -> tuple[dict, list[str], list[str]]:
    """Build the engines DIR needs on this machine; returns (manifest, built, up to date)."""
    from unclip.export import manifest as layout
    from unclip.export import tensorrt_cache as cache

    folder = Path(folder)
    manifest = layout.read_manifest(folder)
    check_artifact_precision(manifest, folder, precision)
    layout.verify_files(folder, manifest)
    target = target or cache.current_target()
    wanted = {name: profile_for(name, batch_sizes) for name in manifest["networks"]}
    build, current = cache.plan_builds(folder, manifest, {n: p.to_dict() for n, p in wanted.items()},
                                       precision, target, rebuild)
    if options.timing_cache is None:
        timing = cache.timing_cache_file(folder, target)
        options = BuildOptions(options.workspace_gb, options.opt_level, timing)
    entries = {}
    for i, network in enumerate(build, 1):
        entry = manifest["networks"][network]
        profile = wanted[network]
        log.info("building %s (%d/%d, %s, rows %s)", network, i, len(build), precision, profile.tag())
        data = build_engine(folder / entry["file"], network, entry["inputs"], profile, options)
        new = cache.engine_entry(network, precision, profile.to_dict(), entry["sha256"], target,
                                 hashlib.sha256(data).hexdigest(),
                                 {"workspace_gb": options.workspace_gb, "opt_level": options.opt_level,
                                  "strongly_typed": True, "tf32": False})
        write_atomic(folder / new["file"], data)
        entries[network] = new
        old = cache.engine_entries(manifest).get(network)
        manifest = cache.record_engines(folder, entries)  # after each engine: a crash keeps the ones done
        if old and old["file"] != new["file"]:  # no longer listed anywhere: nothing could load it
            (folder / old["file"]).unlink(missing_ok=True)
    return manifest, build, current


def check_artifact_precision(manifest: dict, folder: Path, precision: str) -> None:
    exported = manifest.get("precision")
    if precision != exported:
        raise UnclipError(f"--precision {precision} but {folder} holds {exported} ONNX files: TensorRT "
                          f"builds strongly typed engines, whose precision is the ONNX graph's; re-export "
                          f"with `unclip export onnx --precision {precision} --out {folder}` or pass "
                          f"--precision {exported}")
