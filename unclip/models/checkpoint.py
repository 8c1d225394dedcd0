"""Checkpoints in the folder layout diffusers uses for UnCLIPPipeline.

A downloaded kakaobrain/karlo-v1-alpha folder loads as it is: we read it component by
component (its model_index.json names text_proj's library "unclip", which diffusers' own
loader refuses). Weights load from safetensors only unless pickle is explicitly allowed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unclip.engine.pipeline import read_sampler_defaults, write_sampler_defaults
from unclip.engine.scheduler import SchedulerConfig
from unclip.errors import UnclipError
from unclip.folders import staged_folder
from unclip.models.components import NETWORKS, SCHEDULERS, UnclipComponents, network_classes
from unclip.models.presets import PRESETS

LIBRARIES = {
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "prior": ("diffusers", "PriorTransformer"),
    "text_proj": ("unclip", "UnCLIPTextProjModel"),
    "decoder": ("diffusers", "UNet2DConditionModel"),
    "super_res_first": ("diffusers", "UNet2DModel"),
    "super_res_last": ("diffusers", "UNet2DModel"),
    **{name: ("diffusers", "UnCLIPScheduler") for name in SCHEDULERS},
}
SAFETENSORS = ("model.safetensors", "diffusion_pytorch_model.safetensors")
PICKLES = ("pytorch_model.bin", "diffusion_pytorch_model.bin")
ALLOW_PICKLE_HINT = "pass --allow-pickle (Python: allow_pickle=True) if you trust its source"


def save_components(components: UnclipComponents, out: Path) -> None:
    """Write the folder atomically: a temporary sibling, then one rename."""
    from safetensors.torch import save_file

    with staged_folder(Path(out)) as tmp:
        index = {"_class_name": "UnCLIPPipeline", "_diffusers_version": _version("diffusers")}
        index.update({name: list(lib) for name, lib in LIBRARIES.items()})
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        components.tokenizer.save_pretrained(tmp / "tokenizer")
        _write_tokenizer_files(components.tokenizer, tmp / "tokenizer")
        for name, net in components.networks().items():
            folder = tmp / name
            folder.mkdir()
            if name == "text_encoder":
                net.config.to_json_file(folder / "config.json")
                weights = "model.safetensors"
            else:
                config = {"_class_name": LIBRARIES[name][1], **dict(net.config)}
                (folder / "config.json").write_text(json.dumps(config, indent=2, default=list))
                weights = "diffusion_pytorch_model.safetensors"
            state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
            save_file(state, folder / weights, metadata={"format": "pt"})
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


def _load_network(root: Path, name: str, allow_pickle: bool) -> torch.nn.Module:
    folder = root / name
    if not folder.is_dir():
        raise UnclipError(f"model folder {root} has no {name!r} component (expected folder {folder})")
    config = _read_json(folder / "config.json", f"config of {name!r}")
    cls = network_classes()[name]
    try:
        if name == "text_encoder":
            from transformers import CLIPTextConfig

            net = cls(CLIPTextConfig.from_dict(config))
        else:
            net = cls.from_config(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise UnclipError(f"config of {name!r} does not describe a {cls.__name__} ({exc})") from None
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


def load_components(path: str | Path, allow_pickle: bool = False) -> UnclipComponents:
    """Load a checkpoint folder, checking each component with a message that names it."""
    from transformers import CLIPTokenizer

    root = Path(path)
    if not root.is_dir():
        raise UnclipError(f"model folder {root} does not exist; give a checkpoint folder "
                          f"or a preset ({', '.join(PRESETS)})")
    index = _read_json(root / "model_index.json", "model_index.json")
    for name in (*NETWORKS, "tokenizer", *SCHEDULERS):
        if name not in index:
            raise UnclipError(f"{root / 'model_index.json'} lists no {name!r} component; "
                              "is this an unCLIP (UnCLIPPipeline) checkpoint?")
    tok_folder = root / "tokenizer"
    if not ((tok_folder / "vocab.json").exists() or (tok_folder / "tokenizer.json").exists()):
        raise UnclipError(f"model folder {root} has no tokenizer (expected {tok_folder}/vocab.json "
                          "and merges.txt)")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tok_folder)
    except Exception as exc:  # noqa: BLE001 - the tokenizer library raises many types
        raise UnclipError(f"tokenizer in {tok_folder} cannot be read ({exc})") from None
    networks = {name: _load_network(root, name, allow_pickle) for name in NETWORKS}
    schedulers = {}
    for name in SCHEDULERS:
        data = _read_json(root / name / "scheduler_config.json", f"config of {name!r}")
        try:
            schedulers[name] = SchedulerConfig.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise UnclipError(f"config of {name!r} is not supported: {exc}") from None
    name = "demo" if root.resolve() == (Path(__file__).parent / "demo").resolve() else str(root)
    return UnclipComponents(tokenizer=tokenizer, schedulers=schedulers, name=name,
                            extra={"folder": str(root)}, sampler_defaults=read_sampler_defaults(root),
                            **networks)
