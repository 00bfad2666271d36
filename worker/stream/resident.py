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
    def __init__(self, groups: dict[GroupKey, Group] | None = None):
        self.groups: dict[GroupKey, Group] = {}
        self._pending: tuple[Upload, SSDReader] | None = None
        if groups is not None:
            self._set(groups)

    upload: dict | None = None  # the load's stats (worker.stream.upload), for the run's setup

    @classmethod
    def from_pack(cls, pack, device: torch.device, cfg: StreamConfig, span: Spans) -> ResidentWeights:
        """Every group read on a reader of the SSD tier's settings and copied whole to `device` as its
        reads finish (worker.stream.upload). The load is started here and waited for in `finish`, which
        the engine calls after building the model, so the two overlap."""
        n = pack.manifest.model_config.num_hidden_layers
        reader = SSDReader(pack.blob_path, cfg.ssd_readers, cfg.staging_mb << 20)
        out = cls()
        try:
            with span("upload_issue"):
                out._pending = (Upload(pack, device_keys(list(range(n))), reader, device, host_embeddings=False,
                                       populate=cfg.warm_page_cache), reader)
        except BaseException:
            reader.close()
            raise
        return out

    def finish(self) -> None:
        """Wait for the load `from_pack` started (or raise its error)."""
        if self._pending is None:
            return
        (upload, reader), self._pending = self._pending, None
        try:
            self._set(upload.result())
        finally:
            self.upload = upload.stats.to_dict()
            reader.close()

    def close(self) -> None:
        """A build that failed before `finish`: no read left in flight, the reader closed."""
        if self._pending is not None:
            (upload, reader), self._pending = self._pending, None
            upload.close()
            reader.close()

    def _set(self, groups: dict[GroupKey, Group]) -> None:
        self.groups = groups
        self._res = groups[GroupKey(None, RESIDENT)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.groups.values() for t in g.values())

    def resident(self) -> Group:
        return self._res

    def wait(self, layer: int, kind: str) -> Group:
        return self.groups[GroupKey(layer, kind)]

    def release(self, layer: int, kind: str) -> None:
        pass
