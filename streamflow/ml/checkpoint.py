"""The checkpoint store: versioned, atomically written files in one configured directory.

A file is a magic line, a JSON header line (format version, kind, metadata) and a pickled
payload. Pickle runs code when loaded, so a file is unpickled only when it passes three checks:
it and its directory belong to this process's user and are writable by no one else (files are
written 0600 in 0700 directories), its header is one this version reads, and its integrity tag
matches the one recorded in its sidecar (``<file>.digest``) when it was written: an HMAC-SHA256
keyed by ``STREAMFLOW_CHECKPOINT_KEY`` when that variable is set, else a SHA-256 digest. A
digest tells a file streamflow wrote from one put in its place; only the key stops someone who
can also rewrite the sidecar.

A file is written under a temporary name with its tag beside it, fsynced, then put in place,
either at once or, for a model stage's periodic checkpoints, once the stage has produced the
output of every record the checkpoint covers (see :class:`Staged` and :func:`publish`).

Loading sets each object's attributes one by one, as ``__init__`` did, and interns strings.
Pickle's default, an update of the object's ``__dict__``, leaves CPython 3.11 objects with
their attributes in a materialized dict, where every later attribute access is slower: a river
model restored that way learns about 9% slower. Interned strings make the restored model's
feature keys the very objects the features arrive with (see :mod:`streamflow.ml.features`).
"""

from __future__ import annotations

import contextlib
import copyreg
import hashlib
import hmac
import io
import json
import os
import pickle
import re
import secrets
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b"STREAMFLOW-CHECKPOINT\n"
FORMAT_VERSION = 4  # 3: attributes set one by one; 4: an integrity tag in a sidecar, files 0600
READABLE_FORMATS = {4}
SUFFIX = ".ckpt"
SIDECAR_SUFFIX = ".digest"
KEY_VARIABLE = "STREAMFLOW_CHECKPOINT_KEY"
VERSIONS = "versions"  # the model registry's directory in a store (streamflow.ml.registry)
NEW_VERSION_PREFIX = ".new-"  # a version being prepared there
_LEFTOVER_AGE_S = 600.0  # temporary files older than this belong to no live writer
_PROCESS_TOKEN = secrets.token_hex(4)  # see _writer
_MANAGED_DICT = 1 << 4  # Py_TPFLAGS_MANAGED_DICT: the type's attributes may live outside a dict


def _writer() -> str:
    """This process among every writer of a store, for the names of its temporary files: the
    replicas of a stage share one, and the owner of a partition that lost it may still be
    writing there as the next owner starts. The pid, with a random token as pids repeat across
    hosts (a forked child keeps the token, not the pid)."""
    return f"{os.getpid()}-{_PROCESS_TOKEN}"


class CheckpointError(RuntimeError):
    """A checkpoint file is not one this version of streamflow can read, or may not be trusted."""


@dataclass(frozen=True)
class Integrity:
    """How tags are computed: HMAC-SHA256 keyed by ``STREAMFLOW_CHECKPOINT_KEY``, else SHA-256."""

    algorithm: str
    key: bytes | None

    @classmethod
    def from_environment(cls) -> Integrity:
        key = os.environ.get(KEY_VARIABLE, "")
        return cls("hmac-sha256", key.encode()) if key else cls("sha256", None)

    def tag(self, *chunks: bytes) -> str:
        hasher = hmac.new(self.key, digestmod=hashlib.sha256) if self.key else hashlib.sha256()
        for chunk in chunks:
            hasher.update(chunk)
        return hasher.hexdigest()


def _sidecar(path: Path) -> Path:
    """Where the tags ``path`` may have are recorded."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _write_private(path: Path, *chunks: bytes) -> None:
    """Write ``path`` readable and writable by its owner only, and fsync it."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with open(descriptor, "wb") as handle:
        os.fchmod(descriptor, 0o600)
        for chunk in chunks:
            handle.write(chunk)
        handle.flush()
        os.fsync(descriptor)


