"""data.max_staleness: k = 0 is today's loop bit for bit; k >= 1 samples the next rollouts in a background thread
with a copy of the weights (reproducible schedule, staleness bound, decoupled objective, exact resume)."""

import math
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lit_sapo.correction import rollout_correction_weights
from lit_sapo.module import SAPOModule
from lit_sapo.objective import LossSettings, policy_loss
from lit_sapo.rollout import RolloutDataModule
from lit_sapo.sampling.vllm import VLLMSampler
from tests.test_trainer import LENGTH_REWARD, fit, read_metrics, read_records

RUN = ["--trainer.max_steps", "8", "--data.rewards", LENGTH_REWARD]  # 4 rollouts x 2 updates


def comparable(rows: list[dict]) -> list[dict]:
    """Metric rows without wall-clock timings."""
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


class GateRecorder(Callback):
    """Per rollout: the largest |log(pi_theta / pi_old)| of the first update (pi_theta = pi_prox there) and the
    largest |log(pi_prox / pi_behaviour)|, over the loss tokens."""

    def __init__(self) -> None:
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        first = outputs["updates"][0]
        mask = first.terms.mask.bool()
        gap = (outputs["old_logprobs"] - batch.sampler_logprobs)[batch.completion_mask > 0]
        self.rows.append({"gate_log_ratio": float(first.terms.log_ratio[mask].abs().max()),
                          "behaviour_gap": float(gap.abs().max())})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4-rollout run at k = 0 (default and explicit), k = 1 (twice) and k = 2."""
    out = {}
    for name, extra in (("default", []), ("k0", ["--data.max_staleness", "0"]),
                        ("k1", ["--data.max_staleness", "1"]), ("k1_again", ["--data.max_staleness", "1"]),
                        ("k2", ["--data.max_staleness", "2"])):
        path = tmp_path_factory.mktemp(name)
        result = fit(path, *RUN, *extra)
        out[name] = {"path": path, "result": result, "records": read_records(path / "records.jsonl"),
                     "metrics": read_metrics(path)}
    return out


def test_max_staleness_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match=r"^data\.max_staleness: must be an integer >= 0"):
        RolloutDataModule(tokenizer="tiny-random-llama", max_staleness=-1)


def test_a_bad_max_staleness_is_one_line_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path, "--data.max_staleness=-1")
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == "lit-sapo: error: data.max_staleness: must be an integer >= 0 (0 = on-policy), got -1"


def test_k0_explicit_is_the_default_bit_for_bit(runs):
    default, k0 = runs["default"], runs["k0"]
    assert comparable(default["metrics"]) == comparable(k0["metrics"])
    assert [float(r["rollout/staleness"]) for r in k0["metrics"]] == [0.0] * 4
    for a, b in zip(default["records"], k0["records"]):
        assert a["completions"] == b["completions"] and a["loss"] == b["loss"]
        assert a["batch_version"] == a["module_version"]  # strictly on-policy
    assert "in_flight" not in runs["k0"]["result"].datamodule.state_dict()


def test_k1_samples_one_version_behind_and_is_reproducible(runs):
    k0, k1, again = runs["k0"], runs["k1"], runs["k1_again"]
    assert [r["batch_version"] for r in k1["records"]] == [0, 0, 1, 2]
    assert [r["module_version"] for r in k1["records"]] == [0, 1, 2, 3]
    assert [float(r["rollout/staleness"]) for r in k1["metrics"]] == [0.0, 1.0, 1.0, 1.0]
    assert comparable(k1["metrics"]) == comparable(again["metrics"])  # the schedule does not depend on timing
    assert [r["completions"] for r in k1["records"]] == [r["completions"] for r in again["records"]]
    # rollout 0 is sampled by the worker's copy of the same weights with the same seed: the same as at k = 0
    assert k1["records"][0]["completions"] == k0["records"][0]["completions"]
    assert k1["records"][0]["loss"] == k0["records"][0]["loss"]
    # later rollouts are sampled by older weights: the run differs from the on-policy one
    assert k1["records"][1]["loss"] != k0["records"][1]["loss"]
    assert all(math.isfinite(float(r["time/rollout_wait_s"])) for r in k1["metrics"])


def test_k2_schedule(runs):
    k2 = runs["k2"]
    assert [r["batch_version"] for r in k2["records"]] == [0, 0, 0, 1]
    assert [float(r["rollout/staleness"]) for r in k2["metrics"]] == [0.0, 1.0, 2.0, 2.0]


def test_a_rollout_older_than_k_is_refused(runs):
    result = runs["k1"]["result"]
    module, dm = result.model, result.datamodule
    assert module.max_staleness == 1
    dm.setup("fit")  # fit's teardown closed the grader pool
    batch = dm.make_rollout(dm.prompt_batch(0), module)
    module.weight_version += 2  # two updates since the batch was sampled: one more than k
    try:
        with pytest.raises(RuntimeError, match=r"stale rollout: .*more than data\.max_staleness=1 behind"):
            module.training_step(batch, 0)
    finally:
        module.weight_version -= 2
        dm.teardown("fit")


def test_the_gate_acts_on_pi_prox_and_the_behaviour_gap_is_corrected(tmp_path):
    from lit_sapo import cli

    recorder = GateRecorder()
    cli.main(["fit", "--config", str(Path(__file__).parent / "data" / "tiny.yaml"),
              "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
              *RUN, "--data.max_staleness", "1", "--model.rollout_correction", "token_tis"], callbacks=[recorder])
    rows = read_metrics(tmp_path)
    assert len(recorder.rows) == len(rows) == 4
    # rollout 0 is on-policy: no behaviour gap; rollouts 1.. were sampled by the previous weights
    assert float(rows[0]["mismatch/kl"]) < 1e-6
    for row, gate in zip(rows[1:], recorder.rows[1:]):
        # the first update's ratio is against pi_prox (these weights; scored in other batches: float noise) ...
        assert gate["gate_log_ratio"] < 1e-5, recorder.rows
        assert gate["behaviour_gap"] > 1e-3, recorder.rows  # ... not against the stale sampler's log-probs
        assert float(row["mismatch/kl"]) > 1e-6  # the gap goes to the truncated IS weights instead
        assert float(row["mismatch/is_weight_mean"]) != 1.0


def test_decoupled_loss_reduces_to_todays_loss_when_on_policy():
    torch.manual_seed(0)
    logp = torch.randn(4, 6) * 0.1 - 2.0
    prox = logp.detach() + torch.randn(4, 6) * 0.05
    advantages, mask = torch.randn(4), torch.ones(4, 6)
    settings = LossSettings(gate="sigmoid")
    today, _ = policy_loss(logp, prox, advantages, mask, settings)
    for mode in ("token_tis", "seq_tis", "token_mask", "seq_mask"):
        # k = 0: the sampler's weights are the step's weights, pi_behaviour = pi_prox: every weight is 1
        weights, _ = rollout_correction_weights(prox, prox, mask, mode=mode)
        on_policy, _ = policy_loss(logp, prox, advantages, mask, settings, is_weights=weights)
        assert torch.equal(on_policy, today)
    # k = 1: pi_behaviour differs; the gate's ratio is still pi_theta / pi_prox, the weights rescale each token
    behaviour = prox + torch.randn(4, 6) * 0.2
    weights, _ = rollout_correction_weights(prox, behaviour, mask, mode="token_tis")
    _, _, terms = policy_loss(logp, prox, advantages, mask, settings, is_weights=weights, return_terms=True)
    assert torch.allclose(terms.log_ratio, logp - prox)
    assert torch.allclose(weights, (prox - behaviour).exp().clamp(max=2.0))


def test_resume_with_k1_logs_what_an_uninterrupted_run_logs(tmp_path):
    ckpt_args = [*RUN, "--data.max_staleness", "1", "--trainer.enable_checkpointing", "true",
                 "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_top_k=-1"]
    straight = tmp_path / "straight"
    fit(straight, *ckpt_args, f"--trainer.callbacks.dirpath={straight / 'ckpt'}")
    ckpt = sorted((straight / "ckpt").glob("*step=4*.ckpt"))
    assert ckpt, list((straight / "ckpt").iterdir())
    saved = torch.load(ckpt[0], weights_only=True)["RolloutDataModule"]
    assert [s["rollout_index"] for s in saved["in_flight"]] == [2]  # sampled by v1 while rollout 1 trained
    resumed = tmp_path / "resumed"
    fit(resumed, *ckpt_args, f"--trainer.callbacks.dirpath={resumed / 'ckpt'}", "--ckpt_path", str(ckpt[0]))
    full, tail = read_records(straight / "records.jsonl"), read_records(resumed / "records.jsonl")
    assert [r["rollout_index"] for r in tail] == [2, 3]
    for a, b in zip(full[2:], tail):
        assert a["completions"] == b["completions"] and a["batch_version"] == b["batch_version"] == a["rollout_index"] - 1
        assert a["loss"] == b["loss"]
    assert comparable(read_metrics(straight)[2:]) == comparable(read_metrics(resumed))


def test_k1_with_vllm_needs_an_awake_engine_and_one_process():
    sleepy = VLLMSampler()
    sleepy.enable_sleep_mode = True  # what None resolves to on a GPU machine (the constructor refuses it on CPU)
    with pytest.raises(ValueError, match=r"^data\.sampler\.enable_sleep_mode: data\.max_staleness 1 samples while "
                                         r"the trainer updates.*set enable_sleep_mode: false"):
        RolloutDataModule(tokenizer="tiny-random-llama", sampler=sleepy, max_staleness=1)
    vllm_dm = RolloutDataModule(tokenizer="tiny-random-llama", sampler=VLLMSampler(), max_staleness=1,
                                prompts_per_step=2)
    with pytest.raises(ValueError, match=r"^data\.max_staleness: 1 with VLLMSampler runs in one process only, "
                                         r"got 2; use lit_sapo\.sampling\.HFSampler"):
        SAPOModule().bind_run(Trainer(accelerator="cpu", devices=2, logger=False, enable_checkpointing=False), vllm_dm)
    hf_dm = RolloutDataModule(tokenizer="tiny-random-llama", max_staleness=1, prompts_per_step=2)
    # HFSampler in several processes (FSDP2): each rank keeps a full copy (tests/test_distributed.py runs it)
    for dm, devices in ((hf_dm, 2), (hf_dm, 1), (vllm_dm, 1)):
        module = SAPOModule()  # no model is loaded before configure_model
        module.bind_run(Trainer(accelerator="cpu", devices=devices, logger=False, enable_checkpointing=False), dm)
        assert module.max_staleness == 1


def test_sigterm_while_the_worker_grades_saves_and_exits(tmp_path):
    """k = 1: rollout 1 hangs in its reward on the worker thread while the trainer saves after rollout 0 (the save
    waits for the in-flight rollout, so no metrics row is flushed yet). SIGTERM ends the wait, the checkpoint holds
    no unfinished rollout, and the run exits 143 within seconds."""
    import signal
    import subprocess

    from tests.test_faults import _rollouts_in, _start_fit

    proc = _start_fit(tmp_path, "--data.reward_timeout", "600", "--data.max_staleness", "1",
                      rewards={"tests.faults.HangsAfterFirstCall": 1.0})
    time.sleep(20.0)  # the tiny run trains rollout 0 in a few seconds; then the worker is stuck grading rollout 1
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("SIGTERM did not end the run within 30 s")
    assert proc.returncode == 143, err[-2000:]
    assert time.monotonic() - sent < 30
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)["RolloutDataModule"]
    assert _rollouts_in(last) == 1 and state["in_flight"] == []  # rollout 1 is sampled again on resume
