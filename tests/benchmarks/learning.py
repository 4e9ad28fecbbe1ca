"""Does it learn? SmolLM2-135M on the arithmetic task (configs/quickstart.yaml) for ~40 rollout steps.

Prints JSON: mean reward of the first 10 rollouts vs the last 10, and the whole curve (reward/mean per rollout).

    python tests/benchmarks/learning.py [--rollouts 40] [--gate sigmoid] [--out runs/bench-learning]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=40)
    parser.add_argument("--gate", default="sigmoid")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-learning"))
    args = parser.parse_args()

    from lit_sapo import cli

    out = Path(args.out)
    start = time.perf_counter()
    result = cli.main([
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
        f"--trainer.max_steps={2 * args.rollouts}",  # quickstart: 2 optimizer steps per rollout
        f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",  # stdout is for the JSON
        f"--model.gate={args.gate}"])
    seconds = time.perf_counter() - start
    rows = list(csv.DictReader(open(Path(result.trainer.logger.log_dir) / "metrics.csv")))
    curve = [round(float(r["reward/mean"]), 4) for r in rows if r.get("reward/mean")]
    first, last = statistics.mean(curve[:10]), statistics.mean(curve[-10:])
    print(json.dumps({
        "work": "SmolLM2-135M fp32 CPU, arithmetic a+b (2..9), 2 prompts x 4 completions, 32 new tokens, "
                "2 updates per rollout, lr 1e-5, tau 1.0/1.05",
        "gate": args.gate, "rollouts": len(curve), "seconds": round(seconds, 1),
        "reward_first10": round(first, 4), "reward_last10": round(last, 4), "rise": round(last - first, 4),
        "eur_mean": round(statistics.mean(float(r["train/eur"]) for r in rows), 4),
        "curve": curve}, indent=1))


if __name__ == "__main__":
    main()
