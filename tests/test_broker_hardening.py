"""Issue 3: each hardening of the broker, proven on loopback, and shown to be missing without it.

Every test runs against a real broker on 127.0.0.1 with real paho clients or raw sockets, once per
`flavour`:

- `ours`: the server as `iotauth serve` runs it (`HardenedBroker`, `IotAuthPlugin`, the Gate);
- `stock`: the same server on amqtt's stock `Broker` class (same plugin, same Gate), for the points only
  a `Broker` subclass can close;
- `shipped`: amqtt 0.12.1 as shipped, `Broker` with its own default configuration (no `plugins` key:
  anonymous auth, no topic checks) in its own thread and loop, for the points our plugin closes (Will
  rules, identity, `$SYS` and shared subscriptions, fail closed): stock `Broker` + our plugin passes
  those, so the flaw shows only in amqtt without the plugin.

`stock` and `shipped` are `xfail(strict=True, raises=AssertionError)` with the flaw as the reason: each
must fail on its assertion (not crash), and should one ever pass, the suite goes red. So every test is
known to fail where the hardening is missing. Flaws: ../shared/amqtt-notes.md; rules: protocol.md 6-7.

| #  | situation | stock / shipped amqtt | ours |
|----|-----------|-----------------------|------|
| 1  | failed CONNECT with a live device's ClientId | stock: wipes its subscriptions, CONNACK 5 | untouched |
| 1  | bootstrap CONNECT, a device's ClientId, live or offline | stock: CONNACK 0, session taken | CONNACK 2 |
| 2  | socket sends no CONNECT | stock: held open for ever | closed after connect_timeout |
| 2  | client silent for 1.5 x keep-alive | stock: logged, kept open | closed |
| 2  | bootstrap session asks for keep-alive 0 | stock: never times out | 60 s (read timeout 90 s) |
| 3  | retained messages, new session | stock: sent for anyone's subscriptions, no ACL | own, allowed only |
| 4  | client PUBLISH to a `$` topic | stock: session half-dead, later publishes lost | dropped, logged |
| 4  | leading-wildcard grant and `$SYS` | shipped: anyone subscribes `$SYS/#` | denied |
| 5  | packet over 64 KiB | stock: no maximum | closed |
| 5  | header claims 200 MB, 1 MB follows | stock: buffers it, waits for the rest | closed at the header |
| 6  | session with a Will, grant revoked | stock: the server cannot close it at all | closed, no Will |
| 6  | Will on a bootstrap session / outside the scopes | shipped: accepted | CONNACK 5 |
| 7  | ClientId with `+ # / $`, NUL, non-ASCII | shipped: accepted | CONNACK 2 bootstrap, 5 token |
| 8  | `$share/<group>/<filter>` | shipped: granted, whatever the filter | judged by `<filter>` |
| 8  | `$share/g`, `$share//x`, `$share/g+/x` | shipped: granted (`g+` aside: malformed) | SUBACK 0x80 |
| 9  | exception inside the CONNECT check | shipped: admits all, nothing to fail | CONNACK 5, logged |
| 9  | exception inside a topic check | shipped: granted | SUBACK 0x80, session works on |
| 12 | grant revoked / token expired | stock: the Gate has no handle to close it | closed within 1 s |

Points 10 (per-source CONNECT limits) and 11 (delivery QoS) are proven in test_connect_limits.py (same
scheme); their place here is the end of the module. Limits that hold on stock amqtt too (the service's
16 KiB request limit) and other broker limits are in test_broker_limits.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from amqtt.broker import Broker

from broker.plugin import info
from broker.server import HardenedBroker, bound_port
from tests.conftest import ServerThread, start_server
from tests.wire import CONNACK_ACCEPTED, Device, Mqtt, closed_within, connect_packet, remaining_length

QUICK_CONNECT_TIMEOUT = "[mqtt]\nconnect_timeout = 1\n"
# read:temperature as a leading-wildcard grant (an allowed scope: it cannot overlap oauth/v1/#)
WILDCARD_GRANT = ('[scopes."read:temperature"]\ndescription = "Read any temperature"\n'
                  'subscribe = ["+/temperature"]\npublish = []\n')
UNSAFE_CLIENT_IDS = ["a/b", "+", "#", "$sys", "nul\x00id", "l\u00e4mp"]
GATE_CANNOT_CLOSE = ("the Gate has no handle on a connection of amqtt's stock Broker: "
                     "a revoked or expired session lives on")


def _must_fail(flaw: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=flaw)


def stock_fails(flaw: str) -> pytest.MarkDecorator:
    """Run on ours, and on amqtt's stock Broker class with our plugin, which must fail with `flaw`."""
    stock = pytest.param("stock", marks=_must_fail(f"stock Broker: {flaw}"))
    return pytest.mark.parametrize("flavour", ["ours", stock])


