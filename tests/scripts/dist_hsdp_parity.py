"""HSDP gradient parity: a 2 x 2 (replicate, shard) mesh on 4 CPU processes against one process.

    python tests/scripts/dist_hsdp_parity.py OUT_DIR                                              # 1 process
    python -m torch.distributed.run --nproc-per-node=4 tests/scripts/dist_hsdp_parity.py OUT_DIR   # 2 x 2 HSDP

8 fixed sequences; rank r scores rows [2r, 2r + 2). The loss is a per-rank mean and FSDP averages gradients over
every rank (all-reduce across replicas, reduce-scatter within a shard group), so the result is the full-batch
gradient. Rank 0 writes OUT_DIR/world{N}.pt: the unsharded gradient of every parameter, and the mesh shape.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from gpu_check import SMALL, batch, build_model, full, loss_of  # noqa: E402

from lit_sapo.distributed import shard_policy  # noqa: E402

ROWS = 8


def main(out_dir: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    model = shard_policy(build_model(SMALL, torch.float32, "cpu"), mesh, replicate=2 if world == 4 else 1)
    weight = next(model.parameters())
    placements = [str(p) for p in weight.placements]
    b = batch(SMALL, "cpu", ROWS, 6, 5)
    per = ROWS // world
    mine = {k: v[rank * per:(rank + 1) * per] for k, v in b.items()}
    loss_of(model, mine)[0].backward()
    grads = {n: full(p.grad) for n, p in model.named_parameters()}
    if rank == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"grads": grads, "mesh": list(weight.device_mesh.shape), "placements": placements},
                   out / f"world{world}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
