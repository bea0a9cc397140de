"""The model registry: each checkpoint of a model stage is kept as a version in its store.

A stage's store (``<checkpoint.path>/<pipeline>/<stage>/``) holds, besides the current
checkpoint files, ``versions/<N>/``: hard links to the partition-state files a checkpoint put in
place and to the files of the keyed models its partitions had evicted from memory then, each
with its integrity sidecar, and ``version.json``, the version's metadata (offsets, metrics,
records learned, drift events, config hash, river and streamflow versions, creation time, the
evicted models' files), gathered from the files' headers. A version is prepared in a hidden
directory by the forked child that writes the checkpoint's files, and renamed into place whole
when the stage publishes the checkpoint (after the output it covers is out): readers see a
version complete or not at all, and nothing in it changes after that (a checkpoint or an
eviction replaces the current file with a new one; the version keeps the old one, and the
worker links an evicted model's old file into a version still being prepared before it
replaces it). Versions are numbered in the order they were published; replicas of a stage share
the numbering.

Retention keeps the last ``keep_versions`` versions, the tagged ones (``versions/<N>/tags.json``)
and the one a rollback request names. A version is retired by renaming it aside, then looking
at its tags once more, so that a tag set meanwhile keeps it.

A rollback is a request file in the store (``rollback.json``: an id and a version). The stage's
worker looks at it between batches (at most once a second) and when it restores partitions; a
partition whose state has not adopted that request yet takes the version's models and metrics,
keeping its offsets (records are not learned again), and the version's evicted keyed models
become the store's; it remembers the request's id in its state, so a stopped pipeline adopts
it at its next start and a restart after a crash adopts it again if the checkpoint after the
adoption was not written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamflow.ml.checkpoint import (
    _LEFTOVER_AGE_S,
    NEW_VERSION_PREFIX,
    VERSIONS,
    CheckpointError,
    Integrity,
    Snapshot,
    Staged,
    _private_directory,
    _read_private,
    _refuse_unless_private,
    _sidecar,
    _sync_directories,
    _write_private,
    _writer,
    link_checkpoint,
    load_verified,
    read_verified,
)

METADATA = "version.json"
TAGS = "tags.json"
REQUEST = "rollback.json"
EXPORT_FORMAT = "streamflow-model-export/1"
_RETIRED_PREFIX = ".retired-"
_PARTITION_FIELDS = ("partition", "next_offsets", "learned", "records_learned", "metrics",
                     "drift_events", "rollback", "saved_at", "models", "promotions")


class RegistryError(RuntimeError):
    """A version, tag or request the registry does not have, or cannot take."""


@dataclass(frozen=True)
class Version:
    """A version's number, metadata (``version.json``) and tags."""

    number: int
    metadata: dict[str, Any]
    tags: list[str]

    @property
    def records_learned(self) -> int:
        return sum(int(part.get("records_learned", 0))
                   for part in self.metadata.get("partitions", {}).values())


@dataclass(frozen=True)
class RollbackRequest:
    """Have the stage adopt ``version``; ``id`` tells requests apart."""

    id: str
    version: int
    requested_at: float


def _write_json(path: Path, document: Any) -> None:
    """Write ``document`` to ``path`` atomically, readable by its owner only."""
    temporary = path.with_name(f"{path.name}.{_writer()}.part")
    _write_private(temporary, json.dumps(document, indent=2).encode())
    os.replace(temporary, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_private(path))
    except ValueError:
        raise RegistryError(f"{path} is damaged") from None


def open_version(directory: Path) -> None:
    """Create the hidden directory a version is prepared in (:attr:`Staged.version`), if it is
    not there yet."""
    _private_directory(directory.parent)
    directory.mkdir(mode=0o700, exist_ok=True)


