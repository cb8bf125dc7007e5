"""Render saved benchmark results to a markdown table and PNG plots.

    python benchmarks/render.py                       # benchmarks/results/*.json -> results/README.md + PNGs
    python benchmarks/render.py a.json b.json --out-dir /tmp/r --print

Inputs: paper-suite JSON (``python -m benchmarks.paper_protocol``) and pytest-benchmark JSON from the op
microbenchmarks (``--benchmark-json``, with the ``shvit`` section the benchmarks' conftest adds). Other JSON
files in the folder (for example the training engineer's) are left alone.
Plots: ``throughput_<model>.png`` (img/s per setting and method, bars at the median, whiskers min..max) and
``roofline_<device>_<dtype>.png`` (each op at its arithmetic intensity against the measured ceilings).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def load(paths: List[str]) -> Tuple[List[dict], List[dict]]:
    """(paper results, op-benchmark results) among ``paths``; other JSON files are skipped."""
    paper, ops = [], []
    for path in sorted(paths):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        if not isinstance(data, dict):
            continue
        data["_path"] = path
        if data.get("suite") == "paper":
            paper.append(data)
        elif "benchmarks" in data and isinstance(data.get("shvit"), dict):
            ops.append(data)
    order = {"fp32": 0, "bf16": 1, "fp16": 2}
    paper.sort(key=lambda r: (r["model"], r["device"], order.get(r["dtype"], 3), r["threads"], r.get("channels_last") is False))
    return paper, ops


def setting(r: dict) -> str:
    threads = f", {r['threads']} thread{'s' if r['threads'] > 1 else ''}" if r["device"] == "cpu" else ""
    layout = ", NCHW input" if r.get("channels_last") is False else ""  # earlier files lack the field: channels_last
    return (f"{r['model'].replace('shvit_', '').upper()} {r['img_size']}px b{r['batch_size']} {r['device']} "
            f"{r['dtype']}{threads}{layout}")


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _spread(res: dict) -> str:
    b = res["ms_per_batch_median"] * res["img_per_s"] / 1e3  # batch size
    return f"{_fmt(b / res['ms_per_batch_max'] * 1e3)}..{_fmt(b / res['ms_per_batch_min'] * 1e3)}"


def method(res: dict) -> str:
    # The thread count is part of the setting (column), not of the method (row).
    return re.sub(r"ONNX Runtime CPU \(\d+ threads?\)", "ONNX Runtime CPU", res["name"])


def summary_table(paper: List[dict], key: str = "inference") -> str:
    """Methods as rows, settings as columns, median img/s (min..max) in the cells."""
    cols = [r for r in paper if r.get(key)]
    if not cols:
        return ""
    methods: List[str] = []
    for r in cols:
        for res in r[key]:
            if method(res) not in methods:
                methods.append(method(res))
    lines = ["| method | " + " | ".join(setting(r) for r in cols) + " |", "|---|" + "---:|" * len(cols)]
    for m in methods:
        cells = []
        for r in cols:
            res = next((x for x in r[key] if method(x) == m), None)
            cells.append(f"{_fmt(res['img_per_s'])} ({_spread(res)})" if res else "n/a")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    # Other people's work on the machine is the main source of noise: show it beside the numbers.
    loads = [(r["environment"].get("load_average_start") or [None])[0] for r in cols]
    ends = [(r["environment"].get("load_average_end") or [None])[0] for r in cols]
    lines.append("| *load average (1 min), start / end* | " + " | ".join(f"*{a} / {b}*" for a, b in zip(loads, ends)) + " |")
    return "\n".join(lines)


def _per_round(x: dict, first: dict) -> str:
    """Speed against the first method within each round, median (min..max); n/a for results saved without rounds."""
    from shvit.bench import paired_speedup  # here: the rest of this script needs no torch

    paired = paired_speedup(x.get("ms_per_round") or [], first.get("ms_per_round") or [])
    return f"{paired[0]:.2f}x ({paired[1]:.2f}..{paired[2]:.2f})" if paired else "n/a"


def detail_table(r: dict, key: str) -> str:
    rows = r.get(key) or []
    if not rows:
        return ""
    base = rows[0]["img_per_s"]
    mem = key == "training"
    head = ("| method | img/s (median) | min..max | ms/batch | vs first | per round (min..max) | max rel. diff | "
            "setup s |")
    head += " saved for backward MiB | peak alloc. MiB |" if mem else ""
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for x in rows:
        e = x.get("extra", {})
        line = (f"| {x['name']} | {_fmt(x['img_per_s'])} | {_spread(x)} | {x['ms_per_batch_median']:.1f} | "
                f"{x['img_per_s'] / base:.2f}x | {_per_round(x, rows[0])} | {x['max_rel_diff_vs_first']:.1e} | "
                f"{e.get('setup_s', 0):.1f} |")
        if mem:
            peak = e.get("peak_allocated_MiB")
            line += f" {e.get('saved_for_backward_MiB', 0):.0f} | {'n/a (CPU)' if peak is None else f'{peak:.0f}'} |"
        lines.append(line)
    return "\n".join(lines)


def ops_table(run: dict) -> str:
    probe = run["shvit"].get("probe") or {}
    lines = ["| model | op | layer | batch | mode | backend | median us | GB/s | TFLOP/s | FLOP/B | % of roof |",
             "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for b in run["benchmarks"]:
        e = b.get("extra_info", {})
        if "op" not in e:
            continue
        roof = roof_at(probe, e["intensity"], e["dtype"]) if probe else None
        pct = f"{100 * e['TFLOPs'] * 1e12 / roof:.0f}" if roof else "n/a"
        lines.append(f"| {e['model']} | {e['op']} | {e['layer']} | {e['batch']} | {e['mode']} | {e['backend']} | "
                     f"{e['seconds'] * 1e6:,.0f} | {e['GBps']:.1f} | {e['TFLOPs']:.4f} | {e['intensity']:.1f} | {pct} |")
    return "\n".join(lines)


_DT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def roof_at(probe: dict, intensity: float, dtype: str) -> float:
    """Attainable FLOP/s at ``intensity`` under the measured ceilings (fp32 matmul when the dtype was not probed)."""
    peaks = probe.get("matmul_TFLOPs", {})
    peak = peaks.get(_DT.get(dtype, dtype)) or peaks.get("fp32") or 0.0
    return min(peak * 1e12, probe["bandwidth_GBps"] * 1e9 * intensity)


def environment_lines(runs: List[dict]) -> List[str]:
    out, seen = [], set()
    for r in runs:
        env = r.get("environment") or r.get("shvit", {}).get("environment", {})
        probe = r.get("probe") or r.get("shvit", {}).get("probe") or {}
        key = (env.get("cpu"), env.get("gpu"), env.get("torch"))
        if key not in seen:
            seen.add(key)
            dev = env.get("gpu") or env.get("cpu", "?")
            out.append(f"- machine: {dev} ({env.get('cpu_capability', '')}), torch {env.get('torch')}, "
                       f"python {env.get('python')}" + (f", triton {env['triton']}" if "triton" in env else ""))
        s = r.get("shvit", {})
        load = (env.get("load_average_start") or s.get("load_average_start"), env.get("load_average_end") or s.get("load_average_end"))
        name = setting(r) if r.get("suite") == "paper" else f"op benchmarks ({r['shvit']['device']}, {r['shvit']['dtype']})"
        ceil = ""
        if probe and r.get("suite") != "paper":  # the roofline's ceilings; paper runs keep theirs in the JSON
            tf = ", ".join(f"{k} {v * 1e3:.0f} GFLOP/s" for k, v in probe.get("matmul_TFLOPs", {}).items())
            ceil = f"; measured ceilings at {probe.get('threads')} thread(s): copy {probe['bandwidth_GBps']:.1f} GB/s, matmul {tf}"
        rev = env.get("git") or s.get("git")
        out.append(f"- {name}: {env.get('date', '?')}{f', git {rev}' if rev else ''}, load average (1/5/15 min) at start {load[0]}, end {load[1]}{ceil}; "
                   f"`{env.get('command') or r.get('shvit', {}).get('command', '')}`")
    return out


def session_index(out_dir: str) -> List[str]:
    """Markdown lines listing the per-session result folders under ``out_dir`` (each with a NOTES.md, whose first
    line names the machine and date), newest first by the date in the folder's name; [] when there are none."""

    def dated(path: str) -> str:
        found = re.search(r"\d{4}-\d{2}-\d{2}\w*", os.path.basename(os.path.dirname(path)))
        return found.group(0) if found else ""

    notes = sorted(glob.glob(os.path.join(out_dir, "*", "NOTES.md")), key=dated, reverse=True)
    if not notes:
        return []
    lines = ["## Later runs, one folder per session", "",
             "The tables below are the full paper-protocol suite of the date under \"Machines, dates, load\". Later "
             "sessions measured what they changed, each in a folder with its notes and JSON (the repository's README "
             "quotes the latest figures):", ""]
    for path in notes:
        folder = os.path.basename(os.path.dirname(path))
        with open(path) as f:
            title = f.readline().strip().lstrip("#").strip()
        lines.append(f"- [`{folder}/`]({folder}/NOTES.md): {title}")
    return lines + [""]


