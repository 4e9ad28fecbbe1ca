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
