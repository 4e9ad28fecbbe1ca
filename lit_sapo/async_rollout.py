"""Asynchronous rollouts with bounded staleness (`data.max_staleness: k >= 1`).

A single background thread samples and grades the next rollouts with its own copy of the policy while the
trainer updates on the current one (sampling and the update then run on different cores, or overlap on a GPU).
With HFSampler the copy is a second model; with VLLMSampler (one process) it is the engine, which holds its own
weights anyway and is synced from the trainer on the main thread.
Under FSDP2 every rank keeps a full copy: its worker generates without collectives (HFSampler.collective off),
and the copies are refreshed by all-gathering the shards on the main thread, at the same rollout index on every
rank (the schedule below depends on indices only), so no rank waits on another's worker.

The schedule is fixed by rollout indices, never by timing, so a run is reproducible:
- when the trainer asks for rollout n, its weights are at version V (V = n: one version per rollout);
- rollouts n .. n + k that are not yet queued are queued now, in order, each to be sampled with version V;
- before that, the worker's copy is brought to version V: the worker first finishes what it is generating
  (it never samples with half-copied weights), then the trainer's weights are copied into it.
So rollout m is sampled by weights of version max(0, m - k) and trained at version m: staleness min(m, k).
Each rollout keeps its sampling seed (run seed, rollout index, rank), as in the synchronous loop.

Exact resume: the datamodule's checkpoint state holds the finished in-flight rollouts (`state`), which a resumed
run trains instead of sampling them again; with several processes, those of every rank (gathered when the
checkpoint is written, each rank restores its own). A rollout that had not finished (a SIGTERM while it was
sampled) is sampled again after the resume with the checkpoint's weights, still within the bound.

Assumption: the update draws nothing from torch's global RNG (dropout is off, see lit_sapo.models.disable_dropout;
minibatch order has its own generator): the worker's `generate` seeds and uses that RNG while the update runs.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch
from torch import nn

from lit_sapo.rollout import PromptBatch, RolloutBatch, _rank_world
from lit_sapo.sampling import HFSampler


def check_max_staleness(max_staleness, sampler) -> None:
    """data.max_staleness: an int >= 0. k >= 1 with VLLMSampler: the engine must stay awake while the trainer
    updates (sleep mode would hand its memory to the update, so nothing could overlap)."""
    if isinstance(max_staleness, bool) or not isinstance(max_staleness, int) or max_staleness < 0:
        raise ValueError(f"data.max_staleness: must be an integer >= 0 (0 = on-policy), got {max_staleness!r}")
    if max_staleness > 0 and not isinstance(sampler, HFSampler) and getattr(sampler, "enable_sleep_mode", False):
        raise ValueError(f"data.sampler.enable_sleep_mode: data.max_staleness {max_staleness} samples while the "
                         f"trainer updates, so the engine cannot sleep; set enable_sleep_mode: false and leave "
                         f"GPU memory for both (gpu_memory_utilization)")


def check_world_size(max_staleness: int, sampler, world_size: int) -> None:
    """k >= 1 under several processes runs with HFSampler: a vLLM engine under external_launcher runs collectives
    of its own, which a background thread would interleave with the trainer's."""
    if max_staleness > 0 and world_size > 1 and not isinstance(sampler, HFSampler):
        raise ValueError(f"data.max_staleness: {max_staleness} with {type(sampler).__name__} runs in one process "
                         f"only, got {world_size}; use lit_sapo.sampling.HFSampler or data.max_staleness: 0")


def copy_full_weights(source: nn.Module, target: nn.Module) -> None:
    """target's parameters and buffers <- source's, by name; FSDP2 shards (DTensors) are all-gathered first.

    A collective when `source` is sharded: every rank calls it at the same point (the same rollout index)."""
    from torch.distributed.tensor import DTensor

    from lit_sapo.distributed import unwrapped_name

    params = {unwrapped_name(n): p for n, p in source.named_parameters()}
    buffers = {unwrapped_name(n): b for n, b in source.named_buffers()}
    with torch.no_grad():
        for group, named in ((params, target.named_parameters()), (buffers, target.named_buffers())):
            for name, tensor in named:
                value = group[name].detach()
                if isinstance(value, DTensor):
                    value = value.full_tensor()
                tensor.copy_(value)


