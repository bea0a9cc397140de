"""Fixtures of the transport contract suites (test_transport_contract.py, test_transport_reader.py),
which run with each real client on the session's broker and with the in-memory transport."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from streamflow.transport import MEMORY
from streamflow.transport.memory import drop_cluster


@pytest.fixture
def address(client: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """The bootstrap address for ``client``: the session's real broker (started on first use),
    or for the memory transport an in-memory cluster of this test's own."""
    if client != MEMORY:
        yield request.getfixturevalue("bootstrap")
        return
    name = f"memory://contract-{uuid.uuid4().hex[:10]}"
    yield name
    drop_cluster(name)


@pytest.fixture
def kind(client: str, request: pytest.FixtureRequest) -> str:
    """'memory' for the memory transport, else the real broker's kind (see ``broker_kind``)."""
    return MEMORY if client == MEMORY else str(request.getfixturevalue("broker_kind"))
