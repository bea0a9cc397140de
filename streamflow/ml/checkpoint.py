"""The checkpoint store: versioned, atomically written files in one configured directory.

A file is a magic line, a JSON header line (format version, kind, metadata) and a pickled
payload. Pickle runs code when loaded, so checkpoints are read only from the store the pipeline
configures, and the header is checked before anything is unpickled.

A file is written under a temporary name, fsynced, then renamed into place, either at once or,
for a model stage's periodic checkpoints, once the stage has produced the output of every
record the checkpoint covers (see :class:`Staged`).

Loading sets each object's attributes one by one, as ``__init__`` did, and interns strings.
Pickle's default, an update of the object's ``__dict__``, leaves CPython 3.11 objects with
their attributes in a materialized dict, where every later attribute access is slower: a river
model restored that way learns about 9% slower. Interned strings make the restored model's
feature keys the very objects the features arrive with (see :mod:`streamflow.ml.features`).
"""

from __future__ import annotations

import copyreg
import hashlib
import io
import json
import os
import pickle
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"STREAMFLOW-CHECKPOINT\n"
FORMAT_VERSION = 3  # 2: rolling metrics keep their unapplied updates; 3: attributes set one by one
READABLE_FORMATS = {2, 3}
SUFFIX = ".ckpt"
_LEFTOVER_AGE_S = 600.0  # temporary files older than this belong to no live writer
_MANAGED_DICT = 1 << 4  # Py_TPFLAGS_MANAGED_DICT: the type's attributes may live outside a dict


class CheckpointError(RuntimeError):
    """A checkpoint file is not one this version of streamflow can read."""


def _safe(name: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:40]
    return f"{readable}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"


def _set_attributes(instance: Any, state: dict[str, Any]) -> None:
    """Restore an instance's attributes as ``__init__`` set them (the pickles' state setter)."""
    for name, value in state.items():
        object.__setattr__(instance, name, value)


class _Pickler(pickle.Pickler):
    """Pickles plain instances with :func:`_set_attributes` as their state setter, and strings
    as persistent ids, which :class:`_Unpickler` interns."""

    def persistent_id(self, obj: Any) -> Any:
        return obj if type(obj) is str else None

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if isinstance(obj, type) or not cls.__flags__ & _MANAGED_DICT or hasattr(cls, "__setstate__"):
            return NotImplemented
        try:
            reduced = obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        except Exception:  # pickle's own attempt reports it
            return NotImplemented
        if not (isinstance(reduced, tuple) and len(reduced) == 5
                and reduced[0] is copyreg.__newobj__ and reduced[1] == (cls,)
                and type(reduced[2]) is dict and reduced[3] is None and reduced[4] is None):
            return NotImplemented  # not the default reduction of an instance with a __dict__
        state = reduced[2]
        if any(hasattr(getattr(cls, name, None), "__set__") for name in state):
            return NotImplemented  # setattr would go through a descriptor, not into the instance
        return copyreg.__newobj__, (cls,), state, None, None, _set_attributes


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is not str:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return sys.intern(pid)


def _dumps(payload: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(payload)
    return buffer.getvalue()


@dataclass(frozen=True)
class Staged:
    """A checkpoint file written and fsynced under a temporary name, not yet in place."""

    temporary: Path
    path: Path


def publish(staged: Iterable[Staged]) -> None:
    """Put staged files in place, and make the renames durable."""
    directories = set()
    for file in staged:
        os.replace(file.temporary, file.path)
        directories.add(file.path.parent)
    for directory in directories:
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@dataclass(frozen=True)
class Snapshot:
    """A checkpoint taken when the state was consistent: the payload is encoded when written,
    possibly later and elsewhere (the model worker writes from a forked child process)."""

    path: Path
    header: bytes
    payload: Any

    def staged(self, sequence: int) -> Staged:
        """Where :meth:`write_staged` writes this snapshot, as checkpoint number ``sequence``."""
        return Staged(self.path.with_suffix(f".{sequence}.tmp"), self.path)

    def write_staged(self, file: Staged) -> None:
        """Encode and write to ``file``'s temporary name, fsynced."""
        with open(file.temporary, "wb") as handle:
            handle.write(self.header)
            handle.write(_dumps(self.payload))
            handle.flush()
            os.fsync(handle.fileno())

    def write(self) -> None:
        """Write atomically: a temporary file, fsync, rename."""
        file = self.staged(0)
        self.write_staged(file)
        publish([file])


class CheckpointStore:
    """Checkpoints of one stage: ``<root>/<pipeline>/<stage>/<name>.ckpt``."""

    def __init__(self, root: str | Path, pipeline: str, stage: str) -> None:
        self.directory = Path(root) / pipeline / stage
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.rglob("*.tmp"):
            if time.time() - leftover.stat().st_mtime > _LEFTOVER_AGE_S:
                leftover.unlink(missing_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / f"{_safe(name)}{SUFFIX}"

    def snapshot(self, name: str, kind: str, payload: Any,
                 metadata: dict[str, Any] | None = None) -> Snapshot:
        """``payload`` under ``name``, to be written by :meth:`Snapshot.write` before it changes."""
        header = {"format": FORMAT_VERSION, "kind": kind, "name": name, "saved_at": time.time(),
                  **(metadata or {})}
        return Snapshot(self.path(name), MAGIC + json.dumps(header).encode() + b"\n", payload)

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
            if header.get("format") not in READABLE_FORMATS:
                raise CheckpointError(
                    f"{path} has checkpoint format {header.get('format')}; this streamflow reads "
                    f"formats {sorted(READABLE_FORMATS)}. Move the store aside to start the model "
                    "afresh."
                )
            if header.get("kind") != kind or header.get("name") != name:
                raise CheckpointError(f"{path} holds {header.get('kind')} {header.get('name')!r}")
            return header, _Unpickler(handle).load()
