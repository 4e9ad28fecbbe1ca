"""SAPOModule: the policy, the gated objective and the inner updates of each rollout (manual optimization).

One `training_step` = one rollout = `ppo_epochs` x `num_minibatches` optimizer steps. Lightning's
`trainer.global_step` (and so `trainer.max_steps`) counts optimizer steps; `rollout/step` counts rollouts.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric

from lit_sapo.correction import CORRECTION_MODES, rollout_correction_weights
from lit_sapo.callbacks._dist import gather_cat
from lit_sapo.models import ModelSpec, check_model_spec, check_trainable_dtype, load_policy, load_tokenizer, resolve_source
from lit_sapo.objective import GateTerms, LossSettings, policy_loss
from lit_sapo.rollout import RolloutBatch
from lit_sapo.scoring import completion_logprobs, install_scoring_head
from lit_sapo.stats import empty, merge, merge_all, ratio_moments, summarize

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class OptimizerSettings:
    """AdamW with linear warm-up, then constant, linear or cosine decay to `min_lr_ratio` x lr."""

    lr: float = 1e-6
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0."""
    schedule: str = "constant"
    """constant, linear or cosine decay after warm-up, over trainer.max_steps optimizer steps."""
    min_lr_ratio: float = 0.0
    """Floor of the decay, as a fraction of lr."""
    fused: bool | None = None
    """Fused AdamW kernel; None = on when every parameter is on CPU or CUDA."""


@dataclass
class UpdateRecord:
    """What one micro-batch of one inner update saw: for callbacks (see docs/callbacks.md, 'Your own metrics')."""

    epoch: int
    minibatch: int
    rows: torch.Tensor  # indices into the rollout batch
    terms: GateTerms  # per-token log_ratio, ratio, gate_value, gate_grad, tau, advantages, mask (detached)
    entropy: torch.Tensor | None  # per-token entropy [rows, C] (detached), when compute_entropy


@dataclass
class StepOutput:
    """What one rollout step did; `module.last_output`, and as a dict the `outputs` of `on_train_batch_end`."""

    loss: torch.Tensor
    batch: RolloutBatch
    old_logprobs: torch.Tensor
    updates: list[UpdateRecord] = field(default_factory=list)


# token-weighted over all valid tokens; the ratio statistics are pooled as lit_sapo.stats moments instead
_STAT_KEYS = ("loss", "pg_loss", "kl", "entropy")


