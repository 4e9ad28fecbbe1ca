"""FSDP2 under Lightning's ModelParallelStrategy, for real: 2 CPU processes over gloo.

Lightning relaunches the current command for extra ranks, so every multi-process run is a subprocess
(torch.distributed.run, or `python -m lit_sapo.cli fit` with devices: 2, where Lightning starts rank 1 itself);
the runs write JSON / CSV / checkpoints that the tests read. ~2.5 minutes on 2 cores.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"
sys.path.insert(0, str(SCRIPTS))
from dist_helpers import fixed_tokens  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    drop = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
            "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("TORCHELASTIC", "PL_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(SCRIPTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _run(args: list[str], log: Path, timeout: int = 240) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(args, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n" + log.read_text()[-4000:]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}",
            *args]


# ---- 3. gradients of 2 processes == 1 process ------------------------------------------------------------------

@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity")
    _run([sys.executable, str(SCRIPTS / "dist_grad_parity.py"), str(out)], out / "world1.log")
    _run(_torchrun(str(SCRIPTS / "dist_grad_parity.py"), str(out)), out / "world2.log")
    return {w: (json.loads((out / f"world{w}.json").read_text()), torch.load(out / f"world{w}.pt"))
            for w in (1, 2)}


def test_two_processes_shard_the_policy_and_keep_the_embedding_tied(parity):
    (one, _), (two, _) = parity[1], parity[2]
    assert not one["sharded"] and two["sharded"]
    assert two["tied"] and one["tied"]
    assert one["weight_version"] == two["weight_version"] == 3


def test_two_process_gradients_equal_one_process(parity):
    (one, grads1), (two, grads2) = parity[1], parity[2]
    assert len(grads1) == len(grads2) == 6  # 3 rollouts x 2 inner updates
    for step, (g1, g2) in enumerate(zip(grads1, grads2)):
        assert g1.keys() == g2.keys()
        assert max(g.abs().max().item() for g in g1.values()) > 1e-2, "degenerate test: zero gradients"
        worst = max((g1[k] - g2[k]).abs().max().item() for k in g1)
        assert worst < 1e-5, f"optimizer step {step}: gradients differ by {worst}"
    # the global grad norm over the shards (DTensor) is the single-process norm; it is > 1, so clipping acted
    assert min(one["grad_norms"]) > 1.0
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-5)
    assert len(one["losses"]) == 3
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)


# ---- 4, 5. lit-sapo fit with configs/cpu-2proc-fsdp.yaml: checkpoint, resume, export ---------------------------

OVERLAY = """
trainer:
  max_steps: 8          # 4 rollouts x 2 minibatches
  default_root_dir: {root}
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: logs}}
  callbacks:            # same order as the base config: jsonargparse merges list items by position
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/checkpoints, every_n_train_steps: 4, save_top_k: -1, filename: "{{step}}"}}
    - class_path: lit_sapo.export.ExportHF
    - class_path: dist_helpers.LogprobProbe
      init_args: {{path: {root}/probe.json}}
model:
  model: {{name: tiny-random-llama}}
  optimizer: {{lr: 1.0e-3, warmup_steps: 0}}
data:
  rewards: {{dist_helpers.char_reward: 1.0}}
  sampler:
    class_path: lit_sapo.sampling.HFSampler
    init_args: {{max_new_tokens: 8}}
