"""Asynchronous rollouts with bounded staleness (`data.max_staleness: k`, k >= 1).

The schedule is fixed in advance, the same on every rank, and independent of which thread finishes first:
rollout n is sampled by the weights of version v(n) = max(0, n - k). At the start of training step n the policy
is at version n; the datamodule then hands the worker rollout n + k together with a snapshot of those weights,
and takes rollout n (sampled earlier, by version n - k). The worker samples its queue in order in a background
thread while step n updates the policy, so the update never races the sampler:

- HFSampler: the worker owns a second HFSampler over its OWN copy of the policy (a deepcopy; under FSDP a full,
  unsharded copy on every rank, built from the model spec). Before a rollout of a new version it loads that
  version's snapshot into the copy. It runs no collectives (each rank samples its own prompts with its full
  copy), so ranks cannot deadlock on it.
- VLLMSampler: the engine is already separate from the trainer; the worker streams the snapshot into it.

Memory: the copy plus up to k snapshots (one per version in flight). Snapshots are taken on the main thread at
the same point of every step, so under FSDP their all-gathers run in the same order on every rank.

Exact resume: `state_dict` waits for the in-flight rollouts and returns their generations (plain lists); a
resumed run trains on exactly those, then continues the schedule.
"""

from __future__ import annotations

import copy
import queue
import threading
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lit_sapo.sampling.base import Generation

_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def sampled_version(rollout_index: int, max_staleness: int) -> int:
    """The weight version that samples rollout `rollout_index` in an uninterrupted run."""
    return max(0, rollout_index - max_staleness)


def full_weight_snapshot(policy: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every state-dict entry as a full tensor (FSDP2 shards are all-gathered: collective)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        DTensor = ()  # noqa: N806
    out = {}
    with torch.no_grad():
        for name, tensor in policy.state_dict().items():
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            for part in _WRAPPER_PARTS:
                name = name.replace(part, "")
            # clone: the optimizer updates the policy in place while the worker samples with this version
            out[name] = full.detach().clone()
    return out


class _Weights:
    """A snapshot seen as a module by VLLMSampler.sync_weights (which streams `state_dict()`)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        return self.tensors


@dataclass
class _Job:
    index: int
    prompt_ids: list[list[int]]
    num_generations: int
    seed: int
    version: int
    weights: dict[str, torch.Tensor]


class AsyncRolloutWorker:
    """Samples queued rollouts in order in one background thread; `take(n)` waits for rollout n."""

    def __init__(self, sampler, max_staleness: int) -> None:
        self.main_sampler = sampler
        self.max_staleness = max_staleness
        self.sampler = None  # the worker's own sampler (HF: over its own policy copy)
        self.policy_copy: nn.Module | None = None
        self.lock = threading.Lock()  # held while sampling: validation on the main thread waits for it
        self.jobs: queue.Queue = queue.Queue()
        self.done: dict[int, Generation] = {}
        self.queued: set[int] = set()
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    # ---- set-up -------------------------------------------------------------------------------------------
    def bind(self, module) -> None:
        """Build the worker's sampler: HF gets its own full policy copy; vLLM uses the (separate) engine."""
        from lit_sapo.sampling.hf import HFSampler

        if isinstance(self.main_sampler, HFSampler):
            self.policy_copy = _full_copy(module)
            self.sampler = copy.copy(self.main_sampler)
            self.sampler.rank_local = True  # a full copy per rank: no synced_gpus / all_reduce in its generate
            self.sampler.setup(self.policy_copy, module.tokenizer, module.model_source)
            self.sampler.weight_version = -1  # nothing loaded yet: the first job loads its snapshot
        else:  # the datamodule has set the engine up and synced it to the current weights
            self.sampler = self.main_sampler
        self.thread = threading.Thread(target=self._run, name="lit-sapo-rollouts", daemon=True)
        self.thread.start()

    # ---- the queue ----------------------------------------------------------------------------------------
    def has(self, index: int) -> bool:
        with self.cond:
            return index in self.done or index in self.queued

    def submit(self, index: int, prompt_ids, num_generations: int, seed: int, version: int,
               weights: dict[str, torch.Tensor]) -> None:
        with self.cond:
            self.queued.add(index)
        self.jobs.put(_Job(index, prompt_ids, num_generations, seed, version, weights))

    def take(self, index: int) -> Generation:
        with self.cond:
            self.cond.wait_for(lambda: index in self.done or self.error is not None)
            if self.error is not None:
                raise RuntimeError(f"async rollout worker failed: {self.error!r}") from self.error
            return self.done.pop(index)

    def drain(self) -> None:
        """Wait until every queued rollout is sampled."""
        with self.cond:
            self.cond.wait_for(lambda: not self.queued or self.error is not None)
            if self.error is not None:
                raise RuntimeError(f"async rollout worker failed: {self.error!r}") from self.error

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                with self.lock:
                    if self.sampler.weight_version != job.version:
                        self._load(job.weights, job.version)
                    gen = self.sampler.generate(job.prompt_ids, job.num_generations, seed=job.seed)
            except BaseException as err:  # surfaced on the main thread by take()/drain()
                with self.cond:
                    self.error = err
                    self.cond.notify_all()
                return
            job.weights = None  # drop this job's reference to the snapshot
            with self.cond:
                self.queued.discard(job.index)
                self.done[job.index] = gen
                self.cond.notify_all()

    @torch.no_grad()
    def _load(self, weights: dict[str, torch.Tensor], version: int) -> None:
        if self.policy_copy is not None:
            self.policy_copy.load_state_dict(weights, strict=True)
            self.sampler.sync_weights(self.policy_copy, version)
        else:
            self.sampler.sync_weights(_Weights(weights), version)

    # ---- checkpoint ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The generations of every rollout not yet trained on (waits for the in-flight ones)."""
        self.drain()
        with self.cond:
            return {int(i): asdict(g) for i, g in sorted(self.done.items())}

    def load_state_dict(self, state: dict) -> None:
        with self.cond:
            for index, gen in state.items():
                self.done[int(index)] = Generation(**gen)

    def close(self) -> None:
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None
        if self.policy_copy is not None:
            self.sampler.close()
            self.policy_copy = None


def _full_copy(module) -> nn.Module:
    """The policy as a plain (unsharded) module, on the policy's device, with the current weights."""
    from lit_sapo.models import load_policy

    policy = module.policy
    params = list(policy.parameters())
    sharded = any(type(p).__name__ == "DTensor" for p in params)
    if not sharded:
        return copy.deepcopy(policy).eval().requires_grad_(False)
    from lit_sapo.scoring import install_scoring_head

    plain = load_policy(module.spec)
    install_scoring_head(plain)  # same module tree (and state-dict names) as the trainer's policy
    device = params[0].to_local().device if hasattr(params[0], "to_local") else params[0].device
    return plain.to(device).eval().requires_grad_(False)