def markdown(paper: List[dict], ops: List[dict], sessions: Optional[List[str]] = None) -> str:
    parts = ["# Benchmark results", "",
             "Generated by `python benchmarks/render.py` from the JSON files in this folder. img/s are medians over "
             "interleaved rounds, with min..max over rounds in parentheses; \"per round\" is each method's speed against the "
             "first within the same round (median, min..max), steadier than a ratio of medians when the machine's speed "
             "drifts; every number was measured on the machine "
             "and date listed below. Check the load row under each table: on a shared machine, runs that use every core "
             "are hit hardest (a thread that loses its core stalls the others at each parallel step).", ""]
    parts += sessions or []
    if paper:
        groups: Dict[tuple, List[dict]] = {}
        for r in paper:
            groups.setdefault((r["model"], r["img_size"], r["batch_size"], r["device"]), []).append(r)
        parts += ["## Inference throughput (img/s, paper protocol: BN folded, peers interleaved)", ""]
        for g in groups.values():
            parts += [summary_table(g), ""]
        if any(r.get("training") for r in paper):
            parts += ["## Training-step throughput (img/s: forward, loss, backward, SGD step)", ""]
            for g in groups.values():
                parts += [summary_table(g, "training"), ""]
        parts += ["## Details per setting", ""]
        for r in paper:
            parts += [f"### {setting(r)}", "", detail_table(r, "inference"), ""]
            if r.get("training"):
                parts += [detail_table(r, "training"), ""]
            if r.get("skipped"):
                parts += ["Skipped: " + "; ".join(f"{s['peer']} ({s['reason']})" for s in r["skipped"]), ""]
    for run in ops:
        s = run["shvit"]
        parts += [f"## Op microbenchmarks ({s['device']}, {s['dtype']}, grid {s['grid']}, {s['threads']} threads)", "",
                  "Minimum traffic: each input and output once; FLOPs: 2 per multiply-add of convs and matmuls; "
                  "backward counts input and weight gradients. '% of roof': achieved FLOP/s over the measured roofline "
                  "at the op's intensity.", "", ops_table(run), ""]
    parts += ["## Machines, dates, load", ""] + environment_lines(paper + ops) + [""]
    return "\n".join(parts)


