"""Model registry versions written by the model worker's own code (EngineHost): learning,
checkpoints published as the stage publishes them, and rollbacks adopted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from streamflow.ml.checkpoint import publish
from streamflow.ml.engine import EngineSettings
from streamflow.ml.features import pickled_feature_rows
from streamflow.ml.host import EngineHost
from streamflow.ml.registry import Registry, prepare_version
from streamflow.ml.worker import BatchReply, BatchRequest, Effects, EngineSpec

TOPIC = "features"


def settings(key_field: str | None = None, max_models: int = 10) -> EngineSettings:
    return EngineSettings(task="regression", target="y", metrics=["MAE"], rolling_window=50,
                          key_field=key_field, max_models=max_models, features_topic=TOPIC)


def batch(first: int, count: int) -> BatchRequest:
    """Records ``first`` to ``first + count`` of partition 0: x = offset, y = 2x."""
    offsets = np.arange(first, first + count)
    features = pa.table({"x": offsets.astype(float)})
    return BatchRequest(features=pickled_feature_rows(features),
                        partitions=np.zeros(count, dtype=np.int64), offsets=offsets,
                        targets=[2.0 * i for i in offsets.tolist()])


class VersionWriter:
    """A model stage's engine on partition 0, in this process, writing registry versions."""

    def __init__(self, root: Path, pipeline: str = "p", stage: str = "model",
                 engine_settings: EngineSettings | None = None) -> None:
        spec = EngineSpec(engine_settings or settings(), [{"linear_model.LinearRegression": {}}],
                          str(root), pipeline, stage, 1000, keep_versions=10,
                          config_hash="c0ffee")
        self.effects = Effects()
        self.host = EngineHost(spec, self.effects)
        self.host.start(None)
        self.host.assign([0])
        self.registry = Registry.of_stage(root, pipeline, stage)
        self.next_offset = 0

    def learn(self, count: int) -> BatchReply:
        reply = self.host.handle(batch(self.next_offset, count))
        self.next_offset += count
        return reply

    def checkpoint(self) -> None:
        """Write, prepare and publish a checkpoint as the worker and the stage do."""
        durable = self.host.checkpoint()
        for snapshot, file in zip(durable.snapshots, durable.reply.staged, strict=True):
            snapshot.write_staged(file)
        prepare_version(durable.snapshots, durable.reply.staged)
        publish(durable.reply.staged)

    def roll_back(self, version: int) -> None:
        """Request a rollback to ``version`` and have the engine adopt it at once."""
        self.registry.request_rollback(version)
        self.host.adopt_requested(force=True)
