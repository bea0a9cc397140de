"""The checkpoint store: versioned, atomically written files in one configured directory.

A file is a magic line, a JSON header line (format version, kind, metadata) and a pickled
payload. Pickle runs code when loaded, so checkpoints are read only from the store the pipeline
configures, and the header is checked before anything is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"STREAMFLOW-CHECKPOINT\n"
FORMAT_VERSION = 2  # 2: rolling metrics keep their unapplied updates
SUFFIX = ".ckpt"


class CheckpointError(RuntimeError):
    """A checkpoint file is not one this version of streamflow can read."""


def _safe(name: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:40]
    return f"{readable}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class Snapshot:
    """A checkpoint file's bytes, taken when the state was consistent and written later (the
    model worker writes them while it serves the next batch)."""

    path: Path
    data: bytes

    def write(self) -> None:
        """Write atomically: a temporary file, fsync, rename."""
        temporary = self.path.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            handle.write(self.data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)


class CheckpointStore:
    """Checkpoints of one stage: ``<root>/<pipeline>/<stage>/<name>.ckpt``."""

    def __init__(self, root: str | Path, pipeline: str, stage: str) -> None:
        self.directory = Path(root) / pipeline / stage
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.rglob("*.tmp"):
            leftover.unlink()

    def path(self, name: str) -> Path:
        return self.directory / f"{_safe(name)}{SUFFIX}"

    def snapshot(self, name: str, kind: str, payload: Any,
                 metadata: dict[str, Any] | None = None) -> Snapshot:
        """``payload`` encoded under ``name`` now, to be written by :meth:`Snapshot.write`."""
        header = {"format": FORMAT_VERSION, "kind": kind, "name": name, "saved_at": time.time(),
                  **(metadata or {})}
        encoded = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        return Snapshot(self.path(name), MAGIC + json.dumps(header).encode() + b"\n" + encoded)

    def save(self, name: str, kind: str, payload: Any, metadata: dict[str, Any] | None = None) -> None:
        """Write ``payload`` under ``name`` atomically."""
        self.snapshot(name, kind, payload, metadata).write()

    def delete_tree(self, name: str) -> None:
        """Remove the checkpoint ``name`` and those named ``name/...``."""
        for path in self.directory.glob(f"*{SUFFIX}"):
            with open(path, "rb") as handle:
                if handle.readline() != MAGIC:
                    continue
                stored = json.loads(handle.readline()).get("name", "")
            if stored == name or stored.startswith(f"{name}/"):
                path.unlink()

    def load(self, name: str, kind: str) -> tuple[dict[str, Any], Any] | None:
        """The header and payload saved under ``name``, or None if there is none."""
        path = self.path(name)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return None
        with handle:
            if handle.readline() != MAGIC:
                raise CheckpointError(f"{path} is not a streamflow checkpoint")
            header = json.loads(handle.readline())
            if header.get("format") != FORMAT_VERSION:
                raise CheckpointError(
                    f"{path} has checkpoint format {header.get('format')}; this streamflow reads "
                    f"format {FORMAT_VERSION}. Move the store aside to start the model afresh."
                )
            if header.get("kind") != kind or header.get("name") != name:
                raise CheckpointError(f"{path} holds {header.get('kind')} {header.get('name')!r}")
            return header, pickle.load(handle)