def _read_private(path: Path) -> bytes:
    """The bytes of ``path``, refused unless this user owns it and no one else may write it."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot open {path} ({exc.strerror}); checkpoints are read from "
                              "regular files only, never through a symbolic link") from None
    with open(descriptor, "rb") as handle:
        _refuse_unless_private(path, os.fstat(descriptor))
        return handle.read()


def _refuse_unless_private(path: Path, status: os.stat_result) -> None:
    if status.st_uid != os.geteuid():
        raise CheckpointError(
            f"{path} is owned by uid {status.st_uid}, not by this process's uid {os.geteuid()}. A "
            "checkpoint is a pickle, which runs code when loaded, so streamflow loads only its own "
            "user's: move it aside (the model starts afresh) or have its owner run the pipeline."
        )
    if status.st_mode & 0o022:
        raise CheckpointError(
            f"{path} may be written by others (mode {status.st_mode & 0o777:o}). A checkpoint is a "
            "pickle, which runs code when loaded: if nobody else changed it, `chmod go-w` it; "
            "otherwise move it aside (the model starts afresh)."
        )


def _private_directory(directory: Path) -> None:
    """Create ``directory`` and its missing parents 0700; make it 0700 if it exists and is ours."""
    for missing in reversed([path for path in (directory, *directory.parents) if not path.exists()]):
        with contextlib.suppress(FileExistsError):
            missing.mkdir(mode=0o700)
    status = directory.stat()
    if status.st_uid == os.geteuid() and status.st_mode & 0o777 != 0o700:
        os.chmod(directory, 0o700)
        status = directory.stat()
    _refuse_unless_private(directory, status)


def _write_sidecar(path: Path, algorithm: str, tags: list[str]) -> None:
    """Record the tags the checkpoint ``path`` may have, atomically."""
    sidecar = _sidecar(path)
    temporary = sidecar.with_name(f"{sidecar.name}.{_writer()}.tmp")
    _write_private(temporary, json.dumps({"algorithm": algorithm, "tags": tags}).encode())
    os.replace(temporary, sidecar)


def _tags_in_place(path: Path, algorithm: str) -> list[str]:
    """The recorded tag of the file at ``path``, if it has one under ``algorithm``."""
    try:
        record = json.loads(_sidecar(path).read_bytes())
    except FileNotFoundError:
        return []
    if record.get("algorithm") != algorithm or not path.exists():
        return []
    tags: list[str] = record["tags"]
    if len(tags) > 1:  # a publish was interrupted: keep only the tag of the file it left in place
        integrity = Integrity.from_environment()
        actual = integrity.tag(path.read_bytes()) if integrity.algorithm == algorithm else ""
        tags = [tag for tag in tags if hmac.compare_digest(tag, actual)]
    return tags[:1]


def link_checkpoint(path: Path, directory: Path) -> bool:
    """Hard-link the checkpoint file ``path`` and its integrity record into ``directory``, each
    unless a file of that name is there already (the first link stays); False, linking
    nothing, if there is no ``path`` or no ``directory``."""
    try:
        os.link(path, directory / path.name)
    except FileExistsError:
        pass
    except FileNotFoundError:
        return False
    with contextlib.suppress(FileExistsError):
        os.link(_sidecar(path), directory / _sidecar(path).name)
    return True


def model_name(state: str, key: str) -> str:
    """The checkpoint name of ``key``'s model, evicted from memory to a file of its own, of
    the partition state named ``state``."""
    return f"{state}/model/{key}"


def _sync_directories(paths: Iterable[Path]) -> None:
    for directory in {path.parent for path in paths}:
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


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
    """A checkpoint file written and fsynced under a temporary name, not yet in place, with its
    tag in a temporary file beside it. With a ``version`` directory (prepared beside the files
    by :func:`streamflow.ml.registry.prepare_version`), publishing it also names that directory
    a version of the model registry, which keeps ``keep_versions`` versions besides tagged ones."""

    temporary: Path
    path: Path
    version: Path | None = None
    keep_versions: int = 0

    @property
    def tag_file(self) -> Path:
        return self.temporary.with_suffix(".tag.tmp")


def publish(staged: Iterable[Staged]) -> list[int]:
    """Put staged files in place, durably. Each sidecar first records the new file's tag beside
    the tag of the file in place, and keeps only the new one once the new file is in place: a
    crash at any point leaves every file with its tag recorded. Returns the numbers of the
    registry versions this named."""
    files = list(staged)
    tags = [json.loads(file.tag_file.read_bytes()) for file in files]
    for file, tag in zip(files, tags, strict=True):
        in_place = _tags_in_place(file.path, tag["algorithm"])
        _write_sidecar(file.path, tag["algorithm"], [tag["tag"], *in_place])
    _sync_directories(file.path for file in files)
    for file in files:
        os.replace(file.temporary, file.path)
    _sync_directories(file.path for file in files)
    for file, tag in zip(files, tags, strict=True):
        _write_sidecar(file.path, tag["algorithm"], [tag["tag"]])  # if lost, the pair still holds it
        file.tag_file.unlink()
    versions = {(file.version, file.keep_versions) for file in files if file.version is not None}
    if not versions:
        return []
    from streamflow.ml.registry import commit_version  # the registry is built on this module

    return [commit_version(directory, keep) for directory, keep in versions]


@dataclass(frozen=True)
class Snapshot:
    """A checkpoint taken when the state was consistent: the payload is encoded when written,
    possibly later and elsewhere (the model worker writes from a forked child process).
    ``evicted`` names the keyed models of a partition state that were in files of their own
    then (see :func:`model_name`), with the records each had learned: a registry version of
    the snapshot links their files too."""

    path: Path
    header: bytes
    payload: Any
    integrity: Integrity
    evicted: dict[str, int] = field(default_factory=dict)

    def staged(self, sequence: int, keep_versions: int = 0) -> Staged:
        """Where :meth:`write_staged` writes this snapshot, as this process's checkpoint number
        ``sequence`` (under names no other writer uses: see :func:`_writer`); with
        ``keep_versions``, it is part of a registry version (see :class:`Staged`)."""
        name = f"{_writer()}-{sequence}"
        version = (self.path.parent / VERSIONS / f"{NEW_VERSION_PREFIX}{name}"
                   if keep_versions else None)
        return Staged(self.path.with_suffix(f".{name}.tmp"), self.path, version, keep_versions)

    @property
    def fields(self) -> dict[str, Any]:
        """The header's fields."""
        return dict(json.loads(self.header[len(MAGIC):]))

    def evicted_files(self) -> dict[str, Path]:
        """The file of each model in :attr:`evicted`, by key."""
        state = self.fields["name"]
        return {key: self.path.with_name(f"{_safe(model_name(state, key))}{SUFFIX}")
                for key in self.evicted}

    def write_staged(self, file: Staged) -> None:
        """Encode and write to ``file``'s temporary name, and its tag beside it, fsynced."""
        body = _dumps(self.payload)
        _write_private(file.temporary, self.header, body)
        tag = {"algorithm": self.integrity.algorithm, "tag": self.integrity.tag(self.header, body)}
        _write_private(file.tag_file, json.dumps(tag).encode())

    def write(self) -> None:
        """Write atomically: temporary files, fsync, rename."""
        file = self.staged(0)
        self.write_staged(file)
        publish([file])


