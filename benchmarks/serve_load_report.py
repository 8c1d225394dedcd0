"""results.md and serve_load.png of benchmarks/serve_load.py, rendered from its results.json."""

from __future__ import annotations

from pathlib import Path

from unclip.serve.load_report import level_table, refusal_table


def _load(phase: dict) -> str:
    before, after = phase.get("loadavg_before"), phase.get("loadavg_after")
    return f"{before[0]:.2f} → {after[0]:.2f}" if before and after else "–"


def _yes(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def markdown(doc: dict) -> str:
    a, m, v, p = doc["acceptance"], doc["machine"], doc["versions"], doc["phases"]
    refusal = "–" if a["queue_refusal_max_s"] is None else (
        f"max {a['queue_refusal_max_s'] * 1000:.1f} ms, p99 {a['queue_refusal_p99_s'] * 1000:.1f} ms")
    lines = [
        "# Serving under load: the demo model on CPU",
        "",
        "One command measures everything on this page (from the repository root; about 10 minutes on a "
        "2-core machine, about 20 with `--sweep`):",
        "",
        "```",
        doc["command"] if "PYTHONPATH" in doc["command"] else f"PYTHONPATH=$PWD {doc['command']}",
        "```",
        "",
        f"Written {doc['written']}. Machine: {m['cpu_model']}, {m['cpu_cores']} cores, {m['memory_gb']} GB, "
        f"torch threads {m['torch_threads']}, {m['os']}. Versions: Python {v['python']}, unclip "
        f"{v['unclip']} ({v['unclip_git']}), torch {v['torch']}. Load average (1 min) before → after each "
        "phase is given beside it: above the core count, other work shared the CPU and the phase's "
        "numbers are low by an unknown amount. Ratios are taken within this run.",
        "",
        "## Acceptance (issue 12, \"Under load\")",
        "",
        "| criterion | measured | verdict |",
        "|---|---|---|",
        f"| 8 clients for ≥ 60 s | {a['c8_duration_s']:g} s | {_yes(a['c8_duration_ok'])} |",
        f"| 0 failed requests at 8 clients | {a['c8_failed']} failed, {a['c8_refused']} refused "
        f"| {_yes(a['c8_no_failures'])} |",
        f"| images/s at 8 clients ≥ 0.9 × single-stream | {a['c8_images_per_s']:.4f} / "
        f"{a['single_stream_images_per_s']:.4f} = **{a['c8_ratio']:.3f}×** | {_yes(a['c8_ratio_ok'])} |",
        f"| `--max-queue 4`, 16 clients: every refusal a 429 in < 100 ms | {a['queue_refused']} refused "
        f"({', '.join(f'{k}: {n}' for k, n in a['queue_refused_by_status'].items()) or 'none'}); {refusal} "
        f"| {_yes(a['queue_refusals_ok'])} |",
        f"| … and no accepted request fails | {a['queue_accepted_failed']} failed | "
        f"{_yes(a['queue_accepted_ok'])} |",
        "",
        "## Single-stream reference",
        "",
        "`Pipeline.generate` in the script's own process (the model loaded and warmed up by the main "
        "thread), one image per call at the model's default settings "
        f"({doc['single_stream_settings']}), timed calls for about 30 s per regime; images/s = calls / "
        "total time. Two regimes (OpenMP, see docs/serving.md): called from the main thread (what a "
        "script gets) and from a second thread while the main thread holds an OpenMP team (its team "
        "sleeps between parallel regions, as the server's scheduler thread does). Each "
        "regime's figure is the mean of before and after the load phases; the server is held to the "
        "faster regime.",
        "",
        "| when | regime | calls | images/s | seconds per call (min – max) | load before → after |",
        "|---|---|---:|---:|---|---|",
        *(f"| {when} | {r} | {s['calls']} | {s['images_per_s']:.4f} | {min(s['seconds']):.2f} – "
          f"{max(s['seconds']):.2f} | {_load(s)} |"
          for when, key in (("before", "single_before"), ("after", "single_after"))
          for r, s in p[key].items()),
        *(f"| **mean** | {r} | | **{v:.4f}** | | |" for r, v in doc["single_stream"].items()),
        "",
        "## `unclip serve --model demo` (defaults) under 1, 4, 8 clients",
        "",
        f"`{p['load']['server_command']}`, then `{p['load']['command']}` (exit status of the server after "
        f"SIGTERM: {p['load']['server_exit_code']}). Details: [load/results.md](load/results.md).",
        "",
        *level_table(p["load"]["levels"]),
        "",
        *refusal_table(p["load"]["levels"]),
        "",
        "## `--max-queue 4` under 16 clients",
        "",
        f"`{p['queue']['server_command']}`, then `{p['queue']['command']}` (server exit status after "
        f"SIGTERM: {p['queue']['server_exit_code']}). A client pauses "
        f"{p['queue']['options']['refused_pause_s']:g} s "
        "after a refusal, then tries again. Details: [queue/results.md](queue/results.md).",
        "",
        *level_table(p["queue"]["levels"]),
        "",
        *refusal_table(p["queue"]["levels"]),
        "",
    ]
    sweep = [(k, s) for k, s in p.items() if k.startswith("sweep-")]
    if sweep:
        lines += ["## What batching buys (8 clients, one server per setting)", "",
                  "| max_batch_images | max_wait_ms | images/s | × single-stream | latency p50 / p99 (s) "
                  "| mean batch | load before → after |", "|---:|---:|---:|---:|---|---:|---|"]
        single = a["single_stream_images_per_s"]
        for _, s in sweep:
            lv = s["levels"][0]
            lat = lv["latency_s"] or {}
            load = (f"{lv['loadavg_before'][0]:.1f} → {lv['loadavg_after'][0]:.1f}"
                    if lv.get("loadavg_before") else "–")
            batch = "–" if lv["mean_batch_images"] is None else f"{lv['mean_batch_images']:.2f}"
            lines.append(f"| {s['max_batch_images']} | {s['max_wait_ms']:g} | {lv['images_per_s']:.4f} "
                         f"| {lv['images_per_s'] / single:.3f} "
                         f"| {lat.get('p50', 0):.1f} / {lat.get('p99', 0):.1f} "
                         f"| {batch} | {load} |")
        lines.append("")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    p, a = doc["phases"], doc["acceptance"]
    bars = [(f"{lv['concurrency']} clients", lv["images_per_s"]) for lv in p["load"]["levels"]]
    bars += [("16 clients\nqueue 4", lv["images_per_s"]) for lv in p["queue"]["levels"]]
    bars += [(f"8 clients\nb{s['max_batch_images']} w{s['max_wait_ms']:g}", s["levels"][0]["images_per_s"])
             for k, s in p.items() if k.startswith("sweep-")]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(bars) + 2), 4.5))
    ax.bar(range(len(bars)), [b[1] for b in bars], color="tab:blue", label="server (unclip loadtest)")
    single = a["single_stream_images_per_s"]
    styles = dict(zip(doc["single_stream"], (":", "--"), strict=True))
    lines = [(v, styles[r], f"single-stream, {r}") for r, v in doc["single_stream"].items()]
    for value, style, label in (*lines, (0.9 * single, "-", "0.9 × the faster single-stream")):
        color = "tab:red" if label.startswith("0.9") else "black"
        ax.axhline(value, linestyle=style, color=color, label=label)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars])
    ax.set_ylabel("images/s")
    ax.set_title("demo model on CPU: server throughput against in-process single-stream")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
