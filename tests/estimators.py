"""Estimators for tests, named by ``module:function`` factories like a user's own."""

from __future__ import annotations

import time
from typing import Any

from river import linear_model


class Picky(linear_model.LinearRegression):
    """Refuses to predict from a negative ``x`` and to learn a negative target."""

    def predict_one(self, x: dict[str, Any], **kwargs: Any) -> float:
        if x.get("x", 0.0) < 0:
            raise ValueError("negative x")
        return super().predict_one(x, **kwargs)

    def learn_one(self, x: dict[str, Any], y: float, **kwargs: Any) -> None:
        if y < 0:
            raise ArithmeticError("negative target")
        super().learn_one(x, y, **kwargs)


def picky() -> Picky:
    return Picky()


class Slow(linear_model.LinearRegression):
    """Takes ``LEARN_S`` to learn each record: its worker stays busy for a while."""

    LEARN_S = 0.3

    def learn_one(self, x: dict[str, Any], y: float, **kwargs: Any) -> None:
        time.sleep(self.LEARN_S)
        super().learn_one(x, y, **kwargs)


def slow() -> Slow:
    return Slow()
