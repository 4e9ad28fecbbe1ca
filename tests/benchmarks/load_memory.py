"""Host memory per rank of loading and sharding the policy under FSDP2 on 2 CPU processes (gloo).

- `every_rank` (`model.model.load_on_rank0: false`): every rank reads the full weights, then shards them.
- `rank0_broadcast` (the default): rank 0 reads the weights; rank 1 builds the model on the meta device and
  receives its shards by broadcast.

Each rank records the rise of its peak RSS (ru_maxrss) over the RSS before the model is built, and checks that
its shards equal the full weights read from disk (rank 0's copy is the reference). Prints JSON.

    python tests/benchmarks/load_memory.py                 # SmolLM2-135M (fp32: 538 MB of weights)
    python tests/benchmarks/load_memory.py --model tiny-random-llama
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(model: str, load_on_rank0: bool, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lit_sapo.models import ModelSpec
    from lit_sapo.module import SAPOModule

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("data_parallel",))
    module = SAPOModule(model=ModelSpec(name=model, load_on_rank0=load_on_rank0))
    module._device_mesh = mesh  # what ModelParallelStrategy sets before configure_model
    before = _rss_bytes()
    module.configure_model()
    rise = max(_peak_rss_bytes() - before, 0)
    params = sum(p.to_local().numel() * p.element_size() for p in module.policy.parameters())
    # every shard equals the weights on disk: gather the full state and compare on rank 0
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in module.policy.state_dict().items()}
    buffers = {k: b.clone() for k, b in module.policy.named_buffers()}
    report = {"rank": rank, "peak_rss_rise_mb": round(rise / 2**20, 1), "local_param_mb": round(params / 2**20, 1)}
    if rank == 0:
        from lit_sapo.models import load_policy
        from lit_sapo.scoring import install_scoring_head

        reference = load_policy(ModelSpec(name=model))
        install_scoring_head(reference)
        ref = reference.state_dict()
        report["max_abs_diff_vs_disk"] = max((full[k] - ref[k]).abs().max().item() for k in ref)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"report": report, "buffers": {k: b.sum().item() for k, b in buffers.items()}})
    if rank == 0:
        same_buffers = all(g["buffers"] == gathered[0]["buffers"] for g in gathered)
        out.write_text(json.dumps({"ranks": [g["report"] for g in gathered], "buffers_equal": same_buffers}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: str, load_on_rank0: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}",
               __file__, "--worker", "--model", model, "--load-on-rank0", str(int(load_on_rank0)), "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--load-on-rank0", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker(args.model, bool(args.load_on_rank0), Path(args.out))
        return
    result = {"model": args.model, "processes": 2, "backend": "gloo",
              "every_rank": run(args.model, False), "rank0_broadcast": run(args.model, True)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