def shipped_fails(flaw: str) -> pytest.MarkDecorator:
    """Run on ours, and on amqtt as shipped (none of our plugin), which must fail with `flaw`."""
    shipped = pytest.param("shipped", marks=_must_fail(f"amqtt as shipped: {flaw}"))
    return pytest.mark.parametrize("flavour", ["ours", shipped])


class ShippedAmqtt:
    """amqtt's `Broker` with its default configuration on 127.0.0.1, port 0, in its own thread and loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.broker: Broker = self._run(self._start())
        self.mqtt_port = bound_port(self.broker)  # type: ignore[arg-type]

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    @staticmethod
    async def _start() -> Broker:
        broker = Broker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}})
        await broker.start()
        return broker

    def stop(self) -> None:
        try:
            self._run(self.broker.shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            close_loop(self.loop, self.thread)


def close_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Cancel what a stopped server left behind (a stock broker leaves handler tasks of half-dead sessions).

    Otherwise they are destroyed with the loop at some later garbage collection, as warnings in whatever
    test runs then."""
    async def cancel_the_rest() -> None:
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    if not thread.is_alive() and not loop.is_closed():
        loop.run_until_complete(cancel_the_rest())
        loop.close()


Server = ServerThread | ShippedAmqtt


@pytest.fixture
def serve(flavour: str, settings: Any, clock: Any) -> Iterator[Callable[..., Any]]:
    """Start the broker of this test's flavour; `config` is iotauth.toml (amqtt as shipped ignores it)."""
    started: list[Server] = []

    def start(config: str = "") -> Any:
        if flavour == "shipped":
            srv: Server = ShippedAmqtt()
        else:
            broker_cls = HardenedBroker if flavour == "ours" else Broker
            srv = start_server(settings, clock, config, broker_cls=broker_cls)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()
        if isinstance(srv, ServerThread):
            close_loop(srv.loop, srv.thread)


@pytest.fixture
def srv(serve: Callable[..., Any]) -> Any:
    return serve()


def pair(srv: ServerThread, client_id: str) -> tuple[Device, str]:
    """Pair `client_id` over MQTT and approve it: the device and its DPoP-bound access token."""
    dev = Device(srv.mqtt_port, client_id, srv.clock)
    auth = dev.authorize()
    srv.approve(auth["user_code"])
    return dev, dev.poll(auth["device_code"])["access_token"]


def device_session(srv: Server, device: str, **kw: Any) -> Mqtt:
    """An authenticated session of `device` (paired, token + proof); amqtt as shipped lets anyone be anyone.

    `kw` goes to `Device.session` (client_id, will, clean ...)."""
    if isinstance(srv, ShippedAmqtt):
        cid = kw.pop("client_id", device)
        m = Mqtt(srv.mqtt_port, cid, username=cid, password="anything", **kw)
        m.connect()
        return m
    dev, token = pair(srv, device)
    return dev.session(token, **kw)


def connack(m: Mqtt) -> int | None:
    """The CONNACK code `m` got; it then gives up instead of retrying (retries count against the source)."""
    m.client.disconnect()  # its network thread ends by itself; loop_stop() would wait up to a second
    return m.connack


def attempt(m: Mqtt) -> int | None:
    """One CONNECT and its CONNACK code."""
    m.connect()
    return connack(m)


