"""Peak memory and time of chunked vs naive token log-probs (forward + backward), on CPU.

Setting: Qwen2.5's vocabulary (151 936), 8 x 1024 tokens, fp32. The hidden size is 256 (not Qwen's 896+)
to keep the matmuls affordable on a 2-core CPU; the [tokens, vocab] logits, whose size the chunking
addresses, do not depend on it. Work per path: logp and entropy (entropy as a metric, no grad), loss
sum(logp * advantage), gradients to hidden and weight.

Each path runs in its own fresh subprocess (this script with --path): peak memory is the increase of
peak RSS (ru_maxrss) over the baseline taken once inputs are allocated; time is the best of the timed
repetitions after one warm-up. Prints one JSON object to stdout.

    python tests/benchmarks/logprobs_memory.py            # full size (naive path needs ~16 GB)
    python tests/benchmarks/logprobs_memory.py --quick    # 8 x 128 tokens, seconds
    python tests/benchmarks/logprobs_memory.py --head-7b  # Qwen2.5-7B's head (152064 x 3584), 256 tokens:
                                                          # the chunked path with fp32 vs bf16 weights
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

TARGET = {"memory_ratio_max": 0.25, "time_ratio_max": 1.2}
# Observed naive peak / (tokens * vocab * 4 bytes) is ~3 (logp_all, its grad, and the log_softmax grad
# alive together); the guard asks for a margin on top before starting the naive path.
NAIVE_LOGITS_COPIES = 3.5


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


def run_one(args: argparse.Namespace) -> dict:
    """Runs one path in this process; returns its figures."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    from lit_sapo.logprobs import naive_token_logprobs, token_logprobs

    fn = token_logprobs if args.path == "chunked" else naive_token_logprobs
    b, t = args.batch, args.seq
    g = torch.Generator().manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    # drawn in their own dtype: an fp32 draw cast to bf16 would raise the baseline peak above the work's
    hidden = torch.empty(b, t, args.hidden, dtype=dtype).normal_(generator=g).requires_grad_()
    weight = torch.empty(args.vocab, args.hidden, dtype=dtype).normal_(0, args.hidden**-0.5, generator=g)
    weight.requires_grad_()
    targets = torch.randint(0, args.vocab, (b, t), generator=g)
    adv = torch.randn(b, t, generator=g)
    # The grads are inputs-sized and the same for both paths: allocate them before the baseline.
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    baseline = _peak_rss_bytes()

    def step() -> float:
        start = time.perf_counter()
        logp, ent = fn(hidden, weight, targets, chunk_size=args.chunk_size, with_entropy=True)
        (logp * adv).sum().backward()
        assert ent is not None and not ent.requires_grad
        return time.perf_counter() - start

    step()  # warm-up
    times = [step() for _ in range(args.reps)]
    return {"peak_bytes": _peak_rss_bytes() - baseline, "seconds": round(min(times), 3),
            "all_seconds": [round(x, 3) for x in times]}


def _child(path: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--path", path, "--vocab", str(args.vocab),
           "--batch", str(args.batch), "--seq", str(args.seq), "--hidden", str(args.hidden),
           "--chunk-size", str(args.chunk_size), "--reps", str(args.reps), "--dtype", args.dtype]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{path} path failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small size (8 x 128 tokens) for a smoke run")
    p.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (Qwen2.5: 151936)")
    p.add_argument("--batch", type=int, default=8, help="sequences")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024, 128 with --quick)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk of the chunked path")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions after a warm-up (default 2, 3 quick)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight and hidden dtype")
    p.add_argument("--head-7b", action="store_true",
                   help="Qwen2.5-7B's head shape, 1 x 256 tokens: chunked path, fp32 vs bf16 weights (no naive run)")
    p.add_argument("--path", choices=["naive", "chunked"], help=argparse.SUPPRESS)  # internal: child process
    args = p.parse_args(argv)
    if args.head_7b and not args.path:
        args.vocab, args.hidden, args.batch, args.seq = 152_064, 3584, 1, args.seq or 256
        args.reps = args.reps or 1
        runs = {}
        for dtype in ("fp32", "bf16"):
            args.dtype = dtype
            runs[dtype] = _child("chunked", args)
        weight_bytes = args.vocab * args.hidden * 4
        print(json.dumps({"vocab": args.vocab, "hidden": args.hidden, "tokens": args.batch * args.seq,
                          "chunk_size": args.chunk_size, "device": "cpu", "torch_threads": _threads(),
                          "fp32_weight_bytes": weight_bytes, **runs,
                          "bf16_over_fp32_peak": round(runs["bf16"]["peak_bytes"] / runs["fp32"]["peak_bytes"], 4)}))
        return 0
    args.seq = args.seq or (128 if args.quick else 1024)
    args.reps = args.reps or (3 if args.quick else 2)

    if args.path:
        print(json.dumps(run_one(args)))
        return 0

    tokens = args.batch * args.seq
    need = NAIVE_LOGITS_COPIES * tokens * args.vocab * 4
    avail = _mem_available_bytes()
    if avail is not None and need > avail:
        raise SystemExit(f"naive path needs ~{need / 2**30:.1f} GiB, only {avail / 2**30:.1f} GiB available")
    chunked = _child("chunked", args)
    naive = _child("naive", args)
    mem_ratio = chunked["peak_bytes"] / naive["peak_bytes"]
    time_ratio = chunked["seconds"] / naive["seconds"]
    result = {
        "vocab": args.vocab, "tokens": tokens, "batch": args.batch, "seq": args.seq, "hidden": args.hidden,
        "dtype": "float32", "device": "cpu", "torch_threads": _threads(), "chunk_size": args.chunk_size,
        "entropy": "computed, no grad",
        "naive": naive, "chunked": chunked,
        "memory_ratio": round(mem_ratio, 4), "time_ratio": round(time_ratio, 4), "target": TARGET,
        "pass": mem_ratio <= TARGET["memory_ratio_max"] and time_ratio <= TARGET["time_ratio_max"],
    }
    print(json.dumps(result))
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
