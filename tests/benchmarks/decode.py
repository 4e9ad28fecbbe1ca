"""Where HF decoding time goes on CPU (the figures behind README › Performance's step-time analysis).

SmolLM2-135M-Instruct fp32, 8 rows (2 prompts x 4 completions), 32 new tokens, temperature 1, HFSampler:
- the output layer's decode product for 8 rows: F.linear vs W @ h^T (what ScoringHead uses on CPU);
- one decode step (cache of 48 tokens) and the rate its weights stream at (fp32 bytes / step time);
- torch.multinomial over the vocabulary for 8 rows (what `generate` draws each step);
- a whole HFSampler rollout, fp32 vs a bf16 copy of the model (not the same work as TRL's fp32 step);
- with --compile, `generate` with a static cache and torch.compile vs eager (slow: the compile takes ~40 s).
Medians of interleaved repeats. Prints one JSON object.

    python tests/benchmarks/decode.py [--reps 10] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def timed(fns: dict, reps: int) -> dict:
    """Median seconds of each function, interleaved so drifts of the machine hit all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from lit_sapo.models import builtin_smollm2_folder
    from lit_sapo.sampling import HFSampler
    from lit_sapo.scoring import install_scoring_head

    folder = str(builtin_smollm2_folder())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head = install_scoring_head(model)
    out: dict = {"model": "smollm2-135m-instruct fp32", "threads": torch.get_num_threads(), "rows": 8,
                 "weight_mb": weight_bytes / 1e6}

    with torch.no_grad():
        hidden = torch.randn(8, 1, head.in_features)
        product = timed({"linear": lambda: F.linear(hidden, head.weight), "w_ht": lambda: head(hidden)}, args.reps * 3)
        out["output_layer_ms"] = {"F.linear": product["linear"] * 1e3, "W @ h^T": product["w_ht"] * 1e3}

        cache = DynamicCache(config=model.config)
        model(input_ids=torch.randint(0, 1000, (8, 48)), past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = torch.randint(0, 1000, (8, 1))

        def step():
            model(input_ids=token, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # keep the cache at 48 tokens

        probs = torch.softmax(torch.randn(8, model.config.vocab_size), -1)
        per_step = timed({"step": step, "multinomial": lambda: torch.multinomial(probs, 1)}, args.reps * 3)
        out["decode_step_ms"] = per_step["step"] * 1e3
        out["weights_gb_per_s"] = weight_bytes / per_step["step"] / 1e9
        out["multinomial_ms"] = per_step["multinomial"] * 1e3

        messages = [[{"role": "user", "content": f"What is {a}+{b}?\nPut the final answer within \\boxed{{}}."}]
                    for a, b in ((3, 4), (7, 8))]
        prompts = [tokenizer(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False))["input_ids"]
                   for m in messages]
        bf16 = copy.deepcopy(model)
        for p in bf16.parameters():  # parameters only: rotary buffers stay fp32
            p.data = p.data.to(torch.bfloat16)
        for m in (model, bf16):
            m.generation_config.min_new_tokens = 32  # every rollout the same length
        samplers = {}
        for name, m in (("fp32", model), ("bf16", bf16)):
            samplers[name] = HFSampler(max_new_tokens=32)
            samplers[name].setup(m, tokenizer)
        rollout = timed({name: (lambda s=s: s.generate(prompts, 4, seed=0)) for name, s in samplers.items()},
                        max(args.reps // 2, 3))
        out["rollout_s"] = rollout
        out["bf16_speedup"] = rollout["fp32"] / rollout["bf16"]

        if args.compile:
            from transformers import CompileConfig

            config = CompileConfig(fullgraph=False, dynamic=False)
            config._compile_all_devices = True  # transformers compiles on GPUs only unless told
            ids = torch.tensor(prompts).repeat_interleave(4, 0)
            kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=32,
                          temperature=1.0, top_k=None, top_p=1.0, pad_token_id=tokenizer.pad_token_id)
            t = time.perf_counter()
            model.generate(**kwargs, cache_implementation="static", compile_config=config)
            out["compile_s"] = time.perf_counter() - t
            out["generate_s"] = timed({
                "compiled_static_cache": lambda: model.generate(**kwargs, cache_implementation="static",
                                                                compile_config=config),
                "eager": lambda: model.generate(**kwargs)}, max(args.reps // 2, 3))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
