"""`streamflow run`'s process settings (streamflow.runtime.process): Arrow's system allocator, and
pandas left out until something imports it, after which pyarrow treats pandas objects as usual."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Converts Python values with pyarrow (as a stage's steps do), then imports pandas and converts
# pandas objects; prints whether pyarrow had imported pandas and what each conversion gave.
CONVERSIONS = r"""
import json, math, sys
import pyarrow as pa
import pyarrow.compute as pc
if sys.argv[1] == "lean":
    from streamflow.runtime.process import lean_process
    lean_process()
pa.table({"a": [1.5, None], "b": ["x", "y"]})
pc.fill_null(pa.array([None, "x"]), "null")
before = "pandas" in sys.modules
import pandas as pd
frame = pd.DataFrame({"x": [1.0, math.nan], "when": pd.to_datetime(["2024-01-01", None], utc=True)})
print(json.dumps({
    "pandas_before": before,
    "pool": pa.default_memory_pool().backend_name,
    "series": pa.array(pd.Series([1.0, math.nan])).to_pylist(),  # NaN as null: a pandas object
    "categorical": str(pa.array(pd.Series(["a", "b", "a"], dtype="category")).type),
    "frame": str(pa.Table.from_pandas(frame).to_pylist()),
    "back": pa.table({"a": [1, None]}).to_pandas()["a"].isna().tolist(),
}))
"""


def converted(mode: str, **env: str) -> dict[str, object]:
    ran = subprocess.run([sys.executable, "-c", CONVERSIONS, mode], capture_output=True, text=True,
                         timeout=120, env={**os.environ, **env})
    assert ran.returncode == 0, ran.stderr[-3000:]
    return json.loads(ran.stdout.splitlines()[-1])


def test_pandas_waits_until_imported_then_converts_as_always() -> None:
    lean, plain = converted("lean"), converted("plain")
    assert not lean.pop("pandas_before")
    assert plain.pop("pandas_before")  # pyarrow's first conversion imports it otherwise
    assert lean.pop("pool") == "system"
    plain.pop("pool")
    assert lean == plain
    assert lean["series"] == [1.0, None]


def test_arrow_default_memory_pool_still_decides() -> None:
    assert converted("lean", ARROW_DEFAULT_MEMORY_POOL="mimalloc")["pool"] == "mimalloc"