def plot_throughput(paper: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(r, k) for r in paper for k in ("inference", "training") if r.get(k)]
    if not panels:
        return
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 0.45 * max(len(r[k]) for r, k in panels) * rows + 1.2 * rows),
                             squeeze=False)
    for ax, (r, key) in zip(axes.flat, panels):
        res = r[key]
        names = [x["name"] for x in res][::-1]
        med = [x["img_per_s"] for x in res][::-1]
        batch = r["batch_size"]
        lo = [m - batch / (x["ms_per_batch_max"] / 1e3) for m, x in zip(med, res[::-1])]
        hi = [batch / (x["ms_per_batch_min"] / 1e3) - m for m, x in zip(med, res[::-1])]
        colors = ["tab:orange" if "shvit_kernels" in n else "tab:blue" for n in names]
        ax.barh(names, med, xerr=[lo, hi], color=colors, capsize=3)
        for y, (m, h) in enumerate(zip(med, hi)):
            ax.text(m + h, y, f"  {_fmt(m)}", va="center", fontsize=8)
        ax.set_title(f"{setting(r)} - {key}", fontsize=10)
        ax.set_xlabel("img/s (median, whiskers min..max)")
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlim(0, max(m + h for m, h in zip(med, hi)) * 1.25)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roofline(run: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = run["shvit"]
    probe = s.get("probe")
    points = [b["extra_info"] for b in run["benchmarks"] if "op" in b.get("extra_info", {})]
    if not probe or not points:
        return
    backends = sorted({p["backend"] for p in points})
    fig, axes = plt.subplots(1, len(backends), figsize=(7 * len(backends), 5.5), sharex=True, sharey=True, squeeze=False)
    xs = [p["intensity"] for p in points]
    ys = [p["TFLOPs"] * 1e3 for p in points]
    lo, hi = min(xs) / 2, max(xs) * 4
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    dtype = points[0]["dtype"]
    roof = [roof_at(probe, x, dtype) / 1e9 for x in grid]
    ops = sorted({p["op"] for p in points})
    markers = {"forward": "o", "backward": "s", "both": "^"}
    cmap = plt.get_cmap("tab10")
    for ax, backend in zip(axes.flat, backends):
        ax.plot(grid, roof, "k-", lw=2, label=f"measured roof: copy {probe['bandwidth_GBps']:.0f} GB/s, "
                f"matmul {max(probe['matmul_TFLOPs'].values()) * 1e3:.0f} GFLOP/s")
        for i, op in enumerate(ops):
            for mode, mk in markers.items():
                sel = [p for p in points if p["op"] == op and p["mode"] == mode and p["backend"] == backend]
                if sel:
                    ax.scatter([p["intensity"] for p in sel], [p["TFLOPs"] * 1e3 for p in sel], marker=mk, s=40,
                               color=cmap(i), label=f"{op} ({mode})", alpha=0.85, edgecolors="k", linewidths=0.4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(min(ys + roof) / 2, max(ys + roof) * 2)
        ax.set_xlabel("arithmetic intensity (FLOP per byte of minimum traffic)")
        ax.set_title(f"backend {backend}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes.flat[0].set_ylabel("achieved GFLOP/s")
    fig.suptitle(f"Op roofline: {s['device']} {s['dtype']}, {s['threads']} thread(s), grid {s['grid']} "
                 "(points above the roof ran from cache)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(paths: List[str], out_dir: str, plots: bool = True) -> Dict[str, str]:
    """Write README.md (and the PNGs) into ``out_dir``; returns {kind: path}."""
    paper, ops = load(paths)
    os.makedirs(out_dir, exist_ok=True)
    written = {"markdown": os.path.join(out_dir, "README.md")}
    with open(written["markdown"], "w") as f:
        f.write(markdown(paper, ops, session_index(out_dir)))
    if plots:
        for model in sorted({r["model"] for r in paper}):
            written[f"throughput_{model}"] = os.path.join(out_dir, f"throughput_{model}.png")
            plot_throughput([r for r in paper if r["model"] == model], written[f"throughput_{model}"])
        for run in ops:
            s = run["shvit"]
            key = f"roofline_{s['device'].split(':')[0]}_{s['dtype']}"
            written[key] = os.path.join(out_dir, key + ".png")
            plot_roofline(run, written[key])
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", help="result JSON files (default: benchmarks/results/*.json)")
    p.add_argument("--out-dir", default=RESULTS, help="where README.md and the PNGs go")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--print", action="store_true", help="also print the markdown")
    args = p.parse_args(argv)
    files = args.files or glob.glob(os.path.join(RESULTS, "*.json"))
    written = render(files, args.out_dir, plots=not args.no_plots)
    if args.print:
        with open(written["markdown"]) as f:
            print(f.read())
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
