"""`lit-sapo eval`: benchmark a model without training (an HF folder, a lit_sapo checkpoint or a built-in name).

    lit-sapo eval --model smollm2-135m-instruct --benchmarks gsm8k,math500,aime24 --n 4 --out runs/eval

Protocols (presets; explicit flags win):
- `r1` (the DeepSeek-R1 / lighteval protocol): temperature 0.6, top-p 0.95, n = 4 samples, avg@n reported; the
  problem is followed by "Please reason step by step, and put your final answer within \\boxed{}.".
- `qwen-math` (Qwen2.5-Math's evaluation): greedy, one sample, that sentence as the system message and the
  problem alone as the user message.

Writes `<out>/summary.json` (settings and per-benchmark metrics) and `<out>/<benchmark>.jsonl` (one graded row
per problem, the format of BenchmarkEvaluation's files: both come from the same functions), and prints a table.
Bad input stops with one line before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

PROTOCOLS = {
    "r1": {"temperature": 0.6, "top_p": 0.95, "n": 4, "system_prompt": None, "instruction": None},
    "qwen-math": {"temperature": 0.0, "top_p": 1.0, "n": 1, "instruction": "",
                  "system_prompt": "Please reason step by step, and put your final answer within \\boxed{}."},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lit-sapo eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF folder or hub id, a lit_sapo .ckpt, or a built-in name")
    p.add_argument("--benchmarks", default="gsm8k,math500,aime24",
                   help="comma-separated presets (gsm8k, math500, aime24, aime25) or name=path.jsonl")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="r1")
    p.add_argument("--n", type=int, default=None, help="samples per problem (default: the protocol's)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--greedy", action="store_true", help="temperature 0, one sample")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--sampler", choices=("hf", "vllm"), default="hf")
    p.add_argument("--limit", type=int, default=None, help="the first N problems of each benchmark")
    p.add_argument("--batch_size", type=int, default=64, help="problems per generate call")
    p.add_argument("--max_prompt_length", type=int, default=1024)
    p.add_argument("--dtype", default=None, help="fp32 | bf16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--grading_workers", type=int, default=2)
    p.add_argument("--out", required=True, help="folder of summary.json and the per-problem JSONL files")
    return p


def resolve_settings(args: argparse.Namespace) -> dict:
    """The protocol's values with explicit flags on top, validated (ValueError naming the flag)."""
    proto = dict(PROTOCOLS[args.protocol])
    if args.greedy and args.temperature not in (None, 0.0):
        raise ValueError("--greedy and --temperature contradict each other; give one")
    temperature = 0.0 if args.greedy else (proto["temperature"] if args.temperature is None else args.temperature)
    n = args.n if args.n is not None else (1 if temperature == 0 else proto["n"])
    top_p = proto["top_p"] if args.top_p is None else args.top_p
    checks = [(n >= 1, "--n must be >= 1"), (temperature >= 0, "--temperature must be >= 0"),
              (0 < top_p <= 1, "--top_p must be in (0, 1]"), (args.max_new_tokens >= 1, "--max_new_tokens must be >= 1"),
              (args.limit is None or args.limit >= 1, "--limit must be >= 1"), (args.batch_size >= 1, "--batch_size must be >= 1")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return {"protocol": args.protocol, "n": n, "temperature": temperature, "top_p": top_p,
            "max_new_tokens": args.max_new_tokens, "system_prompt": proto["system_prompt"],
            "instruction": proto["instruction"], "sampler": args.sampler, "limit": args.limit, "seed": args.seed}


def benchmark_sources(spec: str) -> list:
    from lit_sapo.callbacks.evaluation import benchmark_source

    sources = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        name, _, path = item.partition("=")
        if path and not Path(path).expanduser().is_file():
            raise ValueError(f"--benchmarks: file {path} of {name!r} does not exist")
        try:
            sources.append(benchmark_source(name, {name: path} if path else None))
        except ValueError as err:
            raise ValueError(f"--benchmarks: {err} (name=path.jsonl)") from None
    if not sources:
        raise ValueError("--benchmarks: give at least one benchmark")
    if len({s.name for s in sources}) != len(sources):
        raise ValueError("--benchmarks: names must be unique")
    return sources


def check_model(name: str) -> None:
    from lit_sapo.models import ModelSpec, check_model_spec

    if name.endswith(".ckpt") or Path(name).expanduser().is_dir() and (Path(name) / "meta.pt").exists():
        if not Path(name).expanduser().exists():
            raise ValueError(f"--model: checkpoint {name} does not exist")
        return
    try:
        check_model_spec(ModelSpec(name=name), "model")
    except ValueError as err:
        raise ValueError(f"--model: {err}") from None


def load_model(name: str, dtype: str, workdir: Path):
    """(policy, tokenizer, source folder for vLLM): a checkpoint is exported to an HF folder first."""
    from lit_sapo.models import ModelSpec, load_policy, load_tokenizer, resolve_source

    path = Path(name).expanduser()
    if path.suffix == ".ckpt" or (path / "meta.pt").exists():
        from lit_sapo.export import export_checkpoint

        name = str(export_checkpoint(path, workdir / "hf_model"))
    spec = ModelSpec(name=name, dtype=dtype)
    return load_policy(spec).eval(), load_tokenizer(spec), resolve_source(spec)[0]


def format_table(results: dict[str, dict[str, float]]) -> str:
    """One row per benchmark, one column per metric (fractions as percentages)."""
    keys = []
    for metrics in results.values():
        keys += [k for k in metrics if k not in keys and k not in ("problems", "time_s")]
    header = ["benchmark", "problems", *keys, "time_s"]
    rows = [[name, str(int(m.get("problems", 0))), *(f"{100 * m[k]:.1f}" if k in m else "-" for k in keys),
             f"{m.get('time_s', 0.0):.1f}"] for name, m in results.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def run_eval(args: argparse.Namespace, settings: dict, sources: list) -> dict:
    import torch

    from lit_sapo.callbacks.evaluation import generate_and_grade, summarize, write_rows
    from lit_sapo.rewards import MathAccuracy
    from lit_sapo.tasks import load_prompts, render_prompt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    with tempfile.TemporaryDirectory(dir=out) as workdir:
        policy, tokenizer, source = load_model(args.model, dtype, Path(workdir))
        if cuda:
            policy = policy.cuda()
        common = dict(temperature=settings["temperature"], top_p=settings["top_p"],
                      max_new_tokens=settings["max_new_tokens"])
        if settings["sampler"] == "vllm":
            from lit_sapo.sampling.vllm import VLLMSampler

            sampler = VLLMSampler(model=source, dtype="bfloat16" if dtype == "bf16" else "float32", **common)
        else:
            from lit_sapo.sampling import HFSampler

            sampler = HFSampler(**common)
        sampler.setup(policy, tokenizer, source)
        if settings["sampler"] == "vllm":
            sampler.sync_weights(policy, 0)  # the engine reads the folder; the policy's weights are what we score
        grader = MathAccuracy(workers=args.grading_workers)
        results = {}
        try:
            for src in sources:
                t0 = time.perf_counter()
                examples = load_prompts(src)[: settings["limit"]]

                def prompt_ids(ex):
                    system = settings["system_prompt"] if settings["system_prompt"] is not None else ex.system_prompt
                    instruction = settings["instruction"] if settings["instruction"] is not None else ex.instruction
                    text = render_prompt(tokenizer, ex.problem, system_prompt=system, instruction=instruction)
                    return tokenizer(text, add_special_tokens=False)["input_ids"][-args.max_prompt_length:]

                rows = generate_and_grade(examples, list(range(len(examples))), sampler, tokenizer, prompt_ids,
                                          grader, n_samples=settings["n"], temperature=settings["temperature"],
                                          max_new_tokens=settings["max_new_tokens"], batch_size=args.batch_size,
                                          seed=settings["seed"])
                metrics = summarize(rows, n_samples=settings["n"], sync=False)
                metrics["time_s"] = time.perf_counter() - t0
                write_rows(out / f"{src.name}.jsonl", rows, step=None)
                results[src.name] = metrics
        finally:
            grader.close()
            sampler.close()
    summary = {"model": args.model, "settings": settings, "benchmarks": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:  # everything a user can get wrong, checked before the model loads
        settings = resolve_settings(args)
        sources = benchmark_sources(args.benchmarks)
        check_model(args.model)
    except ValueError as err:
        print(f"lit-sapo eval: error: {err}", file=sys.stderr)
        return 2
    summary = run_eval(args, settings, sources)
    print(format_table(summary["benchmarks"]))
    print(f"summary: {Path(args.out) / 'summary.json'}; per-problem rows: {Path(args.out)}/<benchmark>.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
