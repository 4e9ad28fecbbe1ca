"""Seconds per rollout step, lit_sapo vs TRL's GRPOTrainer (loss_type="sapo") on the same work, in one run.

Work (the TRL comparison of docs and README): SmolLM2-135M-Instruct, fp32 on CPU, 2 prompts x 4 completions, 32 new tokens,
HF generation, one update per rollout, tau 1.0 / 1.05, no KL. Prompts: "What is a+b?" (a, b in 2..9).
lit_sapo's step is split into generation, grading and update; the update's FLOP/s (6 * params * tokens / time) is
compared with a fp32 GEMM measured in the same run; `update_tokens` counts the tokens the padding-free update
really runs (each prompt once), `row_tokens` those of one row per completion (prompt + completion, no padding).
Needs `pip install trl==1.16.0` (the `bench` extra).

    python tests/benchmarks/step_time.py [--steps 6] [--warmup 2] [--skip-trl] [--with-vllm]
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


VLLM_ARGS = ["--data.sampler=lit_sapo.sampling.vllm.VLLMSampler", "--data.sampler.init_args.max_new_tokens=32",
             "--data.sampler.init_args.temperature=1.0"]


def gemm_flops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def run_lit_sapo(steps: int, warmup: int, sampler: str = "hf") -> dict:
    from lightning.pytorch import Callback

    from lit_sapo import cli

    rows: list[dict] = []

    class Timer(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            update = time.perf_counter() - self._t
            rows.append({"generate": batch.metrics["time/generate_s"], "grade": batch.metrics["time/grade_s"],
                         "update": update, "tokens": packed_tokens(batch),
                         "row_tokens": int(batch.prompt_mask.sum() + batch.completion_mask.sum()),
                         "end": time.perf_counter()})

    with tempfile.TemporaryDirectory() as tmp:
        result = cli.main([
            "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.max_steps={steps}",
            f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}",
            "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--model.num_minibatches=1", "--model.ppo_epochs=1", "--model.optimizer.warmup_steps=0",
            *(VLLM_ARGS if sampler == "vllm" else [])],
            callbacks=[Timer()])
        params = sum(p.numel() for p in result.model.policy.parameters())
    timed = rows[warmup:]
    med = {k: statistics.median(r[k] for r in timed) for k in ("generate", "grade", "update")}
    # a whole step, Lightning's own work included: the time between consecutive step ends
    step = statistics.median(b["end"] - a["end"] for a, b in zip(rows[warmup - 1:], rows[warmup:]))
    tokens = statistics.median(r["tokens"] for r in timed)
    return {"step_s": step, "generate_s": med["generate"], "grade_s": med["grade"], "update_s": med["update"],
            "update_tokens": tokens, "row_tokens": statistics.median(r["row_tokens"] for r in timed),
            "update_flops_per_s": 6 * params * tokens / med["update"], "params": params, "steps_timed": len(timed)}


def packed_tokens(batch) -> int:
    """Tokens the padding-free update runs through the model: per group, the prompt once (less its last token,
    which starts every completion's segment) plus its completions."""
    from lit_sapo.packing import scored_lengths

    lengths = scored_lengths(batch.completion_mask)
    total = 0
    for g in batch.group_ids.unique():
        rows = (batch.group_ids == g).nonzero().flatten()
        if lengths[rows].sum() > 0:
            total += int(batch.prompt_mask[rows[0]].sum()) - 1 + int(lengths[rows].sum())
    return total


def run_trl(steps: int, warmup: int) -> dict:
    import random

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lit_sapo.models import builtin_smollm2_folder
    from lit_sapo.rewards import extract_answer

    folder = str(builtin_smollm2_folder())
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a}+{b}?\nPut the final answer within \\boxed{{}}."}],
                     "answer": str(a + b)})

    def accuracy(completions, answer, **_):
        return [float(extract_answer(c[0]["content"]) == a) for c, a in zip(completions, answer)]

    ends: list[float] = []
    generate_times: list[float] = []

    class StepTimer(TrainerCallback):
        # as for lit_sapo: the time between consecutive step ends (data, logging and callbacks included)
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(output_dir=tmp, loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                            use_cpu=True, use_vllm=False, beta=0.0, num_generations=4,
                            per_device_train_batch_size=8, max_completion_length=32, max_steps=steps,
                            learning_rate=1e-5, report_to="none", logging_steps=1, save_strategy="no",
                            temperature=1.0, seed=0, dataloader_num_workers=0)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        plain_generate = model.generate

        def timed_generate(*args, **kwargs):  # one call per step here (steps_per_generation = 1)
            t = time.perf_counter()
            result = plain_generate(*args, **kwargs)
            generate_times.append(time.perf_counter() - t)
            return result

        model.generate = timed_generate
        trainer = GRPOTrainer(model=model,
                              reward_funcs=accuracy, args=config, train_dataset=Dataset.from_list(rows),
                              processing_class=AutoTokenizer.from_pretrained(folder), callbacks=[StepTimer()])
        trainer.train()
    timed = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    return {"step_s": statistics.median(timed), "generate_s": statistics.median(generate_times[warmup:]),
            "steps_timed": len(timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="rollout steps per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="first steps not timed (>= 1)")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--with-vllm", action="store_true", help="also time lit_sapo with the vLLM sampler")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = {"work": "SmolLM2-135M fp32 CPU, 2 prompts x 4 completions, 32 new tokens, HF generate, 1 update/rollout",
           "threads": torch.get_num_threads(), "gemm_flops_per_s": gemm_flops()}
    out["lit_sapo"] = run_lit_sapo(args.steps, args.warmup)
    out["lit_sapo"]["update_flops_vs_gemm"] = out["lit_sapo"]["update_flops_per_s"] / out["gemm_flops_per_s"]
    if args.with_vllm:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        out["lit_sapo_vllm"] = run_lit_sapo(args.steps, args.warmup, sampler="vllm")
    if not args.skip_trl:
        out["trl"] = run_trl(args.steps, args.warmup)
        out["ratio_vs_trl"] = out["lit_sapo"]["step_s"] / out["trl"]["step_s"]
        out["target"] = {"ratio_vs_trl_max": 0.6}
        out["pass"] = out["ratio_vs_trl"] <= 0.6
        # both generate with the same fp32 HF `generate`: our generation alone bounds the ratio from below
        out["ratio_floor_from_generation"] = out["lit_sapo"]["generate_s"] / out["trl"]["step_s"]
        if args.with_vllm:
            out["ratio_vs_trl_vllm_sampler"] = out["lit_sapo_vllm"]["step_s"] / out["trl"]["step_s"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
