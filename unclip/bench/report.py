"""results.md: the figures of results.json as tables a person reads at a glance, with their method.

Where a backend is slower than the baseline, the note says where the time went, from the
measured per-network times (never a guess): each network's time per generation against the
baseline's, and the time spent outside network calls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unclip.bench.results import Results, write_atomic, write_json
from unclip.engine.profiling import STAGES

STAGE_TITLES = {"text_encoder": "text encoder", "prior": "prior loop", "decoder": "decoder loop",
                "super_res": "super-res loop", "vae": "VAE decode", "post_processing": "post-processing"}


def shown_stages(runs: list[dict]) -> list[str]:
    """The stages this model has (a family without super-resolution or without a VAE shows none)."""
    return [k for k in STAGES if k == "post_processing" or any(r["stages_ms"].get(k) for r in runs)]


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _name(run: dict) -> str:
    return f"{run['backend']} (baseline)" if run["is_baseline"] else run["backend"]


def _outside_calls_ms(run: dict) -> float:
    """Median over repeats of the time a request spends outside network calls."""
    return float(np.median([s["latency_ms"] - sum(c[2] for c in s["calls"]) for s in run["raw"]]))


def slower_note(run: dict, base: dict) -> str:
    """Why `run` is slower than `base`: the networks (and the glue) that account for the gap."""
    gap = run["latency_ms"]["median"] - base["latency_ms"]["median"]
    parts = []
    for network, mine in run["networks"].items():
        theirs = base["networks"].get(network)
        if theirs is None:
            continue
        delta = mine["ms_per_generation"] - theirs["ms_per_generation"]
        calls = f"{mine['calls_per_generation']:g} calls"
        per_call = f"{mine['median_call_ms']:,.2f} vs {theirs['median_call_ms']:,.2f} ms per call"
        parts.append((delta, f"{network} {delta:+,.1f} ms per generation ({calls}, {per_call})"))
    outside = _outside_calls_ms(run) - _outside_calls_ms(base)
    parts.append((outside, f"outside network calls (scheduler steps, noise, tokenising, tensor "
                           f"conversions, post-processing) {outside:+,.1f} ms"))
    parts.sort(key=lambda p: -p[0])
    spread = base["latency_ms"]
    within = spread["p10"] <= run["latency_ms"]["median"] <= spread["p90"]
    text = (f"**{run['backend']}, batch {run['batch_size']}: {run['speedup_vs_baseline']:.2f}× the "
            f"baseline** ({gap:+,.1f} ms median). Largest measured differences (medians over repeats, "
            "backend minus baseline; medians need not add up to the gap): "
            + "; ".join(s for _, s in parts[:3]) + ".")
    text += (f" For scale, the baseline's own repeats span {spread['p10']:,.1f}–{spread['p90']:,.1f} ms "
             "(p10–p90)" + (": the backend's median lies inside it, so the gap is within run-to-run noise."
                            if within else "."))
    return text


REFERENCE = "torch-fp32"  # the exact path: accuracy differences are against it


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def speed_and_accuracy(doc: dict) -> list[str]:
    """One row per runner: speed against the baseline next to its accuracy on the evaluation prompts."""
    runners = [name for name in doc["runners"] if name != doc["baseline"]]
    scored = {n: doc["runners"][n]["accuracy"] for n in runners if "accuracy" in doc["runners"][n]}
    groups = sorted({g for acc in scored.values() for g in acc["summary"]}, key=lambda g: g != "trained")
    if not groups:
        return []
    batches = sorted({r["batch_size"] for r in doc["runs"]})
    ratio = {(r["backend"], r["batch_size"]): r["speedup_vs_baseline"] for r in doc["runs"]}
    reference = doc["runners"].get(REFERENCE, {}).get("accuracy", {}).get("summary", {})
    lines = ["## Speed and accuracy", "",
             "| runner | " + " | ".join(f"× baseline, batch {b}" for b in batches) + " | "
             + " | ".join(f"all three, {g.replace('_', '-')}" for g in groups) + " | "
             + " | ".join(f"CLIP top-1, {g.replace('_', '-')}" for g in groups) + " | cold start s |",
             "|---|" + "---:|" * (len(batches) + 2 * len(groups) + 1)]
    for name in runners:
        info = doc["runners"][name]
        summary = info.get("accuracy", {}).get("summary", {})
        cells = [("n/a" if ratio.get((name, b)) is None else f"{ratio[(name, b)]:.2f}×") for b in batches]
        for g in groups:
            acc = summary.get(g, {}).get("attribute_accuracy")
            ref = reference.get(g, {}).get("attribute_accuracy")
            delta = "" if acc is None or ref is None or name == REFERENCE else f" ({100 * (acc - ref):+.1f})"
            cells.append(_points(acc) + delta)
        cells += [_points(summary.get(g, {}).get("clip_retrieval_top1")) for g in groups]
        cells.append(_f(info.get("cold_start_s"), 1))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    first = next(iter(scored.values()))
    counts = ", ".join(f"{g} {row['prompts']} prompts / {row['images']} images"
                       for g, row in first["summary"].items())
    lines += ["", f"Accuracy: `unclip evaluate`'s prompts and seeds ({counts}; seed {first['seed']}) "
              "generated by each runner at this run's settings; \"all three\" = background colour, shape "
              f"colour and shape read from the pixels all match the prompt; in brackets the difference from "
              f"{REFERENCE} in "
              "percentage points. Cold start: process start, load (and compile) and the first image; the "
              "ONNX export is separate (Cold start table).", ""]
    return lines


def markdown(doc: dict) -> str:
    s, m, v = doc["settings"], doc["machine"], doc["versions"]
    runs = doc["runs"]
    stable = any("unet" in r.get("networks", {}) for r in runs)  # Stable unCLIP (the second family)
    base_of = {r["batch_size"]: r for r in runs if r["is_baseline"]}
    lines = [f"# unclip bench: `{s['model']}` on {s['device']}", ""]
    if doc["status"] != "complete":
        lines += [f"**Status: {doc['status']}** — partial results: only the runs below were measured.", ""]
    lines += ["| backend | batch | median ms | p10 ms | p90 ms | images/s | × baseline | peak RSS MB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lat = r["latency_ms"]
        ratio = "n/a" if r["speedup_vs_baseline"] is None else f"{r['speedup_vs_baseline']:.2f}×"
        lines.append(f"| {_name(r)} | {r['batch_size']} | {_f(lat['median'])} | {_f(lat['p10'])} | "
                     f"{_f(lat['p90'])} | {_f(r['images_per_s'], 3)} | {ratio} | {_f(r['peak_rss_mb'], 0)} |")
    lines += ["", "× baseline = baseline median / backend median at the same batch size (above 1: faster).",
              ""]
    lines += speed_and_accuracy(doc)
    failed = {k: v["failed"] for k, v in doc["runners"].items() if v.get("failed")}
    if failed:
        dropped = "; ".join(f"{k} ({v})" for k, v in failed.items())
        lines += [f"Runners that failed and were dropped: {dropped}.", ""]
    if doc.get("runners_skipped"):
        lines += ["Runners not run: " + "; ".join(f"{k} ({v})" for k, v in doc["runners_skipped"].items())
                  + ".", ""]
    notes = []
    for r in runs:
        base = base_of.get(r["batch_size"])
        if r["is_baseline"] or base is None or r["speedup_vs_baseline"] is None:
            continue
        if r["speedup_vs_baseline"] < 1:
            notes.append("- " + slower_note(r, base))
        else:
            notes.append(f"- **{r['backend']}, batch {r['batch_size']}: {r['speedup_vs_baseline']:.2f}× "
                         f"the baseline** (faster or equal).")
    if notes:
        lines += ["## Ratio to the baseline", "", *notes, ""]

    lines += ["## Time per stage", "", "Median ms (achieved TFLOP/s in brackets).", "",
              "| backend | batch | " + " | ".join(STAGE_TITLES[k] for k in shown_stages(runs)) + " |",
              "|---|---:|" + "---:|" * len(shown_stages(runs))]
    for r in runs:
        cells = []
        for k in shown_stages(runs):
            tf = r["stage_tflops"].get(k)
            cells.append(_f(r["stages_ms"][k]) + ("" if tf is None else f" ({tf:.3f})"))
        lines.append(f"| {_name(r)} | {r['batch_size']} | " + " | ".join(cells) + " |")
    peak = doc.get("matmul_peak")
    if peak:
        lines += ["", f"Measured matmul peak: {peak['tflops']:.3f} TFLOP/s ({peak['n']}³ {peak['dtype']} "
                      f"product on {s['device']})."]

    lines += ["", "## Time per network call", "", "Median ms per call (calls per generation; GFLOP per "
              "call; achieved TFLOP/s).", "", "| backend | batch | network | calls | ms per call | "
              "GFLOP per call | TFLOP/s |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in runs:
        for network, n in r["networks"].items():
            lines.append(f"| {_name(r)} | {r['batch_size']} | {network} | {n['calls_per_generation']:g} | "
                         f"{_f(n['median_call_ms'], 2)} | {_f(n['gflop_per_call'], 4)} | "
                         f"{_f(n['tflops'], 4)} |")

    lines += ["", "## Cold start", "", "| backend | export s | start-up s | load s | first image s | "
              "cold start s | first image vs baseline (max / mean abs, uint8 levels) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, info in doc["runners"].items():
        export = "cached" if info.get("export_cached") else _f(info.get("export_s"))
        mean = info.get("first_image_mean_abs_diff_vs_baseline")
        diff = f"{info.get('first_image_max_abs_diff_vs_baseline', 'n/a')} / {_f(mean, 2)}"
        keys = ("startup_s", "load_s", "first_image_s", "cold_start_s")
        times = " | ".join(_f(info.get(k), 2) for k in keys)
        lines.append(f"| {name} | {export} | {times} | {diff} |")
    for name, info in doc["runners"].items():
        if info.get("mixed_assignment"):  # which runtime the mixed runner chose per network, and why
            times = info.get("mixed_timings") or {}
            lines += ["", f"{name} ran, per network (chosen at load; ms: medians per call at the rows of one "
                      "and two guided images, summed): " + "; ".join(
                          f"{network} {runtime}" + (" (" + ", ".join(
                              f"{r} {_f(ms, 2)}" for r, ms in times[network].items()) + ")"
                              if network in times else "")
                          for network, runtime in info["mixed_assignment"].items()) + "."]
    lines += ["", "The last column compares each runner's first image with the baseline's: a sanity check "
              "that it computed the same thing. Correctness is bounded by the parity tests "
              "(tests/test_parity.py, and the ONNX validation in each export's manifest)."]
    if any(r["cuda_peak_allocated_mb"] is not None for r in runs):
        lines += ["", "GPU peak allocated (MB, torch allocator): " + ", ".join(
            f"{_name(r)} b{r['batch_size']} {_f(r['cuda_peak_allocated_mb'], 0)}" for r in runs)]

    loads = [x["load_average_1min"] for r in runs for x in r["raw"] if x.get("load_average_1min") is not None]
    load = "" if not loads else (
        f" 1-minute load average during the measured runs: median {np.median(loads):.1f}, max "
        f"{max(loads):.1f} (this run's own threads add about {m['torch_threads']}; more means other "
        "processes shared the CPU).")
    gpu = f"; GPU {m['gpu_name']} (driver {m['gpu_driver']}, CUDA {m['cuda']})" if m.get("gpu_name") else ""
    timer = "CUDA events" if s["device"].startswith("cuda") else "time.perf_counter"
    lines += [
        "", "## Method", "",
        f"- Machine: {m['cpu_model']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable, torch "
        f"threads {m['torch_threads']}), {m['memory_gb']} GB RAM, {m['os']}{gpu}.{load}",
        "- Versions: " + ", ".join(f"{k} {val if val else 'absent'}" for k, val in v.items()) + ".",
        f"- Command: `{doc['command']}`" + (f" (suite `{doc['suite']}`)" if doc.get("suite") else ""),
        f"- Started {doc['started']}, written {doc['written']}.",
        f"- Request: {s['batch_sizes']} prompts (batch sizes) of \"{s['prompt']}\", seed {s['seed']}, "
        f"precision {s['dtype']}; steps prior {s['prior_steps']}, decoder {s['decoder_steps']}"
        + (" (the latent UNet, the checkpoint's sampler; PNDM calls it steps + 1 times), no super-resolution"
           if stable else f", super-res {s['super_res_steps']}")
        + f"; guidance prior {s['prior_guidance']}, decoder {s['decoder_guidance']}.",
        f"- Baseline: diffusers `{'StableUnCLIPPipeline' if stable else 'UnCLIPPipeline'}` (eager PyTorch) "
        "built from the same loaded networks, same request, device and dtype.",
        f"- Each runner (baseline and every backend) lives in its own process. Per batch size: "
        f"{s['warmup']} warm-up run(s), then {s['repeat']} measured repeats, interleaved in rounds "
        f"(baseline, then each backend) so machine drift hits all alike. Latency: median, p10, p90 "
        f"(linear interpolation) of end-to-end `generate` time, PIL images out, timed with {timer}.",
        "- Stages: each starts at its first network call and ends where the next stage's first call "
        "starts (text encoder from the start of the request; super-res ends with its last call; "
        "post-processing is the rest), so stages add up to the latency. Per-call times come from a "
        "proxy in front of the backend (ours) or forward hooks (diffusers).",
        "- Memory: peak RSS (VmHWM) of the runner's own process, reset before each batch size's warm-up "
        "(Linux clear_refs); on CUDA the torch allocator's peak (does not see ONNX Runtime/TensorRT memory).",
        "- Cold start: from starting the runner's process (interpreter, imports) through loading (a "
        "preset's random weights are built here; an artifact is read) to its first image at batch 1, "
        "with no other runner busy; export is separate, once, then cached.",
        "- FLOPs: `torch.utils.flop_counter` on the torch networks at each call's shape (matmuls, "
        "convolutions, attention); the same count applies to every backend, which runs the same "
        "graphs. TFLOP/s = stage FLOPs / stage median time.",
    ]
    return "\n".join(lines) + "\n"


def write_outputs(results: Results, out: Path, plots: bool) -> None:
    doc = results.document()
    write_json(out / "results.json", doc)
    write_atomic(out / "results.md", markdown(doc))
    if plots and doc["runs"]:
        from unclip.bench.plots import write_plots

        write_plots(doc, out)
