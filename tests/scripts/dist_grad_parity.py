"""Gradient parity of FSDP2 (ModelParallelStrategy, gloo, CPU) against a single process, on fixed rollouts.

    python tests/scripts/dist_grad_parity.py OUT_DIR                                              # 1 process
    python -m torch.distributed.run --nproc-per-node=2 tests/scripts/dist_grad_parity.py OUT_DIR   # 2 processes

Every rollout is a fixed, seeded batch of 8 sequences; with 2 processes rank r trains on rows [4r, 4r + 4).
The loss is a sequence mean, so the mean of the ranks' half-batch gradients is the full-batch gradient.
2 inner updates per rollout (ppo_epochs=2, one minibatch): the second one has r != 1, so the gate acts.
Rank 0 writes OUT_DIR/world{N}.pt (the unsharded gradient of every parameter before each optimizer step) and
OUT_DIR/world{N}.json (per-rollout loss averaged over ranks, grad norms, whether the embedding stayed tied).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).parent))
from dist_helpers import fixed_tokens, rank  # noqa: E402

from lit_sapo.models import ModelSpec  # noqa: E402
from lit_sapo.module import OptimizerSettings, SAPOModule  # noqa: E402
from lit_sapo.rollout import RolloutBatch, RolloutDataModule  # noqa: E402
from lit_sapo.sampling import HFSampler  # noqa: E402

ROWS, ROLLOUTS, EPOCHS = 8, 3, 2


def fixed_rollout(index: int, weight_version: int, device) -> RolloutBatch:
    """Rollout `index`: the full batch, identical in every process, then this rank's rows."""
    p_ids, p_mask, c_ids, c_mask = fixed_tokens(ROWS, 6, 5, seed=1000 + index)
    g = torch.Generator().manual_seed(2000 + index)
    advantages = torch.randn(ROWS, generator=g)
    if index == 1:  # rank 1 sees no positive and no negative advantage: per-sign metrics must still sync
        advantages[ROWS // 2:] = 0.0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rows = slice(rank() * ROWS // world, (rank() + 1) * ROWS // world)
    n = rows.stop - rows.start
    return RolloutBatch(
        rollout_index=index, weight_version=weight_version, temperature=1.0,
        prompt_ids=p_ids[rows].to(device), prompt_mask=p_mask[rows].to(device),
        completion_ids=c_ids[rows].to(device), completion_mask=c_mask[rows].to(device),
        sampler_logprobs=torch.zeros(n, c_ids.shape[1], device=device), advantages=advantages[rows].to(device),
        rewards=advantages[rows].to(device), group_ids=torch.arange(n, device=device),
        prompts=[""] * n, completions=[""] * n, answers=[""] * n, reward_components={},
        metrics={"reward/mean": float(advantages[rows].mean())})


class FixedRollouts(RolloutDataModule):
    def make_rollout(self, batch, module) -> RolloutBatch:
        return fixed_rollout(batch.rollout_index, module.weight_version, module.device)


class GradProbe(SAPOModule):
    """Records the full gradient before each optimizer step and the rank-averaged loss of each rollout."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.grads, self.losses, self.norms = [], [], []

    def _clip_and_step(self, opt, sched) -> float:
        grads = {}
        for name, p in self.policy.named_parameters():
            g = p.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().cpu().clone()
        self.grads.append(grads)
        norm = super()._clip_and_step(opt, sched)
        self.norms.append(norm)
        return norm

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        loss = out["loss"].detach().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        self.losses.append(float(loss))
        return out


def main(out_dir: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    module = GradProbe(model=ModelSpec(name="tiny-random-llama"), ppo_epochs=EPOCHS, num_minibatches=1,
                       max_grad_norm=1.0, compute_entropy=False, optimizer=OptimizerSettings(lr=1e-3))
    data = FixedRollouts(tokenizer="tiny-random-llama", sampler=HFSampler(max_new_tokens=4), prompts_per_step=1,
                         num_generations=2)
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1) if world > 1 else "auto"
    trainer = Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=ROLLOUTS * EPOCHS,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    policy = module.policy
    tied = policy.get_output_embeddings().weight is policy.get_input_embeddings().weight
    if rank() == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(module.grads, out / f"world{world}.pt")
        (out / f"world{world}.json").write_text(json.dumps({
            "world": world, "losses": module.losses, "grad_norms": module.norms, "tied": tied,
            "sharded": type(policy).__name__.startswith("FSDP"), "weight_version": module.weight_version}))


if __name__ == "__main__":
    main(sys.argv[1])
