"""Plots of the gate study: run comparisons against rollout step, and the paper's Figure 1 (the gate family).

matplotlib with the Agg backend (files only, no display needed). Runs are read from Lightning CSVLogger
`metrics.csv` files (rows are sparse: each key has its own rows) and from TensorBoard event files when present.
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

X_KEY = "rollout/step"
# panel title -> metric keys tried in order (the first one a run has is drawn)
PANELS: dict[str, tuple[str, ...]] = {
    "reward": ("reward/mean",),
    "entropy": ("entropy/mean", "train/entropy"),
    "EUR pos (A > 0)": ("train/eur_pos", "ratio/eur_pos"),
    "EUR neg (A < 0)": ("train/eur_neg", "ratio/eur_neg"),
    "importance-ratio variance": ("train/ratio_var", "ratio/var"),
    "gated fraction": ("train/gated_frac", "ratio/gated_frac"),
    "completion length": ("completion/len_mean",),
}
# spread over orders of magnitude (a single stale token can put r at 1e2): a log axis
LOG_PANELS = {"importance-ratio variance"}
BENCH_PATTERN = re.compile(r"^(eval|bench)/.+/(pass@1|accuracy)$")


def find_metrics_files(run: str | Path) -> list[Path]:
    """Every metrics.csv under a run folder (a resumed run may have several logger versions)."""
    run = Path(run)
    if run.is_file():
        return [run]
    return sorted(run.rglob("metrics.csv"))


def read_run(run: str | Path) -> dict[str, dict[float, float]]:
    """key -> {x: value} of one run, x = rollout step. Eval rows (no rollout/step) use their `step` column
    (the policy version = rollouts trained so far, the same axis)."""
    series: dict[str, dict[float, float]] = defaultdict(dict)
    for path in find_metrics_files(run):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                x = row.get(X_KEY) or ""
                is_eval = not x
                if is_eval:
                    x = row.get("step") or ""
                if not x:
                    continue
                for key, value in row.items():
                    if key in (X_KEY, "step", "epoch") or value in ("", None):
                        continue
                    if is_eval != bool(BENCH_PATTERN.match(key)):
                        continue
                    try:
                        series[key][float(x)] = float(value)
                    except ValueError:
                        pass
    _read_tensorboard(Path(run), series)
    return dict(series)


def _read_tensorboard(run: Path, series: dict) -> None:
    """Add scalars from TensorBoard event files (x = the run's rollout/step at the same global step)."""
    if not run.is_dir():
        return
    files = sorted(run.rglob("events.out.tfevents.*"))
    if not files:
        return
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags().get("scalars", [])
        if X_KEY not in tags:
            continue
        step_to_x = {e.step: e.value for e in acc.Scalars(X_KEY)}
        for tag in tags:
            if tag == X_KEY or tag in series:
                continue  # the CSV log wins
            for e in acc.Scalars(tag):
                x = e.step if BENCH_PATTERN.match(tag) else step_to_x.get(e.step)
                if x is not None:
                    series.setdefault(tag, {})[float(x)] = float(e.value)


def run_label(run: str | Path) -> str:
    """A run's configuration label: its folder name without a trailing `-seed<N>` / `_seed<N>`."""
    return re.sub(r"[-_]seed\d+$", "", Path(run).name)


def _mean_band(curves: list[dict[float, float]]) -> tuple[list[float], list[float], list[float]]:
    xs = sorted(set().union(*curves))
    means, stds = [], []
    for x in xs:
        vals = [c[x] for c in curves if x in c and math.isfinite(c[x])]
        m = sum(vals) / len(vals) if vals else math.nan
        means.append(m)
        stds.append(math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals)) if len(vals) > 1 else 0.0)
    return xs, means, stds


