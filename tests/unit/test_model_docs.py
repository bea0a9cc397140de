"""docs/models.md documents every setting of a model stage, nested ones included, and the
README links to it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from streamflow.config.models import (
    CheckpointConfig,
    DriftConfig,
    LabelsConfig,
    MlflowConfig,
    ModelConfig,
    ServingConfig,
)

ROOT = Path(__file__).parents[2]


def test_every_model_setting_is_documented() -> None:
    page = (ROOT / "docs" / "models.md").read_text()
    settings: list[tuple[type[BaseModel], str]] = [
        (ModelConfig, "`{}`"), (LabelsConfig, "`{}`"), (DriftConfig, "`{}`"),
        (CheckpointConfig, "`{}`"), (MlflowConfig, "`{}`"), (ServingConfig, "`{}`")]
    missing = [f"{model.__name__}.{name}" for model, form in settings
               for name in model.model_fields if form.format(name) not in page]
    assert not missing, f"docs/models.md does not mention {missing}"
    assert "(docs/models.md)" in (ROOT / "README.md").read_text()
