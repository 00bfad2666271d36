"""The all-resident weight source (`--mode gpu`): every group lives on the compute device.

It is also the reference every streaming mode is compared against, bit for bit.
"""

from __future__ import annotations

import torch

from worker.model.step import Group
from worker.pack.blob import group_views
from worker.pack.groups import RESIDENT, GroupKey, all_groups, fused


class ResidentWeights:
    def __init__(self, groups: dict[GroupKey, Group]):
        self.groups = groups
        self._res = groups[GroupKey(None, RESIDENT)]

    @classmethod
    def from_pack(cls, pack, device: torch.device) -> ResidentWeights:
        n = pack.manifest.model_config.num_hidden_layers
        return cls({key: fused(group_views(pack.manifest, key.name, pack.read_raw(key).to(device)))
                    for key in all_groups(n)})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.groups.values() for t in g.values())

    def resident(self) -> Group:
        return self._res

    def wait(self, layer: int, kind: str) -> Group:
        return self.groups[GroupKey(layer, kind)]

    def release(self, layer: int, kind: str) -> None:
        pass
