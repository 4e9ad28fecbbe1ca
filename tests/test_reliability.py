"""Faults that must not poison a run: a non-finite gradient is skipped, never applied, never saved."""

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from lit_sapo import cli

ROOT = Path(__file__).resolve().parents[1]


class InfGradient(Callback):
    """Makes every gradient of the policy inf from the given rollout on (a real backward hook, not a mock)."""

    def __init__(self, from_rollout: int = 1) -> None:
        self.from_rollout = from_rollout
        self.weights_before = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.from_rollout:
            self.weights_before = {k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()}
            for p in pl_module.policy.parameters():
                p.register_hook(lambda g: torch.full_like(g, float("inf")))


def _fit(tmp_path, *extra, callbacks=()):
    return cli.main(["fit", "--config", str(ROOT / "tests" / "data" / "tiny.yaml"),
                     "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
                     "--data.rewards", json.dumps({"tests.recorders.LengthReward": 1.0}), *extra],
                    callbacks=list(callbacks))


def test_a_non_finite_gradient_skips_the_step_and_stops_the_run_after_n_in_a_row(tmp_path, capsys):
    inf = InfGradient(from_rollout=1)
    result = _fit(tmp_path, "--trainer.max_steps", "20", "--model.max_skipped_steps", "2", callbacks=[inf])
    module, trainer = result.model, result.trainer
    # rollout 1's two optimizer steps are skipped: the weights after it are those before it, and the run stops
    after = module.policy.state_dict()
    assert all(torch.equal(after[k], v) for k, v in inf.weights_before.items())
    assert module.skipped_steps == 2 and trainer.global_step == 4 and trainer.should_stop
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 2.0
    assert "2 optimizer steps in a row had a non-finite gradient norm" in capsys.readouterr().out
    # AdamW's moments hold no inf/nan either
    for state in trainer.optimizers[0].state.values():
        assert all(torch.isfinite(t).all() for t in state.values() if torch.is_tensor(t))


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    result = _fit(tmp_path, "--trainer.max_steps", "2")
    module = result.model
    with torch.no_grad():
        next(module.policy.parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="non-finite weights"):
        result.trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling this writes a file: code execution
        return (open, (self.marker, "w"))


def test_export_refuses_a_checkpoint_with_a_pickle_payload(tmp_path):
    from lit_sapo.export import export_checkpoint

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "evil": _Payload(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        export_checkpoint(tmp_path / "evil.ckpt", tmp_path / "out", model="tiny-random-llama")
    assert not marker.exists()


def test_collapse_watch_warns_once_naming_the_rollout_and_stops_a_run_at_lr_1e6(tmp_path):
    from lit_sapo.callbacks import CollapseWatch

    watch = CollapseWatch(stop=True, ratio_max=1e30)  # only the entropy condition may fire
    with pytest.warns(UserWarning, match=r"collapse: rollout \d+: train/entropy .* of log\(V\)") as record:
        # SmolLM2 (a trained model: its entropy starts far below log V), tiny rollouts
        result = _fit(tmp_path, "--trainer.max_steps", "40", "--model.optimizer.lr", "1e6",
                      "--model.max_grad_norm", "1e9", "--model.model.name", "smollm2-135m-instruct",
                      callbacks=[watch])
    assert list(watch.fired) == ["entropy"]
    assert sum("collapse:" in str(w.message) for w in record) == 1  # once, not once per rollout
    trainer = result.trainer
    assert trainer.should_stop and trainer.global_step < 40
    vocab = result.model.head.weight.shape[0]
    ratio = float(trainer.callback_metrics["collapse/entropy_vs_uniform"])
    assert ratio >= 0.95 and float(trainer.callback_metrics["train/entropy"]) <= math.log(vocab) + 1e-3


def test_collapse_watch_is_silent_on_a_healthy_run_and_validates_its_settings(tmp_path):
    from lit_sapo.callbacks import CollapseWatch

    watch = CollapseWatch(stop=True)  # the tiny random model sits at log V from the start: not a collapse
    result = _fit(tmp_path, "--trainer.max_steps", "4", callbacks=[watch])
    assert watch.fired == {} and result.trainer.global_step == 4
    assert float(result.trainer.callback_metrics["collapse/conditions"]) == 0.0
    for bad, field in [({"entropy_frac": 0.0}, "entropy_frac"), ({"ratio_max": 1.0}, "ratio_max"),
                       ({"zero_variance_rollouts": 0}, "zero_variance_rollouts")]:
        with pytest.raises(ValueError, match=f"CollapseWatch.{field}"):
            CollapseWatch(**bad)
