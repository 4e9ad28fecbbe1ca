"""2-process check: the callbacks' cross-rank aggregation equals the single-process computation on the same data.

    python -m torch.distributed.run --nproc-per-node=2 tests/scripts/monitor_ddp.py OUT.json

Each rank takes half of a fixed set of UpdateRecords (micro-batch m of every inner update goes to rank m, with
different token counts) and half of a fixed set of graded evaluation rows (sharded like BenchmarkEvaluation);
rank 0 writes the synced and the single-process results to OUT.json.
"""

import json
import sys

import torch
import torch.distributed as dist

from lit_sapo.callbacks._dist import gather_objects
from lit_sapo.callbacks.evaluation import shard, summarize
from lit_sapo.callbacks.monitors import entropy_stats, entropy_tokens, ratio_metrics, update_moments
from lit_sapo.module import UpdateRecord
from lit_sapo.objective import GateTerms


def records() -> list[tuple[int, UpdateRecord]]:
    """(owner rank, record) for 2 epochs x 2 minibatches x 2 micro-batches of 3 and 2 rows."""
    g = torch.Generator().manual_seed(0)
    out = []
    for epoch in range(2):
        for mb in range(2):
            for micro, rows in enumerate((3, 2)):
                r = torch.exp(0.3 * torch.randn(rows, 5, generator=g))
                adv = torch.randint(-1, 2, (rows,), generator=g).float()  # -1, 0 or +1
                mask = torch.rand(rows, 5, generator=g) < 0.7
                df = torch.rand(rows, 5, generator=g)
                terms = GateTerms(log_ratio=r.log(), ratio=r, gate_value=r, gate_grad=df, tau=torch.ones(rows, 5),
                                  advantages=(adv[:, None] * mask).expand(rows, 5), mask=mask)
                entropy = 3 * torch.rand(rows, 5, generator=g)
                out.append((micro, UpdateRecord(epoch, mb, torch.arange(rows), terms, entropy)))
    return out


def eval_rows() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"index": i, "correct": torch.randint(0, 2, (3,), generator=g).float().tolist(),
             "majority_correct": float(i % 2)} for i in range(5)]


def metrics(updates, rows, sync: bool) -> dict:
    out = entropy_stats(*entropy_tokens(updates), (0.1, 0.5, 0.9), sync=sync)
    out.update(ratio_metrics(update_moments(updates, sync=sync)))
    out.update({f"eval/{k}": v for k, v in summarize(rows, sync=sync).items()})
    return out


def main(path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mine = [rec for owner, rec in records() if owner == rank]
    rows = [eval_rows()[i] for i in shard(5, rank, dist.get_world_size()) if i >= 0]
    synced = metrics(mine, rows, sync=True)
    gathered = sorted((r for part in gather_objects(rows) for r in part), key=lambda r: r["index"])
    if rank == 0:
        single = metrics([rec for _, rec in records()], eval_rows(), sync=False)
        with open(path, "w") as f:
            json.dump({"synced": synced, "single": single, "rows_gathered": gathered == eval_rows(),
                       "tokens": [int(sum(rec.terms.mask.sum() for rec in mine))]}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