def expand_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders: a path holding metrics.csv files directly is one run; a sweep folder is every child run."""
    runs = []
    for p in map(Path, paths):
        children = sorted(c for c in p.iterdir() if c.is_dir() and find_metrics_files(c)) if p.is_dir() else []
        own = (p / "config.yaml").exists() or not children
        runs += [p] if own else children
    return runs


def _groups(runs: list[str | Path]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in expand_runs(runs):
        groups[run_label(run)].append(read_run(run))
    return groups


def _draw_panel(ax, groups: dict[str, list[dict]], keys: tuple[str, ...], title: str, legend: bool = True) -> bool:
    """One metric, one line per configuration (seeds: mean with a ±1 std band). False when no run has it."""
    drawn = False
    for label, members in groups.items():
        curves = [next((r[k] for k in keys if k in r), None) for r in members]
        curves = [c for c in curves if c]
        if not curves:
            continue
        xs, means, stds = _mean_band(curves)
        (line,) = ax.plot(xs, means, label=label + (f" (n={len(curves)})" if len(curves) > 1 else ""))
        if len(curves) > 1:
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    ax.set_xlabel("rollout step")
    ax.set_ylabel(keys[0])
    ax.set_title(title + (" (log)" if title in LOG_PANELS else ""))
    if drawn and title in LOG_PANELS:
        ax.set_yscale("log")
    if legend and drawn:
        ax.legend(fontsize=7)
    return drawn


def plot_runs(runs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """One PNG per metric (and one per benchmark), one line per configuration: seeds of the same configuration
    (folders named `<config>-seed<N>`) are drawn as their mean with a ±1 std band; and `overview.png`, the
    metrics side by side with one legend. Returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = _groups(runs)
    panels = dict(PANELS)
    bench = sorted({k for runs_ in groups.values() for r in runs_ for k in r if BENCH_PATTERN.match(k)})
    for key in bench:
        panels[f"benchmark {key}"] = (key,)
    written = []
    for title, keys in panels.items():
        fig, ax = plt.subplots(figsize=(6, 3.6))
        if not _draw_panel(ax, groups, keys, title):
            plt.close(fig)
            continue
        fig.tight_layout()
        path = out_dir / (re.sub(r"[^A-Za-z0-9@]+", "_", title.split(" (")[0]).strip("_").lower() + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if written:
        written.append(plot_overview(groups, out_dir / "overview.png"))
    return written


def plot_overview(groups: dict[str, list[dict]], out_path: str | Path) -> Path:
    """The PANELS metrics in one figure (3 columns), one shared legend below."""
    panels = [(t, k) for t, k in PANELS.items() if any(key in r for m in groups.values() for r in m for key in k)]
    cols = 3
    rows = max(1, -(-len(panels) // cols))
    spare = len(panels) < rows * cols  # the legend goes into the first empty cell, else below the grid
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows + (0 if spare else 0.9)), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        _draw_panel(ax, groups, keys, title, legend=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if spare:
        axes.flat[len(panels)].legend(handles, labels, loc="center", fontsize=9, frameon=False)
        fig.tight_layout()
    else:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
        fig.tight_layout(rect=(0, 0.9 / (3.2 * rows + 0.9) + 0.02, 1, 1))
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)


def plot_gate_family(out_path: str | Path, taus=(1, 5, 10)) -> Path:
    """The paper's Figure 1: f(r) (top row) and f'(r) (bottom row) of sigmoid, erf, arctan, softsign and the
    clip, one column per tau; every curve passes through (1, 1). The clip (eps 0.2, no sign) ignores tau."""
    import torch

    from lit_sapo.gates import get_gate

    names = ("sigmoid", "erf", "arctan", "softsign", "clip")
    r = torch.linspace(0.0, 2.0, 801, dtype=torch.float64)
    fig, axes = plt.subplots(2, len(taus), figsize=(4 * len(taus), 6.5), squeeze=False)
    for j, tau in enumerate(taus):
        for name in names:
            gate = get_gate(name)
            axes[0, j].plot(r, gate.f(r, float(tau)), label=name)
            axes[1, j].plot(r, gate.df(r, float(tau)), label=name)
        for i, what in enumerate(("f(r)", "f'(r)")):
            ax = axes[i, j]
            ax.plot([1.0], [1.0], "ko", markersize=3)
            ax.set_title(f"{what}, tau = {tau:g}")
            ax.set_xlabel("r")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


PROBE_PANELS = (("kl", "KL(pi_k || pi_0)"), ("ratio_var", "ratio variance"), ("ratio_max", "ratio max"),
                ("eur_pos", "EUR (A > 0)"), ("eur_neg", "EUR (A < 0)"), ("entropy", "entropy"))


def plot_probe(rows: list[dict], out_path: str | Path) -> Path:
    """The stress probe (`lit-sapo probe`): one panel per statistic against optimizer step, one line per gate."""
    lines: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        lines[f"{row['gate']} ({row['setting']})"].append(row)
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), squeeze=False)
    for ax, (key, title) in zip(axes.flat, PROBE_PANELS):
        for label, members in lines.items():
            ax.plot([float(m["step"]) for m in members], [float(m[key]) for m in members], label=label)
        ax.set_title(title)
        ax.set_xlabel("optimizer step on the same rollout")
        ax.grid(alpha=0.3)
        if key in ("kl", "ratio_var"):
            ax.set_yscale("symlog", linthresh=1e-6)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
