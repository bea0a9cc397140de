"""The mqtt source against the local Mosquitto: JSON objects with their topic, wrapped bad
payloads, and QoS 1 messages that survive a SIGKILL through the persistent session."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from connectors.sources.mqtt import MqttConfig, MqttSource
from streamflow.plugins import ComponentContext, TransientError
from streamflow.transport.broker import free_port
from tests.helpers import read_topic
from tests.source_runs import TopicWatcher, kill_and_restart, running, source_pipeline, unique

Address = tuple[str, int]


def create_session(address: Address, client_id: str, topic_filter: str) -> None:
    """Subscribe once as the source will, so messages published before it starts are kept."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 600
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(*address, clean_start=False, properties=properties)
    client.loop_start()
    client.subscribe(topic_filter, qos=1)
    assert subscribed.wait(10), "Mosquitto did not acknowledge the subscription"
    client.disconnect()
    client.loop_stop()


@contextmanager
def publisher(address: Address) -> Iterator[mqtt.Client]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("pub"), protocol=mqtt.MQTTv5)
    client.connect(*address)
    client.loop_start()
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def publish(client: mqtt.Client, topic: str, payload: bytes) -> None:
    client.publish(topic, payload, qos=1).wait_for_publish(10)


def test_json_objects_get_their_topic_and_bad_payloads_are_wrapped(
    bootstrap: str, mqtt_address: Address
) -> None:
    topic, prefix, client_id = unique("mqtt"), unique("sf-test"), unique("sf-source")
    create_session(mqtt_address, client_id, f"{prefix}/#")
    with publisher(mqtt_address) as client:
        publish(client, f"{prefix}/room1", b'{"temp": 21.5}')  # queued in the session
        with running(source_pipeline(bootstrap, "mqtt", topic, topics=[f"{prefix}/#"],
                                     host=mqtt_address[0], port=mqtt_address[1],
                                     client_id=client_id, key_field="mqtt_topic",
                                     session_expiry_s=120)):
            publish(client, f"{prefix}/room2", b'{"temp": 19.0, "mqtt_topic": "overwritten"}')
            publish(client, f"{prefix}/room3", b"22.5 degrees")
            publish(client, f"{prefix}/room4", b"[1, 2]")
            publish(client, f"{prefix}/room5", b"\xff\xfe")
            TopicWatcher(bootstrap, topic).wait_for(5)
    records = read_topic(bootstrap, topic)
    rows = [json.loads(value) for value in records.values]
    assert rows[:2] == [{"temp": 21.5, "mqtt_topic": f"{prefix}/room1"},
                        {"temp": 19.0, "mqtt_topic": f"{prefix}/room2"}]
    assert records.keys[0] == f"{prefix}/room1".encode()
    assert rows[2]["payload"] == "22.5 degrees" and "not JSON" in rows[2]["payload_error"]
    assert rows[3]["payload"] == "[1, 2]" and rows[3]["payload_error"] == (
        "payload is a JSON list, not an object")
    assert rows[4]["payload_encoding"] == "base64"
    assert base64.b64decode(rows[4]["payload"]) == b"\xff\xfe"


def test_sigkill_then_restart_loses_no_qos1_message(
    tmp_path: Path, bootstrap: str, mqtt_address: Address
) -> None:
    topic, prefix, client_id = unique("mqtt"), unique("sf-test"), unique("sf-source")
    create_session(mqtt_address, client_id, f"{prefix}/#")
    with publisher(mqtt_address) as client:
        pipeline = source_pipeline(bootstrap, "mqtt", topic, topics=[f"{prefix}/#"],
                                   host=mqtt_address[0], port=mqtt_address[1],
                                   client_id=client_id, session_expiry_s=120)

        def publish_some_then_wait() -> None:
            for number in range(200):
                publish(client, f"{prefix}/n", json.dumps({"n": number}).encode())
            watcher.wait_for(50, timeout_s=40)

        def publish_while_down() -> None:
            for number in range(200, 300):
                publish(client, f"{prefix}/n", json.dumps({"n": number}).encode())

        watcher = TopicWatcher(bootstrap, topic)
        try:
            kill_and_restart(pipeline, tmp_path, before_kill=publish_some_then_wait,
                             while_down=publish_while_down,
                             after_restart=lambda: watcher.wait_for(300, timeout_s=40))
        finally:
            watcher.close()
        received = [json.loads(v)["n"] for v in read_topic(bootstrap, topic).values]
    assert set(received) == set(range(300)), "a QoS 1 message was lost"


def test_an_unreachable_broker_names_mqtt_and_its_address() -> None:
    port = free_port()
    source = MqttSource(MqttConfig(port=port, topics=["x/#"]), ComponentContext("p", "m"))
    with pytest.raises(TransientError, match=f"MQTT broker at 127.0.0.1:{port} is unreachable"):
        source.open(None)