def local_copy(module) -> nn.Module:
    """A full, frozen copy of the trainer's policy for the worker. Under FSDP2 (DTensor parameters) it is built
    on the meta device from the same spec and filled by all-gathering the shards: a collective."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in module.policy.parameters()):
        return copy.deepcopy(module.policy).eval().requires_grad_(False)
    from lit_sapo.models import load_policy
    from lit_sapo.scoring import install_scoring_head

    policy = load_policy(module.spec, on_meta=True).to_empty(device=module.device)
    policy.tie_weights()  # to_empty gives tied weights separate storage again
    install_scoring_head(policy)
    policy.eval().requires_grad_(False)
    copy_full_weights(module.policy, policy)
    policy.generation_config = copy.deepcopy(module.policy.generation_config)  # the stop ids come from it
    return policy


def gather_in_flight(saved: list[dict]) -> list[dict] | dict:
    """Every rank's finished in-flight rollouts, {rank: list}, under several processes (a collective: Lightning
    writes a checkpoint on every rank); the list itself in one process."""
    _, world = _rank_world()
    if world == 1:
        return saved
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, saved)
    return dict(enumerate(everyone))


def own_in_flight(saved: list[dict] | dict) -> list[dict]:
    rank, world = _rank_world()
    if isinstance(saved, dict):  # written by several processes
        return saved.get(rank, [])
    return saved if world == 1 else []  # one process's rollouts in several: sampled again, within the bound


def rollout_state(rollout: RolloutBatch) -> dict:
    """A rollout as plain values and CPU tensors (what a checkpoint can hold and torch.load(weights_only) reads)."""
    return {f.name: _to(getattr(rollout, f.name), torch.device("cpu")) for f in dataclasses.fields(RolloutBatch)}


def rollout_to(rollout: RolloutBatch, device) -> RolloutBatch:
    return dataclasses.replace(rollout, **{f.name: _to(getattr(rollout, f.name), device)
                                           for f in dataclasses.fields(RolloutBatch)})


def _to(value, device):
    return value.to(device) if torch.is_tensor(value) else value


class AsyncRollouts:
    """The background sampler of a RolloutDataModule with `max_staleness` k >= 1 (see the module docstring)."""

    def __init__(self, datamodule, max_staleness: int) -> None:
        self.dm = datamodule
        self.max_staleness = max_staleness
        self.executor: ThreadPoolExecutor | None = None
        # the worker's sampler: an HFSampler over `self.policy` (its copy of the weights), or the datamodule's
        # VLLMSampler, whose engine holds the copy (then `self.policy` stays None)
        self.sampler = None
        self.policy = None
        self._bound_to = None  # the trainer's policy the copy was made from
        self.in_flight: dict[int, Future] = {}  # rollout index -> future RolloutBatch (CPU tensors)
        self.restored: dict[int, dict] = {}  # rollout index -> rollout_state, from a checkpoint

    # ---- the schedule -------------------------------------------------------------------------------------
    def next_rollout(self, batch: PromptBatch, module) -> RolloutBatch:
        """Rollout `batch.rollout_index` for the trainer; queues the following ones up to n + k first."""
        n = batch.rollout_index
        self._bind(module)
        for stale in [m for m in self.in_flight if m < n]:  # not expected; never train them
            self.in_flight.pop(stale).cancel()
        for m in range(n, n + self.max_staleness + 1):
            if m not in self.in_flight and m not in self.restored:
                self._submit(batch if m == n else self.dm.prompt_batch(m), module)
        self.dm._set_phase("sampling")
        t0 = time.perf_counter()
        if n in self.restored:
            rollout = RolloutBatch(**self.restored.pop(n))
        else:
            rollout = self.in_flight.pop(n).result()  # re-raises the worker's error (SIGTERM included)
        waited = time.perf_counter() - t0
        self.dm.stop_if_terminated()
        rollout.metrics["time/rollout_wait_s"] = waited  # the part of sampling the update did not hide
        self.dm.rollouts_consumed = n + 1
        self.dm._set_phase("updating")
        return rollout_to(rollout, module.device)

    def _submit(self, batch: PromptBatch, module) -> None:
        if self.sampler.weight_version != module.weight_version:
            self.drain()  # the copy is refreshed between generations only
            if self.policy is None:  # vLLM: the engine is the worker's copy
                self.sampler.sync_weights(module.policy, module.weight_version)
            else:
                copy_full_weights(module.policy, self.policy)
                self.sampler.sync_weights(self.policy, module.weight_version)
        # prompts and their token ids in this thread: the prompt sources and the tokenizer are not thread-safe
        prompt_ids = self.dm.rollout_prompt_ids(batch)
        self.in_flight[batch.rollout_index] = self.executor.submit(
            self.dm.build_rollout, batch, self.sampler, prompt_ids, torch.device("cpu"))

    def _bind(self, module) -> None:
        if self._bound_to is module.policy:
            return
        self.close()
        if isinstance(self.dm.sampler, HFSampler):
            self.policy = local_copy(module)
            self.sampler = copy.copy(self.dm.sampler)
            self.sampler.collective = False  # a full copy on every rank: nothing to gather
            self.sampler.setup(self.policy, module.tokenizer, module.model_source)
            self.sampler.sync_weights(self.policy, module.weight_version)
        else:  # vLLM: the datamodule's engine, used by one thread at a time (validation drains the worker first)
            self.dm.ensure_synced(module)
            self.sampler = self.dm.sampler
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lit-sapo-rollout")
        self._bound_to = module.policy

    def drain(self) -> None:
        """Wait until the worker has finished every queued rollout (their errors stay in their futures)."""
        wait(list(self.in_flight.values()))

    # ---- checkpoints --------------------------------------------------------------------------------------
    def state(self, next_index: int) -> list[dict]:
        """The finished rollouts next_index, next_index + 1, ... (in order, up to the first that failed)."""
        saved = []
        for m in range(next_index, next_index + self.max_staleness + 1):
            if m in self.restored:
                saved.append(self.restored[m])
            elif m in self.in_flight:
                try:
                    saved.append(rollout_state(self.in_flight[m].result()))
                except BaseException:  # noqa: BLE001 - a SIGTERM'd or failed rollout is sampled again on resume
                    break
            else:
                break
        return saved

    def restore(self, saved: list[dict] | dict) -> None:
        self.restored = {int(s["rollout_index"]): dict(s) for s in own_in_flight(saved)}

    def close(self) -> None:
        """Stop the worker: queued rollouts are dropped, the one it is generating finishes first."""
        for future in self.in_flight.values():
            future.cancel()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        self.executor, self.sampler, self.policy, self._bound_to = None, None, None, None
        self.in_flight = {}
