"""broker.acl: MQTT 3.1.1 section 4.7 topic logic, protocol.md sections 2 and 7, cases.md M1-M6."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.acl import (
    ACLConfigError,
    ScopeRule,
    SessionACL,
    bootstrap_acl,
    compile_acl,
    filter_within,
    filters_overlap,
    parse_scope_catalogue,
    topic_matches,
    valid_identity,
    valid_topic_filter,
    valid_topic_name,
)

DEFAULT_TOML = Path(__file__).resolve().parents[1] / "config" / "default.toml"
REPLY_ID = "Ab3_-" + "x" * 17  # 22 characters, the shortest valid reply-id
REPLY = f"oauth/v1/reply/{REPLY_ID}"


def rule(name: str = "s", publish: tuple[str, ...] = (), subscribe: tuple[str, ...] = ()) -> ScopeRule:
    return ScopeRule(name=name, description="", publish=publish, subscribe=subscribe)


def acl_for(*rules: ScopeRule, client_id: str = "lamp-1", sub: str = "alice") -> SessionACL:
    catalogue = {r.name: r for r in rules}
    return compile_acl(list(catalogue), catalogue, client_id=client_id, sub=sub)


EVERYTHING = rule("all", publish=("#",), subscribe=("#",))


# --------------------------------------------------------------------------- topic names and filters


@pytest.mark.parametrize(
    "topic",
    ["a", "/", "sport/tennis/player1", "/finance", "sport/", "$SYS/x", "a//b", "lämp/1", "x" * 65535],
)
def test_valid_topic_name_accepts(topic: str) -> None:
    assert valid_topic_name(topic)


@pytest.mark.parametrize(
    "topic",
    ["", "a/+", "a/#", "+", "#", "a+b", "a#", "a\x00b", "é" * 32768, "x" * 65536, "a\ud800"],
)
def test_valid_topic_name_refuses(topic: str) -> None:
    assert not valid_topic_name(topic)


@pytest.mark.parametrize(
    "topic_filter", ["#", "+", "a/#", "+/+", "a/+/b", "/", "+/#", "$SYS/#", "a//b", "sport/"]
)
def test_valid_topic_filter_accepts(topic_filter: str) -> None:
    assert valid_topic_filter(topic_filter)


@pytest.mark.parametrize(
    "topic_filter", ["", "a/#/b", "#/a", "a#", "a/b#", "a+", "a/+b/c", "++", "##", "a/\x00", "x" * 65536]
)
def test_valid_topic_filter_refuses(topic_filter: str) -> None:
    assert not valid_topic_filter(topic_filter)


# cases.md "Topic matching", plus M1 and the invalid-input rows
MATCHING = [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/#", "sport", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("+", "/finance", False),
    ("#", "$SYS/anything", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("ACCOUNTS", "Accounts", False),
    ("$SYS/#", "$SYS/anything", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("#", "sport/tennis", True),
    ("+/#", "sport", True),
    ("devices/lamp-1/+", "devices/lamp-1/state", True),
    ("devices/lamp-1/+", "devices/lamp-1/state/x", False),
    ("devices/lamp-1/+", "devices/lamp-1", False),
    ("devices/lamp-1/#", "devices/lamp-1", True),
    ("devices/lamp-1/#", "devices/lamp-10/x", False),
    ("devices/lamp-1/#", "devices/lamp-1x", False),
    ("a/#/b", "a/x/b", False),  # invalid filter
    ("a+", "a+", False),  # invalid filter and topic
    ("#", "a/+", False),  # invalid topic name (M6)
    ("a/b", "", False),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCHING)
def test_topic_matches_follows_mqtt_4_7(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


# cases.md "Filter within filter", plus edge rows
WITHIN = [
    ("a/b/+", "a/b/#", True),
    ("a/b/#", "a/b/+", False),
    ("a/+/c", "a/b/c", False),
    ("#", "a/#", False),
    ("a/#", "a/#", True),
    ("$SYS/#", "#", False),
    ("$SYS/x", "+/x", False),
    ("$SYS/x", "$SYS/+", True),
    ("a", "a/#", True),
    ("a/#", "a/+/#", False),
    ("#", "+/#", True),
    ("+/#", "#", True),
    ("/#", "/+/#", True),  # '/#' cannot match its parent: that would be the empty topic
    ("+/#", "+/+/#", False),  # '+/#' matches 'x', '+/+/#' does not
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("home/kitchen/temperature", "home/+/temperature", True),
    ("home/+/temperature", "home/+/temperature", True),
    ("home/#", "home/+/temperature", False),
    ("#", "home/+/temperature", False),
    ("a/#/b", "#", False),  # invalid requested
    ("a", "a/#/b", False),  # invalid granted
]


@pytest.mark.parametrize(("requested", "granted", "expected"), WITHIN)
def test_filter_within_table(requested: str, granted: str, expected: bool) -> None:
    assert filter_within(requested, granted) is expected


OVERLAP = [
    ("#", "oauth/v1/#", True),
    ("oauth/#", "oauth/v1/#", True),
    ("+/v1/token", "oauth/v1/#", True),
    ("oauth/v1", "oauth/v1/#", True),
    ("oauth/v1/+", "oauth/v1/#", True),
    ("a/+", "+/b", True),
    ("a/#", "a", True),
    ("/#", "/", True),
    ("+/#", "+", True),
    ("/#", "+", False),  # the only common topic would be the empty name
    ("oauth", "oauth/v1/#", False),
    ("home/#", "oauth/v1/#", False),
    ("$SYS/#", "#", False),
    ("#", "$SYS/#", False),
    ("+/x", "$SYS/x", False),
    ("a/+", "a", False),
    ("a/b", "a/c", False),
    ("a/#/b", "#", False),
]


@pytest.mark.parametrize(("a", "b", "expected"), OVERLAP)
def test_filters_overlap_table(a: str, b: str, expected: bool) -> None:
    assert filters_overlap(a, b) is expected
    assert filters_overlap(b, a) is expected


# --------------------------------------------------------------------------- identities (M4)

BAD_IDENTITIES = [
    "+", "#", "a/lamp-2", "", "lamp\x00", "lämp", "x" * 65, "$SYS", "lamp 1", "١٢٣", "lamp-1\n",
]  # fmt: skip


@pytest.mark.parametrize("value", ["lamp-1", "thermo-1", "smart-fridge-001", "A.b_c-9", "a", "x" * 64])
def test_valid_identity_accepts(value: str) -> None:
    assert valid_identity(value)


@pytest.mark.parametrize("value", BAD_IDENTITIES)
def test_valid_identity_refuses(value: str) -> None:
    assert not valid_identity(value)


@pytest.mark.parametrize("value", BAD_IDENTITIES)
def test_compile_acl_refuses_bad_client_id(value: str) -> None:
    catalogue = {"own": rule("own", publish=("devices/{client_id}/#",))}
    with pytest.raises(ValueError, match="client_id"):
        compile_acl(["own"], catalogue, client_id=value, sub="alice")


@pytest.mark.parametrize("value", BAD_IDENTITIES)
def test_compile_acl_refuses_bad_sub(value: str) -> None:
    catalogue = {"home": rule("home", subscribe=("households/{sub}/#",))}
    with pytest.raises(ValueError, match="sub"):
        compile_acl(["home"], catalogue, client_id="lamp-1", sub=value)


def test_placeholders_are_substituted_per_level() -> None:
    acl = acl_for(rule("own", publish=("devices/{client_id}/#", "households/{sub}/{client_id}")))
    assert acl.publish_filters == ("devices/lamp-1/#", "households/alice/lamp-1")
    assert acl.can_publish("households/alice/lamp-1")
    assert not acl.can_publish("households/bob/lamp-1")
    assert not acl.can_publish("devices/lamp-2/state")


# --------------------------------------------------------------------------- M1, M2, M6

M1 = [
    ("devices/{client_id}/+", "devices/lamp-1/state", True),
    ("devices/{client_id}/+", "devices/lamp-1/state/x", False),
    ("devices/{client_id}/+", "devices/lamp-1", False),
    ("devices/{client_id}/#", "devices/lamp-1", True),
    ("devices/{client_id}/#", "devices/lamp-1/state/x", True),
    ("devices/{client_id}/#", "devices/lamp-10/x", False),
    ("devices/{client_id}/#", "devices/lamp-1x", False),
]


@pytest.mark.parametrize(("template", "topic", "allowed"), M1)
def test_m1_publish_is_matched_level_by_level(template: str, topic: str, allowed: bool) -> None:
    assert acl_for(rule(publish=(template,))).can_publish(topic) is allowed


@pytest.mark.parametrize(("template", "topic", "allowed"), M1)
def test_m1_receive_is_matched_level_by_level(template: str, topic: str, allowed: bool) -> None:
    assert acl_for(rule(subscribe=(template,))).can_receive(topic) is allowed


def test_m2_one_subscribe_packet_gets_per_filter_decisions() -> None:
    acl = acl_for(rule(subscribe=("devices/{client_id}/+",)))
    packet = ["devices/lamp-1/#", "devices/lamp-1/+", "devices/lamp-1/state"]
    assert [acl.can_subscribe(f) for f in packet] == [False, True, True]


@pytest.mark.parametrize(
    "topic", ["devices/lamp-1/+", "devices/lamp-1/#", "devices/+/state", "#", "+", "devices/lamp-1/a+b"]
)
def test_m6_publish_to_wildcard_topic_is_never_allowed(topic: str) -> None:
    acl = acl_for(EVERYTHING, rule("own", publish=("devices/{client_id}/#",)))
    assert not acl.can_publish(topic)


# --------------------------------------------------------------------------- M3 no fail-open

PROBES_OUTSIDE_TABLE = ["home/x", "devices/lamp-1/state", "a", "$SYS/x"]


def _denies_everything_outside_table(acl: SessionACL) -> bool:
    return not any(
        [
            *(acl.can_publish(t) for t in PROBES_OUTSIDE_TABLE),
            *(acl.can_receive(t) for t in PROBES_OUTSIDE_TABLE),
            *(acl.can_subscribe(f) for f in ["#", "+", "home/#", "devices/lamp-1/state", "$SYS/#"]),
        ]
    )


@pytest.mark.parametrize(
    ("scopes", "catalogue"),
    [
        pytest.param([], {"all": EVERYTHING}, id="no-scopes"),
        pytest.param([""], {"all": EVERYTHING}, id="empty-scope-name"),
        pytest.param(["unknown"], {"all": EVERYTHING}, id="unknown-scope"),
        pytest.param(["none"], {"none": rule("none")}, id="scope-without-rules"),
        pytest.param(["all"], {}, id="empty-catalogue"),
    ],
)
def test_m3_denies_everything_without_grants(scopes: list[str], catalogue: dict[str, ScopeRule]) -> None:
    acl = compile_acl(scopes, catalogue, client_id="lamp-1", sub="alice")
    assert _denies_everything_outside_table(acl)
    assert acl.can_publish("oauth/v1/token")  # the protocol table still applies


def test_m3_bootstrap_session_denies_everything_outside_table() -> None:
    assert _denies_everything_outside_table(bootstrap_acl())


def test_m3_subscribe_only_scope_cannot_publish() -> None:
    acl = acl_for(rule(subscribe=("devices/{client_id}/#",)))
    assert acl.can_subscribe("devices/lamp-1/state")
    assert not acl.can_publish("devices/lamp-1/state")


def test_m3_publish_only_scope_cannot_subscribe_or_receive() -> None:
    acl = acl_for(rule(publish=("devices/{client_id}/#",)))
    assert acl.can_publish("devices/lamp-1/state")
    assert not acl.can_subscribe("devices/lamp-1/state")
    assert not acl.can_receive("devices/lamp-1/state")


def test_m3_scopes_as_one_string_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        compile_acl("all", {"all": EVERYTHING}, client_id="lamp-1", sub="alice")


# --------------------------------------------------------------------------- protocol topic table

SUBSCRIBE_TABLE = [
    ("#", False),
    ("oauth/#", False),
    ("+/v1/token", False),
    ("$share/g/oauth/#", False),
    ("$share/g/#", False),
    ("$share/g/oauth/v1/token", False),
    ("oauth/v1/+", False),
    ("oauth/v1/#", False),
    ("oauth/v1", False),
    ("oauth/+/token", False),
    ("+/+/+", False),
    ("+/#", False),
    ("oauth/v1/token", False),
    ("oauth/v1/device_authorization", False),
    ("oauth/v1/revoke", False),
    ("oauth/v1/reply/+", False),
    ("oauth/v1/reply/#", False),
    ("oauth/v1/reply/short", False),
    (f"oauth/v1/reply/{REPLY_ID}/#", False),
    (f"oauth/v1/reply/{'x' * 65}", False),
    ("oauth/v1/jwks/#", False),
    ("oauth/v1/jwks/x", False),
    ("oauth/v1/jwks", True),
    (REPLY, True),
    (f"oauth/v1/reply/{'Z' * 64}", True),
    ("$share/g/oauth/v1/jwks", True),
    ("home/#", True),
    ("+", True),
    ("+/+", False),  # matches the prefix topic oauth/v1 itself
    ("+/x", True),
    ("oauth", True),
    ("oauth/v2/token", True),
]


@pytest.mark.parametrize(("topic_filter", "allowed"), SUBSCRIBE_TABLE)
def test_protocol_table_overrides_a_grant_of_everything_for_subscribe(
    topic_filter: str, allowed: bool
) -> None:
    assert acl_for(EVERYTHING).can_subscribe(topic_filter) is allowed


PUBLISH_TABLE = [
    ("oauth/v1/device_authorization", True),
    ("oauth/v1/token", True),
    ("oauth/v1/revoke", True),
    ("home/x", True),
    ("oauth/v2/token", True),
    ("oauth", True),
    (REPLY, False),
    ("oauth/v1/jwks", False),
    ("oauth/v1", False),
    ("oauth/v1/", False),
    ("oauth/v1/other", False),
    ("oauth/v1/token/x", False),
    ("$SYS/x", False),
]


@pytest.mark.parametrize(("topic", "allowed"), PUBLISH_TABLE)
def test_protocol_table_overrides_a_grant_of_everything_for_publish(topic: str, allowed: bool) -> None:
    assert acl_for(EVERYTHING).can_publish(topic) is allowed


RECEIVE_TABLE = [
    ("home/x", True),
    ("oauth/v1/jwks", True),
    (REPLY, True),
    ("oauth/v1/token", False),
    ("oauth/v1/revoke", False),
    ("oauth/v1/device_authorization", False),
    ("oauth/v1", False),
    ("oauth/v1/reply/short", False),
    ("$SYS/x", False),
]


@pytest.mark.parametrize(("topic", "allowed"), RECEIVE_TABLE)
def test_protocol_table_overrides_a_grant_of_everything_for_receive(topic: str, allowed: bool) -> None:
    assert acl_for(EVERYTHING).can_receive(topic) is allowed


BOOTSTRAP = [
    ("publish", "oauth/v1/token", True),
    ("publish", "oauth/v1/device_authorization", True),
    ("publish", "oauth/v1/revoke", True),
    ("publish", REPLY, False),
    ("publish", "oauth/v1/jwks", False),
    ("publish", "home/x", False),
    ("subscribe", REPLY, True),
    ("subscribe", "oauth/v1/jwks", True),
    ("subscribe", "oauth/v1/reply/+", False),
    ("subscribe", "oauth/v1/token", False),
    ("subscribe", "#", False),
    ("receive", REPLY, True),
    ("receive", "oauth/v1/jwks", True),
    ("receive", "oauth/v1/token", False),
    ("receive", "home/x", False),
]


@pytest.mark.parametrize(("action", "topic", "allowed"), BOOTSTRAP)
def test_bootstrap_session_gets_only_the_protocol_table(action: str, topic: str, allowed: bool) -> None:
    assert getattr(bootstrap_acl(), f"can_{action}")(topic) is allowed


def test_protocol_table_follows_the_configured_prefix() -> None:
    catalogue = {"all": EVERYTHING}
    acl = compile_acl(["all"], catalogue, client_id="lamp-1", sub="alice", prefix="acme/auth")
    assert acl.can_publish("acme/auth/token")
    assert not acl.can_publish("acme/auth/jwks")
    assert not acl.can_subscribe("acme/#")
    assert acl.can_subscribe("acme/auth/jwks")
    assert acl.can_subscribe("oauth/v1/token")  # an ordinary topic under another prefix
    assert not bootstrap_acl("acme/auth").can_publish("oauth/v1/token")


@pytest.mark.parametrize("prefix", ["", "a/+", "#", "$oauth/v1", "a//b", "oauth/v1/", "a\x00"])
def test_invalid_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError):
        bootstrap_acl(prefix)
    with pytest.raises(ValueError):
        compile_acl([], {}, client_id="lamp-1", sub="alice", prefix=prefix)


# --------------------------------------------------------------------------- $share and $SYS

SHARE = [
    ("$share/g/home/#", True),
    ("$share/group-1/home/x", True),
    ("$share/g", False),
    ("$share//x", False),
    ("$share//home/x", False),
    ("$share/g+/x", False),
    ("$share/+/home/x", False),
    ("$share/g#/home/x", False),
    ("$share/g/", False),
    ("$share", False),
    ("$share/#", False),
    ("$share/g/#", False),
    ("$share/g/$SYS/#", False),
    ("$share/g/oauth/#", False),
    ("$share/g/$share/h/home/x", False),
]


@pytest.mark.parametrize(("topic_filter", "allowed"), SHARE)
def test_shared_subscription_is_judged_by_its_inner_filter(topic_filter: str, allowed: bool) -> None:
    assert acl_for(rule(subscribe=("home/#",))).can_subscribe(topic_filter) is allowed


DOLLAR = [
    ("#", "subscribe", "$SYS/#", False),
    ("#", "subscribe", "$SYS/broker/uptime", False),
    ("#", "subscribe", "$queue/x", False),
    ("#", "subscribe", "+/monitor/Clients", True),
    ("#", "receive", "$SYS/monitor/Clients", False),
    ("+/monitor/Clients", "receive", "$SYS/monitor/Clients", False),
    ("$SYS/broker/#", "subscribe", "$SYS/broker/uptime", True),
    ("$SYS/broker/#", "subscribe", "$SYS/broker/+", True),
    ("$SYS/broker/#", "subscribe", "$SYS/#", False),
    ("$SYS/broker/#", "subscribe", "#", False),
    ("$SYS/broker/#", "receive", "$SYS/broker/uptime", True),
    ("$SYS/broker/#", "receive", "$SYS/other", False),
]


@pytest.mark.parametrize(("grant", "action", "topic", "allowed"), DOLLAR)
def test_dollar_topics_need_an_explicit_dollar_grant(
    grant: str, action: str, topic: str, allowed: bool
) -> None:
    acl = acl_for(rule(subscribe=(grant,)))
    assert getattr(acl, f"can_{action}")(topic) is allowed


def test_clients_never_publish_to_dollar_topics() -> None:
    assert not acl_for(EVERYTHING).can_publish("$SYS/broker/uptime")
    assert not SessionACL("oauth/v1", ["$SYS/#"], []).can_publish("$SYS/x")  # even a hand-made grant
    with pytest.raises(ACLConfigError, match=r"publish\[0\] = '\$SYS/x'"):
        rule("sys", publish=("$SYS/x",))


# --------------------------------------------------------------------------- scope catalogue


def _entry(**overrides: object) -> dict[str, object]:
    entry: dict[str, object] = {"description": "d", "publish": [], "subscribe": []}
    entry.update(overrides)
    return entry


CATALOGUE_ERRORS = [
    ({"read:x": _entry(subscribe=["home/#x"])}, "subscribe[0] = 'home/#x' is not a valid MQTT topic filter"),
    ({"read:x": _entry(subscribe=["a", "b/+c"])}, "subscribe[1] = 'b/+c' is not a valid MQTT topic filter"),
    ({"read:x": _entry(publish=["home/{client_id}x"])}, "publish[0] = 'home/{client_id}x' has a placeholder"),
    ({"read:x": _entry(publish=["home/x{sub}"])}, "publish[0] = 'home/x{sub}' has a placeholder"),
    ({"read:x": _entry(publish=["home/{user}"])}, "publish[0] = 'home/{user}' uses the unknown placeholder"),
    ({"read:x": _entry(publish=["home/{client-id}"])}, "uses the unknown placeholder {client-id}"),
    ({"read:x": _entry(publish=["home/{"])}, "publish[0] = 'home/{' has a placeholder"),
    ({"read:x": _entry(publish=["$SYS/x"])}, "publish[0] = '$SYS/x' starts with '$'"),
    ({"read:x": _entry(subscribe=["$share/g/home/x"])}, "subscribe[0] = '$share/g/home/x' is a shared"),
    ({"read:x": _entry(subscribe=["#"])}, "subscribe[0] = '#' overlaps the reserved protocol namespace"),
    ({"read:x": _entry(publish=["oauth/#"])}, "publish[0] = 'oauth/#' overlaps the reserved"),
    ({"read:x": _entry(subscribe=["+/v1/token"])}, "'+/v1/token' overlaps the reserved"),
    ({"read:x": _entry(publish=["oauth/v1"])}, "'oauth/v1' overlaps the reserved"),
    ({"read:x": _entry(publish=["{client_id}/v1/token"])}, "'{client_id}/v1/token' overlaps the reserved"),
    ({"read:x": _entry(subscribe=["oauth/{sub}/#"])}, "'oauth/{sub}/#' overlaps the reserved"),
    ({"read:x": _entry(publish=[3])}, "publish[0] = 3 is not a string"),
    ({"read:x": _entry(publish="home/x")}, 'scopes."read:x".publish must be a list'),
    ({"read:x": _entry(description=5)}, 'scopes."read:x".description must be a string'),
    ({"read:x": _entry(publsh=["a"])}, 'scopes."read:x".publsh is not a known key'),
    ({"read:x": {"description": "d", "publish": []}}, 'scopes."read:x".subscribe is missing'),
    ({"read:x": "home/#"}, 'scopes."read:x" must be a table'),
    ({"read temp": _entry()}, 'scopes."read temp" is not a valid scope name'),
    ({"": _entry()}, 'scopes."" is not a valid scope name'),
    ({"lämp": _entry()}, "is not a valid scope name"),
    ({"s" * 65: _entry()}, "is not a valid scope name"),
]


@pytest.mark.parametrize(("raw", "message"), CATALOGUE_ERRORS)
def test_catalogue_error_names_source_scope_and_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ACLConfigError) as caught:
        parse_scope_catalogue(raw, "config/x.toml")
    assert str(caught.value).startswith("config/x.toml: scopes.")
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_catalogue_must_be_a_table() -> None:
    with pytest.raises(ACLConfigError, match="config/x.toml: scopes must be a table"):
        parse_scope_catalogue(["read:x"], "config/x.toml")  # type: ignore[arg-type]


def test_catalogue_overlap_check_follows_the_prefix() -> None:
    raw = {"s": _entry(subscribe=["oauth/#"])}
    assert parse_scope_catalogue(raw, prefix="acme/auth")["s"].subscribe == ("oauth/#",)
    with pytest.raises(ACLConfigError, match="'acme/auth/#'"):
        parse_scope_catalogue({"s": _entry(subscribe=["acme/#"])}, prefix="acme/auth")


def test_catalogue_accepts_dollar_subscribe_templates_and_placeholders() -> None:
    raw = {"sys:read": _entry(subscribe=["$SYS/broker/#"], publish=["households/{sub}/{client_id}/#"])}
    parsed = parse_scope_catalogue(raw)
    assert parsed == {
        "sys:read": ScopeRule("sys:read", "d", ("households/{sub}/{client_id}/#",), ("$SYS/broker/#",))
    }


@pytest.fixture(scope="module")
def shipped() -> dict[str, ScopeRule]:
    with DEFAULT_TOML.open("rb") as handle:
        return parse_scope_catalogue(tomllib.load(handle)["scopes"], "config/default.toml")


def test_shipped_catalogue_parses(shipped: dict[str, ScopeRule]) -> None:
    assert set(shipped) == {"read:temperature", "write:temperature", "control:power", "device:power"}
    assert shipped["write:temperature"].publish == ("home/{client_id}/temperature",)


SHIPPED = [
    ("thermo-1", "publish", "home/thermo-1/temperature", True),
    ("thermo-1", "publish", "home/thermo-1/power/state", True),
    ("thermo-1", "publish", "home/panel-1/temperature", False),
    ("thermo-1", "publish", "home/thermo-1/power/set", False),
    ("thermo-1", "subscribe", "home/thermo-1/power/set", True),
    ("thermo-1", "subscribe", "home/panel-1/power/set", False),
    ("thermo-1", "subscribe", "home/+/temperature", False),
    ("thermo-1", "receive", "home/thermo-1/power/set", True),
    ("panel-1", "subscribe", "home/+/temperature", True),
    ("panel-1", "subscribe", "home/thermo-1/temperature", True),
    ("panel-1", "subscribe", "home/#", False),
    ("panel-1", "subscribe", "#", False),
    ("panel-1", "publish", "home/thermo-1/power/set", True),
    ("panel-1", "publish", "home/thermo-1/power/state", False),
    ("panel-1", "publish", "home/thermo-1/temperature", False),
    ("panel-1", "receive", "home/thermo-1/temperature", True),
    ("panel-1", "receive", "home/thermo-1/power/set", False),
]
SHIPPED_SCOPES = {
    "thermo-1": ["write:temperature", "device:power"],
    "panel-1": ["read:temperature", "control:power"],
}


@pytest.mark.parametrize(("client_id", "action", "topic", "allowed"), SHIPPED)
def test_shipped_catalogue_grants(
    shipped: dict[str, ScopeRule], client_id: str, action: str, topic: str, allowed: bool
) -> None:
    acl = compile_acl(SHIPPED_SCOPES[client_id], shipped, client_id=client_id, sub="alice")
    assert getattr(acl, f"can_{action}")(topic) is allowed


# --------------------------------------------------------------------------- cache


def test_decision_cache_is_bounded_and_stays_correct() -> None:
    acl = acl_for(rule(publish=("devices/{client_id}/#",)))
    for n in range(3000):
        assert acl.can_publish(f"devices/lamp-1/{n}")
        assert not acl.can_publish(f"devices/lamp-2/{n}")
    assert len(acl._cache) <= 1024
    assert acl.can_publish("devices/lamp-1/0") and not acl.can_publish("devices/lamp-2/0")


def test_long_topics_are_decided_but_not_cached() -> None:
    acl = acl_for(rule(publish=("devices/{client_id}/#",)))
    assert acl.can_publish("devices/lamp-1/" + "x" * 600)
    assert not acl.can_publish("devices/lamp-2/" + "x" * 600)
    assert acl._cache == {}


@pytest.mark.parametrize("topic", [None, 3, b"home/x"])
def test_non_string_topics_are_denied(topic: object) -> None:
    acl = acl_for(EVERYTHING)
    assert not acl.can_publish(topic)  # type: ignore[arg-type]
    assert not acl.can_subscribe(topic)  # type: ignore[arg-type]
    assert not acl.can_receive(topic)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- properties


# The topic-filter functions against a reference reading of MQTT 4.7, exhaustively and at random:
# tests/test_fuzz.py. Here: the ACL's own properties.

FILTER_LEVELS = ["a", "b", "", "$", "$a", "+", "#"]


def _joined(levels: list[str], max_levels: int) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(levels), min_size=1, max_size=max_levels).map("/".join)


FILTERS = st.one_of(_joined(FILTER_LEVELS, 4), st.text(alphabet="ab$/+#", max_size=8))


@settings(max_examples=150, deadline=None)
@given(FILTERS, st.booleans())
def test_reserved_namespace_is_closed_even_to_a_grant_of_everything(topic_filter: str, shared: bool) -> None:
    acl = compile_acl(["all"], {"all": EVERYTHING}, client_id="lamp-1", sub="alice", prefix="a/b")
    requested = f"$share/g/{topic_filter}" if shared else topic_filter
    if filters_overlap(topic_filter, "a/b/#"):
        assert not acl.can_subscribe(requested)
    elif valid_topic_filter(topic_filter) and not topic_filter.startswith("$"):
        assert acl.can_subscribe(requested)
