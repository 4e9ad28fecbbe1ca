"""FSDP2 (`fully_shard`) plan for a HF causal LM, used by SAPOModule.configure_model under ModelParallelStrategy.

One code path for CPU (gloo, tests) and GPU (NCCL): each decoder layer is its own FSDP unit, then the root holds
the embeddings, final norm and output head. Mixed precision (bf16 compute, fp32 reduce) only on GPU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lit_sapo.models import decoder_layers


def shard_policy(model: nn.Module, mesh, *, activation_checkpointing: bool = False,
                 mixed_precision: bool | None = None) -> nn.Module:
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        # the rollout stream gives every rank its own prompts: a TP group would need identical inputs
        raise ValueError(f"trainer.strategy: tensor parallelism is not supported; set tensor_parallel_size: 1 and "
                         f"data_parallel_size: {mesh.size()} (the number of processes)")
    dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    on_gpu = dp_mesh.device_type == "cuda"
    use_mp = on_gpu if mixed_precision is None else mixed_precision
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_mp else MixedPrecisionPolicy()
    layers = decoder_layers(model)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        parent = _parent_list(model, layers[0])
        for i, layer in enumerate(layers):
            parent[i] = checkpoint_wrapper(layer)
        layers = list(parent)
    for layer in layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    return model


def _parent_list(model: nn.Module, layer: nn.Module) -> nn.ModuleList:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and any(m is layer for m in module):
            return module
    raise ValueError("decoder layers are not held in a ModuleList")
