"""Adopt a fine-tuned decoder (training/finetune_decoder.py) into the shipped demo model.

    python -m training.adopt_decoder /tmp/ftx/drop0.6-1200

Why a script: the fine-tune writes a complete model folder elsewhere; adopting it must change only
the networks it trained (text_proj, decoder) and keep the demo's record of how it was made. So this
refuses a folder whose other networks differ from the demo's, copies the two trained networks'
weights, and appends the fine-tune (command, recipe changes, time, machine) to the list
"finetunes" of the demo's training_log.json without touching the original training's record. The
evaluation files, the model card and the sampler defaults are re-measured separately (the model
card says with which commands).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from training.finetune_decoder import DEMO, NETWORKS

TRAINED = ("text_proj", "decoder")


def _weights(folder: Path, network: str) -> Path:
    (path,) = (folder / network).glob("*.safetensors")
    return path


def adopt(source: Path, target: Path = DEMO) -> dict:
    log = json.loads((source / "training_log.json").read_text())
    if sorted(log.get("finetuned", [])) != sorted(TRAINED):
        raise SystemExit(f"adopt_decoder: error: {source} is not a finetune_decoder output (no 'finetuned' "
                         "entry in its training_log.json)")
    for network in NETWORKS:
        if network in TRAINED:
            continue
        if _weights(source, network).read_bytes() != _weights(target, network).read_bytes():
            raise SystemExit(f"adopt_decoder: error: {source}'s {network} differs from {target}'s; "
                             "only text_proj and decoder may change")
    for network in TRAINED:
        shutil.copyfile(_weights(source, network), _weights(target, network))
    target_log_path = target / "training_log.json"
    target_log = json.loads(target_log_path.read_text())
    base = target_log["recipe"]
    changed = {k: v for k, v in log["recipe"].items() if base.get(k) != v}
    entry = {"command": log["command"], "from": log["finetuned_from"], "adopted": str(source),
             "networks": list(TRAINED), "recipe_changes": changed,
             "seconds": log["seconds_per_stage"]["decoder"], "machine": log["machine"], "date": log["date"]}
    target_log.setdefault("finetunes", []).append(entry)  # in order: each continued the one before
    target_log_path.write_text(json.dumps(target_log, indent=2) + "\n")
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a folder written by training.finetune_decoder")
    args = parser.parse_args()
    print(json.dumps(adopt(args.source), indent=2))


if __name__ == "__main__":
    main()