class CheckpointStore:
    """Checkpoints of one stage: ``<root>/<pipeline>/<stage>/<name>.ckpt``, each with its sidecar."""

    def __init__(self, root: str | Path, pipeline: str, stage: str) -> None:
        self.directory = Path(root) / pipeline / stage
        _private_directory(self.directory)
        self.integrity = Integrity.from_environment()
        for leftover in self.directory.rglob("*.tmp"):
            with contextlib.suppress(FileNotFoundError):  # another writer may publish it meanwhile
                if time.time() - leftover.stat().st_mtime > _LEFTOVER_AGE_S:
                    leftover.unlink()

    def path(self, name: str) -> Path:
        return self.directory / f"{_safe(name)}{SUFFIX}"

    def snapshot(self, name: str, kind: str, payload: Any,
                 metadata: dict[str, Any] | None = None,
                 evicted: dict[str, int] | None = None) -> Snapshot:
        """``payload`` under ``name``, to be written by :meth:`Snapshot.write` before it changes
        (``evicted``: see :class:`Snapshot`)."""
        header = {"format": FORMAT_VERSION, "kind": kind, "name": name, "saved_at": time.time(),
                  **(metadata or {})}
        return Snapshot(self.path(name), MAGIC + json.dumps(header).encode() + b"\n", payload,
                        self.integrity, evicted or {})

    def save(self, name: str, kind: str, payload: Any, metadata: dict[str, Any] | None = None) -> None:
        """Write ``payload`` under ``name`` atomically."""
        self.snapshot(name, kind, payload, metadata).write()

    def replace_by_link(self, name: str, source: Path | None) -> None:
        """Make the checkpoint ``name`` a hard link to the checkpoint file ``source``, with its
        integrity record, or remove it when ``source`` is None. The file goes first and comes
        back last, so that it never stands beside another file's integrity record."""
        path = self.path(name)
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)
        if source is not None:
            os.link(_sidecar(source), _sidecar(path))
            os.link(source, path)

    def delete_tree(self, name: str) -> None:
        """Remove the checkpoint ``name`` and those named ``name/...``, with their sidecars."""
        for path in self.directory.glob(f"*{SUFFIX}"):
            with open(path, "rb") as handle:
                if handle.readline() != MAGIC:
                    continue
                stored = json.loads(handle.readline()).get("name", "")
            if stored == name or stored.startswith(f"{name}/"):
                path.unlink()
                _sidecar(path).unlink(missing_ok=True)

    def entries(self) -> list[tuple[str, str]]:
        """The name and kind of each checkpoint in the store, as their headers say."""
        found = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            with open(path, "rb") as handle:
                if handle.readline() != MAGIC:
                    continue
                header = json.loads(handle.readline())
            found.append((str(header.get("name", "")), str(header.get("kind", ""))))
        return found

    def load(self, name: str, kind: str) -> tuple[dict[str, Any], Any] | None:
        """The header and payload saved under ``name``, or None if there is none. The file is
        unpickled only once its owner, mode, header and integrity tag are checked."""
        try:
            return load_verified(self.path(name), self.integrity, kind, name)
        except FileNotFoundError:
            return None


