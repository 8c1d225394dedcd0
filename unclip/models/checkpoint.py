"""Checkpoints in the folder layout diffusers uses for UnCLIPPipeline.

A downloaded kakaobrain/karlo-v1-alpha folder loads as it is: we read it component by
component (its model_index.json names text_proj's library "unclip", which diffusers' own
loader refuses). Weights load from safetensors only unless pickle is explicitly allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import ConfigDict, Field, ValidationError, create_model

from unclip.engine.image_input import (
    CLIP_PROCESSOR_FILE,
    PREPROCESS_FILE,
    ImagePreprocess,
    from_clip_processor,
    read_preprocess,
)
from unclip.engine.settings import read_sampler_defaults, scheduler_config, write_sampler_defaults
from unclip.engine.tokenizer import check_vocabulary_files
from unclip.errors import UnclipError, schema_error
from unclip.folders import staged_folder
from unclip.models.components import NETWORKS, SCHEDULERS, UnclipComponents, network_classes
from unclip.models.presets import PRESETS

LIBRARIES = {  # what save_components writes into model_index.json (as Karlo's folder has it)
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "prior": ("diffusers", "PriorTransformer"),
    "text_proj": ("unclip", "UnCLIPTextProjModel"),
    "decoder": ("diffusers", "UNet2DConditionModel"),
    "super_res_first": ("diffusers", "UNet2DModel"),
    "super_res_last": ("diffusers", "UNet2DModel"),
    **{name: ("diffusers", "UnCLIPScheduler") for name in SCHEDULERS},
}
# What model_index.json may name, beyond LIBRARIES: the fast tokenizer class, text_proj under
# newer diffusers' library name, and the CLIP image tower that image-conditioned models ship with
# the config of its preprocessing (transformers has named that class four ways).
ALSO_ACCEPTED = {"tokenizer": [("transformers", "CLIPTokenizerFast")],
                 "text_proj": [("diffusers", "UnCLIPTextProjModel")],
                 "feature_extractor": [("transformers", name) for name in (
                     "CLIPImageProcessorPil", "CLIPImageProcessorFast", "CLIPFeatureExtractor")]}
IMAGE_LIBRARIES = {"image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
                   "feature_extractor": ("transformers", "CLIPImageProcessor")}
VARIATION = "UnCLIPImageVariationPipeline"  # diffusers' image-variation checkpoints: no prior
VARIATION_LACKS = ("prior", "prior_scheduler")


def _entry_type(name: str, pair: tuple[str, str]):
    libraries, classes = zip(pair, *ALSO_ACCEPTED.get(name, []), strict=True)
    return tuple[Literal[tuple(dict.fromkeys(libraries))], Literal[tuple(dict.fromkeys(classes))]]


def _index_schema(class_name: str, required: dict, optional: dict):
    """model_index.json's schema: every required component named as [library, class] of the class we
    load; an optional one may be [null, null] (diffusers' mark for "not saved") or absent."""
    return create_model(
        class_name, __config__=ConfigDict(extra="forbid", populate_by_name=True),
        class_name=(Literal[class_name], Field(class_name, alias="_class_name")),
        **{name: (_entry_type(name, pair), ...) for name, pair in required.items()},
        **{name: (_entry_type(name, pair) | tuple[None, None] | None, None)
           for name, pair in optional.items()})


_ModelIndex = _index_schema("UnCLIPPipeline", LIBRARIES, IMAGE_LIBRARIES)
_VariationIndex = _index_schema(
    VARIATION, {**{k: v for k, v in LIBRARIES.items() if k not in VARIATION_LACKS},
                "image_encoder": IMAGE_LIBRARIES["image_encoder"]},
    {"feature_extractor": IMAGE_LIBRARIES["feature_extractor"]})
TRANSFORMERS_CONFIGS = {"text_encoder": "CLIPTextConfig", "image_encoder": "CLIPVisionConfig"}
SAFETENSORS = ("model.safetensors", "diffusion_pytorch_model.safetensors")
PICKLES = ("pytorch_model.bin", "diffusion_pytorch_model.bin")
ALLOW_PICKLE_HINT = "pass --allow-pickle (Python: allow_pickle=True) if you trust its source"


def save_components(components: UnclipComponents, out: Path) -> None:
    """Write the folder atomically: a temporary sibling, then one rename."""
    from safetensors.torch import save_file

    variation = components.prior is None
    with staged_folder(Path(out)) as tmp:
        index = {"_class_name": VARIATION if variation else "UnCLIPPipeline",
                 "_diffusers_version": _version("diffusers")}
        index.update({name: list(lib) for name, lib in LIBRARIES.items()
                      if not (variation and name in VARIATION_LACKS)})
        if components.image_encoder is not None:
            index["image_encoder"] = list(IMAGE_LIBRARIES["image_encoder"])
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        components.tokenizer.save_pretrained(tmp / "tokenizer")
        _write_tokenizer_files(components.tokenizer, tmp / "tokenizer")
        for name, net in components.networks().items():
            folder = tmp / name
            folder.mkdir()
            if name in TRANSFORMERS_CONFIGS:
                net.config.to_json_file(folder / "config.json")
                weights = "model.safetensors"
            else:
                config = {"_class_name": LIBRARIES[name][1], **dict(net.config)}
                (folder / "config.json").write_text(json.dumps(config, indent=2, default=list))
                weights = "diffusion_pytorch_model.safetensors"
            state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
            save_file(state, folder / weights, metadata={"format": "pt"})
        if components.image_preprocess is not None:  # ours: it can say "area" and normalised embeddings
            (tmp / "image_encoder" / PREPROCESS_FILE).write_text(
                json.dumps(components.image_preprocess.to_dict(), indent=2) + "\n")
        for name, config in components.schedulers.items():
            (tmp / name).mkdir()
            (tmp / name / "scheduler_config.json").write_text(json.dumps(config.to_dict(), indent=2))
        write_sampler_defaults(tmp, components.sampler_defaults)


def _write_tokenizer_files(tokenizer, folder: Path) -> None:
    """Karlo's tokenizer folder holds vocab.json + merges.txt; newer transformers write only
    tokenizer.json, so write the classic pair too for readers of the original layout."""
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return
    tok = json.loads((folder / "tokenizer.json").read_text())
    model = tok["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UnclipError(f"{what} is missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnclipError(f"{what} is not valid JSON ({path}: {exc}); re-download or re-export it") from None
    if not isinstance(data, dict):
        raise UnclipError(f"{what} must hold a JSON object: {path}")
    return data


def _load_state_dict(folder: Path, name: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for file in SAFETENSORS:
        if (folder / file).exists():
            try:
                return load_file(folder / file)
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise UnclipError(f"weights of {name!r} are corrupt ({folder / file}: {exc}); "
                                  "re-download or re-save the model") from None
    for file in PICKLES:
        if (folder / file).exists():
            if not allow_pickle:
                raise UnclipError(f"{name!r} has only a pickle checkpoint ({folder / file}), which can run "
                                  f"code when loaded; {ALLOW_PICKLE_HINT}")
            try:
                return torch.load(folder / file, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt file here
                raise UnclipError(f"weights of {name!r} are corrupt ({folder / file}: {exc})") from None
    raise UnclipError(f"no weights for {name!r} in {folder} (expected {' or '.join(SAFETENSORS)})")


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    if not ((folder / "vocab.json").exists() or (folder / "tokenizer.json").exists()):
        raise UnclipError(f"model folder {folder.parent} has no tokenizer (expected {folder}/vocab.json "
                          "and merges.txt)")
    check_vocabulary_files(folder)
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - the tokenizer library raises many types
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UnclipError(f"tokenizer in {folder} cannot be read ({detail}); re-download or re-save "
                          "the model") from None


def _check_consistency(root: Path, tokenizer, networks: dict[str, torch.nn.Module],
                       image_preprocess: ImagePreprocess | None) -> None:
    """Components that each load but do not fit together would fail mid-generate: say so here."""
    text, proj = networks["text_encoder"].config, networks["text_proj"].config
    decoder = networks["decoder"].config
    length = tokenizer.model_max_length
    # the CLIP embedding size: the prior's where there is one, else text_proj's (a variation-only model)
    prior = networks["prior"].config if networks.get("prior") is not None else None
    clip = (("the prior's embedding_dim", prior.embedding_dim) if prior is not None
            else ("text_proj's clip_embeddings_dim", proj.clip_embeddings_dim))
    pairs = [  # (what, value, must equal what, value)
        ("the tokenizer's model_max_length (tokenizer/tokenizer_config.json)", length,
         "the text encoder's max_position_embeddings", text.max_position_embeddings),
        ("the text encoder's projection_dim", text.projection_dim, *clip),
    ]
    if prior is not None:
        pairs += [("the prior's num_embeddings", prior.num_embeddings, "the tokenizer's model_max_length",
                   length), ("text_proj's clip_embeddings_dim", proj.clip_embeddings_dim, *clip)]
    pairs += [
        ("text_proj's cross_attention_dim", proj.cross_attention_dim, "the decoder's cross_attention_dim",
         decoder.cross_attention_dim),
        ("super_res_first's in_channels", networks["super_res_first"].config.in_channels,
         "twice the decoder's in_channels", 2 * decoder.in_channels),
        ("super_res_last's sample_size", networks["super_res_last"].config.sample_size,
         "super_res_first's sample_size", networks["super_res_first"].config.sample_size),
    ]
    if networks.get("image_encoder") is not None:
        image = networks["image_encoder"].config
        pairs += [("the image encoder's projection_dim", image.projection_dim, *clip),
                  ("the image encoder's num_channels", image.num_channels, "RGB's channels", 3),
                  ("the image preprocessing's crop size", image_preprocess.crop,
                   "the image encoder's image_size", image.image_size)]
    for what, value, other, expected in pairs:
        if value != expected:
            raise UnclipError(f"model folder {root}: {what} is {value}, but {other} is {expected}; the "
                              "folder mixes components of different models")
    if len(tokenizer) > text.vocab_size:
        raise UnclipError(f"model folder {root}: the tokenizer has {len(tokenizer)} tokens, but the text "
                          f"encoder's vocab_size is {text.vocab_size}; the folder mixes components of "
                          "different models")


def _load_network(root: Path, name: str, allow_pickle: bool) -> torch.nn.Module:
    folder = root / name
    if not folder.is_dir():
        raise UnclipError(f"model folder {root} has no {name!r} component (expected folder {folder})")
    config = _read_json(folder / "config.json", f"config of {name!r}")
    cls = network_classes()[name]
    declared = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if declared is not None and declared != cls.__name__:
        raise UnclipError(f"{folder / 'config.json'} describes a {declared!r}, but {name!r} must be a "
                          f"{cls.__name__}; the folder mixes files of different models")
    try:
        if name in TRANSFORMERS_CONFIGS:
            import transformers

            net = cls(getattr(transformers, TRANSFORMERS_CONFIGS[name]).from_dict(config))
        else:
            net = cls.from_config(config)
    except Exception as exc:  # noqa: BLE001 - library constructors raise many types for a bad config
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UnclipError(f"config of {name!r} does not describe a {cls.__name__} ({detail}); "
                          "re-download or re-save the model") from None
    state = _load_state_dict(folder, name, allow_pickle)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = str(exc).split("\n\t")[1] if "\n\t" in str(exc) else str(exc)
        raise UnclipError(f"weights of {name!r} do not match its config ({detail[:160]}); "
                          "the folder mixes files from different models") from None
    unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
    if result.missing_keys or unexpected:
        problem = (f"missing {result.missing_keys[:3]}" if result.missing_keys
                   else f"unexpected {unexpected[:3]}")
        raise UnclipError(f"weights of {name!r} do not match its config ({problem}); "
                          "the folder mixes files from different models")
    return net.eval().requires_grad_(False)


def check_model_index(index: dict, path: Path) -> None:
    """Each component must be the library and class this loader builds: a checkpoint naming
    another class (`UNet9000Model`) would otherwise load our class from its files."""
    data = {k: v for k, v in index.items() if not k.startswith("_") or k == "_class_name"}
    schema = _VariationIndex if data.get("_class_name") == VARIATION else _ModelIndex
    try:
        schema.model_validate(data)
    except ValidationError as exc:
        expected = ", ".join(f"{n}: {list(lib)}" for n, lib in LIBRARIES.items())
        components = [n for n in schema.model_fields if n != "class_name"]
        raise schema_error(exc, where=f"{path}: ", data=data,
                           fix="this unclip loads UnCLIPPipeline checkpoints (diffusers layout) whose "
                               f"model_index.json names {expected}, and {VARIATION} checkpoints",
                           unknown=f"a {schema.__name__} checkpoint has {', '.join(components)}") from None


def load_components(path: str | Path, allow_pickle: bool = False) -> UnclipComponents:
    """Load a checkpoint folder, checking each component with a message that names it."""
    root = Path(path)
    if not root.is_dir():
        raise UnclipError(f"model folder {root} does not exist; give a checkpoint folder "
                          f"or a preset ({', '.join(PRESETS)})")
    if not (root / "model_index.json").exists() and (root / "manifest.json").exists():
        raise UnclipError(f"{root} is an exported ONNX artifact folder, not a checkpoint: load it with "
                          "--backend onnxruntime (Python: unclip.load(folder, backend='onnxruntime'))")
    index = _read_json(root / "model_index.json", "model_index.json")
    check_model_index(index, root / "model_index.json")
    variation = index.get("_class_name") == VARIATION
    tokenizer = _load_tokenizer(root / "tokenizer")
    names = [n for n in NETWORKS if not (variation and n in VARIATION_LACKS)]
    networks = {name: _load_network(root, name, allow_pickle) for name in names}
    networks["prior"] = networks.get("prior")
    image_preprocess = None
    if _listed(index, "image_encoder"):
        networks["image_encoder"] = _load_network(root, "image_encoder", allow_pickle)
        image_preprocess = _load_image_preprocess(root, index)
    schedulers = {}
    for name in [n for n in SCHEDULERS if not (variation and n in VARIATION_LACKS)]:
        path = root / name / "scheduler_config.json"
        schedulers[name] = scheduler_config(_read_json(path, f"config of {name!r}"), str(path),
                                            "re-download or re-save the model")
    _check_consistency(root, tokenizer, networks, image_preprocess)
    name = "demo" if root.resolve() == (Path(__file__).parent / "demo").resolve() else str(root)
    return UnclipComponents(tokenizer=tokenizer, schedulers=schedulers, name=name,
                            extra={"folder": str(root)}, sampler_defaults=read_sampler_defaults(root),
                            image_preprocess=image_preprocess, **networks)


def _listed(index: dict, name: str) -> bool:
    """model_index.json names the component (not diffusers' [null, null] for "not saved")."""
    entry = index.get(name)
    return isinstance(entry, list) and entry[0] is not None


def _load_image_preprocess(root: Path, index: dict) -> ImagePreprocess:
    """Ours (image_encoder/preprocess.json) where present, else diffusers' CLIPImageProcessor config."""
    fix = "re-download or re-save the model"
    ours, theirs = root / "image_encoder" / PREPROCESS_FILE, root / "feature_extractor" / CLIP_PROCESSOR_FILE
    if ours.is_file():
        return read_preprocess(ours, fix)
    if theirs.is_file():
        return from_clip_processor(_read_json(theirs, "config of 'feature_extractor'"), str(theirs), fix)
    missing = theirs if _listed(index, "feature_extractor") else f"{theirs} (diffusers) or {ours}"
    raise UnclipError(f"model folder {root} has an image_encoder but no image preprocessing config: expected "
                      f"{missing}")