"""


def _fit_args(root: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "overlay.yaml").write_text(OVERLAY.format(root=root))
    return ["-m", "lit_sapo.cli", "fit", "--config", "configs/cpu-2proc-fsdp.yaml", "--config",
            str(root / "overlay.yaml")]


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    base = tmp_path_factory.mktemp("fit")
    straight, resumed = base / "straight", base / "resumed"
    # 4 rollouts uninterrupted; Lightning starts the second process itself (devices: 2 in the config)
    _run([sys.executable, *_fit_args(straight)], base / "straight.log")
    # the same run resumed from its own checkpoint after rollout 2, under torchrun
    ckpt = straight / "checkpoints" / "step=4.ckpt"
    _run(_torchrun(*_fit_args(resumed), "--ckpt_path", str(ckpt)), base / "resumed.log")
    return straight, resumed


def _metrics(root: Path) -> dict[int, dict[str, float]]:
    rows = {}
    for path in sorted((root / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("rollout/step"):
                rows[int(float(row["rollout/step"]))] = {k: float(v) for k, v in row.items() if v != ""}
    return rows


def test_checkpoint_is_sharded_and_holds_the_stream_and_weight_version(fits):
    straight, _ = fits
    ckpt = straight / "checkpoints" / "step=4.ckpt"
    assert ckpt.is_dir()
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= {p.name for p in ckpt.iterdir()}
    meta = torch.load(ckpt / "meta.pt", weights_only=False)
    assert meta["RolloutDataModule"]["rollouts_consumed"] == 2
    assert meta["lit_sapo"]["weight_version"] == 2
    assert meta["global_step"] == 4


def test_resumed_run_continues_like_the_uninterrupted_one(fits):
    straight, resumed = fits
    a, b = _metrics(straight), _metrics(resumed)
    assert sorted(a) == [1, 2, 3, 4]
    assert sorted(b) == [3, 4]  # the stream restarts at rollout 3, not at 1
    assert len({a[k]["reward/mean"] for k in a}) > 1, "degenerate test: constant reward"
    for k in (3, 4):
        assert b[k]["rollout/weight_version"] == a[k]["rollout/weight_version"] == k - 1
        for key in ("reward/mean", "train/loss", "completion/len_mean", "train/grad_norm", "train/ratio_var",
                    "train/lr"):
            assert b[k][key] == pytest.approx(a[k][key], abs=1e-6), (k, key)
        assert a[k]["train/loss"] != 0.0


def _hf_logprobs(folder: Path) -> tuple[torch.Tensor, object]:
    """Token log-probs of the probe batch from a HF folder, through plain transformers logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    p_ids, p_mask, c_ids, c_mask = fixed_tokens(4, 6, 5, seed=123)
    ids, attention = torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask.long()], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention,
                       position_ids=(attention.cumsum(-1) - 1).clamp(min=0)).logits.float()
    logp = logits[:, p_ids.shape[1] - 1:-1].log_softmax(-1).gather(-1, c_ids[..., None])[..., 0]
    return logp, model


def test_exported_hf_folder_gives_the_trained_policys_logprobs(fits):
    straight, _ = fits
    probe = json.loads((straight / "probe.json").read_text())
    assert probe["weight_version"] == 4
    logp, model = _hf_logprobs(straight / "hf_model")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (straight / "hf_model" / "tokenizer.json").exists()
    assert torch.allclose(logp, torch.tensor(probe["logprobs"]), atol=1e-5, rtol=0)


def test_export_from_the_sharded_checkpoint_of_the_resumed_run(fits, tmp_path):
    from lit_sapo.export import export_checkpoint

    straight, resumed = fits
    out = export_checkpoint(resumed / "checkpoints" / "step=8.ckpt", tmp_path / "hf")
    logp, _ = _hf_logprobs(out)
    # resumed at rollout 3, it ends with the weights of the uninterrupted run
    for root in (straight, resumed):
        assert torch.allclose(logp, torch.tensor(json.loads((root / "probe.json").read_text())["logprobs"]),
                              atol=1e-5, rtol=0)


# ---- HSDP: a 2 x 2 (replicate, shard) mesh on 4 processes ------------------------------------------------------

def test_hsdp_2x2_gradients_equal_one_process(tmp_path):
    script = str(SCRIPTS / "dist_hsdp_parity.py")
    _run([sys.executable, script, str(tmp_path)], tmp_path / "world1.log")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", f"--master-port={_free_port()}",
          script, str(tmp_path)], tmp_path / "world4.log")
    one, four = torch.load(tmp_path / "world1.pt"), torch.load(tmp_path / "world4.pt")
    assert four["mesh"] == [2, 2] and four["placements"] == ["R", "S(0)"]  # replicated over dim 0, sharded over 1
    assert max(g.abs().max().item() for g in one["grads"].values()) > 1e-2, "degenerate test: zero gradients"
    worst = max((one["grads"][k] - four["grads"][k]).abs().max().item() for k in one["grads"])
    assert worst < 1e-5, f"HSDP gradients differ from one process by {worst}"


