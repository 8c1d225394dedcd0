"""results.md and loadtest.png of `unclip loadtest`, both rendered from results.json alone."""

from __future__ import annotations

from pathlib import Path


def _num(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ms(spread: dict | None, key: str) -> str:
    return "–" if not spread else f"{spread[key] * 1000:.0f}"


def _s(spread: dict | None, key: str, digits: int = 2) -> str:
    return "–" if not spread else f"{spread[key]:.{digits}f}"


def level_table(levels: list[dict]) -> list[str]:
    lines = ["| clients | ok | refused | failed | requests/s | images/s | latency p50 / p90 / p99 (s) "
             "| queue p50 / p99 (s) | compute p50 (s) | mean batch (images) | load before → after |",
             "|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---|"]
    for lv in levels:
        lat, queue = lv["latency_s"], lv["queue_s"]
        load = (f"{lv['loadavg_before'][0]:.1f} → {lv['loadavg_after'][0]:.1f}"
                if lv.get("loadavg_before") and lv.get("loadavg_after") else "–")
        lines.append(
            f"| {lv['concurrency']} | {lv['ok']} | {lv['refused']} | {lv['failed']} "
            f"| {lv['requests_per_s']:.3f} | {lv['images_per_s']:.3f} "
            f"| {_s(lat, 'p50')} / {_s(lat, 'p90')} / {_s(lat, 'p99')} "
            f"| {_s(queue, 'p50')} / {_s(queue, 'p99')} | {_s(lv['compute_s'], 'p50')} "
            f"| {_num(lv['mean_batch_images'])} | {load} |")
    return lines


def refusal_table(levels: list[dict]) -> list[str]:
    lines = ["| clients | errors by status | refused answers | refused latency p50 / p99 / max (ms) |",
             "|---:|---|---:|---|"]
    for lv in levels:
        errors = ", ".join(f"{k}: {v}" for k, v in lv["errors_by_status"].items()) or "none"
        if lv["abandoned"]:
            errors += f", abandoned in flight: {lv['abandoned']}"
        r = lv["refused_latency_s"]
        lines.append(f"| {lv['concurrency']} | {errors} | {lv['refused']} "
                     f"| {_ms(r, 'p50')} / {_ms(r, 'p99')} / {_ms(r, 'max')} |")
    return lines


def markdown(doc: dict) -> str:
    m, v, o, req = doc["machine"], doc["versions"], doc["options"], doc["request"]
    server = doc.get("server") or {}
    lines = [
        f"# Load test: {server.get('model', '?')} at {doc['url']}",
        "",
        "```",
        doc["command"],
        "```",
        "",
        f"Written {doc['written']}. Client machine: {m['cpu_model']}, {m['cpu_cores']} cores "
        f"({m['cpu_cores_usable']} usable), {m['memory_gb']} GB, {m['os']}. Server replica "
        f"`{server.get('replica', '?')}`.",
        f"Versions: Python {v.get('python')}, unclip {v.get('unclip')} ({v.get('unclip_git')}), torch "
        f"{v.get('torch')}, locust {v.get('locust')}, fastapi {v.get('fastapi')}, "
        f"uvicorn {v.get('uvicorn')}.",
        "",
        f"Each level: that many clients in a closed loop for {o['duration_s']:g} s (requests sent in that "
        f"window may finish up to {o['grace_s']:g} s after it); a client pauses {o['refused_pause_s']:g} s "
        f"after a refused or failed answer. Requests: n = {req['n']}, prompts cycling through "
        f"{len(req['prompts'])}, settings {req['settings'] or 'the model defaults'}, a distinct seed each. "
        f"The probe request before the first level took {doc['probe']['latency_s']:.2f} s.",
        "",
        *level_table(doc["levels"]),
        "",
        *refusal_table(doc["levels"]),
        "",
        "Definitions: requests/s and images/s count successful answers over the span from the level's "
        "start to its last answer (at least the window); latency is the client's, send to last byte, "
        "of successful requests; queue and compute times are the server's "
        "(`X-Unclip-Queue-Seconds`, `X-Unclip-Compute-Seconds`); mean batch = images / batches, the "
        "batches counted from `X-Unclip-Batch-Images`; refused = 429 or 503, timed like the rest; "
        "failed = every other non-200, a 200 without its images, or a request still in flight when the "
        "grace ended. Percentiles: numpy's linear interpolation (with few samples, p99 is near the max). "
        "Load = /proc/loadavg (1 min) before and after the level.",
        "",
    ]
    server_rows = [lv for lv in doc["levels"] if lv.get("server")]
    if server_rows:
        lines += ["The server's own count (/metrics, before and after each level):", "",
                  "| clients | batches | images | mean batch (images) | requests by outcome |",
                  "|---:|---:|---:|---:|---|"]
        for lv in server_rows:
            s = lv["server"]
            outcomes = ", ".join(f"{k.removeprefix('requests_')}: {v:g}" for k, v in s.items()
                                 if k.startswith("requests_") and v)
            lines.append(f"| {lv['concurrency']} | {s.get('batches', 0):g} | {s.get('images', 0):g} "
                         f"| {_num(s.get('mean_batch_images'))} | {outcomes or '–'} |")
        lines.append("")
    return "\n".join(lines)


def write_plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    levels = doc["levels"]
    clients = [lv["concurrency"] for lv in levels]
    x = range(len(levels))
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 4))
    a.bar(x, [lv["images_per_s"] for lv in levels], color="tab:blue")
    a.set_ylabel("images/s")
    a.set_title("throughput")
    for key, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        b.plot(x, [lv["latency_s"][key] if lv["latency_s"] else float("nan") for lv in levels], style,
               label=f"latency {key}")
    b.plot(x, [lv["queue_s"]["p50"] if lv["queue_s"] else float("nan") for lv in levels], "x-",
           label="queue p50 (server)")
    b.set_ylabel("seconds")
    b.set_title("latency of successful requests")
    b.legend()
    c.bar(x, [lv["mean_batch_images"] or 0 for lv in levels], color="tab:green")
    c.set_ylabel("images per batch")
    c.set_title("mean batch")
    for ax in (a, b, c):
        ax.set_xticks(list(x), [str(n) for n in clients])
        ax.set_xlabel("concurrent clients")
    fig.suptitle(f"unclip loadtest — {doc.get('server', {}).get('model', '?')}, "
                 f"{doc['options']['duration_s']:g} s per level")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
