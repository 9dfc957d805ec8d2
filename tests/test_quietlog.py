"""A flood of refusals leaves one log line per kind and window, with a count, never one line per refusal."""

from __future__ import annotations

import json
import logging

from authsvc.quietlog import MAX_KINDS, QuietLog
from tests.test_connect_limits import connect_raw
from tests.wire import Device


class Now:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def test_one_line_per_kind_and_window_with_the_count_left_out() -> None:
    now = Now()
    quiet = QuietLog(window=10, now=now)
    assert quiet.due("a") == 0
    assert [quiet.due("a") for _ in range(4)] == [None] * 4
    assert quiet.due("b") == 0  # another kind has its own line
    now.t += 10
    assert quiet.due("a") == 4


def test_kinds_are_bounded() -> None:
    quiet = QuietLog()
    for i in range(MAX_KINDS + 50):
        quiet.due(i)
    assert len(quiet._kinds) <= MAX_KINDS


def test_a_flood_of_refused_requests_and_connects_logs_a_line_not_a_line_each(server, caplog):
    dev = Device(server.mqtt_port, "thermo-1", server.clock)
    with caplog.at_level(logging.INFO):
        for _ in range(30):
            reply = dev.raw_request("token", json.dumps({"reply_to": dev.reply_to, "client_id": "thermo-1",
                                                          "grant_type": "refresh_token", "refresh_token": "x"}))
            assert reply is not None and reply["error"] == "invalid_dpop_proof"
        for _ in range(30):
            sock, code = connect_raw(server.mqtt_port, "thermo-1", b"forged forged")
            sock.close()
    assert caplog.text.count("token -> invalid_dpop_proof") == 1
    assert "Failed to initialize client session" not in caplog.text  # amqtt's echo of each refusal
    assert caplog.text.count("refused with CONNACK 3") == 1
