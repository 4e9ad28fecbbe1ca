"""The figures of the docs: `make figures` (= python scripts/make_figures.py).

- docs/figures/quickstart.png: the curves of `make quickstart` (reward, EUR, ratio variance, completion length
  per rollout). Reuses the newest finished run under runs/quickstart/logs; runs the quickstart first if none is.
- docs/figures/gate_family.png: f(r) and f'(r) of every gate (the paper's Figure 1, lit_sapo.plots.plot_gate_family).

    python scripts/make_figures.py [--rerun]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quickstart.yaml"
FIGURES = ROOT / "docs" / "figures"
# panel title -> metric key of the quickstart's metrics.csv
PANELS = {
    "mean reward": "reward/mean",
    "EUR (mean f'(r), A != 0 tokens)": "train/eur",
    "importance-ratio variance": "train/ratio_var",
    "completion length (tokens)": "completion/len_mean",
}


def expected_rollouts(config_path: Path) -> int:
    """Rollouts of a full run: max_steps counts optimizer steps, ppo_epochs x num_minibatches per rollout."""
    config = yaml.safe_load(config_path.read_text())
    model = config.get("model", {})
    per_rollout = int(model.get("ppo_epochs", 1)) * int(model.get("num_minibatches", 1))
    return int(config["trainer"]["max_steps"]) // per_rollout


def finished_run(log_root: Path, rollouts: int) -> Path | None:
    """The newest logger version whose metrics.csv reaches the last rollout, or None."""
    from lit_sapo.plots import read_run

    versions = sorted(log_root.glob("version_*"), key=lambda p: int(p.name.split("_")[-1]), reverse=True)
    for version in versions:
        if not (version / "metrics.csv").exists():
            continue
        steps = read_run(version).get("reward/mean", {})
        if steps and max(steps) >= rollouts:
            return version
    return None


def plot_quickstart(run: Path, out_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lit_sapo.plots import read_run

    series = read_run(run)
    fig, axes = plt.subplots(2, 2, figsize=(9, 5.6))
    for ax, (title, key) in zip(axes.flat, PANELS.items()):
        points = sorted(series.get(key, {}).items())
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rollout")
        ax.grid(alpha=0.3)
    fig.suptitle("make quickstart: SmolLM2-135M-Instruct, SAPO (sigmoid gate), arithmetic, CPU", fontsize=11)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rerun", action="store_true", help="run the quickstart even if a finished run exists")
    args = parser.parse_args(argv)

    config = yaml.safe_load(CONFIG.read_text())
    logger = config["trainer"]["logger"]["init_args"]
    log_root = ROOT / logger["save_dir"] / logger["name"]
    rollouts = expected_rollouts(CONFIG)
    run = None if args.rerun else finished_run(log_root, rollouts)
    if run is None:
        lit_sapo = Path(sys.executable).with_name("lit-sapo")
        subprocess.run([str(lit_sapo), "fit", "--config", str(CONFIG.relative_to(ROOT))], cwd=ROOT, check=True)
        run = finished_run(log_root, rollouts)
        if run is None:
            print(f"make_figures: no finished quickstart run under {log_root}", file=sys.stderr)
            return 1
    print(plot_quickstart(run, FIGURES / "quickstart.png"))

    from lit_sapo.plots import plot_gate_family

    print(plot_gate_family(FIGURES / "gate_family.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
