"""`lit-sapo sweep`: the base config once per gate x temperature pair x seed, each run in its own folder.

    lit-sapo sweep --config BASE.yaml [--config ...] --gates sigmoid,erf,clip --taus 10:12,1:1.05 --seeds 0,1 \
        --out DIR [--eps 0.2:0.2] [any fit override, e.g. --trainer.max_steps 40]

The clip gate takes eps instead of taus: one clip run per `--eps` pair (low:high) and seed; the tau pairs do
not apply to it. Every run gets the same seed_everything and data.seed (same prompts and sampling seeds for
every gate). Each fit is a subprocess `lit-sapo fit`. Resume: a run whose DONE file exists is skipped; a run
with a checkpoints/last.ckpt continues from it (`--ckpt_path`). DIR/summary.csv and DIR/summary.md: one row per run.
"""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
import time
from pathlib import Path

from lit_sapo.plots import read_run

DONE = "DONE"


def run_specs(gates, taus, eps, seeds) -> list[dict]:
    specs = []
    for gate in gates:
        pairs = eps if gate == "clip" else taus
        for a, b in pairs:
            for seed in seeds:
                kind = "eps" if gate == "clip" else "tau"
                specs.append({"gate": gate, "kind": kind, "a": a, "b": b, "seed": seed,
                              "name": f"{gate}-{kind}{a:g}_{b:g}-seed{seed}"})
    return specs


def _pairs(text: str, flag: str) -> list[tuple[float, float]]:
    try:
        return [tuple(float(v) for v in item.split(":")) for item in text.split(",") if item]
    except ValueError:
        raise SystemExit(f"lit-sapo sweep: error: {flag}: use a:b pairs separated by commas, got {text!r}") from None


def fit_command(configs: list[str], spec: dict, run_dir: Path, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "lit_sapo.cli", "fit"]
    for c in configs:
        cmd += ["--config", c]
    model = (["--model.eps_low", str(spec["a"]), "--model.eps_high", str(spec["b"])] if spec["kind"] == "eps"
             else ["--model.tau_pos", str(spec["a"]), "--model.tau_neg", str(spec["b"])])
    cmd += ["--model.gate", spec["gate"], *model, "--seed_everything", str(spec["seed"]),
            "--data.seed", str(spec["seed"]), "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger.class_path", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.logger.init_args.name", "logs",
            # last.ckpt a hard link to the newest checkpoint: one copy per run on disk (1.6 GB for SmolLM2)
            "--trainer.callbacks+=lit_sapo.callbacks.RolloutCheckpoint",
            "--trainer.callbacks.dirpath", str(run_dir / "checkpoints"), "--trainer.callbacks.save_last", "link",
            "--trainer.callbacks.every_n_train_steps", "1", "--trainer.enable_checkpointing", "true", *overrides]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        cmd += ["--ckpt_path", str(last)]
    return cmd


def _finite(values):
    return [v for v in values if math.isfinite(v)]


def summarize_run(run_dir: Path, spec: dict) -> dict:
    s = read_run(run_dir)

    def series(*keys):
        for k in keys:
            if k in s:
                return [v for _, v in sorted(s[k].items())]
        return []

    def mean(*keys):
        v = _finite(series(*keys))
        return sum(v) / len(v) if v else math.nan

    reward, entropy = series("reward/mean"), series("entropy/mean", "train/entropy")
    bench = {k: v for k, v in s.items() if k.startswith(("eval/", "bench/")) and k.endswith("pass@1")}
    wall = (run_dir / "wall_s").read_text() if (run_dir / "wall_s").exists() else "nan"
    return {
        "run": spec["name"], "gate": spec["gate"],
        "taus": f"{spec['a']:g}/{spec['b']:g}" if spec["kind"] == "tau" else f"eps {spec['a']:g}/{spec['b']:g}",
        "seed": spec["seed"], "rollouts": len(reward),
        "reward_final": reward[-1] if reward else math.nan, "reward_mean": mean("reward/mean"),
        "entropy_first": entropy[0] if entropy else math.nan, "entropy_last": entropy[-1] if entropy else math.nan,
        "eur_pos": mean("train/eur_pos"), "eur_neg": mean("train/eur_neg"), "ratio_var": mean("train/ratio_var"),
        "gated_frac": mean("train/gated_frac"), "completion_len": mean("completion/len_mean"),
        "bench_final": ";".join(f"{k}={v[max(v)]:.4g}" for k, v in sorted(bench.items())),
        "wall_s": float(wall),
    }


def write_summary(out: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(fmt(v) for v in r.values()) + " |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lit-sapo sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--gates", default="sigmoid,erf,arctan,softsign,clip")
    parser.add_argument("--taus", default="10:12,1:1.05", help="tau_pos:tau_neg pairs (not for clip)")
    parser.add_argument("--eps", default="0.2:0.2", help="eps_low:eps_high pairs of the clip gate")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", required=True)
    args, overrides = parser.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = run_specs([g for g in args.gates.split(",") if g], _pairs(args.taus, "--taus"),
                      _pairs(args.eps, "--eps"), [int(s) for s in args.seeds.split(",") if s])
    rows, failed = [], []
    for spec in specs:
        run_dir = out / spec["name"]
        if not (run_dir / DONE).exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            print(f"lit-sapo sweep: {spec['name']}", flush=True)
            t0 = time.perf_counter()
            code = subprocess.call(fit_command(args.config, spec, run_dir, overrides))
            previous = float((run_dir / "wall_s").read_text()) if (run_dir / "wall_s").exists() else 0.0
            (run_dir / "wall_s").write_text(f"{previous + time.perf_counter() - t0:.2f}")
            if code != 0:
                failed.append(spec["name"])
                continue
            (run_dir / DONE).write_text("ok\n")
        rows.append(summarize_run(run_dir, spec))
    write_summary(out, rows)
    if failed:
        print(f"lit-sapo sweep: failed runs (rerun the same command to resume): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
