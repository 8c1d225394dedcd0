"""Fine-tune the demo model's decoder with more caption dropout: an experiment (issue 14).

Why: the shipped decoder saw its caption dropped in only ~37 % of its training steps
(Recipe.text_drop_p 0.3 plus unconditional_p 0.1; DALL-E 2 drops it 50 %), so decoding a scene's own
CLIP image embedding with an empty caption, as a variation does, keeps the shape's kind 70 % of the
time against 88 % with the caption. This continues training text_proj + decoder from the shipped
weights with a higher --text-drop-p (the rest of the model is loaded and saved unchanged), with
train_demo's loss, warm-up + cosine learning-rate schedule and EMA, on batches of another data seed.

    PYTHONPATH=$PWD python3 -m training.finetune_decoder --out /tmp/demo-ft --steps 600 --text-drop-p 0.6
    PYTHONPATH=$PWD python3 benchmarks/variations.py --model /tmp/demo-ft --out /tmp/demo-ft-variations
    PYTHONPATH=$PWD unclip evaluate --model /tmp/demo-ft

--out is a scratch folder outside the package (it must not exist yet); the shipped
unclip/models/demo/ is only read. The result is a complete model folder, saved as train_demo saves
one, with the source model's sampler_defaults.json and a training_log.json naming the fine-tune.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from training.train_demo import Recipe, Trainer, save_model

DEMO = Path(__file__).resolve().parent.parent / "unclip" / "models" / "demo"
NETWORKS = ("text_encoder", "image_encoder", "prior", "text_proj", "decoder", "super_res_first",
            "super_res_last")


def load_weights(trainer: Trainer, model: Path) -> None:
    """Every network of the trainer from the model folder's safetensors (strict: same configs)."""
    from safetensors.torch import load_file

    for name in NETWORKS:
        files = [p for p in (model / name).glob("*.safetensors")]
        if len(files) != 1:
            raise SystemExit(f"finetune_decoder: error: {model / name} should hold one .safetensors file")
        trainer.nets[name].load_state_dict(load_file(files[0]), strict=True)
        trainer.nets[name].eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO, help="the model to start from")
    parser.add_argument("--out", type=Path, required=True, help="new scratch model folder (must not exist)")
    parser.add_argument("--work", type=Path, help="checkpoints (default: OUT's sibling OUT.work)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--text-drop-p", type=float, default=0.6,
                        help="caption dropped, image embedding kept (shipped: 0.3)")
    parser.add_argument("--unconditional-p", type=float, default=0.1, help="both dropped (shipped: 0.1)")
    # the shipped decoder ended its cosine schedule at 5e-5 (10 % of 5e-4): start near it
    parser.add_argument("--lr", type=float, default=1e-4, help="peak, after 100 warm-up steps")
    # not the shipped decoder's data seed 0, whose batches it has already seen
    parser.add_argument("--seed", type=int, default=1, help="data and dropout seed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"finetune_decoder: error: --out {args.out} exists; give a new folder")
    if args.out.resolve().is_relative_to(DEMO.parent.resolve()):
        raise SystemExit("finetune_decoder: error: --out is inside unclip/models; give a scratch folder")
    if not 0 <= args.text_drop_p <= 1 or not 0 <= args.unconditional_p <= 1 or args.steps < 1:
        raise SystemExit("finetune_decoder: error: probabilities must be in [0, 1] and --steps >= 1")
    work = args.work or args.out.with_name(args.out.name + ".work")
    torch.set_num_threads(args.threads)
    started = time.time()

    recipe = replace(Recipe(), seed=args.seed, decoder_steps=args.steps, diffusion_lr=args.lr,
                     text_drop_p=args.text_drop_p, unconditional_p=args.unconditional_p)
    trainer = Trainer(recipe, work)  # resumable: a rerun with the same --work continues
    load_weights(trainer, args.model)
    trainer.train_decoder()  # text_proj + decoder only, starting from the loaded weights

    args.out.mkdir(parents=True)  # save_model keeps the sampler defaults it finds in --out
    shutil.copy(args.model / "sampler_defaults.json", args.out / "sampler_defaults.json")
    command = "python -m training.finetune_decoder " + " ".join(argv or sys.argv[1:])
    save_model(trainer, args.out, command, started)
    log_path = args.out / "training_log.json"
    log = json.loads(log_path.read_text())
    log["finetuned_from"] = str(args.model)
    log["finetuned"] = ["text_proj", "decoder"]
    log_path.write_text(json.dumps(log, indent=2))
    print(f"wrote {args.out} ({trainer.times['decoder'] / args.steps:.2f} s/step)")


if __name__ == "__main__":
    main()
