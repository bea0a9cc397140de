"""MQTT: subscribes to topic filters with QoS 1 and emits each message as a JSON record.

Messages are acknowledged to the MQTT broker (manual PUBACK, in order) only after Kafka
acknowledged them. The session is persistent (MQTT 5, ``clean_start`` false, a fixed client id,
``session_expiry_s``), so messages that were not acknowledged, and messages published while the
pipeline is down, are delivered again after a restart: at-least-once, and a crash between Kafka's
acknowledgement and the PUBACK repeats those messages. The broker bounds both: Mosquitto keeps at
most ``max_queued_messages`` (default 1000) per offline session and sends ``max_inflight_messages``
(default 20) unacknowledged messages at a time.

A payload that is a JSON object gets the MQTT topic added as ``topic_field``. Any other payload
(not JSON, not UTF-8, or JSON that is not an object) is never dropped: it is wrapped as
``{topic_field: ..., "payload": text or base64, "payload_encoding": "utf-8"|"base64",
"payload_error": reason}`` so that a schema step downstream can route it to the dead-letter topic.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections import deque
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from connectors.sources.records import AckTracker, encode_record, record_key
from streamflow.plugins import ComponentContext, Source, SourceBatch, TransientError

log = logging.getLogger(__name__)


class MqttConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="MQTT broker host")
    port: int = Field(1883, ge=1, le=65535, description="MQTT broker port")
    topics: list[str] = Field(min_length=1, description="topic filters (QoS 1), e.g. sensors/#")
    client_id: str | None = Field(
        None, description="fixed client id of the persistent session; default streamflow-PIPELINE-SOURCE"
    )
    username: str | None = None
    password: str | None = Field(None, description="masked in logs")
    topic_field: str = Field("mqtt_topic", description="record field that receives the MQTT topic")
    key_field: str | None = Field(None, description="field whose value becomes the record key")
    session_expiry_s: int = Field(
        7 * 24 * 3600, ge=1, description="how long the broker keeps the session while the pipeline is down"
    )
    keepalive_s: int = Field(30, ge=5)
    connect_timeout_s: float = Field(10.0, gt=0)


def message_record(topic: str, payload: bytes, topic_field: str) -> dict[str, Any]:
    """The record for one MQTT message (see the module docstring for non-object payloads)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return {topic_field: topic, "payload": base64.b64encode(payload).decode(),
                "payload_encoding": "base64", "payload_error": "payload is not UTF-8"}
    try:
        document = json.loads(text)
    except ValueError as exc:
        error = f"payload is not JSON: {exc}"
    else:
        if isinstance(document, dict):
            document[topic_field] = topic
            return document
        error = f"payload is a JSON {type(document).__name__}, not an object"
    return {topic_field: topic, "payload": text, "payload_encoding": "utf-8", "payload_error": error}


class MqttSource(Source[MqttConfig]):
    """A persistent MQTT 5 session whose messages are acknowledged once they are in Kafka."""

    config_model = MqttConfig

    def __init__(self, config: MqttConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.client_id = config.client_id or f"streamflow-{context.pipeline}-{context.name}"
        self._received: deque[Any] = deque()
        self._arrived = threading.Condition()
        self._tracker: AckTracker[Any] = AckTracker()
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self._client: Any = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def open(self, position: dict[str, int] | None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._tracker = AckTracker((position or {}).get("messages", 0))
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self.config.password)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.config.session_expiry_s
        self._client = client
        try:
            client.connect(self.config.host, self.config.port, self.config.keepalive_s,
                           clean_start=False, properties=properties)
        except OSError as exc:
            raise TransientError(f"MQTT broker at {self.address} is unreachable: {exc}") from None
        client.loop_start()
        if not self._connected.wait(self.config.connect_timeout_s):
            raise TransientError(
                f"MQTT broker at {self.address} did not accept the connection and subscription "
                f"in {self.config.connect_timeout_s:g}s: {self._connect_error or 'no answer'}"
            )

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self._connect_error = str(reason)
            log.error("MQTT broker at %s refused %s: %s", self.address, self.client_id, reason)
            return
        client.subscribe([(topic, 1) for topic in self.config.topics])

    def _on_subscribe(self, _client: Any, _userdata: Any, _mid: int, reasons: Any, _props: Any) -> None:
        refused = [f"{topic}: {reason}" for topic, reason in zip(self.config.topics, reasons, strict=False)
                   if reason.is_failure]
        if refused:
            self._connect_error = f"subscription refused ({'; '.join(refused)})"
            log.error("MQTT broker at %s refused %s", self.address, self._connect_error)
            return
        self._connected.set()

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        with self._arrived:
            self._received.append(message)
            self._arrived.notify()

    def poll(self, max_records: int, timeout_s: float) -> SourceBatch:
        values: list[bytes] = []
        keys: list[bytes | None] = []
        with self._arrived:
            if not self._received:
                self._arrived.wait(timeout_s)
            while self._received and len(values) < max_records:
                message = self._received.popleft()
                document = message_record(message.topic, message.payload, self.config.topic_field)
                values.append(encode_record(document))
                keys.append(record_key(document, self.config.key_field))
                self._tracker.polled((message.mid, message.qos))
        return SourceBatch(values, keys)

    def position(self) -> dict[str, int]:
        return {"messages": self._tracker.polled_count}

    def acknowledged(self, position: dict[str, int]) -> None:
        for mid, qos in self._tracker.release(position["messages"]):
            self._client.ack(mid, qos)

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
