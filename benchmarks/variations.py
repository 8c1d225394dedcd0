"""Image-conditioned generation on the demo model, scored by the scene scorer (issue 14):
variations, interpolations and text diffs of rendered scenes (unclip.models.variation_evaluation).

Acceptance, as the issue states it (each checked here, reported met or not, never tuned):
* variations of a rendered scene of every trained combination, 4 each, keep background colour,
  shape colour and shape kind (each field, and all three at once) in >= 80 %;
* interpolation frames between two rendered scenes: the first reads as A, the last as B (all three
  fields, >= 80 % of pairs, the same bar), and the mean CLIP similarity to A falls frame by frame;
* a text diff "a red S on a B background" -> "a blue S ..." at full amount: shape blue and kind
  kept in >= 70 %.
And a diagnosis: the scenes' own embeddings decoded with and without their captions' tokens.

Interpolations use 96 pairs: the frame-1-to-2 step of the mean similarity is a small difference
(about 0.03) that a few pairs whose first frame fails can reverse; with 24 pairs it did once
(benchmarks/results/variations/demo-24-pairs/, the first 24 of these 96).

    PYTHONPATH=$PWD python3 benchmarks/variations.py        # ~7 min on 2 cores
    PYTHONPATH=$PWD python3 benchmarks/variations.py --seed 1 --out /tmp/validation   # another seed

Output (all or nothing; default benchmarks/results/variations/demo/): results.json (machine, versions,
date, command, settings, every number) and results.md (the summary table).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from unclip.bench.machine import machine, versions
from unclip.bench.results import now
from unclip.folders import staged_folder
from unclip.models import variation_evaluation as evaluation

VARIATIONS_BAR = 0.80  # each of background, shape colour, shape kind kept (issue 14)
ENDS_BAR = 0.80  # first frame reads as A, last as B: the variations' bar, as the issue gives none
TEXT_DIFF_BAR = 0.70  # shape blue and kind kept at full amount (issue 14)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-scene", type=int, default=4, help="variations of each scene")
    parser.add_argument("--pairs", type=int, default=96, help="interpolated pairs of scenes")
    parser.add_argument("--frames", type=int, default=7, help="frames per interpolation")
    parser.add_argument("--per-combination", type=int, default=4, help="text-diff scenes per combination")
    parser.add_argument("--decoder-guidance", type=float, help="instead of the model's default (a sweep)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/variations/demo"))
    args = parser.parse_args()

    import unclip

    pipe = unclip.load(args.model)
    chosen = {} if args.decoder_guidance is None else {"decoder_guidance": args.decoder_guidance}
    started, t0 = now(), time.perf_counter()
    variations = evaluation.evaluate_variations(pipe, seed=args.seed, per_scene=args.per_scene, progress=True,
                                                **chosen)
    interpolations = evaluation.evaluate_interpolations(pipe, evaluation.clip_image_encoder(pipe),
                                                        pairs=args.pairs, frames=args.frames, seed=args.seed,
                                                        progress=True, **chosen)
    text_diffs = evaluation.evaluate_text_diffs(pipe, per_combination=args.per_combination, seed=args.seed,
                                                progress=True, **chosen)
    caption_dependence = evaluation.evaluate_caption_dependence(pipe, seed=args.seed, progress=True, **chosen)
    seconds = time.perf_counter() - t0

    v, first, last = variations["summary"], interpolations["first_frame_reads_as_a"], \
        interpolations["last_frame_reads_as_b"]
    checks = {
        "variations_keep_each_field": {"bar": VARIATIONS_BAR, "measured": {
            f: v[f"{f}_accuracy"] for f in ("background", "colour", "shape")}},
        "interpolation_first_frame_reads_as_a": {"bar": ENDS_BAR, "measured": first["all_three"]},
        "interpolation_last_frame_reads_as_b": {"bar": ENDS_BAR, "measured": last["all_three"]},
        "interpolation_mean_similarity_to_a_falls": {"bar": True,
                                                     "measured": interpolations["mean_falls_monotonically"]},
        "text_diff_blue_and_kind_kept_at_full_amount": {
            "bar": TEXT_DIFF_BAR, "measured": text_diffs["full_amount_blue_and_kind_kept"]},
    }
    for check in checks.values():
        check["met"] = met(check["measured"], check["bar"])

    document = {
        "what": "issue 14: variations, interpolations and text diffs of rendered scenes, read by the scene "
                "scorer (unclip.models.shapes.score) and the model's CLIP image tower",
        "command": shlex.join(["python3", *sys.argv]),
        "date": started, "seconds": round(seconds, 1),
        "machine": machine("cpu"), "versions": versions(), "machine_shared": True,
        "model": args.model, "seed": args.seed,
        "settings_chosen_here": chosen,
        "settings": {k: getattr(pipe.image_settings(**chosen), k)
                     for k in ("decoder_steps", "super_res_steps", "decoder_guidance")},
        "checks": checks, "all_met": all(c["met"] for c in checks.values()),
        "variations": variations, "interpolations": interpolations, "text_diffs": text_diffs,
        "caption_dependence": caption_dependence,
    }
    with staged_folder(args.out) as tmp:
        (tmp / "results.json").write_text(json.dumps(document, indent=2) + "\n")
        (tmp / "results.md").write_text(markdown(document))
    print(markdown(document))


def met(measured, bar) -> bool:
    if isinstance(bar, bool):
        return measured is bar
    return all(x >= bar for x in measured.values()) if isinstance(measured, dict) else measured >= bar


def markdown(d: dict) -> str:
    v, i, t = d["variations"]["summary"], d["interpolations"], d["text_diffs"]
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    settings = ", ".join(f"{k} {v}" for k, v in d["settings"].items())
    where = ("settings given on the command line" if d["settings_chosen_here"] else
             "the model's own sampler defaults for image-conditioned generation")
    full = t["by_amount"][max(t["by_amount"], key=float)]
    lines = [
        "# Variations, interpolations and text diffs on the demo model (issue 14)", "",
        f"`{d['command']}` — {d['date']}, {d['seconds']} s, {d['machine']['cpu_model']} "
        f"({d['machine']['cpu_cores']} cores, shared), torch {d['versions']['torch']}, "
        f"unclip {d['versions']['unclip_git']}; model `{d['model']}`, seed {d['seed']}, "
        f"{where} ({settings}).", "",
        "| measured | background | shape colour | shape kind | all three | bar | met |",
        "|---|---:|---:|---:|---:|---|---|",
        f"| variations: {d['variations']['scenes']} scenes (every trained combination) x "
        f"{d['variations']['per_scene']} | {pct(v['background_accuracy'])} | {pct(v['colour_accuracy'])} | "
        f"{pct(v['shape_accuracy'])} | {pct(v['all_three'])} | each >= 80 % | "
        f"{d['checks']['variations_keep_each_field']['met']} |",
    ]
    for key, label in (("first_frame_reads_as_a", "first frame reads as A"),
                       ("last_frame_reads_as_b", "last frame reads as B")):
        r = i[key]
        check = d["checks"][f"interpolation_{key}"]
        lines.append(f"| interpolations, {i['pairs']} pairs x {i['frames']} frames: {label} | "
                     f"{pct(r['background_accuracy'])} | {pct(r['colour_accuracy'])} | "
                     f"{pct(r['shape_accuracy'])} | "
                     f"{pct(r['all_three'])} | all three >= 80 % | {check['met']} |")
    lines.append(f"| text diff red -> blue at full amount, {len(t['combinations'])} combinations x "
                 f"{t['per_combination']} (target: blue shape, same kind and background) | "
                 f"{pct(full['background_accuracy'])} | {pct(full['colour_accuracy'])} | "
                 f"{pct(full['shape_accuracy'])} | {pct(full['all_three'])} | blue and kind kept >= 70 % "
                 f"(measured {pct(t['full_amount_blue_and_kind_kept'])}) | "
                 f"{d['checks']['text_diff_blue_and_kind_kept_at_full_amount']['met']} |")
    sims = ", ".join(f"{x:.3f}" for x in i["mean_similarity_to_a"])
    lines += ["", f"Interpolations: mean CLIP image similarity to A per frame: {sims} (falls monotonically: "
              f"{i['mean_falls_monotonically']}; pairs whose own similarity falls monotonically: "
              f"{pct(i['pairs_monotonic'])}).", "",
              "Text diff by amount (the share of images with the blue target's field right):", "",
              "| amount | shape blue | kind kept | background kept | all three |",
              "|---:|---:|---:|---:|---:|"]
    for amount, r in t["by_amount"].items():
        lines.append(f"| {amount} | {pct(r['colour_accuracy'])} | {pct(r['shape_accuracy'])} | "
                     f"{pct(r['background_accuracy'])} | {pct(r['all_three'])} |")
    c = d["caption_dependence"]
    lines += ["", f"Diagnosis (not an acceptance bar): each of {c['scenes']} scenes' own image embedding "
              "decoded with the same noise, with an empty caption (as a variation) and with the scene's "
              "caption tokens (as the decoder saw it in most of its training):", "",
              "| decoded from the scene's embedding with | background | shape colour | shape kind "
              "| all three |",
              "|---|---:|---:|---:|---:|"]
    for key, label in (("empty_caption", "an empty caption (a variation)"), ("scene_caption", "its caption")):
        r = c[key]
        lines.append(f"| {label} | {pct(r['background_accuracy'])} | {pct(r['colour_accuracy'])} | "
                     f"{pct(r['shape_accuracy'])} | {pct(r['all_three'])} |")
    lines += ["", f"All acceptance bars met: {d['all_met']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
