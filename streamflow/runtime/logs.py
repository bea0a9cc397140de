"""Logging: readable text or JSON lines, with secrets from the config masked everywhere."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

from streamflow.config.models import PipelineConfig, uri_password

SECRET_KEY = re.compile(r"pass(word)?|secret|token|jaas|credential|private", re.IGNORECASE)
MASK = "***"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's ``data`` (given as
    ``extra={"data": ...}``) and the exception, if any."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data = getattr(record, "data", None)
        if data is not None:
            document["data"] = data
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)


class Redactor(logging.Filter):
    """Replaces every known secret in a record's rendered message and exception with ***."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def add(self, secrets: Iterable[str]) -> None:
        self.secrets.update(secret for secret in secrets if len(secret) >= 4)

    def mask(self, text: str) -> str:
        """``text`` with every known secret replaced by ***."""
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        exception = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        if any(secret in message or secret in exception for secret in self.secrets):
            message, exception = self.mask(message), self.mask(exception)
            record.msg, record.args = message, None
            if record.exc_info:
                record.exc_info, record.exc_text = None, None
                record.msg = f"{message}\n{exception}"
        return True


REDACTOR = Redactor()


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes: the progress display redirects
    it to print log lines above itself, and a caller that replaced it (a test capturing output)
    may have closed the stream the logging was configured with since."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr


def configure_logging(level: str, log_format: str) -> None:
    """Text (default) or JSON to stderr, every record passing through the redactor."""
    handler = StderrHandler()
    handler.addFilter(REDACTOR)
    handler.setFormatter(
        JsonFormatter() if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def config_secrets(config: PipelineConfig) -> list[str]:
    """Values of settings whose names say they are secret (Kafka client and connectors, at any
    depth: a connector's own ``config`` of client settings, say), and the passwords in model
    stages' MLflow tracking URIs."""
    found = _secrets(config.kafka.config)
    for component in [*config.sources, *config.sinks]:
        found += _secrets(component.connector_settings())
    found += [password for model in config.models if model.mlflow
              if (password := uri_password(model.mlflow.tracking_uri))]
    return found


def _secrets(settings: Any) -> list[str]:
    if isinstance(settings, list):
        return [secret for item in settings for secret in _secrets(item)]
    if not isinstance(settings, dict):
        return []
    found = []
    for key, value in settings.items():
        if SECRET_KEY.search(str(key)) and isinstance(value, str | int) and str(value):
            found.append(str(value))
        else:
            found += _secrets(value)
    return found