def raw_connack(srv: Server, client_id: str, keep_alive: int = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", srv.mqtt_port)) as sock:
        sock.sendall(connect_packet(client_id, keep_alive))
        sock.settimeout(5)
        return sock.recv(4)


# 1. Authenticate before any session state changes -----------------------------------------------------------


@stock_fails("CONNECT wipes the ClientId's session before authentication refuses it")
def test_a_failed_connect_with_a_live_devices_client_id_leaves_that_device_receiving(srv):
    thermo_dev, token = pair(srv, "thermo-1")
    password = f"{token} {thermo_dev.connect_proof(token)}"
    thermo = thermo_dev.session(token, password=password)
    assert thermo.subscribe("home/thermo-1/power/set") == [1]
    replay = Mqtt(srv.mqtt_port, "thermo-1", username="thermo-1", password=password)  # a captured password
    assert attempt(replay) == 5
    panel = device_session(srv, "panel-1")
    panel.publish("home/thermo-1/power/set", b"on")
    assert thermo.wait_message("home/thermo-1/power/set", timeout=2) == [b"on"]
    assert not thermo.disconnected.is_set()


@stock_fails("a password-less CONNECT takes over a device's live session")
def test_a_bootstrap_connect_cannot_take_over_a_live_device_session(srv):
    thermo = device_session(srv, "thermo-1")
    assert thermo.subscribe("home/thermo-1/power/set") == [1]
    assert attempt(Mqtt(srv.mqtt_port, "thermo-1")) == 2
    device_session(srv, "panel-1").publish("home/thermo-1/power/set", b"on")
    assert thermo.wait_message("home/thermo-1/power/set", timeout=2) == [b"on"]
    assert not thermo.disconnected.is_set()


@stock_fails("a password-less CONNECT takes over or wipes a device's offline session")
@pytest.mark.parametrize("clean", [False, True], ids=["take over", "wipe"])
def test_a_bootstrap_connect_cannot_touch_an_offline_device_session_or_its_queued_messages(srv, clean):
    thermo_dev, token = pair(srv, "thermo-1")
    first = thermo_dev.session(token, clean=False)
    assert first.subscribe("home/thermo-1/power/set") == [1]
    first.close()
    device_session(srv, "panel-1").publish("home/thermo-1/power/set", b"secret-on")
    attacker = Mqtt(srv.mqtt_port, "thermo-1", clean=clean)
    assert attempt(attacker) == 2
    assert attacker.received() == []
    back = thermo_dev.session(token, clean=False)
    assert back.connack == 0
    assert back.wait_message("home/thermo-1/power/set") == [b"secret-on"]
    assert back.flags == [("home/thermo-1/power/set", 1, False)]  # queued, not retained (MQTT-3.3.1-9)


# 2. Timeouts ------------------------------------------------------------------------------------------------


@stock_fails("no CONNECT timeout: a socket that never sends CONNECT is held open for ever")
def test_a_socket_that_sends_no_connect_is_closed_after_the_connect_timeout(serve):
    srv = serve(QUICK_CONNECT_TIMEOUT)
    with socket.create_connection(("127.0.0.1", srv.mqtt_port)) as sock:
        assert closed_within(sock, 2.5) is not None


@stock_fails("a client silent past 1.5 x keep-alive is only logged, never closed")
def test_a_client_silent_for_one_and_a_half_keep_alives_is_closed(srv):
    with socket.create_connection(("127.0.0.1", srv.mqtt_port)) as sock:
        sock.sendall(connect_packet("silent1", keep_alive=1))
        assert sock.recv(4) == CONNACK_ACCEPTED
        assert closed_within(sock, 3.5) is not None  # read timeout ceil(1.5 x 1) = 2 s


@stock_fails("keep-alive 0 means a password-less session never times out")
def test_a_bootstrap_session_asking_for_no_keep_alive_gets_the_bootstrap_default(srv):
    with socket.create_connection(("127.0.0.1", srv.mqtt_port)) as sock:
        sock.sendall(connect_packet("forever1", keep_alive=0))
        assert sock.recv(4) == CONNACK_ACCEPTED
        read_timeout = srv.call(lambda: srv.run.broker._sessions["forever1"][0].keep_alive)
    assert read_timeout == 90  # 1.5 x 60 s: closed after 90 s of silence


# 3. Retained messages obey the ACL --------------------------------------------------------------------------


@stock_fails("a new session gets retained messages matching any client's subscriptions")
def test_a_new_session_gets_retained_messages_only_for_its_own_subscriptions(srv):
    watcher = Mqtt(srv.mqtt_port, "watcher1")
    assert watcher.connect() == 0
    watcher.subscribe("oauth/v1/jwks")
    assert watcher.wait_message("oauth/v1/jwks")
    newcomer = Mqtt(srv.mqtt_port, "newcomer1")
    assert newcomer.connect() == 0
    # what the broker sends a session at CONNECT precedes the SUBACK of its first SUBSCRIBE
    assert newcomer.subscribe("oauth/v1/reply/AAAAAAAAAAAAAAAAAAAAAAAA") == [1]
    assert newcomer.received() == []
    assert len(watcher.received("oauth/v1/jwks")) == 1


@stock_fails("retained messages reach a new session without the RECEIVE check")
def test_a_new_session_never_gets_a_retained_message_its_scopes_do_not_allow(srv):
    thermo = device_session(srv, "thermo-1")
    panel = device_session(srv, "panel-1")
    thermo.publish("home/thermo-1/temperature", b"21", retain=True)
    assert panel.subscribe("home/+/temperature") == [1]
    assert panel.wait_message("home/thermo-1/temperature") == [b"21"]
    lamp = device_session(srv, "lamp-1")  # device:power: may not read temperatures
    assert lamp.subscribe("home/lamp-1/power/set") == [1]
    panel.publish("home/lamp-1/power/set", b"marker")
    assert lamp.wait_message("home/lamp-1/power/set", timeout=2)
    assert lamp.received() == [b"marker"]


# 4. `$` topics ----------------------------------------------------------------------------------------------


@stock_fails("a PUBLISH to a $ topic leaves the session half-dead: later publishes are acked and dropped")
def test_a_publish_to_a_dollar_topic_is_dropped_and_logged_and_the_session_keeps_working(srv, caplog):
    thermo = device_session(srv, "thermo-1")
    panel = device_session(srv, "panel-1")
    assert panel.subscribe("home/+/temperature") == [1]
    thermo.publish("$SYS/broker/uptime", b"0")
    thermo.publish("home/thermo-1/temperature", b'{"celsius": 20}')
    assert panel.wait_message("home/thermo-1/temperature", timeout=2) == [b'{"celsius": 20}']
    assert not thermo.disconnected.is_set()
    assert any("$SYS/broker/uptime" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@shipped_fails("any client may subscribe to $SYS")
def test_a_leading_wildcard_grant_never_reaches_dollar_topics(serve):
    srv = serve(WILDCARD_GRANT)
    panel = device_session(srv, "panel-1")
    assert panel.subscribe("+/temperature", "$SYS/temperature", "$SYS/#", "#") == [1, 0x80, 0x80, 0x80]


# 5. Size limits ---------------------------------------------------------------------------------------------


@stock_fails("no maximum packet size")
def test_a_packet_over_64_kib_closes_the_connection(srv):
    m = Mqtt(srv.mqtt_port, "bigsender")
    assert m.connect() == 0
    m.client.publish("oauth/v1/token", b"x" * (70 * 1024), qos=0)
    assert m.disconnected.wait(2)
    m.client.disconnect()


@stock_fails("a packet is buffered for as long as its header claims, 200 MB here")
def test_a_packet_whose_header_claims_200_mb_is_closed_at_the_header(srv):
    with socket.create_connection(("127.0.0.1", srv.mqtt_port)) as sock:
        sock.sendall(connect_packet("claims200mb", keep_alive=60))
        assert sock.recv(4) == CONNACK_ACCEPTED
        sock.sendall(b"\x30" + remaining_length(200 * 1024 * 1024))  # PUBLISH, QoS 0
        try:
            sock.sendall(b"\x00" * (1024 * 1024))
        except OSError:
            pass  # the server closed it while we were still sending
        assert closed_within(sock, 2) is not None


# 6. Will ----------------------------------------------------------------------------------------------------


@stock_fails(GATE_CANNOT_CLOSE)
def test_a_session_closed_for_revocation_does_not_publish_its_will(srv):
    thermo_dev, token = pair(srv, "thermo-1")
    panel = device_session(srv, "panel-1")
    assert panel.subscribe("home/+/temperature") == [1]
    dropped = thermo_dev.session(token, will=("home/thermo-1/temperature", b"dropped"))
    dropped.client.reconnect_delay_set(120, 120)
    dropped.client.socket().shutdown(socket.SHUT_RDWR)  # gone without DISCONNECT: the Will is published
    assert panel.wait_message("home/thermo-1/temperature") == [b"dropped"]
    revoked = thermo_dev.session(token, will=("home/thermo-1/temperature", b"revoked"))
    assert revoked.connack == 0
    srv.call(srv.service.revoke_client, "thermo-1", srv.clock.now())
    assert revoked.disconnected.wait(1.5)
    assert panel.wait_for(lambda: b"revoked" in panel.received(), timeout=1.0) is False


@shipped_fails("any client may set a Will")
def test_a_bootstrap_session_may_not_set_a_will(srv):
    assert attempt(Mqtt(srv.mqtt_port, "bootwill1", will=("oauth/v1/token", b"x"))) == 5


@shipped_fails("a Will may name any topic")
def test_a_will_topic_outside_the_token_scopes_gets_connack_5(srv):
    assert connack(device_session(srv, "thermo-1", will=("home/panel-1/temperature", b"gone"))) == 5


# 7. Identity ------------------------------------------------------------------------------------------------


@shipped_fails("any ClientId is accepted")
def test_a_bootstrap_connect_with_an_unsafe_client_id_gets_connack_2(srv):
    codes = {cid: raw_connack(srv, cid) for cid in UNSAFE_CLIENT_IDS}
    assert codes == {cid: b"\x20\x02\x00\x02" for cid in UNSAFE_CLIENT_IDS}


@shipped_fails("any ClientId is accepted, with any password")
def test_an_authenticated_connect_with_an_unsafe_client_id_gets_connack_5(srv, caplog):
    codes = {cid: connack(device_session(srv, "thermo-1", client_id=cid)) for cid in UNSAFE_CLIENT_IDS}
    assert codes == {cid: 5 for cid in UNSAFE_CLIENT_IDS}
    assert caplog.text.count("is not a valid client_id") == len(UNSAFE_CLIENT_IDS)


# 8. Shared subscriptions ------------------------------------------------------------------------------------


@shipped_fails("no topic checks: shared subscriptions are granted whatever their filter")
def test_a_shared_subscription_is_judged_by_its_inner_filter(srv, monkeypatch):
    # paho refuses to send a malformed filter; the broker must refuse it on its own
    send_anything = staticmethod(lambda _: mqtt.MQTT_ERR_SUCCESS)
    monkeypatch.setattr(mqtt.Client, "_filter_wildcard_len_check", send_anything)
    panel = device_session(srv, "panel-1")  # read:temperature grants home/+/temperature
    requested = {
        "$share/g/home/+/temperature": 1,
        "$share/g/home/#": 0x80,  # wider than the grant
        "$share/g": 0x80,  # no filter
        "$share//home/+/temperature": 0x80,  # empty group
        "$share/g+/home/+/temperature": 0x80,  # wildcard in the group
    }
    assert dict(zip(requested, panel.subscribe(*requested))) == requested


# 9. Fail closed ---------------------------------------------------------------------------------------------


def logged_traceback(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(r.exc_info and text in str(r.exc_info[1]) for r in caplog.records)


class _RaisingSubscribeCheck:
    """A session ACL whose subscribe check raises; everything else is the real ACL."""

    def __init__(self, acl: Any) -> None:
        self._acl = acl

    def __getattr__(self, name: str) -> Any:
        return getattr(self._acl, name)

    def can_subscribe(self, topic_filter: str) -> bool:
        raise RuntimeError("injected failure in the subscribe check")


@shipped_fails("admits everyone: there is no CONNECT check to fail closed")
def test_an_exception_in_the_connect_check_refuses_with_connack_5_and_the_broker_keeps_serving(
        srv, caplog, monkeypatch):
    if isinstance(srv, ServerThread):
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("injected failure in the CONNECT check")
        monkeypatch.setattr(srv.service, "authorize_connect", broken)
    assert connack(device_session(srv, "thermo-1")) == 5
    assert logged_traceback(caplog, "injected failure")
    monkeypatch.undo()
    assert device_session(srv, "panel-1").connack == 0


@shipped_fails("no topic checks: there is no subscribe check to fail closed")
def test_an_exception_in_a_topic_check_denies_the_subscription_and_the_session_keeps_working(srv, caplog):
    panel = device_session(srv, "panel-1")
    thermo = device_session(srv, "thermo-1")
    assert panel.subscribe("home/+/temperature") == [1]
    if isinstance(srv, ServerThread):
        def break_subscribe_check() -> None:
            meta = info(srv.run.broker._sessions["panel-1"][0])
            meta.acl = _RaisingSubscribeCheck(meta.acl)
        srv.call(break_subscribe_check)
    assert panel.subscribe("home/thermo-1/temperature") == [0x80]
    assert logged_traceback(caplog, "injected failure")
    thermo.publish("home/thermo-1/temperature", b"21")
    assert panel.wait_message("home/thermo-1/temperature") == [b"21"]
    assert not panel.disconnected.is_set()


# 12. Expiry and revocation close sessions within a second ---------------------------------------------------


@stock_fails(GATE_CANNOT_CLOSE)
def test_revoking_the_grant_closes_the_live_session_within_a_second(srv):
    thermo = device_session(srv, "thermo-1")
    assert thermo.connack == 0
    srv.call(srv.service.revoke_client, "thermo-1", srv.clock.now())
    assert thermo.disconnected.wait(1.5)


@stock_fails(GATE_CANNOT_CLOSE)
def test_token_expiry_closes_the_live_session_within_a_second(srv):
    thermo = device_session(srv, "thermo-1")
    assert thermo.connack == 0
    srv.clock.advance(srv.service.settings.access_ttl + 1)
    assert thermo.disconnected.wait(1.5)


# 10. Per-source CONNECT limits, 11. delivery QoS ------------------------------------------------------------
# Proven in test_connect_limits.py (same ours / stock variants); this is their spot if they move here.