class SAPOModule(LightningModule):
    """Policy optimisation with a soft gate (SAPO and family) or the hard clip (GRPO).

    Args:
        model: the policy to train.
        gate: sigmoid (SAPO), erf, arctan, softsign, clip (GRPO/DAPO), none, or a class path.
        tau_pos: gate temperature for tokens with positive advantage.
        tau_neg: gate temperature for tokens with non-positive advantage.
        eps_low: lower clip range of the clip gate.
        eps_high: upper clip range of the clip gate (> eps_low: DAPO clip-higher).
        level: token or sequence (GSPO-style) importance ratio.
        aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm.
        norm_length: the constant divisor of seq-mean-token-sum-norm (Dr.GRPO); default: the sampler's
            max_new_tokens, bound at setup (`bind_rollout`).
        max_log_ratio: clamp of log r before exp.
        kl_coef: weight of the KL penalty to a frozen reference (0 = no reference model is loaded).
        kl_estimator: k1, k2 or k3.
        reference: the reference model (default: the same as `model`).
        ppo_epochs: passes over each rollout.
        num_minibatches: optimizer steps per pass.
        micro_batch_size: sequences per forward/backward (gradient accumulation); None = whole minibatch.
        optimizer: AdamW settings and schedule.
        max_grad_norm: gradient clipping by global norm (0 = off).
        logprob_chunk_size: rows of the chunked log-prob computation.
        compute_entropy: compute token entropy during the update (no gradient; logged as train/entropy).
        rollout_correction: none, token_tis, seq_tis, token_mask, seq_mask: sampler/trainer mismatch correction.
        correction_cap: cap of the truncated IS weight, or the mask threshold.
        activation_checkpointing: under FSDP2, checkpoint each decoder layer.
        padding_free: score each micro-batch packed (`lit_sapo.packing`): every prompt once, its completions
            after it without padding, one forward (FSDP2-safe); same values and gradients, less compute.
            Minibatches then hold whole groups. Needs sdpa or eager attention (else rows are padded).
        pack_row_tokens: packed row length; groups are packed together up to it (a longer group has its own row).
        max_skipped_steps: an optimizer step whose gradient norm is not finite is skipped (no update, counted in
            train/skipped_steps); after this many in a row the run stops with one line naming the cause.
    """

    def __init__(self, model: ModelSpec | None = None, gate: str = "sigmoid", tau_pos: float = 1.0,
                 tau_neg: float = 1.05, eps_low: float = 0.2, eps_high: float = 0.2, level: str = "token",
                 aggregation: str = "seq-mean-token-mean", norm_length: int | None = None,
                 max_log_ratio: float = 20.0, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 reference: ModelSpec | None = None, ppo_epochs: int = 1, num_minibatches: int = 1,
                 micro_batch_size: int | None = None, optimizer: OptimizerSettings | None = None,
                 max_grad_norm: float = 1.0, logprob_chunk_size: int = 1024, compute_entropy: bool = True,
                 rollout_correction: str = "none", correction_cap: float = 2.0,
                 activation_checkpointing: bool = False, padding_free: bool = True,
                 pack_row_tokens: int = 1024, max_skipped_steps: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.spec = model or ModelSpec()
        try:  # the loss settings are validated in one place: LossSettings
            self.loss_settings = LossSettings(gate=gate, tau_pos=tau_pos, tau_neg=tau_neg, eps_low=eps_low,
                                              eps_high=eps_high, level=level, aggregation=aggregation,
                                              norm_length=norm_length, max_log_ratio=max_log_ratio,
                                              kl_coef=kl_coef, kl_estimator=kl_estimator)
        except ValueError as err:
            raise ValueError(f"model.{err}") from None
        if rollout_correction not in CORRECTION_MODES:
            raise ValueError(f"model.rollout_correction: unknown {rollout_correction!r}; use one of {list(CORRECTION_MODES)}")
        if ppo_epochs < 1 or num_minibatches < 1:
            raise ValueError("model.ppo_epochs and model.num_minibatches: must be >= 1")
        if max_skipped_steps < 1:
            raise ValueError(f"model.max_skipped_steps: must be >= 1, got {max_skipped_steps}")
        if pack_row_tokens < 1:
            raise ValueError(f"model.pack_row_tokens: must be >= 1, got {pack_row_tokens}")
        self.optim = optimizer or OptimizerSettings()
        if self.optim.schedule not in SCHEDULES:
            raise ValueError(f"model.optimizer.schedule: unknown {self.optim.schedule!r}; use one of {list(SCHEDULES)}")
        check_optimizer_settings(self.optim)
        check_model_spec(self.spec, "model.model")
        check_trainable_dtype(self.spec, "model.model")
        self.reference_spec = reference or (self.spec if kl_coef > 0 else None)
        if self.reference_spec is not None:
            check_model_spec(self.reference_spec, "model.reference")
        self.automatic_optimization = False
        self.weight_version = 0
        self.max_staleness = 0  # data.max_staleness, bound at setup: how many versions a rollout may lag
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite gradient, in all
        self._skipped_in_a_row = 0
        self.policy = None
        self.reference = None
        self.tokenizer = None
        self.stats = torch.nn.ModuleDict({k: MeanMetric() for k in _STAT_KEYS})
        self._ratio_moments = empty(3)  # this rank's tokens of the rollout step: all (A != 0), A > 0, A < 0
        self.last_output: StepOutput | None = None

    @property
    def model_source(self) -> str:
        return resolve_source(self.spec)[0]

    # ---- binding to the run -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Lightning calls this after the datamodule's setup and before configure_model: no model is loaded yet
        if stage == "fit":
            self.bind_run(self.trainer, self.trainer.datamodule)

    def bind_run(self, trainer, datamodule) -> None:
        """Check the settings that need the trainer and the datamodule, and bind the sampler's max_new_tokens.

        The datamodule must expose `prompts_per_step`, `num_generations` and `sampler.max_new_tokens` (as
        RolloutDataModule does); raises a one-line ValueError naming the setting otherwise or when they clash.
        """
        hp, o = self.hparams, self.optim
        if o.schedule != "constant" and not (trainer is not None and trainer.max_steps > 0):
            raise ValueError(f"model.optimizer.schedule: {o.schedule} decays over trainer.max_steps, which is not "
                             f"set; set trainer.max_steps or use schedule: constant")
        groups = getattr(datamodule, "prompts_per_step", None)
        group_size = getattr(datamodule, "num_generations", None)
        if groups is not None and group_size is not None:
            units, what = (groups, "data.prompts_per_step groups") if hp.padding_free else \
                (groups * group_size, "rows (data.prompts_per_step x data.num_generations)")
            if units % hp.num_minibatches:
                raise ValueError(f"model.num_minibatches: {hp.num_minibatches} does not divide the {units} {what} "
                                 f"of a rollout evenly; choose a divisor of {units}")
        if self.loss_settings.aggregation == "seq-mean-token-sum-norm" and self.loss_settings.norm_length is None:
            max_new_tokens = getattr(getattr(datamodule, "sampler", None), "max_new_tokens", None)
            if not max_new_tokens:
                raise ValueError("model.norm_length: seq-mean-token-sum-norm needs a constant; set model.norm_length "
                                 "(the datamodule has no sampler.max_new_tokens to default to)")
            self.loss_settings = dataclasses.replace(self.loss_settings, norm_length=int(max_new_tokens))
        self.max_staleness = int(getattr(datamodule, "max_staleness", 0) or 0)
        if self.max_staleness:
            from lit_sapo.async_rollout import check_world_size

            check_world_size(self.max_staleness, getattr(datamodule, "sampler", None),
                             trainer.world_size if trainer is not None else 1)

    # ---- models -------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.tokenizer = load_tokenizer(self.spec)
        mesh = self._device_mesh_or_none()
        # under FSDP2 with several processes only rank 0 reads the weights (ModelSpec.load_on_rank0)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else self.global_rank
        meta = {id(s): mesh is not None and mesh.size() > 1 and s.load_on_rank0 and rank > 0
                for s in (self.spec, self.reference_spec) if s is not None}
        self.policy = load_policy(self.spec, on_meta=meta[id(self.spec)]).train()
        install_scoring_head(self.policy)
        if self.reference_spec is not None:
            self.reference = load_policy(self.reference_spec, on_meta=meta[id(self.reference_spec)])
            self.reference.eval().requires_grad_(False)
            install_scoring_head(self.reference)
        if mesh is not None:
            from lit_sapo.distributed import compute_dtype_for, fill_from_rank0, shard_policy

            for model, spec, ckpt in ((self.policy, self.spec, self.hparams.activation_checkpointing),
                                      (self.reference, self.reference_spec, False)):
                if model is None:
                    continue
                broadcast = mesh.size() > 1 and spec.load_on_rank0
                # rank 0's full weights, read before sharding replaces them by its own shards
                full = dict(model.state_dict()) if broadcast and rank == 0 else None
                dtype = compute_dtype_for(spec.compute_dtype, next(model.parameters()).dtype, mesh.device_type)
                shard_policy(model, mesh, activation_checkpointing=ckpt, compute_dtype=dtype,
                             replicate=spec.fsdp_replicate)
                if broadcast:
                    fill_from_rank0(model, full)
                    del full

    # the head lives inside the model (not registered here too: a checkpoint holds each weight once)
    @property
    def head(self):
        return self.policy.get_output_embeddings()

    def _device_mesh_or_none(self):
        try:
            return self.device_mesh  # set by ModelParallelStrategy
        except (AttributeError, RuntimeError):
            return None

    def configure_optimizers(self):
        o = self.optim
        params = [p for p in self.policy.parameters() if p.requires_grad]
        # the fused kernel (CPU and CUDA) is ~8x faster than the per-tensor loop for a 135M model on CPU
        fused = o.fused if o.fused is not None else all(p.device.type in ("cpu", "cuda") for p in params)
        opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                fused=fused)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, o, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- scoring ------------------------------------------------------------------------------------------
    def _micro_slices(self, rows: torch.Tensor) -> list[torch.Tensor]:
        size = self.hparams.micro_batch_size or len(rows)
        return [rows[i:i + size] for i in range(0, len(rows), size)]

    def score(self, batch: RolloutBatch, rows: torch.Tensor, *, reference: bool = False,
              with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        policy = self.reference if reference else self.policy
        hp = self.hparams
        return completion_logprobs(policy, policy.get_output_embeddings(), batch.prompt_ids[rows],
                                   batch.prompt_mask[rows], batch.completion_ids[rows], batch.completion_mask[rows],
                                   temperature=batch.temperature or 1.0, chunk_size=hp.logprob_chunk_size,
                                   with_entropy=with_entropy,
                                   group_ids=batch.group_ids[rows] if hp.padding_free else None,
                                   pack_row_tokens=hp.pack_row_tokens)

    @torch.no_grad()
    def _score_all(self, batch: RolloutBatch, reference: bool = False) -> torch.Tensor:
        rows = torch.arange(batch.size, device=self.device)
        return torch.cat([self.score(batch, r, reference=reference)[0] for r in self._micro_slices(rows)])

    # ---- the rollout step ---------------------------------------------------------------------------------
    def training_step(self, batch: RolloutBatch, batch_idx: int) -> dict:
        hp = self.hparams
        staleness = self.weight_version - batch.weight_version
        if not 0 <= staleness <= self.max_staleness:
            raise RuntimeError(f"stale rollout: sampled by weights v{batch.weight_version}, policy is at "
                               f"v{self.weight_version}, more than data.max_staleness={self.max_staleness} behind")
        # the gate acts on pi_theta / pi_prox, pi_prox = these weights at the step start (old_logp, recomputed, or
        # logp.detach() on a single update); pi_prox / pi_behaviour (the sampler's log-probs, stale when
        # staleness > 0) is left to rollout_correction: the decoupled objective (docs/async.md)
        n_updates = hp.ppo_epochs * hp.num_minibatches
        needs_old = n_updates > 1 or hp.rollout_correction != "none"
        old_logp = self._score_all(batch) if needs_old else None
        ref_logp = self._score_all(batch, reference=True) if self.reference is not None else None
        is_weights = self._correction_weights(batch, old_logp) if hp.rollout_correction != "none" else None
        opt, sched = self.optimizers(), self.lr_schedulers()
        output = StepOutput(loss=torch.zeros((), device=self.device), batch=batch,
                            old_logprobs=old_logp if old_logp is not None else batch.sampler_logprobs)
        generator = torch.Generator().manual_seed(batch.rollout_index)  # minibatch order replays on resume
        grad_norms = []
        for epoch in range(hp.ppo_epochs):
            order = self._shuffled_rows(batch, generator)
            for mb, rows in enumerate(order.chunk(hp.num_minibatches)):
                loss = self._update(batch, rows, old_logp, ref_logp, is_weights, epoch, mb, output)
                grad_norms.append(self._clip_and_step(opt, sched))
                output.loss = output.loss + loss / n_updates
        self.weight_version += 1  # the sampler is synced lazily, right before the next rollout
        output.old_logprobs = output.old_logprobs.detach()
        self._log_step(batch, grad_norms)
        self.last_output = output
        # Lightning's manual loop takes a mapping; callbacks get it as `outputs` (same fields as StepOutput)
        return vars(output).copy()

    def _shuffled_rows(self, batch: RolloutBatch, generator: torch.Generator) -> torch.Tensor:
        if not self.hparams.padding_free:
            return torch.randperm(batch.size, generator=generator).to(self.device)
        # whole groups stay together (consecutive), so each micro-batch packs each prompt once
        g = batch.group_size
        groups = torch.randperm(batch.size // g, generator=generator)
        return (groups[:, None] * g + torch.arange(g)).flatten().to(self.device)

    def _update(self, batch, rows, old_logp, ref_logp, is_weights, epoch, mb, output: StepOutput) -> torch.Tensor:
        hp = self.hparams
        mask = batch.completion_mask
        denominator = self._normalizer(mask[rows])
        total = torch.zeros((), device=self.device)
        for micro in self._micro_slices(rows):
            logp, entropy = self.score(batch, micro, with_entropy=hp.compute_entropy)
            loss, stats, terms = policy_loss(
                logp, logp.detach() if old_logp is None else old_logp[micro], batch.advantages[micro], mask[micro],
                self.loss_settings, ref_logp=None if ref_logp is None else ref_logp[micro],
                is_weights=None if is_weights is None else is_weights[micro], return_terms=True)
            # each micro-batch's mean is re-weighted so the sum is the minibatch mean of the aggregation
            share = self._normalizer(mask[micro]) / denominator if denominator > 0 else 0.0
            self.manual_backward(loss * share)
            total = total + loss.detach() * share
            self._accumulate(stats, terms, entropy.detach() if hp.compute_entropy else None)
            output.updates.append(UpdateRecord(epoch, mb, micro, terms,
                                               entropy.detach() if hp.compute_entropy else None))
        return total

    def _normalizer(self, mask: torch.Tensor) -> float:
        if self.hparams.aggregation == "token-mean":
            return float(mask.sum())
        return float((mask.sum(1) > 0).sum())

    def _clip_and_step(self, opt, sched) -> float:
        # max_norm inf: no clipping, but the global norm is still measured (and logged)
        max_norm = self.hparams.max_grad_norm if self.hparams.max_grad_norm > 0 else float("inf")
        params = [p for p in self.policy.parameters() if p.grad is not None]
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)  # global: all ranks agree
        if not math.isfinite(norm):
            # a non-finite loss or gradient: drop the gradients, so AdamW's step leaves weights and moments as
            # they are (it skips parameters without .grad) while the step and lr counters still advance
            opt.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row >= self.hparams.max_skipped_steps and not self.trainer.should_stop:
                self.print(f"lit-sapo: stopping: {self._skipped_in_a_row} optimizer steps in a row had a non-finite "
                           f"gradient norm ({norm}); lower model.optimizer.lr or check the reward/advantages")
                self.trainer.should_stop = True
        else:
            self._skipped_in_a_row = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return norm

    def _correction_weights(self, batch: RolloutBatch, old_logp: torch.Tensor) -> torch.Tensor:
        weights, stats = rollout_correction_weights(old_logp, batch.sampler_logprobs, batch.completion_mask,
                                                    mode=self.hparams.rollout_correction,
                                                    cap=self.hparams.correction_cap)
        for key, value in stats.items():
            self.log(f"mismatch/{key}", value, on_step=True, sync_dist=True, batch_size=batch.size)
        return weights

    # ---- metrics ------------------------------------------------------------------------------------------
    def _accumulate(self, stats: dict, terms: GateTerms, entropy: torch.Tensor | None) -> None:
        # ratio statistics: float64 moments of this micro-batch's tokens, Chan-merged into the rollout's
        moments = ratio_moments(terms.log_ratio, terms.advantages, terms.mask, terms.gate_grad, terms.gate_value)
        self._ratio_moments = merge(self._ratio_moments.to(moments.device), moments)
        # loss, kl, entropy: policy_loss's token-weighted means over all valid tokens, pooled by token count
        tokens = stats["tokens"]
        if tokens == 0:
            return
        values = {key: stats[key] for key in ("loss", "pg_loss", "kl")}
        mask = terms.mask.float()
        values["entropy"] = (entropy * mask).sum() / tokens if entropy is not None else torch.zeros(())
        for key, value in values.items():
            self.stats[key].update(value.detach().float(), tokens)

    def train_metrics(self) -> dict[str, torch.Tensor]:
        """train/* statistics of the updates since the last call, over every rank's tokens; resets them.

        A collective: every rank calls it once per rollout step. Ratio statistics, EUR, gate_mean, gated_frac and
        clip_frac are over tokens with A != 0 (nan where there are none); loss, pg_loss, kl, entropy over all
        valid tokens.
        """
        with warnings.catch_warnings():  # a rollout whose every token is masked: nan, not a warning
            warnings.filterwarnings("ignore", message=".*compute.*before the ..update", category=UserWarning)
            out = {f"train/{k}": m.compute() for k, m in self.stats.items()}  # synced across ranks
        for metric in self.stats.values():
            metric.reset()
        # exact across ranks: gather every rank's (count, mean, M2, ...) and Chan-merge them
        local = self._ratio_moments.to(self.device)
        merged = merge_all(gather_cat(local.flatten(), device=self.device).view(-1, *local.shape))
        self._ratio_moments = empty(3, device=self.device)
        g = summarize(merged)
        names = {"eur": "eur", "gated_frac": "gated_frac", "clip_frac": "clip_frac", "gate_mean": "gate_mean",
                 "mean": "ratio_mean", "var": "ratio_var", "log_var": "log_ratio_var", "min": "ratio_min",
                 "max": "ratio_max"}
        for stat, name in names.items():
            out[f"train/{name}"] = g[stat][0].float()
        for i, suffix in ((1, "pos"), (2, "neg")):
            out[f"train/eur_{suffix}"] = g["eur"][i].float()
            out[f"train/ratio_mean_{suffix}"] = g["mean"][i].float()
        return out

    def _log_step(self, batch: RolloutBatch, grad_norms: list[float]) -> None:
        out = self.train_metrics()
        applied = [n for n in grad_norms if math.isfinite(n)]
        out["train/grad_norm"] = torch.tensor(sum(applied) / len(applied) if applied else math.nan)
        out["train/skipped_steps"] = torch.tensor(float(self.skipped_steps))
        out["train/lr"] = torch.tensor(self.lr_schedulers().get_last_lr()[0])
        self.log_dict(out, on_step=True, batch_size=batch.size)
        sums = {k for k in batch.metrics if k.startswith("grading/")}
        self.log_dict({k: v for k, v in batch.metrics.items() if k not in sums}, on_step=True, sync_dist=True,
                      batch_size=batch.size)
        self.log_dict({k: batch.metrics[k] for k in sums}, on_step=True, sync_dist=True, reduce_fx="sum",
                      batch_size=batch.size)
        self.log("rollout/step", float(batch.rollout_index + 1), on_step=True, batch_size=batch.size)
        self.log("rollout/weight_version", float(batch.weight_version), on_step=True, batch_size=batch.size)
        # versions between the sampler's weights and the weights at the start of this step (bumped since)
        self.log("rollout/staleness", float(self.weight_version - 1 - batch.weight_version), on_step=True,
                 batch_size=batch.size)
        # the bar's own counter is rollouts against max_steps (optimizer steps): show both step counts explicitly
        self.log("rollout", float(batch.rollout_index + 1), prog_bar=True, on_step=True, batch_size=batch.size,
                 logger=False)
        self.log("opt_step", float(self.trainer.global_step), prog_bar=True, on_step=True, batch_size=batch.size,
                 logger=False)
        self.log("reward", batch.metrics["reward/mean"], prog_bar=True, on_step=True, sync_dist=True,
                 batch_size=batch.size, logger=False)
        self.log("loss", out["train/loss"], prog_bar=True, on_step=True, batch_size=batch.size, logger=False)

    # ---- validation (held-out prompts, see RolloutDataModule.val_sources) -----------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # per-prompt means, weighted by prompts across batches and ranks (per-benchmark scores: BenchmarkEvaluation)
        for name, values in batch["scores"].items():
            # a batch of padding prompts only (n < world size) weighs 0, but every rank still logs every key
            mean = values.float().sum() / max(len(values), 1)
            self.log(f"val/{name}", mean, batch_size=len(values), sync_dist=True)

    # ---- checkpoints --------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        for name, value in checkpoint.get("state_dict", {}).items():
            local = value.to_local() if hasattr(value, "to_local") else value
            if torch.is_tensor(local) and local.is_floating_point() and not torch.isfinite(local).all():
                raise RuntimeError(f"lit-sapo: refusing to save a checkpoint with non-finite weights ({name})")
        checkpoint["lit_sapo"] = {"weight_version": self.weight_version, "skipped_steps": self.skipped_steps}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.weight_version = int(checkpoint.get("lit_sapo", {}).get("weight_version", 0))
        self.skipped_steps = int(checkpoint.get("lit_sapo", {}).get("skipped_steps", 0))


def check_optimizer_settings(o: OptimizerSettings) -> None:
    """The AdamW settings torch would refuse only in configure_optimizers, after the model has loaded."""
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ValueError(f"model.optimizer.lr: must be a finite number > 0, got {o.lr}; e.g. 1e-6 (the paper's)")
    if o.weight_decay < 0:
        raise ValueError(f"model.optimizer.weight_decay: must be >= 0, got {o.weight_decay}")
    if not all(0 <= b < 1 for b in o.betas):
        raise ValueError(f"model.optimizer.betas: each must be in [0, 1), got {tuple(o.betas)}")
    if not o.eps > 0:
        raise ValueError(f"model.optimizer.eps: must be > 0, got {o.eps}")
    if o.warmup_steps < 0:
        raise ValueError(f"model.optimizer.warmup_steps: must be >= 0, got {o.warmup_steps}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ValueError(f"model.optimizer.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")


def lr_factor(step: int, o: OptimizerSettings, total: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (warm-up, then the chosen decay)."""
    if o.warmup_steps > 0 and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant" or total <= o.warmup_steps:
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    decay = 1.0 - progress if o.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * decay
