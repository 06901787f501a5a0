"""A model version's champion intervals as JSON (training/promotions.py)."""

from __future__ import annotations

import json

from flywheel.training.promotions import close_interval, open_interval, spans


def test_intervals_open_close_and_reopen_after_a_rollback():
    raw = open_interval(None, "t1", "gate-a")
    raw = close_interval(raw, "t2", since="t1")
    raw = open_interval(raw, "t3", "gate-b")  # champion again
    assert json.loads(raw) == [{"since": "t1", "until": "t2", "gate_run": "gate-a"},
                               {"since": "t3", "until": None, "gate_run": "gate-b"}]


def test_a_champion_set_by_hand_is_recorded_when_it_loses_the_alias():
    assert json.loads(close_interval(None, "t9", since="t5")) == [{"since": "t5", "until": "t9", "gate_run": None}]
    assert json.loads(close_interval("not json", "t9", since=None)) == [{"since": None, "until": "t9",
                                                                         "gate_run": None}]


def test_an_unreadable_tag_is_no_intervals():
    assert spans(None) == [] and spans("") == [] and spans("{oops") == []