def test_rank0_loads_and_broadcasts_the_shards_the_others_build_on_meta():
    """model.model.load_on_rank0 (the default): rank 1 never reads the weights, yet its shards and buffers equal
    the weights on disk (tests/benchmarks/load_memory.py measures the host memory this saves)."""
    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    from load_memory import run

    report = run("tiny-random-llama", load_on_rank0=True)
    assert report["ranks"][0]["max_abs_diff_vs_disk"] == 0.0
    assert report["buffers_equal"]
    assert [r["local_param_mb"] for r in report["ranks"]][0] == report["ranks"][1]["local_param_mb"]


# ---- asynchronous rollouts (data.max_staleness 1) under FSDP2 ----------------------------------------------------

ASYNC_OVERLAY = OVERLAY.replace("""      init_args: {{path: {root}/probe.json}}
""", """      init_args: {{path: {root}/probe.json}}
    - class_path: tests.recorders.RolloutRecorder
      init_args: {{path: "{root}/rollouts-rank{{rank}}.jsonl"}}
""") + "  max_staleness: 1\n"


@pytest.fixture(scope="module")
def async_fits(tmp_path_factory):
    base = tmp_path_factory.mktemp("async")
    straight, resumed = base / "straight", base / "resumed"
    for root in (straight, resumed):
        root.mkdir()
        (root / "overlay.yaml").write_text(ASYNC_OVERLAY.format(root=root))
    args = ["-m", "lit_sapo.cli", "fit", "--config", "configs/cpu-2proc-fsdp.yaml", "--config"]
    _run([sys.executable, *args, str(straight / "overlay.yaml")], base / "straight.log")
    # resumed after rollout 2 from the sharded checkpoint: rollout 3 was in flight (sampled by v1) when it was saved
    _run(_torchrun(*args, str(resumed / "overlay.yaml"), "--ckpt_path", str(straight / "checkpoints" / "step=4.ckpt")),
         base / "resumed.log")
    return straight, resumed


def _records(root: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (root / f"rollouts-rank{rank}.jsonl").read_text().splitlines()]


def test_async_rollouts_keep_one_schedule_on_every_fsdp_rank(async_fits):
    straight, _ = async_fits
    ranks = [_records(straight, r) for r in (0, 1)]
    for records in ranks:
        # rollout m sampled by weights v max(0, m - 1), trained at v m: staleness 0, 1, 1, 1
        assert [r["batch_version"] for r in records] == [0, 0, 1, 2]
        assert [r["module_version"] for r in records] == [0, 1, 2, 3]
    assert ranks[0][1]["prompts"] != ranks[1][1]["prompts"]  # each rank samples its own shard of the prompts
    rows = _metrics(straight)
    assert [rows[k]["rollout/staleness"] for k in (1, 2, 3, 4)] == [0.0, 1.0, 1.0, 1.0]
    assert all(rows[k]["train/loss"] != 0.0 for k in (2, 3, 4))


def test_async_fsdp_resume_trains_the_checkpointed_in_flight_rollouts(async_fits):
    straight, resumed = async_fits
    for rank in (0, 1):  # each rank gets back its own in-flight rollout, then samples the next like the straight run
        a, b = _records(straight, rank)[2:], _records(resumed, rank)
        assert [r["rollout_index"] for r in b] == [2, 3]
        for x, y in zip(a, b):
            assert (x["batch_version"], x["completions"], x["rewards"]) == (y["batch_version"], y["completions"],
                                                                            y["rewards"])
            assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)
    a, b = _metrics(straight), _metrics(resumed)
    for k in (3, 4):
        for key in ("reward/mean", "train/loss", "train/grad_norm", "rollout/staleness"):
            assert b[k][key] == pytest.approx(a[k][key], abs=1e-6), (k, key)
