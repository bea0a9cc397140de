"""Faust agents named ``module:function`` in a pipeline: importing them, and the ``[faust]`` extra."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import AsyncIterator, Callable
from types import ModuleType
from typing import Any

AGENT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

AgentFunction = Callable[[AsyncIterator[Any]], AsyncIterator[Any]]


class AgentError(ValueError):
    """An agent reference that cannot be used, or the ``[faust]`` extra is missing."""


def require_faust() -> ModuleType:
    """The ``faust`` module, imported on first use so that the core runs without the extra."""
    try:
        return importlib.import_module("faust")
    except ImportError as exc:
        raise AgentError(
            f"type: faust stages need the faust extra ({exc}); install it with "
            "pip install 'streamflow[faust]'"
        ) from None


def load_agent(reference: str) -> AgentFunction:
    """The async generator function ``reference`` (``module:function``) names."""
    if not AGENT_PATH.match(reference):
        raise AgentError(f"agent {reference!r} must be 'package.module:function'")
    module_name, function_name = reference.split(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise AgentError(f"cannot import agent {reference!r}: {exc}") from None
    if not inspect.isasyncgenfunction(function):
        raise AgentError(
            f"agent {reference!r} must be an async generator function: "
            "async def agent(stream): async for event in stream: yield ..."
        )
    return function
