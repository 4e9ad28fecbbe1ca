"""Peak memory of one HFSampler rollout at Qwen2.5's vocabulary: per-step chosen-token log-probs vs `output_scores`.

Setting: a random Llama with vocabulary 151 936 (Qwen2.5's) and a tiny body (hidden 64, 2 layers), so the
[rows, vocab] decode scores, whose keeping the sampler no longer does, dominate; fp32 on CPU, sampling at
temperature 1 with no top-k/top-p, eos an id past the vocabulary (never drawn), so every row runs all steps.

- `recorder` (today's HFSampler): a last logits processor keeps one step's log-softmax [rows, V] and gathers the
  chosen token's log-prob at the next step.
- `scores` (the sampler before): `generate(output_scores=True)` keeps every step's processed scores
  (steps x rows x V x 4 bytes), then gathers the chosen tokens from them.

Each variant runs in its own fresh subprocess (this script with --variant): the figure is the rise of peak RSS
(ru_maxrss) over the baseline taken after the model is built and one short warm-up rollout ran (0 = the rollout
never rose above the peak of building the model). Prints JSON.

    python tests/benchmarks/rollout_memory.py            # 32 rows x 256 new tokens (scores path needs ~5 GB)
    python tests/benchmarks/rollout_memory.py --quick    # 8 rows x 64 new tokens, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

VOCAB = 151_936
PROMPT_LEN = 16


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _build():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=VOCAB, pad_token_id=0)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config).eval()
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=VOCAB)  # past the vocabulary: never sampled
    return policy, tokenizer


def _rollout_recorder(policy, tokenizer, prompts, max_new):
    from lit_sapo.sampling import HFSampler

    sampler = HFSampler(max_new_tokens=max_new, share_prefill=False)
    sampler.setup(policy, tokenizer)
    gen = sampler.generate(prompts, 1, seed=0)
    return sum(map(len, gen.completion_ids))


def _rollout_scores(policy, tokenizer, prompts, max_new):
    """The sampler before: `output_scores=True`, then a gather per step (as it did)."""
    import torch

    from lit_sapo.sampling.hf import blank_generation_config

    input_ids = torch.tensor(prompts)
    with torch.no_grad(), blank_generation_config(policy):
        torch.manual_seed(0)
        result = policy.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 output_scores=True, return_dict_in_generate=True)
        new_tokens = result.sequences[:, input_ids.shape[1]:]
        logp = torch.stack([step.gather(1, new_tokens[:, i:i + 1]).squeeze(1) - step.logsumexp(-1)
                            for i, step in enumerate(result.scores)], dim=1)
    return int(logp.numel())


def run_one(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    torch.set_num_threads(args.threads)
    policy, tokenizer = _build()
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, VOCAB, (args.rows, PROMPT_LEN), generator=generator).tolist()
    rollout = _rollout_recorder if args.variant == "recorder" else _rollout_scores
    rollout(policy, tokenizer, prompts[:2], 2)  # warm-up: lazy imports and kernels outside the figure
    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    tokens = rollout(policy, tokenizer, prompts, args.new_tokens)
    seconds = time.perf_counter() - start
    peak = _peak_rss_bytes()
    return {"variant": args.variant, "tokens": tokens, "baseline_peak_rss_mib": round(baseline / 2 ** 20, 1),
            "peak_rss_mib": round(peak / 2 ** 20, 1), "peak_rise_mib": round((peak - baseline) / 2 ** 20, 1),
            "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="8 rows x 64 new tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", choices=["recorder", "scores"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.new_tokens = 8, 64
    if args.variant:
        print(json.dumps(run_one(args)))
        return
    scores_bytes = args.rows * args.new_tokens * VOCAB * 4
    results = {"setting": {"rows": args.rows, "new_tokens": args.new_tokens, "vocab": VOCAB, "hidden": 64,
                           "layers": 2, "dtype": "fp32", "device": "cpu",
                           "kept_scores_mib": round(scores_bytes / 2 ** 20, 1)}}
    for variant in ("recorder", "scores"):
        available = _mem_available_bytes()
        if variant == "scores" and available is not None and available < 1.5 * scores_bytes:
            results[variant] = {"skipped": f"needs ~{1.5 * scores_bytes / 2 ** 30:.1f} GiB, "
                                           f"{available / 2 ** 30:.1f} GiB available"}
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--rows", str(args.rows),
               "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
        # a fixed mmap threshold: glibc otherwise raises it as big blocks are freed and serves the later
        # [rows, V] step tensors from a fragmenting heap, which adds noise (~200 MiB) to peak RSS
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": str(2 ** 20)}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    if "peak_rise_mib" in results.get("scores", {}):
        results["saved_mib"] = round(results["scores"]["peak_rise_mib"] - results["recorder"]["peak_rise_mib"], 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
