"""How much device memory a colocated vLLM engine needs, as the `gpu_memory_utilization` fraction vLLM takes.

vLLM's `gpu_memory_utilization` is the share of the device's TOTAL memory the engine may hold: weights, its
profiled activation peak (and CUDA graphs), and the KV cache, which gets whatever is left of that share. A fixed
fraction is wrong on every GPU but one (0.35 of 40 GB is less than 7B bf16 weights); here the share is sized from
what the rollout needs:

    need = num_params * dtype_bytes                                   (weights)
         + 2 * layers * kv_heads * head_dim * kv_dtype_bytes * batch * max_model_len   (K and V of every token)
         + OVERHEAD_BYTES                                            (activation peak, graphs, sampler buffers)
    fraction = need / total

Pure arithmetic (no torch.cuda, no vLLM): unit-tested with a Qwen2.5-7B-shaped config.
"""

from __future__ import annotations

import math

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2}
# vLLM's profile run (max_num_batched_tokens of activations, the sampler's logits), CUDA graphs and allocator
# slack: ~1 GiB measured by vLLM's own start-up log for 7B models; 2 GiB leaves room.
OVERHEAD_BYTES = 2 * 2 ** 30


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"data.sampler.dtype: unknown dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)}") from None


def kv_bytes_per_token(config, dtype: str) -> int:
    """K and V of one token over all layers, from a HF config (text config of multimodal ones)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes(dtype)


def engine_memory_bytes(num_params: int, config, dtype: str, max_model_len: int, max_num_seqs: int,
                        kv_cache_bytes: int | None = None) -> int:
    """Bytes the engine needs: weights + KV for `max_num_seqs` sequences of `max_model_len` tokens + overhead."""
    weights = num_params * dtype_bytes(dtype)
    kv = kv_cache_bytes if kv_cache_bytes is not None else \
        kv_bytes_per_token(config, dtype) * max_num_seqs * max_model_len
    return weights + kv + OVERHEAD_BYTES


def memory_fraction(need_bytes: int, total_bytes: int, free_bytes: int | None = None) -> float:
    """`gpu_memory_utilization` for `need_bytes` on a device of `total_bytes`, rounded up to 0.01.

    Raises one line when it is more than the device has (or than is free right now, when `free_bytes` is given:
    vLLM refuses to start when the share exceeds the free memory)."""
    fraction = math.ceil(need_bytes / total_bytes * 100) / 100
    available = total_bytes if free_bytes is None else free_bytes
    if need_bytes > available:
        raise ValueError(
            f"data.sampler.gpu_memory_utilization: the vLLM engine needs {need_bytes / 2 ** 30:.1f} GiB (weights + KV "
            f"cache for the rollout batch x max_model_len), {fraction:.2f} of the device's {total_bytes / 2 ** 30:.1f} "
            f"GiB, but only {available / 2 ** 30:.1f} GiB is {'free' if free_bytes is not None else 'there'}; lower "
            "data.prompts_per_step / data.num_generations / max_model_len, shard the trainer over more devices, "
            "or set data.sampler.gpu_memory_utilization explicitly")
    return min(fraction, 1.0)