def prepare_version(snapshots: list[Snapshot], staged: list[Staged]) -> None:
    """Prepare the version of a checkpoint whose files were just staged (in the forked child
    that wrote them, so that neither the worker nor the stage spends time on it): hard links to
    the staged files, each with a sidecar holding its tag, and to the files of the keyed models
    each snapshot names as evicted, with their sidecars (a model whose file is gone is left
    out, as it would start afresh), and the metadata, all fsynced, in the hidden directory
    :func:`commit_version` names a version once the files are in place."""
    directory = staged[0].version
    assert directory is not None
    open_version(directory)
    _remove_leftovers(directory.parent)
    partitions: dict[str, dict[str, Any]] = {}
    common: dict[str, Any] = {}
    for snapshot, file in zip(snapshots, staged, strict=True):
        link = directory / file.path.name
        os.link(file.temporary, link)
        tag = json.loads(file.tag_file.read_bytes())
        _write_private(_sidecar(link), json.dumps({"algorithm": tag["algorithm"],
                                                   "tags": [tag["tag"]]}).encode())
        header = snapshot.fields
        part = partitions[header["name"]] = {
            "file": link.name, **{key: header[key] for key in _PARTITION_FIELDS if key in header}}
        if snapshot.evicted:
            evicted = {key: path.name for key, path in snapshot.evicted_files().items()
                       if link_checkpoint(path, directory)}
            part["learned"] = {**{key: snapshot.evicted[key] for key in evicted},
                               **part.get("learned", {})}
            part["records_learned"] = sum(part["learned"].values())
            part["evicted"] = evicted
        common = dict(header.get("registry", {}))
    _write_private(directory / METADATA, json.dumps(
        {**common, "created_at": time.time(), "partitions": partitions}, indent=2).encode())
    _sync_directories([directory / METADATA])


def merge_prepared(directories: list[Path]) -> Path:
    """One prepared version of a checkpoint whose partitions several worker processes wrote,
    each preparing a version of its own (streamflow.ml.pool): the files and partitions of the
    others moved into the first, which is returned."""
    first, *others = directories
    metadata = _read_json(first / METADATA)
    for other in others:
        metadata["partitions"].update(_read_json(other / METADATA)["partitions"])
        for path in other.iterdir():
            if path.name != METADATA:
                os.rename(path, first / path.name)
    _write_private(first / f"{METADATA}.part", json.dumps(metadata, indent=2).encode())
    os.replace(first / f"{METADATA}.part", first / METADATA)
    _sync_directories([first / METADATA])
    for other in others:
        shutil.rmtree(other)
    return first


def commit_version(directory: Path, keep: int) -> int:
    """Name the version prepared in ``directory`` (the next number free: replicas of a stage
    share the numbering), then apply retention; the version's number."""
    versions = directory.parent
    number = max(_numbers(versions), default=0) + 1
    while True:
        try:
            os.rename(directory, versions / str(number))
            break
        except OSError:  # another replica took that number: take the next
            if not (versions / str(number)).exists():
                raise
            number += 1
    Registry(versions.parent).retain(keep)
    return number


def _numbers(versions: Path) -> list[int]:
    try:
        names = os.listdir(versions)
    except FileNotFoundError:
        return []
    return sorted(int(name) for name in names if name.isdigit())


def _remove_leftovers(versions: Path) -> None:
    """Hidden directories of writers that died building or retiring a version."""
    for path in versions.iterdir():
        if path.name.startswith((NEW_VERSION_PREFIX, _RETIRED_PREFIX)):
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime > _LEFTOVER_AGE_S:
                    shutil.rmtree(path, ignore_errors=True)


