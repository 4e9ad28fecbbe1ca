"""Evaluation throughput of BenchmarkEvaluation (problems/s): HFSampler, and VLLMSampler when it imports.

Setting (the defaults): SmolLM2-135M-Instruct (fp32 on CPU, bf16 on GPU), the first 50 GSM8K test problems (the copy
shipped in lit_sapo/benchmarks), 1 sample each at temperature 0.7, max_new_tokens 128 (modest, so the CPU run stays short;
most GSM8K answers need more, so accuracy here is not the model's GSM8K score), grading with math-verify in
2 worker processes. Each sampler gets one untimed warm-up evaluation (4 problems, 8 tokens: grader start-up,
data loading, kernels), then one timed evaluation of the 50 problems through `BenchmarkEvaluation.evaluate`:
the time covers rendering, generation, decoding, grading and the JSONL. HF runs first: the in-process vLLM engine
binds this process's OpenMP threads. Prints one JSON object to stdout (vLLM's logs go to stderr).

    OMP_NUM_THREADS=2 VLLM_CPU_KVCACHE_SPACE=2 python tests/benchmarks/eval_throughput.py [--no-vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # keep stdout for the JSON
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _Timed:
    """Wraps a sampler's generate to count its seconds and generated tokens."""

    def __init__(self, sampler) -> None:
        self.sampler, self.seconds, self.tokens = sampler, 0.0, 0
        self.temperature, self.max_new_tokens = sampler.temperature, sampler.max_new_tokens

    def __getattr__(self, name):
        return getattr(self.sampler, name)

    def generate(self, *args, **kwargs):
        start = time.perf_counter()
        gen = self.sampler.generate(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.tokens += sum(len(ids) for ids in gen.completion_ids)
        return gen


def run(sampler, module, args, out_dir: str) -> dict:
    from lit_sapo.callbacks import BenchmarkEvaluation
    from lit_sapo.models import SMOLLM2
    from lit_sapo.rollout import RolloutDataModule

    timed = _Timed(sampler)
    dm = RolloutDataModule(tokenizer=SMOLLM2, sampler=timed, grading_workers=2)
    dm.setup("fit")
    trainer = SimpleNamespace(datamodule=dm, is_global_zero=True, loggers=[], log_dir=out_dir,
                              default_root_dir=out_dir, global_step=0)
    try:
        common = dict(n_samples=args.samples, temperature=0.7, batch_size=64)
        BenchmarkEvaluation(limit=4, max_new_tokens=8, **common).evaluate(trainer, module)  # warm-up
        timed.seconds, timed.tokens = 0.0, 0
        evaluation = BenchmarkEvaluation(limit=args.problems, max_new_tokens=args.max_new_tokens, **common)
        start = time.perf_counter()
        metrics = evaluation.evaluate(trainer, module)
        seconds = time.perf_counter() - start
    finally:
        dm.teardown("fit")
    return {"seconds": round(seconds, 2), "problems_per_s": round(args.problems / seconds, 3),
            "generate_seconds": round(timed.seconds, 2), "generated_tokens": timed.tokens,
            "tokens_per_s": round(timed.tokens / timed.seconds, 1),
            "pass@1": metrics["eval/gsm8k/pass@1"], f"maj@{args.samples}": metrics[f"eval/gsm8k/maj@{args.samples}"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=50)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()

    import torch

    from lit_sapo.models import SMOLLM2, ModelSpec, load_policy, load_tokenizer, resolve_source
    from lit_sapo.sampling import HFSampler

    cuda = torch.cuda.is_available()
    spec = ModelSpec(name=SMOLLM2, dtype="bf16" if cuda else "fp32")
    policy = load_policy(spec).eval()
    policy = policy.cuda() if cuda else policy
    module = SimpleNamespace(policy=policy, tokenizer=load_tokenizer(spec), model_source=resolve_source(spec)[0],
                             weight_version=0, device=next(policy.parameters()).device)
    result = {"benchmark": "eval_throughput", "model": SMOLLM2, "dtype": spec.dtype,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch_threads": torch.get_num_threads(),
              "problems": args.problems, "n_samples": args.samples, "max_new_tokens": args.max_new_tokens,
              "temperature": 0.7, "note": "max_new_tokens kept modest (CPU); accuracy is not a GSM8K score",
              "load_avg_1min_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as out:
        result["hf"] = run(HFSampler(max_new_tokens=args.max_new_tokens), module, args, out)
        try:
            from lit_sapo.sampling.vllm import VLLMSampler

            import vllm
        except ImportError as exc:
            result["vllm"] = f"skipped: {exc}"
        else:
            if args.no_vllm:
                result["vllm"] = "skipped: --no-vllm"
            else:
                sampler = VLLMSampler(max_new_tokens=args.max_new_tokens, max_model_len=1024,
                                      dtype="bfloat16" if cuda else "float32")
                try:
                    result["vllm"] = {"version": vllm.__version__, **run(sampler, module, args, out)}
                finally:
                    sampler.close()
                result["vllm_speedup"] = round(result["vllm"]["problems_per_s"] / result["hf"]["problems_per_s"], 2)
    result["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
