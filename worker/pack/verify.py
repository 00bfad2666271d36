"""Is a pack's blob still the bytes that were packed? Full checksums rarely, a cheap check every load.

Full verification (sha256 of every group: `verify_pack`, `bench verify`) reads the whole blob, so
it runs once per pack (the packer's own checksums count as one), again when the last one is older
than the run's `pack_verify_days`, and never on the hot path. Its record, `<manifest>.verified`, is
tied to the manifest's bytes and the blob's size, mtime and first 64 KiB, and holds a digest of each
group's first and last 4 KiB (its "edges"). Every load re-reads the edges (8 KiB a group:
milliseconds even for a 70B pack): a blob corrupted in place with its mtime put back, which the
record alone cannot tell, fails there unless the damage lies wholly inside groups, and that the
periodic full verification finds. Every run records when its pack was last fully verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from worker.errors import UserError
from worker.files import write_atomic
from worker.pack.blob import PAGE, Pack, aligned_empty, blob_size, extent_checksum, read_extent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackCheck:
    """How a run checked its pack: `full` (every checksum, now) or `edges` (the cheap check, against a
    full verification at `verified_at`)."""

    kind: str
    verified_at: str | None

    def to_dict(self) -> dict:
        return {"check": self.kind, "verified_at": self.verified_at}


def marker(pack: Pack) -> Path:
    return pack.manifest_path.with_name(pack.manifest_path.name + ".verified")


def identity(pack: Pack) -> dict:
    """What a record is tied to: this manifest's bytes, the blob's size and mtime, and its first
    64 KiB (a device has no useful mtime; another pack written onto it changes its head)."""
    st = os.stat(pack.blob_path)
    with open(pack.blob_path, "rb") as f:
        head = f.read(64 << 10)
    return {"manifest_sha256": hashlib.sha256(pack.manifest_path.read_bytes()).hexdigest(),
            "blob": str(pack.blob_path.resolve()), "blob_size": blob_size(pack.blob_path),
            "blob_mtime_ns": st.st_mtime_ns if stat.S_ISREG(st.st_mode) else None,
            "blob_head_sha256": hashlib.sha256(head).hexdigest()}


def edges(pack: Pack) -> dict[str, str]:
    """Group → sha256 of its extent's first and last 4 KiB (aligned reads, O_DIRECT-friendly)."""
    buf = aligned_empty(PAGE)  # (4096,)
    out = {}
    for g in pack.manifest.groups:
        h = hashlib.sha256()
        for offset in sorted({g.offset, g.offset + g.nbytes - PAGE}):
            read_extent(pack.fd, offset, PAGE, buf)
            h.update(memoryview(buf.numpy()))
        out[g.name] = h.hexdigest()
    return out


def record(pack: Pack, ok: bool) -> None:
    """Remember a passed full verification (or forget one); best effort where the directory is read-only."""
    path = marker(pack)
    try:
        if not ok:
            path.unlink(missing_ok=True)
            return
        doc = {**identity(pack), "verified_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "edges": edges(pack)}
        write_atomic(path, json.dumps(doc), "verification record")
    except (OSError, UserError) as e:
        log.warning("cannot record the verification of %s (%s): it will be verified again", pack.manifest_path, e)


def record_of(pack: Pack) -> dict | None:
    """The full verification on record for exactly this manifest and blob, or None."""
    try:
        doc = json.loads(marker(pack).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or {k: doc.get(k) for k in identity(pack)} != identity(pack):
        return None
    return doc


def changed_edges(pack: Pack, rec: dict) -> list[str]:
    """Groups whose edges differ from the record (all of them when the record has none)."""
    was = rec.get("edges") or {}
    return [name for name, digest in edges(pack).items() if was.get(name) != digest]


def is_verified(pack: Pack) -> bool:
    """A full verification is on record and the edges still match it."""
    rec = record_of(pack)
    return rec is not None and not changed_edges(pack, rec)


def verify_pack(pack: Pack, threads: int | None = None) -> list[str]:
    """Names of the groups whose bytes do not match their checksum (empty: the pack is intact).

    Groups are hashed in parallel, each with large sequential reads; the result is recorded so the
    next load only checks the edges.
    """
    groups = pack.manifest.groups
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as ex:
        sums = list(ex.map(lambda g: extent_checksum(pack.fd, g.offset, g.nbytes), groups))
    bad = [g.name for g, s in zip(groups, sums) if s != g.checksum]
    record(pack, not bad)
    return bad


def check(pack: Pack, strict: bool, max_age_days: float | None = None) -> PackCheck | None:
    """The check before a run: edges against the record while it is younger than `max_age_days`, else
    every checksum. None (or, `strict`, a UserError) when the blob does not match its manifest."""
    rec = record_of(pack)
    why = "no full verification on record"
    if rec is not None:
        bad_edges = changed_edges(pack, rec)
        age = (datetime.now(timezone.utc) - datetime.fromisoformat(rec["verified_at"])).total_seconds() / 86400 \
            if rec.get("verified_at") else float("inf")
        if not bad_edges and (max_age_days is None or age <= max_age_days):
            return PackCheck("edges", rec.get("verified_at"))
        why = (f"the first or last 4 KiB of {len(bad_edges)} group(s) changed ({', '.join(bad_edges[:3])})" if bad_edges
               else f"the last full verification is {age:.1f} days old (pack_verify_days={max_age_days:g})")
    log.info("verifying every checksum of %s: %s", pack.blob_path, why)
    bad = verify_pack(pack)
    if bad:
        if strict:
            raise UserError(f"blob {pack.blob_path} fails its checksums in {len(bad)} group(s) "
                            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): re-pack with `bench pack`")
        return None
    return PackCheck("full", (record_of(pack) or {}).get("verified_at"))