class Registry:
    """The versions of one model stage's store, read and managed while the stage runs or not."""

    def __init__(self, store: str | Path) -> None:
        self.store = Path(store)
        self.versions_directory = self.store / VERSIONS
        self.integrity = Integrity.from_environment()

    @classmethod
    def of_stage(cls, root: str | Path, pipeline: str, stage: str) -> Registry:
        return cls(Path(root) / pipeline / stage)

    # --- reading --------------------------------------------------------------------------

    def numbers(self) -> list[int]:
        """The numbers of the versions, oldest first (a directory listing: nothing is read)."""
        return _numbers(self.versions_directory)

    def versions(self) -> list[Version]:
        """Every version, oldest first (one retired while this reads is left out)."""
        found = []
        for number in _numbers(self.versions_directory):
            with contextlib.suppress(RegistryError):
                found.append(self.version(number))
        return found

    def latest(self) -> Version | None:
        """The newest version (reading its metadata only), or None without any."""
        for number in reversed(_numbers(self.versions_directory)):
            with contextlib.suppress(RegistryError):  # retired while this reads: the one before
                return self.version(number)
        return None

    def version(self, number: int) -> Version:
        directory = self.versions_directory / str(number)
        try:
            _refuse_unless_private(directory, directory.stat())
            metadata = _read_json(directory / METADATA)
        except FileNotFoundError:
            raise RegistryError(f"{self.store} has no version {number}"
                                f"{self._known()}") from None
        return Version(number, {"version": number, **metadata}, self._tags(directory))

    def _known(self) -> str:
        numbers = _numbers(self.versions_directory)
        return f" (it has {numbers[0]}..{numbers[-1]})" if numbers else " (it has no versions yet)"

    def _tags(self, directory: Path) -> list[str]:
        try:
            return list(_read_json(directory / TAGS))
        except FileNotFoundError:
            return []

    def files(self, number: int) -> dict[str, Path]:
        """The checkpoint file of each partition state in version ``number``, by state name."""
        version = self.version(number)
        directory = self.versions_directory / str(number)
        return {name: directory / part["file"]
                for name, part in version.metadata.get("partitions", {}).items()}

    def evicted_models(self, number: int, name: str) -> dict[str, tuple[Path, int]]:
        """The keyed models partition state ``name`` of version ``number`` had evicted from
        memory, by key: the model's file in the version, and the records it had learned."""
        part = self.version(number).metadata.get("partitions", {}).get(name, {})
        directory = self.versions_directory / str(number)
        return {key: (directory / file, int(part.get("learned", {}).get(key, 0)))
                for key, file in part.get("evicted", {}).items()}

    def verify(self, number: int) -> None:
        """Check the integrity of every file of version ``number``, unpickling nothing."""
        for name, path in self.files(number).items():
            read_verified(path, self.integrity)
            for model, _learned in self.evicted_models(number, name).values():
                read_verified(model, self.integrity)

    def load_state(self, number: int, name: str) -> tuple[dict[str, Any], Any] | None:
        """The header and (state, models) of partition state ``name`` in version ``number``,
        verified before it is unpickled; None if the version has no such partition."""
        path = self.files(number).get(name)
        if path is None:
            return None
        return self._load(number, path, "partition-state", name)

    def load_models(self, number: int, name: str) -> dict[str, Any] | None:
        """Every keyed model (a ModelSlot) of partition state ``name`` in version ``number``, by
        key: those in memory then and those it had evicted; None if the version has no such
        partition."""
        loaded = self.load_state(number, name)
        if loaded is None:
            return None
        _state, slots = loaded[1]
        return {**{key: self.load_model(number, path)[1] for key, (path, _learned)
                   in self.evicted_models(number, name).items()}, **slots}

    def load_model(self, number: int, path: Path) -> tuple[dict[str, Any], Any]:
        """The header and model (a ModelSlot) of the evicted keyed model file ``path`` of
        version ``number`` (see :meth:`evicted_models`), verified before it is unpickled."""
        return self._load(number, path, "model")

    def _load(self, number: int, path: Path, kind: str,
              name: str | None = None) -> tuple[dict[str, Any], Any]:
        try:
            return load_verified(path, self.integrity, kind, name)
        except FileNotFoundError:
            raise RegistryError(f"version {number} was removed while being read") from None

    # --- tags and retention ---------------------------------------------------------------

    def tag(self, number: int, name: str) -> int | None:
        """Tag version ``number`` ``name``; a tag names one version, so it moves from the one
        that had it, whose number is returned."""
        if not name or name.isdigit() or name == "latest":
            raise RegistryError(f"a tag is a name other than latest, not {name!r}")
        self.version(number)
        moved_from = None
        for version in self.versions():
            if name in version.tags and version.number != number:
                self._set_tags(version.number, [tag for tag in version.tags if tag != name])
                moved_from = version.number
        directory = self.versions_directory / str(number)
        tags = self._tags(directory)
        if name not in tags:
            self._set_tags(number, [*tags, name])
        if name not in self.version(number).tags:  # retired while it was being tagged
            raise RegistryError(f"version {number} was removed by retention meanwhile")
        return moved_from

    def untag(self, name: str) -> int:
        """Remove tag ``name``; the number of the version that had it."""
        for version in self.versions():
            if name in version.tags:
                self._set_tags(version.number, [tag for tag in version.tags if tag != name])
                return version.number
        raise RegistryError(f"no version is tagged {name!r}")

    def _set_tags(self, number: int, tags: list[str]) -> None:
        _write_json(self.versions_directory / str(number) / TAGS, tags)

    def resolve(self, reference: str) -> int:
        """A version number from a number, a tag, or ``latest``."""
        if reference.isdigit():
            return int(reference)
        versions = self.versions()
        if reference == "latest" and versions:
            return versions[-1].number
        for version in versions:
            if reference in version.tags:
                return version.number
        raise RegistryError(f"no version is tagged {reference!r}{self._known()}")

    def retain(self, keep: int) -> list[int]:
        """Retire versions beyond the last ``keep``, but tagged ones and the one a rollback
        request names; the numbers retired."""
        numbers = _numbers(self.versions_directory)
        request = self.rollback_request()
        pinned = {request.version} if request else set()
        retired = []
        for number in numbers[:-keep]:
            directory = self.versions_directory / str(number)
            if number in pinned or self._tags(directory):
                continue
            aside = self.versions_directory / f"{_RETIRED_PREFIX}{number}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(directory, aside)
            except FileNotFoundError:  # retired by another replica
                continue
            if self._tags(aside):  # tagged just now: keep it
                os.rename(aside, directory)
                continue
            shutil.rmtree(aside, ignore_errors=True)
            retired.append(number)
        return retired

    # --- rollback -------------------------------------------------------------------------

    def request_rollback(self, number: int) -> RollbackRequest:
        """Ask the stage to adopt version ``number`` (checked whole first)."""
        self.verify(number)
        request = RollbackRequest(uuid.uuid4().hex, number, time.time())
        _write_json(self.store / REQUEST, request.__dict__)
        return request

    def rollback_request(self) -> RollbackRequest | None:
        try:
            document = _read_json(self.store / REQUEST)
        except FileNotFoundError:
            return None
        try:
            return RollbackRequest(str(document["id"]), int(document["version"]),
                                   float(document["requested_at"]))
        except (KeyError, TypeError, ValueError):
            raise RegistryError(f"{self.store / REQUEST} is damaged") from None

    def rollback_at(self, topic: str, partition: int, offset: int) -> dict[str, Any] | None:
        """The rollback whose adopted model predicted the stage's input record at (``topic``,
        ``partition``, ``offset``), as the versions kept record it: of the rollbacks a version's
        state of that partition continues from, the one adopted last at or before that offset;
        None if there is none (or the versions recording it were retired)."""
        found: dict[str, Any] | None = None
        for version in self.versions():
            for part in version.metadata.get("partitions", {}).values():
                rollback = part.get("rollback")
                if not rollback or int(part.get("partition", -1)) != partition:
                    continue
                at = rollback.get("at_offsets", {}).get(topic)
                if at is not None and at <= offset and (found is None or (
                        at, rollback["adopted_at"]) > (found["at_offsets"][topic],
                                                       found["adopted_at"])):
                    found = rollback
        return found

    # --- export ---------------------------------------------------------------------------

    def export(self, number: int, destination: Path) -> str:
        """Write version ``number`` as one portable file at ``destination``: a plain pickle
        (protocol 5) of an :class:`Exported`'s fields as a dict, holding river estimators and
        JSON-like metadata only. Returns the file's SHA-256."""
        version = self.version(number)
        models: dict[int, dict[str, Any]] = {}
        for name, part in version.metadata.get("partitions", {}).items():
            slots = self.load_models(number, name)
            assert slots is not None
            models[int(part["partition"])] = {key: slot.model.estimator for key, slot in slots.items()}
        document = {"format": EXPORT_FORMAT, "metadata": {**version.metadata, "tags": version.tags},
                    "models": models}
        body = pickle.dumps(document, protocol=5)
        temporary = destination.with_name(f"{destination.name}.{os.getpid()}.part")
        _write_private(temporary, body)
        os.replace(temporary, destination)
        return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class Exported:
    """A version exported by ``streamflow models export``: its metadata and its river
    estimators by input partition and model key (``""`` without ``key_field``)."""

    metadata: dict[str, Any]
    models: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        """The estimator, when the version holds exactly one."""
        every = [model for keyed in self.models.values() for model in keyed.values()]
        if len(every) != 1:
            raise ValueError(f"this export holds {len(every)} models: pick one from .models")
        return every[0]


def load(path: str | Path, sha256: str | None = None) -> Exported:
    """Load a file written by ``streamflow models export``. It is a pickle, which runs code when
    loaded: the file must belong to this user and be writable by no one else, and with
    ``sha256`` (printed by the export) its digest must match before it is unpickled."""
    data = _read_private(Path(path))
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise CheckpointError(f"{path} does not have the SHA-256 given: it is not loaded")
    document = pickle.loads(data)
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not a model exported by streamflow")
    return Exported(document["metadata"], document["models"])
