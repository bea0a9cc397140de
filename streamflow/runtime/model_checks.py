"""``streamflow validate``'s checks of a pipeline with model stages, for ``streamflow run``, in a
process of their own (``python -m streamflow.runtime.model_checks``, the request on stdin).

Resolving a model's river names, and telling its task for the fields that flow past it, imports
river (with scipy, ~1 s and ~65 MB). The run's own process never imports it: its model stages'
workers do. So the run asks a child, which exits before the pipeline starts, for the same
checks ``validate`` makes: the run refuses to start on the same errors and logs the same
warnings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

from streamflow.config import ConfigError, load_pipeline
from streamflow.runtime.semantics import Finding, require_valid

CHECK_TIMEOUT_S = 120.0


def checked_elsewhere(file: str, stage: str | None) -> list[Finding]:
    """The warnings :func:`require_valid` finds in the pipeline in ``file``, its models resolved
    in river by a child process; raises :class:`ConfigError` with the errors it finds."""
    request = json.dumps({"file": file, "stage": stage, "path": sys.path})
    try:
        ran = subprocess.run([sys.executable, "-m", __name__], input=request, capture_output=True,
                             text=True, check=False, timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"checking the pipeline's models took over {CHECK_TIMEOUT_S:.0f} s "
                           "(an estimator factory that hangs?)") from exc
    if ran.returncode != 0:
        raise RuntimeError(f"checking the pipeline's models failed: {ran.stderr.strip()[-2000:]}")
    found = json.loads(ran.stdout)
    if found["errors"]:
        raise ConfigError(file, found["errors"])
    return [Finding(**finding) for finding in found["warnings"]]


def main() -> None:
    """The child: check the requested pipeline as ``validate`` does, and print the outcome."""
    request = json.load(sys.stdin)
    sys.path[:] = request["path"]  # to import the user's estimator factories as the run would
    file = request["file"]
    try:
        findings = require_valid(load_pipeline(file), file, stage=request["stage"])
    except ConfigError as exc:
        print(json.dumps({"errors": exc.errors, "warnings": []}))
        return
    print(json.dumps({"errors": [], "warnings": [asdict(finding) for finding in findings]}))


if __name__ == "__main__":
    main()
