"""The ``python`` step: a user function, referenced as ``module:function`` and imported."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from streamflow.plugins import ComponentContext, Processor, StepResult
from streamflow.processing.codec import escape_name, user_fields
from streamflow.processing.steps import hidden_columns

FUNCTION_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class PythonConfig(BaseModel):
    """Settings of a ``python`` step."""

    model_config = ConfigDict(extra="forbid")

    function: str = Field(pattern=FUNCTION_PATH, description="'package.module:function'")
    mode: Literal["batch", "record"] = Field(
        "record", description="batch: pa.Table → pa.Table (keep _sf_row); record: dict → dict, "
        "None (filter it) or a list of dicts"
    )

    @field_validator("function")
    @classmethod
    def _importable(cls, path: str) -> str:
        import_function(path)
        return path


def import_function(path: str) -> Callable[..., Any]:
    """The callable named ``module:function``; a ValueError says what is wrong."""
    module_name, function_name = path.split(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {path!r}: {exc}") from None
    if not callable(function):
        raise ValueError(f"{path!r} is not callable")
    return function  # type: ignore[no-any-return]


class PythonStep(Processor[PythonConfig]):
    """Runs a user function per batch or per record. In record mode an exception (or a result
    that is not a dict, a list of dicts or None) fails only that record."""

    name = "python"
    config_model = PythonConfig

    def __init__(self, config: PythonConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.function = import_function(config.function)

    def process(self, table: pa.Table) -> StepResult:
        if self.config.mode == "batch":
            result = self.function(table)
            if not isinstance(result, pa.Table):
                raise TypeError(f"{self.config.function} returned {type(result).__name__}, "
                                "not a pyarrow.Table")
            return StepResult(result)
        return self._per_record(table)

    def _per_record(self, table: pa.Table) -> StepResult:
        hidden = hidden_columns(table)
        records = user_fields(table.drop_columns(hidden)).to_pylist()  # with the fields' own names
        outputs: list[dict[str, Any]] = []
        origins: list[int] = []
        failures: list[tuple[int, BaseException]] = []
        for row, record in enumerate(records):
            try:
                result = self.function(record)
                produced = [] if result is None else result if isinstance(result, list) else [result]
                if not all(isinstance(item, dict) for item in produced):
                    raise TypeError(f"{self.config.function} returned {type(result).__name__}; "
                                    "return a dict, a list of dicts or None")
            except Exception as exc:
                failures.append((row, exc))
                continue
            outputs += produced
            origins += [row] * len(produced)
        names = list(dict.fromkeys(name for output in outputs for name in output))
        columns = {escape_name(name): pa.array([output.get(name) for output in outputs]) for name in names}
        taken = table.select(hidden).take(pa.array(np.asarray(origins, dtype=np.int64)))
        columns.update({name: taken.column(name) for name in hidden})
        return StepResult(pa.table(columns), failures)
