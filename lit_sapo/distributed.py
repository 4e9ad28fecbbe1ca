"""FSDP2 (`fully_shard`) plan for a HF causal LM, used by SAPOModule.configure_model under ModelParallelStrategy.

One code path for CPU (gloo, tests) and GPU (NCCL): each decoder layer is its own FSDP unit, then the root holds
the embeddings, final norm and output head.

Precision: parameters (the master weights, and so AdamW's state) keep their load dtype, fp32 for training. With a
compute dtype (bf16) FSDP2 casts the gathered parameters to it for forward and backward, and reduces and stores the
gradients in fp32 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`). See docs/distributed.md.

HSDP: with `replicate` > 1 the data-parallel ranks form a 2D mesh (replicate, shard): parameters are sharded within
a group of `world / replicate` consecutive ranks (one node) and replicated across groups, so the all-gathers stay
inside a node and only the gradient all-reduce crosses nodes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lit_sapo.models import DTYPES, decoder_layers

# name parts that torch.compile, activation checkpointing and FSDP1 wrappers add to parameter names
WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """The parameter name of the bare model (as in its state dict on disk) for a wrapped model's name."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def compute_dtype_for(setting: str | None, param_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The forward/backward dtype: the setting if given, else bf16 on GPU and the parameter dtype elsewhere."""
    if setting is not None:
        return DTYPES[setting]
    return torch.bfloat16 if device_type == "cuda" else param_dtype


def mixed_precision_policy(param_dtype: torch.dtype, compute_dtype: torch.dtype) -> MixedPrecisionPolicy:
    if compute_dtype == param_dtype:
        return MixedPrecisionPolicy()
    # gradients are reduced in fp32 (a bf16 sum over many ranks loses bits) and land in the fp32 parameters
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)


def data_parallel_mesh(mesh, replicate: int = 1):
    """The mesh `fully_shard` gets: the data-parallel dim of Lightning's mesh, or a 2D (replicate, shard) one."""
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        # the rollout stream gives every rank its own prompts: a TP group would need identical inputs
        raise ValueError(f"trainer.strategy: tensor parallelism is not supported; set tensor_parallel_size: 1 and "
                         f"data_parallel_size: {mesh.size()} (the number of processes)")
    dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    if replicate <= 1:
        return dp_mesh
    world = dp_mesh.size()
    if world % replicate:
        raise ValueError(f"model.model.fsdp_replicate: {replicate} does not divide the {world} data-parallel "
                         "processes; use the number of nodes")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(dp_mesh.device_type, (replicate, world // replicate),
                            mesh_dim_names=("replicate", "shard"))


def shard_policy(model: nn.Module, mesh, *, activation_checkpointing: bool = False,
                 compute_dtype: torch.dtype | None = None, replicate: int = 1) -> nn.Module:
    """Shard `model` in place over `mesh` (each decoder layer, then the root) and return it.

    `compute_dtype`: None = the parameters' dtype (no casting); bf16 with fp32 parameters = mixed precision.
    """
    dp_mesh = data_parallel_mesh(mesh, replicate)
    param_dtype = next(model.parameters()).dtype
    mp = mixed_precision_policy(param_dtype, compute_dtype or param_dtype)
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


def fill_from_rank0(model: nn.Module, full_state: dict | None) -> None:
    """After `shard_policy`: ranks > 0 built `model` on the meta device; give them storage and rank 0's weights.

    Rank 0 passes its full state dict (read before sharding), the others None. One tensor at a time, rank 0's
    full tensor is scattered as the parameter's shards (`distribute_tensor(src_data_rank=0)`), so no rank holds
    more than its shards plus one full tensor. Buffers (rotary tables and other non-persistent tensors, which no
    state dict holds) are broadcast whole."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    rank0 = dist.get_rank() == 0
    device = _mesh_device(model)
    if not rank0:
        model.to_empty(device=device)
    done: set[int] = set()
    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            if id(target) in done:  # a tied weight, filled under its first name
                continue
            done.add(id(target))
            key = unwrapped_name(name)
            if isinstance(target, DTensor):
                src = full_state[key].to(device, target.dtype) if rank0 else \
                    torch.empty(target.shape, dtype=target.dtype, device=device)
                shard = distribute_tensor(src, target.device_mesh, target.placements, src_data_rank=0)
                target.to_local().copy_(shard.to_local())
                del src, shard
            else:
                if rank0:
                    target.copy_(full_state[key])
                dist.broadcast(target.data, src=0)
        for _, buffer in model.named_buffers():
            dist.broadcast(buffer, src=0)


def _mesh_device(model: nn.Module) -> torch.device:
    param = next(model.parameters())
    mesh = getattr(param, "device_mesh", None)
    if mesh is None or mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.accelerator.current_device_index()
                        if hasattr(torch, "accelerator") else torch.cuda.current_device())


def _parent_list(model: nn.Module, layer: nn.Module) -> nn.ModuleList:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and any(m is layer for m in module):
            return module
    raise ValueError("decoder layers are not held in a ModuleList")
