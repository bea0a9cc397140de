"""JSON-lines or CSV files: one file or a glob, read in name order, optionally followed.

The position is the file being read and the byte offset after the last emitted line, plus the
files already finished, so a restart resumes exactly after the last acknowledged record. In
follow mode a line is emitted only once its newline was written, and new files matching the
glob are picked up.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from connectors.sources.records import record_key
from streamflow.plugins import ComponentContext, SettingProblem, Source, SourceBatch


class FileConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="a file, or a glob such as ./data/*.jsonl")
    format: Literal["json", "csv"] = "json"
    follow: bool = Field(False, description="keep reading appended lines and new files")
    key_field: str | None = Field(None, description="field whose value becomes the record key")


def _scalar(text: str) -> Any:
    """A CSV cell as int, float or string."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _csv_row(text: str) -> list[str]:
    return next(csv.reader(io.StringIO(text)), [])


class FileSource(Source[FileConfig]):
    """Emits one record per line (per row for CSV)."""

    config_model = FileConfig

    def __init__(self, config: FileConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self._done: list[str] = []
        self._current: str | None = None
        self._offset = 0
        self._header: list[str] | None = None

    @classmethod
    def problems(cls, config: FileConfig) -> list[SettingProblem]:
        """A path or glob that matches no file, unless ``follow`` waits for files to come."""
        if config.follow or any(Path(match).is_file() for match in glob.glob(config.path)):
            return []
        return [SettingProblem(
            "path", f"{config.path!r} matches no file (relative paths start at {Path.cwd()})",
            "correct the path or glob, or set follow: true to wait for files to appear")]

    def open(self, position: dict[str, Any] | None) -> None:
        position = position or {}
        self._done = list(position.get("done", []))
        self._current = position.get("file")
        self._offset = int(position.get("offset", 0))
        self._header = position.get("header")

    def position(self) -> dict[str, Any]:
        return {"done": self._done, "file": self._current, "offset": self._offset,
                "header": self._header}

    def _next_file(self) -> str | None:
        skipped = {*self._done, self._current}
        candidates = sorted(p for p in glob.glob(self.config.path) if p not in skipped)
        return candidates[0] if candidates else None

    def poll(self, max_records: int, timeout_s: float) -> SourceBatch | None:
        if self._current is None:
            self._current, self._offset, self._header = self._next_file(), 0, None
            if self._current is None:
                if not self.config.follow:
                    return None
                time.sleep(timeout_s)
                return SourceBatch([])
        batch = self._read(Path(self._current), max_records)
        if not len(batch) and self._at_end(Path(self._current)):
            following = self._next_file() if self.config.follow else None
            if not self.config.follow or following:
                self._done.append(self._current)
                self._current = None
            else:
                time.sleep(timeout_s)
        return batch

    def _at_end(self, path: Path) -> bool:
        return path.stat().st_size <= self._offset

    def _read(self, path: Path, max_records: int) -> SourceBatch:
        values: list[bytes] = []
        keys: list[bytes | None] = []
        with open(path, "rb") as handle:
            handle.seek(self._offset)
            while len(values) < max_records:
                line = handle.readline()
                if not line:
                    break
                if not line.endswith(b"\n") and self.config.follow:
                    break  # a line still being written
                self._offset += len(line)
                text = line.strip()
                if not text:
                    continue
                if self.config.format == "csv":
                    text, is_header = self._csv_record(text)
                    if is_header:
                        continue
                values.append(text)
                keys.append(self._key(text))
        return SourceBatch(values, keys)

    def _csv_record(self, line: bytes) -> tuple[bytes, bool]:
        """A CSV line as a JSON object, and whether it was the header. A row that is not UTF-8
        (or that the csv module rejects) goes on as it is, for the stage reading it to
        dead-letter as invalid JSON; in header names, bytes that are not UTF-8 become U+FFFD."""
        try:
            row = _csv_row(line.decode("utf-8", "replace" if self._header is None else "strict"))
        except (UnicodeDecodeError, csv.Error):
            return line, False
        if self._header is None:
            self._header = row
            return line, True
        record = {name: _scalar(cell) for name, cell in zip(self._header, row, strict=False)}
        return json.dumps(record).encode(), False

    def _key(self, value: bytes) -> bytes | None:
        if self.config.key_field is None:
            return None
        try:
            document = json.loads(value)
        except (ValueError, RecursionError):
            return None
        return record_key(document, self.config.key_field)
