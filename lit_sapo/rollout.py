"""Grouped rollouts as a LightningDataModule.

The dataloader yields cheap prompt batches (Lightning prefetches one; that is harmless). The expensive part,
sampling the completions, happens in `on_after_batch_transfer`, which Lightning calls on the current batch right
before `training_step`, after the previous step's updates: every rollout is sampled by the newest weights, and
is tagged with the weight version that produced it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from lit_sapo.advantages import ADVANTAGE_METHODS, group_advantages
from lit_sapo.callbacks._dist import shard
from lit_sapo.models import ModelSpec, check_model_spec, load_tokenizer
from lit_sapo.rewards import RewardSet, check_reward_names
from lit_sapo.sampling import HFSampler, Sampler
from lit_sapo.tasks import ArithmeticTask, PromptMixture, PromptSource, load_prompts, render_prompt


@dataclass
class PromptBatch:
    """The prompts of one rollout on this rank."""

    rollout_index: int
    examples: list  # lit_sapo.tasks.Example
    counted: list[bool] | None = None  # validation: False for a rank's padding prompt (generated, not scored)


@dataclass
class RolloutBatch:
    """One rollout on this rank: `num_prompts` groups of `num_generations` completions (row i*G + j)."""

    rollout_index: int
    weight_version: int
    temperature: float
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C] right-padded
    completion_mask: torch.Tensor  # [N, C] float: tokens that enter the loss
    sampler_logprobs: torch.Tensor  # [N, C]
    advantages: torch.Tensor  # [N]
    rewards: torch.Tensor  # [N]
    group_ids: torch.Tensor  # [N]
    prompts: list[str]
    completions: list[str]
    answers: list[str]
    reward_components: dict[str, list[float]]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def group_size(self) -> int:
        """G: completions per prompt (rows i*G .. i*G + G - 1 share a prompt)."""
        return int((self.group_ids == self.group_ids[0]).sum())


class _PromptStream(IterableDataset):
    """Infinite, deterministic, rank-sharded: rollout k on rank r takes global prompts (k*world + r)*n + j."""

    def __init__(self, datamodule: "RolloutDataModule") -> None:
        self.dm = datamodule

    def __iter__(self):
        index = self.dm.rollouts_consumed  # restored from a checkpoint before the loader is iterated
        while True:
            yield self.dm.prompt_batch(index)
            index += 1


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RolloutDataModule(LightningDataModule):
    """Streams grouped rollouts: prompts -> sampler (G completions each) -> rewards -> group advantages.

    Args:
        tokenizer: model whose tokenizer renders the prompts (interpolate the module's model name in YAML).
        task: the built-in arithmetic task; used when `sources` is empty.
        sources: prompt datasets (presets, hub ids, local files); several form a weighted mixture.
        weights: mixture weights of `sources` (default: equal).
        system_prompt: optional system message of the chat template.
        instruction: text appended to each problem (None = the source's default: reason, then \\boxed{}).
        sampler: the generator (HFSampler, or lit_sapo.sampling.vllm.VLLMSampler).
        rewards: reward name or class path -> weight; the total reward is the weighted sum.
        grading_timeout: wall-clock bound in seconds for grading one completion (a timeout scores 0).
        grading_workers: grader worker processes.
        reward_timeout: wall-clock bound in seconds on one batch call of each reward function other than the
            built-in accuracy (user rewards included); past it the batch scores 0 for that function and every
            completion counts in grading/timeouts.
        prompts_per_step: prompts per rollout on each rank.
        num_generations: completions per prompt (G, the group size).
        advantage: grpo (group z-score), dr_grpo (mean only) or rloo (leave-one-out).
        max_prompt_length: prompts longer than this many tokens are dropped from the sources up front (counted).
        drop_zero_variance_groups: take groups whose rewards are all equal out of the loss normalization.
        mask_truncated: completions that hit max_new_tokens get no gradient (DAPO's overlong filtering).
        seed: seed of prompt order and sampling (each rollout and rank gets its own stream).
        val_sources: held-out prompts for `lit-sapo validate` and for validation during fit
            (`trainer.val_check_interval`); one completion each, graded by the reward functions.
        val_batch_size: prompts per validation batch (per rank).
        val_temperature: sampling temperature of validation (0 = greedy).
        max_staleness: k, the most weight versions a rollout may lag the trainer. 0 = strictly on-policy (each
            rollout sampled by the newest weights); k >= 1 = the next rollouts are sampled in a background thread
            by a copy of the policy while the current one trains (HFSampler, under FSDP2 with a full copy per rank;
            VLLMSampler in one process; docs/async.md).
    """

    def __init__(self, tokenizer: str = "smollm2-135m-instruct", task: ArithmeticTask | None = None,
                 sources: list[PromptSource] | None = None, weights: list[float] | None = None,
                 system_prompt: str | None = None, instruction: str | None = None,
                 sampler: Sampler | None = None, rewards: dict[str, float] | None = None,
                 grading_timeout: float = 1.0, grading_workers: int = 2, reward_timeout: float = 30.0,
                 prompts_per_step: int = 8,
                 num_generations: int = 8, advantage: str = "grpo", max_prompt_length: int = 1024,
                 drop_zero_variance_groups: bool = False, mask_truncated: bool = False, seed: int = 0,
                 val_sources: list[PromptSource] | None = None, val_batch_size: int = 16,
                 val_temperature: float = 0.0, max_staleness: int = 0) -> None:
        super().__init__()
        if num_generations < 2:
            raise ValueError(f"data.num_generations: group advantages need at least 2 completions per prompt, "
                             f"got {num_generations}")
        if prompts_per_step < 1:
            raise ValueError(f"data.prompts_per_step: must be >= 1, got {prompts_per_step}")
        if advantage not in ADVANTAGE_METHODS:
            raise ValueError(f"data.advantage: unknown method {advantage!r}; use one of {list(ADVANTAGE_METHODS)}")
        if grading_timeout <= 0:
            raise ValueError(f"data.grading_timeout: must be > 0 seconds, got {grading_timeout}")
        if not reward_timeout > 0:
            raise ValueError(f"data.reward_timeout: must be > 0 seconds, got {reward_timeout}")
        if weights is not None and (not sources or len(weights) != len(sources)):
            raise ValueError("data.weights: give one weight per entry of data.sources")
        check_model_spec(ModelSpec(name=tokenizer), "data.tokenizer")
        self.tokenizer_name = tokenizer
        self.task = task if task is not None else ArithmeticTask(seed=seed)
        self.sources = list(sources or [])
        for i, source in enumerate(self.sources):
            try:
                source.validate()  # cheap: field map and emptiness, before any model is loaded
            except ValueError as err:
                raise ValueError(f"data.sources[{i}]: {err}") from None
        self.weights = weights
        self.system_prompt = system_prompt
        self.instruction = instruction
        self.sampler: Sampler = sampler if sampler is not None else HFSampler()
        from lit_sapo.async_rollout import AsyncRollouts, check_max_staleness

        check_max_staleness(max_staleness, self.sampler)
        self.max_staleness = max_staleness
        # k >= 1: the background sampler (its own copy of the policy); None keeps today's synchronous rollouts
        self.async_rollouts = AsyncRollouts(self, max_staleness) if max_staleness > 0 else None
        self.reward_weights = dict(rewards or {"accuracy": 1.0})
        check_reward_names([k for k, v in self.reward_weights.items() if isinstance(v, (int, float))])
        self.grading_timeout = grading_timeout
        self.grading_workers = grading_workers
        self.reward_timeout = reward_timeout
        self.prompts_per_step = prompts_per_step
        self.num_generations = num_generations
        self.advantage = advantage
        self.max_prompt_length = max_prompt_length
        self.drop_zero_variance_groups = drop_zero_variance_groups
        self.mask_truncated = mask_truncated
        self.seed = seed
        self.val_sources = list(val_sources or [])
        for i, source in enumerate(self.val_sources):
            try:
                source.validate()
            except ValueError as err:
                raise ValueError(f"data.val_sources[{i}]: {err}") from None
        self.val_batch_size = val_batch_size
        self.val_temperature = val_temperature
        self.rollouts_consumed = 0
        self.phase = ""  # sampling | grading | updating while a rollout runs
        self._sampler_bound_to = None  # the policy the sampler was set up with
        self.tokenizer = None
        self.prompt_source = None
        self.reward_set: RewardSet | None = None
        self.prompts_dropped = 0

    # ---- set-up -------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        model_name = getattr(getattr(module, "spec", None), "name", self.tokenizer_name)
        if model_name != self.tokenizer_name:
            raise ValueError(f"data.tokenizer: {self.tokenizer_name!r} differs from the policy {model_name!r}; "
                             "set data.tokenizer: ${model.model.name}")
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(ModelSpec(name=self.tokenizer_name))
        if self.prompt_source is None:
            self.prompt_source = self._build_prompt_source()
        if self.reward_set is None:
            self.reward_set = RewardSet(self.reward_weights, timeout_s=self.grading_timeout,
                                        workers=self.grading_workers, call_timeout_s=self.reward_timeout,
                                        check=self.stop_if_terminated)

    def _build_prompt_source(self):
        if not self.sources:
            return self.task
        too_long = lambda ex: len(self.prompt_token_ids(ex)) > self.max_prompt_length  # noqa: E731
        mixture = PromptMixture(self.sources, self.weights, seed=self.seed, drop=too_long)
        self.prompts_dropped = mixture.dropped
        return mixture

    def teardown(self, stage: str) -> None:
        if self.async_rollouts is not None:  # before the grader pool closes: the worker may be grading
            self.async_rollouts.close()
        if self.reward_set is not None:
            self.reward_set.close()
            self.reward_set = None
        if self._sampler_bound_to is not None:  # frees a vLLM engine; a later rollout sets the sampler up again
            self.sampler.close()
            self._sampler_bound_to = None

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: the stream yields whole prompt batches; no worker processes (sampling is in-process)
        return DataLoader(_PromptStream(self), batch_size=None, num_workers=0, collate_fn=lambda x: x)

    def state_dict(self) -> dict:
        state = {"rollouts_consumed": self.rollouts_consumed, "seed": self.seed}
        if self.async_rollouts is not None:  # the finished in-flight rollouts, so a resume trains the same ones
            from lit_sapo.async_rollout import gather_in_flight

            state["in_flight"] = gather_in_flight(self.async_rollouts.state(self.rollouts_consumed))
        return state

    def load_state_dict(self, state: dict) -> None:
        self.rollouts_consumed = int(state["rollouts_consumed"])
        if self.async_rollouts is not None:
            self.async_rollouts.restore(state.get("in_flight", []))

    # ---- the rollout --------------------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch  # prompt batches are plain Python; the rollout is built on the device below

    def val_dataloader(self):
        if not self.val_sources:
            return []
        examples = [ex for source in self.val_sources for ex in load_prompts(source)]
        rank, world = _rank_world()
        batches = validation_batches(examples, rank, world, self.val_batch_size)
        return DataLoader(batches, batch_size=None, num_workers=0, collate_fn=lambda x: x)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if not isinstance(batch, PromptBatch):
            return batch
        module = self.trainer.lightning_module
        if self.trainer.training:
            if self.async_rollouts is not None:
                return self.async_rollouts.next_rollout(batch, module)
            return self.make_rollout(batch, module)
        return self.make_evaluation(batch, module)

    def make_evaluation(self, batch: PromptBatch, module) -> dict:
        """One completion per held-out prompt with the current weights, graded by the run's reward functions."""
        if self.async_rollouts is not None:  # the worker and this share the global RNG and the tokenizer
            self.async_rollouts.drain()
        self.ensure_synced(module)
        prompt_ids = [self.prompt_token_ids(ex)[-self.max_prompt_length:] for ex in batch.examples]
        gen = self.sampler.generate(prompt_ids, 1, seed=self.seed, temperature=self.val_temperature)
        completions = self.tokenizer.batch_decode(gen.completion_ids, skip_special_tokens=True)
        graded = self.reward_set(completions, [ex.answer for ex in batch.examples],
                                 [self.tokenizer.decode(p) for p in prompt_ids])
        scores = {name: torch.tensor(values) for name, values in graded.per_function.items()}
        scores["reward"] = torch.tensor(graded.total)
        scores["completion_len"] = torch.tensor([float(len(c)) for c in gen.completion_ids])
        if batch.counted is not None:  # a padding prompt keeps the ranks in step but is not scored
            keep = torch.tensor(batch.counted, dtype=torch.bool)
            scores = {name: values[keep] for name, values in scores.items()}
        return {"sources": [ex.source for ex in batch.examples], "scores": scores}

    def ensure_synced(self, module) -> None:
        """Push the module's weights to the sampler if it is behind (lazy: right before it samples)."""
        if self._sampler_bound_to is not module.policy:
            # the longest rollout or validation call this module makes: vLLM sizes its context and memory to it
            self.sampler.setup(module.policy, module.tokenizer, module.model_source,
                               max_prompt_length=self.max_prompt_length,
                               max_batch_size=max(self.prompts_per_step * self.num_generations,
                                                  self.val_batch_size if self.val_sources else 0))
            self._sampler_bound_to = module.policy
            # a fresh engine holds the weights on disk, not the policy's (resumed, or trained before a re-setup)
            self.sampler.sync_weights(module.policy, module.weight_version)
            return
        if self.sampler.weight_version != module.weight_version:
            self.sampler.sync_weights(module.policy, module.weight_version)

    def prompt_batch(self, index: int) -> PromptBatch:
        """Rollout `index` on this rank: global prompts (index * world + rank) * n + j."""
        rank, world = _rank_world()
        first = (index * world + rank) * self.prompts_per_step
        return PromptBatch(index, [self.prompt_source.example(first + j) for j in range(self.prompts_per_step)])

    def rollout_prompt_ids(self, batch: PromptBatch) -> list[list[int]]:
        return [self.prompt_token_ids(ex)[-self.max_prompt_length:] for ex in batch.examples]

    def prompt_token_ids(self, example) -> list[int]:
        text = render_prompt(self.tokenizer, example.problem,
                             system_prompt=self.system_prompt if self.system_prompt is not None
                             else example.system_prompt,
                             instruction=self.instruction if self.instruction is not None else example.instruction)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def stop_if_terminated(self) -> None:
        """Raise Lightning's SIGTERMException once the trainer got SIGTERM: called between the phases of a
        rollout and while waiting on a reward, so a stop request is not held up by a long rollout. The rollout is
        not counted as consumed, so a checkpoint written on the way out resumes with it."""
        if self.trainer is not None and self.trainer.received_sigterm:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException

    def _set_phase(self, phase: str) -> None:
        """What the rollout is doing now (read by the console bar: lit_sapo.callbacks.RolloutProgressBar)."""
        self.phase = phase
        bar = getattr(self.trainer, "progress_bar_callback", None) if self.trainer is not None else None
        if hasattr(bar, "show_phase"):
            bar.show_phase(phase)

    def make_rollout(self, batch: PromptBatch, module) -> RolloutBatch:
        """Rollout `batch` sampled now by the module's current weights (data.max_staleness 0)."""
        self._set_phase("sampling")
        self.ensure_synced(module)
        rollout = self.build_rollout(batch, self.sampler, self.rollout_prompt_ids(batch), module.device,
                                     set_phase=self._set_phase)
        self.rollouts_consumed = batch.rollout_index + 1
        self._set_phase("updating")  # the module's inner updates come next
        return rollout

    def build_rollout(self, batch: PromptBatch, sampler: Sampler, prompt_ids: list[list[int]], device,
                      set_phase=lambda phase: None) -> RolloutBatch:
        """Sample with `sampler`, grade, and compute the group advantages of one rollout (tensors on `device`).

        Touches no state of the datamodule: the background worker (lit_sapo.async_rollout) runs it too."""
        rank, world = _rank_world()
        tok, G = self.tokenizer, self.num_generations
        t0 = time.perf_counter()
        gen = sampler.generate(prompt_ids, G, seed=_mix_seed(self.seed, batch.rollout_index, rank))
        t1 = time.perf_counter()
        self.stop_if_terminated()
        completions = tok.batch_decode(gen.completion_ids, skip_special_tokens=True)
        prompts = [tok.decode(p) for p in prompt_ids for _ in range(G)]
        answers = [ex.answer for ex in batch.examples for _ in range(G)]
        set_phase("grading")
        graded = self.reward_set(completions, answers, prompts)
        t2 = time.perf_counter()
        self.stop_if_terminated()
        rewards = torch.tensor(graded.total, dtype=torch.float32).view(len(prompt_ids), G)
        advantages, zero_std = group_advantages(rewards, method=self.advantage)
        n, pad = rewards.numel(), tok.pad_token_id
        p_width = max(len(p) for p in prompt_ids)
        c_width = max(1, max(len(c) for c in gen.completion_ids))
        rows_prompt = [prompt_ids[i // G] for i in range(n)]
        prompt_t = torch.tensor([[pad] * (p_width - len(p)) + p for p in rows_prompt])
        prompt_m = torch.tensor([[0] * (p_width - len(p)) + [1] * len(p) for p in rows_prompt])
        comp_t = torch.tensor([c + [pad] * (c_width - len(c)) for c in gen.completion_ids])
        comp_m = torch.tensor([[1.0] * len(c) + [0.0] * (c_width - len(c)) for c in gen.completion_ids])
        logp_t = torch.tensor([lp + [0.0] * (c_width - len(lp)) for lp in gen.logprobs])
        truncated = torch.tensor([r == "length" for r in gen.finish_reasons])
        loss_mask = comp_m.clone()
        if self.mask_truncated:
            loss_mask[truncated] = 0.0
        if self.drop_zero_variance_groups:
            loss_mask[zero_std.repeat_interleave(G)] = 0.0
        lengths = comp_m.sum(1)
        metrics = {
            "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item() if n > 1 else 0.0,
            "completion/len_mean": lengths.mean().item(), "completion/len_max": lengths.max().item(),
            "completion/truncated_frac": truncated.float().mean().item(),
            "rollout/zero_std_frac": zero_std.float().mean().item(),
            "rollout/prompts_dropped": float(self.prompts_dropped),
            "grading/timeouts": float(graded.timeouts), "grading/errors": float(graded.errors),
            "time/generate_s": t1 - t0, "time/grade_s": t2 - t1,
        }
        for name, values in graded.per_function.items():
            metrics[f"reward/{name}"] = sum(values) / max(len(values), 1)
        return RolloutBatch(
            rollout_index=batch.rollout_index, weight_version=gen.weight_version,
            temperature=sampler.temperature, prompt_ids=prompt_t.to(device), prompt_mask=prompt_m.to(device),
            completion_ids=comp_t.to(device), completion_mask=loss_mask.to(device),
            sampler_logprobs=logp_t.to(device), advantages=advantages.reshape(-1).to(device),
            rewards=rewards.reshape(-1).to(device), group_ids=torch.arange(n, device=device) // G,
            prompts=prompts, completions=completions, answers=answers,
            reward_components=graded.per_function, metrics=metrics)


def validation_batches(examples: list, rank: int, world: int, batch_size: int) -> list[PromptBatch]:
    """This rank's validation prompts in batches: every prompt is scored once on some rank, and every rank runs
    the same number of equally long generate calls (FSDP all-gathers weights in each forward), padding the
    last with prompt 0, not counted."""
    indices = shard(len(examples), rank, world)
    return [PromptBatch(-1, [examples[max(i, 0)] for i in chunk], [i >= 0 for i in chunk])
            for chunk in (indices[s:s + batch_size] for s in range(0, len(indices), batch_size))]


def _mix_seed(seed: int, rollout_index: int, rank: int) -> int:
    # distinct, reproducible sampling seed for every (run seed, rollout, rank)
    return (seed * 1_000_003 + rollout_index * 1_009 + rank) % (2**31 - 1)
