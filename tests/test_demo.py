"""`iotauth demo --auto-approve`: two simulated devices pair and the demo shows data flowing."""

from __future__ import annotations

import asyncio
import threading

from authsvc import demo
from authsvc.config import load_settings


def run_until(settings, wanted: list[str], timeout: float = 60.0) -> list[str]:
    lines: list[str] = []
    done = threading.Event()

    def echo(line: str) -> None:
        lines.append(line)
        if all(any(w in seen for seen in lines) for w in wanted):
            done.set()

    async def main() -> None:
        stop = asyncio.Event()
        waiter = asyncio.get_running_loop().run_in_executor(None, done.wait, timeout)
        waiter.add_done_callback(lambda _: stop.set())
        await demo.run_demo(settings, auto_approve=True, echo=echo, stop=stop)

    asyncio.run(main())
    return lines


def test_demo_pairs_both_devices_and_shows_readings_commands_and_a_refusal(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "SWITCH_EVERY", 1.0)
    monkeypatch.delenv("IOTAUTH_ADMIN_PASSWORD", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "iotauth.toml").write_text("[tokens]\npoll_interval = 1\n")
    settings = load_settings(data).with_ports(mqtt_port=0, http_port=0)
    lines = run_until(settings, ["[panel-1] reading from thermo-1:", "[thermo-1] power is now on",
                                 "[broker] refused thermo-1's publish to home/panel-1/temperature"])
    text = "\n".join(lines)
    assert "admin password (shown once):" in text
    assert "[demo] approved" in text and "for thermo-1" in text and "for panel-1" in text
    assert "[panel-1] reading from thermo-1:" in text
    assert "[panel-1] switches thermo-1 on" in text and "[thermo-1] power is now on" in text
    assert "[broker] refused thermo-1's publish to home/panel-1/temperature: outside its scopes" in text
    assert lines[-1] == "demo stopped"

    # second run: the devices come back from their sealed state with a refresh, no new codes
    again = run_until(settings, ["[panel-1] reading from thermo-1:"])
    assert not any("shows code" in line for line in again)
    assert any("received a DPoP-bound access token" in line for line in again)
