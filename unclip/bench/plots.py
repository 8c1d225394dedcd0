"""PNG plots of results.json: time per stage (stacked bars per backend) and throughput vs batch size."""

from __future__ import annotations

from pathlib import Path

from unclip.engine.profiling import STAGES

PLOTS = ("stages.png", "throughput.png", "speed_quality.png")  # the last only with --evaluate


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    tmp.replace(path)


def _label(run: dict) -> str:
    return f"{run['backend']} (baseline)" if run["is_baseline"] else run["backend"]


def write_plots(doc: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    from unclip.bench.report import STAGE_TITLES

    s = doc["settings"]
    steps = f"{s['prior_steps']}/{s['decoder_steps']}/{s['super_res_steps']}"
    title = f"{s['model']} on {s['device']}, steps {steps}"
    runs = doc["runs"]
    batches = sorted({r["batch_size"] for r in runs})
    backends = list(dict.fromkeys(r["backend"] for r in runs))

    fig, axes = plt.subplots(1, len(batches), figsize=(4 + 2.2 * len(backends) * len(batches), 4.5),
                             squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        here = [r for r in runs if r["batch_size"] == batch]
        bottom = [0.0] * len(here)
        for stage in [k for k in STAGES if any(r["stages_ms"].get(k) for r in runs)]:
            values = [r["stages_ms"][stage] for r in here]
            ax.bar([_label(r) for r in here], values, bottom=bottom, label=STAGE_TITLES[stage])
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("median ms per request")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"Time per stage — {title}")
    stages_png = out / PLOTS[0]
    _save(fig, stages_png)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for backend in backends:
        mine = sorted((r for r in runs if r["backend"] == backend), key=lambda r: r["batch_size"])
        ips = [r["images_per_s"] for r in mine]
        # bars span the throughput at the p90 (slow) and p10 (fast) latencies
        # (max with 0: with one sample p10 = median = p90, and rounding may leave -1e-16)
        pairs = list(zip(ips, mine, strict=True))
        low = [max(0.0, v - r["batch_size"] / r["latency_ms"]["p90"] * 1e3) for v, r in pairs]
        high = [max(0.0, r["batch_size"] / r["latency_ms"]["p10"] * 1e3 - v) for v, r in pairs]
        ax.errorbar([r["batch_size"] for r in mine], ips, yerr=[low, high], marker="o", label=_label(mine[0]),
                    capsize=3)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images per second (median)")
    ax.set_xticks(batches)
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(f"Throughput — {title}")
    throughput_png = out / PLOTS[1]
    _save(fig, throughput_png)
    plt.close(fig)
    written = [stages_png, throughput_png]
    points = speed_quality_points(doc)
    if points:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for base, mine in points.items():
            ax.plot([p[1] for p in mine], [p[2] for p in mine], marker="o", label=base)
            for n, x, y in mine:
                ax.annotate(f"N={n}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"speed-up over the baseline, batch {min(batches)} (median)")
        ax.set_ylabel("all three attributes right, trained prompts (%)")
        ax.legend(fontsize=8)
        ax.set_title(f"Speed and quality over the step cache's N — {s['model']}", fontsize=10)
        _save(fig, out / PLOTS[2])
        plt.close(fig)
        written.append(out / PLOTS[2])
    return written


def speed_quality_points(doc: dict) -> dict[str, list[tuple[int, float, float]]]:
    """Per runner without its +cacheN suffix: (N, speed-up at the smallest batch, trained accuracy %),
    for the runners that were evaluated; only runners of which some N > 1 ran."""
    batch = min(r["batch_size"] for r in doc["runs"])
    speed = {r["backend"]: r["speedup_vs_baseline"] for r in doc["runs"] if r["batch_size"] == batch}
    points: dict[str, list] = {}
    for name, runner in doc.get("runners", {}).items():
        accuracy = (runner.get("accuracy") or {}).get("summary", {}).get("trained")
        if accuracy is None or speed.get(name) is None:
            continue
        base, _, cache = name.partition("+cache")
        right = 100 * accuracy["attribute_accuracy"]
        points.setdefault(base, []).append((int(cache or 1), speed[name], right))
    return {base: sorted(p) for base, p in points.items() if any(n > 1 for n, _, _ in p)}
