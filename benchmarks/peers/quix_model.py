"""The model workload as a Quix Streams app: each record's features go through river's
StandardScaler | LinearRegression, which predicts, updates MAE and learns, as in
``benchmarks.model``; the prediction goes to the output topic. Run by
``benchmarks.peers.harness`` with .venv-peers' python; ``--mark FILE`` receives the wall-clock
time of the first record consumed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from quixstreams import Application
from river import linear_model, metrics, preprocessing


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("bootstrap", "input", "output", "group", "mark"):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args()
    mark = Path(args.mark)
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    mae = metrics.MAE()

    def predict_and_learn(event: dict[str, Any]) -> dict[str, Any]:
        if not mark.exists():
            mark.write_text(repr(time.time()))
        target = event.pop("y")
        prediction = model.predict_one(event)
        mae.update(target, prediction)
        model.learn_one(event, target)
        return {"prediction": prediction, "y": target}

    app = Application(broker_address=args.bootstrap, consumer_group=args.group,
                      auto_offset_reset="earliest", loglevel="WARNING")
    sdf = app.dataframe(app.topic(args.input, value_deserializer="json"))
    sdf.apply(predict_and_learn).to_topic(app.topic(args.output, value_serializer="json"))
    app.run()


if __name__ == "__main__":
    main()
