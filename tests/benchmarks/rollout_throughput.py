"""Rollout throughput: HFSampler vs VLLMSampler on identical prompts, plus the time of one weight sync.

Setting (the defaults): SmolLM2-135M-Instruct, fp32 on CPU (bf16 on GPU), the first 8 GSM8K test problems through
the chat template, 4 sampled completions each (32 sequences), up to 64 new tokens, temperature 1. Each sampler
gets one untimed warm-up call, then one timed rollout; tokens/s counts generated completion tokens (stop tokens
included). The HF run goes first: the in-process vLLM engine binds this process's OpenMP threads.
Prints one JSON object to stdout (vLLM's logs go to stderr).

    OMP_NUM_THREADS=2 VLLM_CPU_KVCACHE_SPACE=2 python tests/benchmarks/rollout_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # keep stdout for the JSON
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET = {"cpu_speedup_min": 1.3}


def _questions(n: int) -> list[str]:
    from lit_sapo import benchmarks  # the GSM8K test copy shipped with the package

    with benchmarks.path("gsm8k").open() as f:
        return [json.loads(line)["problem"] for _, line in zip(range(n), f)]


def _prompt_ids(tokenizer, questions: list[str]) -> list[list[int]]:
    ids = []
    for q in questions:
        text = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
        ids.append(tokenizer(text, add_special_tokens=False).input_ids)
    return ids


def _timed_rollout(sampler, prompts, args) -> tuple[float, float, int, object]:
    """(wall seconds, process CPU seconds, generated tokens, Generation) of one timed rollout."""
    sampler.generate(prompts[:1], 1, seed=123, max_new_tokens=4)  # warm-up: kernels, allocator
    start, cpu_start = time.perf_counter(), time.process_time()
    gen = sampler.generate(prompts, args.generations, seed=0, max_new_tokens=args.max_new_tokens)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu_seconds, sum(len(ids) for ids in gen.completion_ids), gen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="vLLM without enforce_eager (torch.compile)")
    args = parser.parse_args()

    import torch

    from lit_sapo.models import SMOLLM2, ModelSpec, load_policy, load_tokenizer, resolve_source
    from lit_sapo.sampling import HFSampler
    from lit_sapo.sampling.vllm import VLLMSampler

    cuda = torch.cuda.is_available()
    spec = ModelSpec(name=SMOLLM2, dtype="bf16" if cuda else "fp32")
    tokenizer = load_tokenizer(spec)
    policy = load_policy(spec).eval()
    if cuda:
        policy = policy.cuda()
    prompts = _prompt_ids(tokenizer, _questions(args.prompts))

    hf = HFSampler(temperature=1.0, max_new_tokens=args.max_new_tokens)
    hf.setup(policy, tokenizer)
    load_before = os.getloadavg()[0]  # the machine is shared: a busy one slows both, unevenly
    hf_seconds, hf_cpu, hf_tokens, _ = _timed_rollout(hf, prompts, args)

    vllm = VLLMSampler(temperature=1.0, max_new_tokens=args.max_new_tokens, dtype="bfloat16" if cuda else "float32",
                       max_model_len=1024, enforce_eager=not args.compile)
    start = time.perf_counter()
    vllm.setup(policy, tokenizer, resolve_source(spec)[0])
    startup_seconds = time.perf_counter() - start
    vllm_seconds, vllm_cpu, vllm_tokens, gen = _timed_rollout(vllm, prompts, args)
    start = time.perf_counter()
    vllm.sync_weights(policy, 1)
    sync_seconds = time.perf_counter() - start
    vllm.close()

    import vllm as vllm_pkg

    hf_tps, vllm_tps = hf_tokens / hf_seconds, vllm_tokens / vllm_seconds
    speedup = vllm_tps / hf_tps
    print(json.dumps({
        "benchmark": "rollout_throughput", "model": SMOLLM2, "dtype": spec.dtype,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch_threads": torch.get_num_threads(),
        "vllm_version": vllm_pkg.__version__, "enforce_eager": not args.compile,
        "prompts_from": GSM8K.name if GSM8K.is_file() else "builtin", "sequences": args.prompts * args.generations, "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
        "hf_tokens": hf_tokens, "hf_seconds": round(hf_seconds, 3), "hf_cpu_seconds": round(hf_cpu, 2),
        "hf_tokens_per_s": round(hf_tps, 2),
        "vllm_tokens": vllm_tokens, "vllm_seconds": round(vllm_seconds, 3), "vllm_cpu_seconds": round(vllm_cpu, 2),
        "vllm_tokens_per_s": round(vllm_tps, 2),
        "vllm_finished_by_length": gen.finish_reasons.count("length"),
        "speedup": round(speedup, 3), "vllm_startup_seconds": round(startup_seconds, 2),
        "sync_seconds": round(sync_seconds, 3), "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "target": TARGET,
        "pass": bool(speedup >= TARGET["cpu_speedup_min"]),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
