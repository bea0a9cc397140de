"""Transactional ids of exactly-once stages: a restarted stage reuses its predecessor's id (its
producer then aborts the predecessor's open transaction at once); live ones never share one."""

from __future__ import annotations

from streamflow.runtime import transactional_ids


def test_a_released_id_is_taken_again_and_live_ones_differ() -> None:
    first, first_slot = transactional_ids.take("pipe.stage")
    second, second_slot = transactional_ids.take("pipe.stage")
    other, other_slot = transactional_ids.take("pipe.other")
    assert len({first, second, other}) == 3
    assert first.startswith("pipe.stage.") and other.startswith("pipe.other.")
    transactional_ids.release("pipe.stage", first_slot)
    again, again_slot = transactional_ids.take("pipe.stage")
    assert (again, again_slot) == (first, first_slot)
    for group, slot in (("pipe.stage", again_slot), ("pipe.stage", second_slot),
                        ("pipe.other", other_slot)):
        transactional_ids.release(group, slot)