def read_verified(path: Path, integrity: Integrity) -> tuple[dict[str, Any], io.BytesIO]:
    """The header of the checkpoint file at ``path`` and its payload, still pickled, once the
    file and its directory are private, its format readable and its integrity tag verified."""
    _refuse_unless_private(path.parent, path.parent.stat())
    data = _read_private(path)
    handle = io.BytesIO(data)
    if handle.readline() != MAGIC:
        raise CheckpointError(f"{path} is not a streamflow checkpoint")
    try:
        header = json.loads(handle.readline())
    except ValueError:
        raise CheckpointError(f"{path} has a damaged header") from None
    if header.get("format") not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path} has checkpoint format {header.get('format')}; this streamflow reads "
            f"formats {sorted(READABLE_FORMATS)} (format 4 added the integrity check that is "
            "verified before a checkpoint is unpickled). Move the store aside to start the "
            "model afresh."
        )
    _verify(path, data, integrity)
    return header, handle


def load_verified(path: Path, integrity: Integrity, kind: str,
                  name: str | None = None) -> tuple[dict[str, Any], Any]:
    """The header and payload of the checkpoint file at ``path``, unpickled only once
    :func:`read_verified` checked it and it holds a ``kind`` (named ``name``, if given)."""
    header, handle = read_verified(path, integrity)
    if header.get("kind") != kind or (name is not None and header.get("name") != name):
        raise CheckpointError(f"{path} holds {header.get('kind')} {header.get('name')!r}")
    return header, _Unpickler(handle).load()


def _verify(path: Path, data: bytes, integrity: Integrity) -> None:
    """Refuse ``path`` unless its tag is one its sidecar recorded, under ``integrity``."""
    sidecar = _sidecar(path)
    try:
        record = json.loads(_read_private(sidecar))
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no integrity record ({sidecar.name}), so it was not "
                              "written by this streamflow; move it aside (the model starts "
                              "afresh).") from None
    except ValueError:
        raise CheckpointError(f"{sidecar} is damaged; move {path.name} and it aside (the model "
                              "starts afresh).") from None
    algorithm = record.get("algorithm") if isinstance(record, dict) else None
    if algorithm != integrity.algorithm:
        raise CheckpointError(
            f"{path} was recorded with {algorithm}, but this process uses "
            f"{integrity.algorithm} ({KEY_VARIABLE} is "
            f"{'set' if integrity.key else 'not set'}), so it cannot be verified: set "
            f"{KEY_VARIABLE} as when it was written, or move the store aside (the model starts "
            "afresh)."
        )
    actual = integrity.tag(data)
    if not any(hmac.compare_digest(actual, str(tag)) for tag in record.get("tags", [])):
        raise CheckpointError(
            f"{path} does not match the {algorithm} recorded when it was written: it was "
            "changed or replaced since, and is not loaded (a checkpoint is a pickle, which runs "
            "code). Move it aside (the model starts afresh)."
        )
