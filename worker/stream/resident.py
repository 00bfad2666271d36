"""The all-resident weight source (`--mode gpu`): every group lives on the compute device.

It is also the reference every streaming mode is compared against, bit for bit.
"""

from __future__ import annotations

import torch

from worker.config import StreamConfig
from worker.host.walltime import Spans
from worker.model.step import Group
from worker.pack.groups import RESIDENT, GroupKey
from worker.stream.ssd import SSDReader
from worker.stream.upload import Upload, device_keys


class ResidentWeights:
    def __init__(self, groups: dict[GroupKey, Group]):
        self.groups = groups
        self._res = groups[GroupKey(None, RESIDENT)]

    upload: dict | None = None  # the load's stats (worker.stream.upload), for the run's setup

    @classmethod
    def from_pack(cls, pack, device: torch.device, cfg: StreamConfig, span: Spans) -> ResidentWeights:
        """Every group read on a reader of the SSD tier's settings and copied whole to `device` as its
        reads finish (worker.stream.upload)."""
        n = pack.manifest.model_config.num_hidden_layers
        reader = SSDReader(pack.blob_path, cfg.ssd_readers, cfg.staging_mb << 20)
        try:
            with span("upload_issue"):
                upload = Upload(pack, device_keys(list(range(n))), reader, device, host_embeddings=False)
            with span("upload_wait"):
                out = cls(upload.result())
        finally:
            reader.close()
        out.upload = upload.stats.to_dict()
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.groups.values() for t in g.values())

    def resident(self) -> Group:
        return self._res

    def wait(self, layer: int, kind: str) -> Group:
        return self.groups[GroupKey(layer, kind)]

    def release(self, layer: int, kind: str) -> None:
        pass
