"""`lit-sapo probe`: what each gate does to one fixed rollout over K optimizer steps (a trust-region stress test).

    lit-sapo probe --config BASE.yaml [--config ...] --gates sigmoid,erf,arctan,softsign,clip --taus 1:1.05 \
        --eps 0.2:0.2 --steps 16 --out DIR [any fit override, e.g. --model.optimizer.lr 1e-5]

One rollout is sampled from the config (its model, data, sampler and seed), then, for every gate, the same start
weights take K AdamW steps on that same rollout (the whole rollout each step, the config's loss settings and
optimizer otherwise). Before each step and after the last, the probe records on the rollout's tokens: the exact
KL(pi_k || pi_0) over the full vocabulary at every completion position, the ratio pi_k / pi_0 (mean, variance,
max), EUR by advantage sign, the gated fraction and the entropy. The gate's tail (exponential, Gaussian, u^-2,
u^-3, hard) shows directly as how fast KL and the ratio variance grow and where EUR falls. Deterministic:
no dropout, a fixed rollout, full-batch steps. Writes DIR/probe.csv and DIR/probe.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from lit_sapo.objective import LossSettings, policy_loss
from lit_sapo.study.sweep import _pairs, run_specs

COLUMNS = ("gate", "setting", "step", "kl", "ratio_mean", "ratio_var", "ratio_max", "eur", "eur_pos", "eur_neg",
           "gated_frac", "entropy", "loss")


def completion_log_softmax(policy, batch) -> torch.Tensor:
    """log pi(. | context) at every completion position of the rollout, full vocabulary, float32 [N, C, V]."""
    attention = torch.cat([batch.prompt_mask, (batch.completion_mask > 0).long()], dim=1).long()
    # positions past a completion's end are masked out of every statistic; their context does not matter
    attention[:, batch.prompt_ids.shape[1]:] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    width = batch.completion_ids.shape[1]
    logits = policy(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                    logits_to_keep=width + 1, use_cache=False).logits[:, :-1]
    return F.log_softmax(logits.float() / (batch.temperature or 1.0), dim=-1)


def probe_gate(policy, start_state: dict, batch, settings: LossSettings, make_optimizer, steps: int,
               max_grad_norm: float) -> list[dict]:
    """Rows of one gate: the statistics before each of `steps` updates and after the last."""
    policy.load_state_dict(start_state)
    optimizer = make_optimizer(policy)
    mask = batch.completion_mask
    valid = mask > 0
    tokens = valid.sum().clamp(min=1)
    with torch.no_grad():
        reference = completion_log_softmax(policy, batch)
    old_logp = reference.gather(-1, batch.completion_ids[..., None])[..., 0]
    rows = []
    for step in range(steps + 1):
        log_probs = completion_log_softmax(policy, batch)
        logp = log_probs.gather(-1, batch.completion_ids[..., None])[..., 0]
        loss, stats = policy_loss(logp, old_logp, batch.advantages, mask, settings)
        with torch.no_grad():
            probs = log_probs.exp()
            kl = ((probs * (log_probs - reference)).sum(-1) * valid).sum() / tokens
            entropy = (-(probs * log_probs).sum(-1) * valid).sum() / tokens
        rows.append({"step": step, "kl": kl.item(), "entropy": entropy.item(), "loss": loss.item(),
                     **{k: float(stats[k]) for k in ("ratio_mean", "ratio_var", "ratio_max", "eur", "eur_pos",
                                                     "eur_neg", "gated_frac")}})
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
        optimizer.step()
    return rows


def build_run(configs: list[str], overrides: list[str]):
    """The config's module and datamodule, parsed and validated as `fit` would, without a trainer run."""
    from lit_sapo.cli import main

    args = [a for c in configs for a in ("--config", c)] + overrides
    with warnings.catch_warnings():  # `lit-sapo probe`'s own argv is not LightningCLI's: the args are
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = main(args, run=False)
    module, datamodule = cli.model, cli.datamodule
    # the probe steps at a constant lr; the other run settings (norm_length, minibatch split) bind as in fit
    module.optim = dataclasses.replace(module.optim, schedule="constant", warmup_steps=0)
    module.bind_run(None, datamodule)
    return module, datamodule


def sample_rollout(module, datamodule, seed: int):
    from lit_sapo.rollout import PromptBatch

    torch.manual_seed(seed)
    datamodule.setup("fit")
    module.configure_model()
    module.policy.eval()  # dropout is off already (models.load_policy); eval keeps it so
    examples = [datamodule.prompt_source.example(j) for j in range(datamodule.prompts_per_step)]
    return datamodule.make_rollout(PromptBatch(0, examples), module)


def run_probe(module, batch, specs: list[dict], steps: int) -> list[dict]:
    policy = module.policy
    start = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    o = module.optim

    def make_optimizer(model):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

    out = []
    for spec in specs:
        extra = ({"eps_low": spec["a"], "eps_high": spec["b"]} if spec["kind"] == "eps"
                 else {"tau_pos": spec["a"], "tau_neg": spec["b"]})
        settings = dataclasses.replace(module.loss_settings, gate=spec["gate"], **extra)
        label = f"{spec['kind']} {spec['a']:g}/{spec['b']:g}"
        t0 = time.perf_counter()
        rows = probe_gate(policy, start, batch, settings, make_optimizer, steps, module.hparams.max_grad_norm)
        print(f"lit-sapo probe: {spec['gate']} ({label}): KL after {steps} steps {rows[-1]['kl']:.4g}, "
              f"ratio var {rows[-1]['ratio_var']:.4g}, EUR {rows[-1]['eur']:.4g} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        out += [{"gate": spec["gate"], "setting": label, **row} for row in rows]
    policy.load_state_dict(start)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lit-sapo probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--gates", default="sigmoid,erf,arctan,softsign,clip")
    parser.add_argument("--taus", default="1:1.05", help="tau_pos:tau_neg pairs (not for clip)")
    parser.add_argument("--eps", default="0.2:0.2", help="eps_low:eps_high pairs of the clip gate")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps on the fixed rollout")
    parser.add_argument("--out", required=True)
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1:
        raise SystemExit(f"lit-sapo probe: error: --steps must be >= 1, got {args.steps}")
    specs = run_specs([g for g in args.gates.split(",") if g], _pairs(args.taus, "--taus"),
                      _pairs(args.eps, "--eps"), [0])
    for spec in specs:  # a bad gate or temperature fails here, before the model loads
        extra = ({"eps_low": spec["a"], "eps_high": spec["b"]} if spec["kind"] == "eps"
                 else {"tau_pos": spec["a"], "tau_neg": spec["b"]})
        try:
            LossSettings(gate=spec["gate"], **extra)
        except ValueError as err:
            raise SystemExit(f"lit-sapo probe: error: {err}") from None
    module, datamodule = build_run(args.config, overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batch = sample_rollout(module, datamodule, datamodule.seed)
    rows = run_probe(module, batch, specs, args.steps)
    write_csv(out / "probe.csv", rows)
    from lit_sapo.plots import plot_probe

    plot_probe(rows, out / "probe.png")
    datamodule.teardown("fit")
    print(f"lit-sapo probe: wrote {out / 'probe.csv'} and {out / 'probe.png'}", file=sys.stderr)
    return 0 if all(math.isfinite(r["kl"]) for r in rows) else 1
