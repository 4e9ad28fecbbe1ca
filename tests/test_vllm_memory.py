"""The vLLM memory share from what the engine needs, at a Qwen2.5-7B shape on 40 GB and 80 GB devices (no GPU)."""

import pytest
import torch

from lit_sapo.sampling.vllm_memory import OVERHEAD_BYTES, engine_memory_bytes, kv_bytes_per_token, memory_fraction

GB = 10 ** 9


@pytest.fixture(scope="module")
def qwen7b():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                         max_position_embeddings=32768)
    with torch.device("meta"):
        num_params = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    return config, num_params


def test_qwen7b_need_and_share_on_40_and_80_gb(qwen7b):
    config, num_params = qwen7b
    assert num_params == 7_615_616_512
    assert kv_bytes_per_token(config, "bfloat16") == 2 * 28 * 4 * 128 * 2  # 56 KiB: K and V, 28 layers, 4 KV heads
    # 64 sequences (8 prompts x 8 completions) of 1024 prompt + 1024 completion tokens, bf16
    need = engine_memory_bytes(num_params, config, "bfloat16", max_model_len=2048, max_num_seqs=64)
    weights, kv = num_params * 2, 57344 * 64 * 2048
    assert need == weights + kv + OVERHEAD_BYTES
    assert round(weights / GB, 1) == 15.2 and round(kv / GB, 1) == 7.5
    assert memory_fraction(need, 80 * GB) == 0.32
    assert memory_fraction(need, 40 * GB) == 0.63  # vs the old fixed 0.35: 14 GB, less than the weights alone
    # on a 40 GB device with the trainer's shards resident, only what is free counts: one line, named setting
    with pytest.raises(ValueError, match=r"^data\.sampler\.gpu_memory_utilization: the vLLM engine needs 23\.2 GiB"):
        memory_fraction(need, 40 * GB, free_bytes=20 * GB)
    assert memory_fraction(need, 80 * GB, free_bytes=60 * GB) == 0.32
    # an explicit KV size (data.sampler.kv_cache_gib) replaces the batch x length estimate
    assert engine_memory_bytes(num_params, config, "bfloat16", 2048, 64, kv_cache_bytes=0) == weights + OVERHEAD_BYTES


def test_fp32_engine_doubles_weights_and_kv(qwen7b):
    config, num_params = qwen7b
    bf16 = engine_memory_bytes(num_params, config, "bfloat16", 2048, 64) - OVERHEAD_BYTES
    fp32 = engine_memory_bytes(num_params, config, "float32", 2048, 64) - OVERHEAD_BYTES
    assert fp32 == 2 * bf16
    with pytest.raises(ValueError, match="data.sampler.dtype"):
        engine_memory_bytes(num_params, config, "int3", 2048, 64)
