"""The FSDP2 plan's settings check (the 2-process behaviour is in tests/test_distributed.py)."""

import pytest
from torch import nn

from lit_sapo.distributed import shard_policy
from lit_sapo.models import plain_class


class _Mesh:
    """Stands in for a DeviceMesh: named dims of given sizes."""

    def __init__(self, **sizes):
        self.sizes = sizes
        self.mesh_dim_names = tuple(sizes)

    def __getitem__(self, name):
        return _Mesh(**{name: self.sizes[name]})

    def size(self):
        n = 1
        for v in self.sizes.values():
            n *= v
        return n


def test_tensor_parallel_mesh_is_refused_with_the_setting_to_use():
    with pytest.raises(ValueError, match="tensor_parallel_size: 1 and data_parallel_size: 8"):
        shard_policy(nn.Linear(2, 2), _Mesh(data_parallel=2, tensor_parallel=4))


def test_plain_class_sees_through_fsdp_subclasses():
    from torch.distributed.fsdp import FSDPModule

    module = nn.Linear(2, 2)
    module.__class__ = type("FSDPLinear", (FSDPModule, nn.Linear), {})  # what fully_shard does
    assert plain_class(module) is nn.Linear
    assert plain_class(nn.Linear(2, 2)) is nn.Linear


def test_bf16_parameters_under_adamw_are_refused_in_one_line_naming_the_fix():
    from lit_sapo.module import SAPOModule
    from lit_sapo.models import ModelSpec

    with pytest.raises(ValueError, match=r"^model\.model\.dtype: bf16 .*compute_dtype: bf16.*allow_bf16_params: true$"):
        SAPOModule(model=ModelSpec(name="tiny-random-llama", dtype="bf16"))
    SAPOModule(model=ModelSpec(name="tiny-random-llama", dtype="bf16", allow_bf16_params=True))  # the user means it
    SAPOModule(model=ModelSpec(name="tiny-random-llama", dtype="fp32", compute_dtype="bf16"))


def test_compute_dtype_defaults_to_bf16_on_gpu_and_the_parameter_dtype_on_cpu():
    import torch

    from lit_sapo.distributed import compute_dtype_for, mixed_precision_policy

    assert compute_dtype_for(None, torch.float32, "cuda") == torch.bfloat16
    assert compute_dtype_for(None, torch.float32, "cpu") == torch.float32
    assert compute_dtype_for("bf16", torch.float32, "cpu") == torch.bfloat16
    assert compute_dtype_for("fp32", torch.float32, "cuda") == torch.float32
    mp = mixed_precision_policy(torch.float32, torch.bfloat16)
    assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32
    assert mixed_precision_policy(torch.float32, torch.float32).param_dtype is None


def test_hsdp_replicate_must_divide_the_ranks():
    with pytest.raises(ValueError, match="fsdp_replicate: 3 does not divide the 4"):
        from lit_sapo.distributed import data_parallel_mesh

        data_parallel_mesh(_Mesh(data_parallel=4, tensor_parallel=1), replicate=3)


def test_validate_runs_without_inference_mode_by_default(capsys):
    # FSDP2 unsharding under NCCL did not support torch.inference_mode: the CLI's trainer default is no_grad
    from pathlib import Path

    from lit_sapo import cli

    tiny = Path(__file__).parent / "data" / "tiny.yaml"
    with pytest.raises(SystemExit):
        cli.main(["validate", "--config", str(tiny), "--print_config"])
    out = capsys.readouterr().out
    assert "inference_mode: false" in out
