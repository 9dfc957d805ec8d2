"""Topic ACLs: MQTT topic-filter logic and scopes compiled into per-session ACLs.

Implements:

- MQTT 3.1.1 section 4.7 (topic names and topic filters): level separator
  (4.7.1.1), multi-level ``#`` (4.7.1.2, ``sport/#`` also matches ``sport``),
  single-level ``+`` (4.7.1.3), topics beginning with ``$`` (4.7.2), and the
  topic semantics and usage rules of 4.7.3 (non-empty, at most 65535 bytes of
  UTF-8, no NUL, no wildcards in a topic name).
- protocol.md section 1: identities (``client_id``, account names) are 1-64
  characters of ``[A-Za-z0-9._-]`` and are the only values ever substituted
  into topic templates.
- protocol.md section 2: the protocol topic table under the prefix ``P``,
  which applies to every session and overrides every scope.
- protocol.md section 7: scopes map to ``publish`` / ``subscribe`` templates;
  a SUBSCRIBE filter is allowed only when it lies within a granted filter;
  ``$share/<group>/<filter>`` is judged by ``<filter>``; other ``$`` topics
  only when a scope names them explicitly; clients never publish to ``$``.

Pure logic: no I/O, no clock, no amqtt. Anything not explicitly allowed is
denied; every malformed input is a denial, never an exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACLConfigError",
    "ScopeRule",
    "SessionACL",
    "bootstrap_acl",
    "compile_acl",
    "filter_within",
    "filters_overlap",
    "parse_scope_catalogue",
    "topic_matches",
    "valid_identity",
    "valid_topic_filter",
    "valid_topic_name",
]

DEFAULT_PREFIX = "oauth/v1"
MAX_TOPIC_BYTES = 65535  # MQTT 3.1.1 section 1.5.3: UTF-8 encoded strings

PLACEHOLDERS = ("{client_id}", "{sub}")
REQUEST_ENDPOINTS = ("device_authorization", "token", "revoke")  # protocol.md section 2

_IDENTITY = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
_SCOPE_NAME = re.compile(r"[A-Za-z0-9:._-]{1,64}", re.ASCII)
_REPLY_ID = re.compile(r"[A-Za-z0-9_-]{22,64}", re.ASCII)
_BARE_TOML_KEY = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_SHARE = "$share"
_SCOPE_KEYS = ("description", "publish", "subscribe")
# Template validity is checked with the longest identity, so a substituted
# filter can never exceed the length limit after the check passed.
_DUMMY_IDENTITY = "x" * 64

_CACHE_MAX_ENTRIES = 1024
_CACHE_MAX_TOPIC_CHARS = 512  # longer topics are decided but not cached (bounds memory)


class ACLConfigError(ValueError):
    """A scope catalogue entry or topic template is malformed; the message names scope and key."""


# --------------------------------------------------------------------------- MQTT 4.7


def valid_topic_name(topic: str) -> bool:
    """A PUBLISH topic name (MQTT 4.7.3, 1.5.3): non-empty, <= 65535 bytes, no ``+ #`` or NUL."""
    if not isinstance(topic, str) or not topic:
        return False
    if "+" in topic or "#" in topic or "\x00" in topic:
        return False
    return _utf8_length_ok(topic)


def valid_topic_filter(topic_filter: str) -> bool:
    """A SUBSCRIBE topic filter (MQTT 4.7.1): ``+`` fills a whole level, ``#`` the whole last level."""
    if not isinstance(topic_filter, str) or not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "+" in level and level != "+":
            return False
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
    return _utf8_length_ok(topic_filter)


def _utf8_length_ok(text: str) -> bool:
    try:
        return len(text.encode("utf-8")) <= MAX_TOPIC_BYTES
    except UnicodeEncodeError:  # lone surrogates are not UTF-8 (MQTT 1.5.3)
        return False


def _is_wildcard(level: str) -> bool:
    return level in ("+", "#")


def _dollar_excluded(filter_first_level: str, topic_first_level: str) -> bool:
    """MQTT 4.7.2: a filter starting with a wildcard never matches a topic starting with ``$``."""
    return _is_wildcard(filter_first_level) and topic_first_level.startswith("$")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True iff ``topic`` matches ``topic_filter`` (MQTT 4.7); invalid input never matches."""
    if not valid_topic_filter(topic_filter) or not valid_topic_name(topic):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    if _dollar_excluded(f_levels[0], t_levels[0]):
        return False
    for index, level in enumerate(f_levels):
        if level == "#":
            return True  # also matches the parent level (4.7.1.2)
        if index >= len(t_levels):
            return False
        if level != "+" and level != t_levels[index]:
            return False
    return len(f_levels) == len(t_levels)


def filter_within(requested: str, granted: str) -> bool:
    """True iff every topic name that ``requested`` matches is also matched by ``granted``."""
    if not valid_topic_filter(requested) or not valid_topic_filter(granted):
        return False
    req = requested.split("/")
    grant = granted.split("/")
    # A requested filter starting with a '$' literal matches only '$' topics,
    # which a granted filter starting with a wildcard never matches (4.7.2).
    if _dollar_excluded(grant[0], req[0]):
        return False
    for index, level in enumerate(req):
        if index >= len(grant):
            return False  # requested is longer and granted has no '#'
        granted_level = grant[index]
        if granted_level == "#":
            return True
        if level == "#":
            # requested matches every deeper topic, and the parent level unless
            # that parent would be the empty topic name (which is no topic).
            empty_parent = index == 0 or (index == 1 and req[0] == "")
            return empty_parent and grant[index:] == ["+", "#"]
        if granted_level != "+" and granted_level != level:
            return False  # a '+' or a different literal is not within a literal
    # requested matches topics of exactly len(req) levels
    return len(grant) == len(req) or grant[len(req) :] == ["#"]


def filters_overlap(a: str, b: str) -> bool:
    """True iff some topic name matches both filters (invalid filters overlap nothing)."""
    if not valid_topic_filter(a) or not valid_topic_filter(b):
        return False
    a_levels = a.split("/")
    b_levels = b.split("/")
    if _dollar_excluded(a_levels[0], b_levels[0]) or _dollar_excluded(b_levels[0], a_levels[0]):
        return False
    for index in range(max(len(a_levels), len(b_levels))):
        if index >= len(a_levels) or index >= len(b_levels):
            # one filter is used up: the only common topic left is the parent
            # level of a '#' in the other, of `index` levels, and it must not be empty
            longer = a_levels if len(a_levels) > index else b_levels
            empty_parent = index == 1 and "" in (a_levels[0], b_levels[0])
            return longer[index] == "#" and not empty_parent
        level_a, level_b = a_levels[index], b_levels[index]
        if level_a == "#" or level_b == "#":
            return True
        if level_a != "+" and level_b != "+" and level_a != level_b:
            return False
    return True


# --------------------------------------------------------------------------- identities


def valid_identity(value: str) -> bool:
    """protocol.md section 1: 1-64 ASCII characters of ``[A-Za-z0-9._-]``."""
    return isinstance(value, str) and _IDENTITY.fullmatch(value) is not None


def _valid_reply_id(value: str) -> bool:
    return _REPLY_ID.fullmatch(value) is not None


def _check_prefix(prefix: str) -> None:
    if (
        not valid_topic_name(prefix)
        or prefix.startswith("$")
        or any(level == "" for level in prefix.split("/"))
    ):
        raise ValueError(
            f"topic prefix {prefix!r} must be a topic name without wildcards, empty levels or a leading '$'"
        )


# --------------------------------------------------------------------------- scope catalogue


def _toml_key(key: str) -> str:
    return key if _BARE_TOML_KEY.fullmatch(key) else json.dumps(key)


def _template_problem(template: object, action: str) -> str | None:
    """Why ``template`` cannot be a ``publish``/``subscribe`` template, or None (prefix-independent)."""
    if not isinstance(template, str):
        return "is not a string"
    for level in template.split("/"):
        if level in PLACEHOLDERS or ("{" not in level and "}" not in level):
            continue
        if re.fullmatch(r"\{[^{}/]*\}", level):
            return f"uses the unknown placeholder {level}; only {{client_id}} and {{sub}} exist"
        return "has a placeholder that does not fill a whole topic level (or a stray brace)"
    concrete = _substitute(template, _DUMMY_IDENTITY, _DUMMY_IDENTITY)
    if not valid_topic_filter(concrete):
        return "is not a valid MQTT topic filter"
    if action == "publish" and template.startswith("$"):
        return "starts with '$'; clients never publish to '$' topics"
    if action == "subscribe" and template.split("/", 1)[0] == _SHARE:
        return "is a shared subscription; grant the inner filter, $share/<group>/<filter> is judged by it"
    return None


def _reserved_overlap_problem(template: str, prefix: str) -> str | None:
    # A placeholder may become any identity, so it is checked as '+'.
    as_wildcards = _substitute(template, "+", "+")
    reserved = f"{prefix}/#"
    if filters_overlap(as_wildcards, reserved):
        return f"overlaps the reserved protocol namespace {reserved!r} (protocol.md section 2 governs it)"
    return None


def _substitute(template: str, client_id: str, sub: str) -> str:
    """Replace whole-level placeholders level by level, so a value can never add levels."""
    values = {"{client_id}": client_id, "{sub}": sub}
    return "/".join(values.get(level, level) for level in template.split("/"))


@dataclass(frozen=True)
class ScopeRule:
    """One scope of the catalogue: topic templates it grants (protocol.md section 7)."""

    name: str
    description: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def __post_init__(self) -> None:
        where = f"scopes.{_toml_key(str(self.name))}"
        for action, templates in (("publish", self.publish), ("subscribe", self.subscribe)):
            for index, template in enumerate(templates):
                problem = _template_problem(template, action)
                if problem is not None:
                    raise ACLConfigError(f"{where}.{action}[{index}] = {template!r} {problem}")


def parse_scope_catalogue(
    raw: Mapping[str, Any], source: str = "config", *, prefix: str = DEFAULT_PREFIX
) -> dict[str, ScopeRule]:
    """Validate the ``[scopes]`` table once at load; every error names ``source``, scope and key."""
    _check_prefix(prefix)
    if not isinstance(raw, Mapping):
        raise ACLConfigError(f"{source}: scopes must be a table of scope tables")
    catalogue: dict[str, ScopeRule] = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or _SCOPE_NAME.fullmatch(name) is None:
            shown = json.dumps(name) if isinstance(name, str) else repr(name)
            raise ACLConfigError(
                f"{source}: scopes.{shown} is not a valid scope name (1-64 characters of [A-Za-z0-9:._-])"
            )
        catalogue[name] = _parse_scope(name, entry, source, prefix)
    return catalogue


def _parse_scope(name: str, entry: object, source: str, prefix: str) -> ScopeRule:
    where = f"{source}: scopes.{_toml_key(name)}"
    if not isinstance(entry, Mapping):
        raise ACLConfigError(f"{where} must be a table with keys {', '.join(_SCOPE_KEYS)}")
    for key in entry:
        if key not in _SCOPE_KEYS:
            raise ACLConfigError(
                f"{where}.{_toml_key(str(key))} is not a known key (expected {', '.join(_SCOPE_KEYS)})"
            )
    for key in _SCOPE_KEYS:
        if key not in entry:
            raise ACLConfigError(f"{where}.{key} is missing")
    description = entry["description"]
    if not isinstance(description, str):
        raise ACLConfigError(f"{where}.description must be a string")
    templates: dict[str, tuple[str, ...]] = {}
    for action in ("publish", "subscribe"):
        values = entry[action]
        if not isinstance(values, (list, tuple)):
            raise ACLConfigError(f"{where}.{action} must be a list of topic filters")
        for index, template in enumerate(values):
            problem = _template_problem(template, action)
            if problem is None:
                problem = _reserved_overlap_problem(template, prefix)
            if problem is not None:
                raise ACLConfigError(f"{where}.{action}[{index}] = {template!r} {problem}")
        templates[action] = tuple(values)
    return ScopeRule(name, description, templates["publish"], templates["subscribe"])


# --------------------------------------------------------------------------- compiled session ACL


def unshare(topic_filter: str) -> str | None:
    """``$share/<group>/<filter>`` -> ``<filter>``; malformed shares -> None; other filters unchanged."""
    if topic_filter.split("/", 1)[0] != _SHARE:
        return topic_filter
    parts = topic_filter.split("/", 2)
    if len(parts) < 3:
        return None
    group, inner = parts[1], parts[2]
    if not group or "+" in group or "#" in group:
        return None
    return inner


class SessionACL:
    """Compiled once per MQTT session; decisions cached per topic (dict, bounded size)."""

    __slots__ = ("_cache", "_prefix", "_publish", "_reply_prefix", "_request_topics", "_subscribe")

    def __init__(self, prefix: str, publish: Iterable[str], subscribe: Iterable[str]) -> None:
        _check_prefix(prefix)
        self._prefix = prefix
        self._request_topics = frozenset(f"{prefix}/{name}" for name in REQUEST_ENDPOINTS)
        self._reply_prefix = f"{prefix}/reply/"
        self._publish = tuple(dict.fromkeys(publish))
        self._subscribe = tuple(dict.fromkeys(subscribe))
        self._cache: dict[tuple[str, str], bool] = {}

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def publish_filters(self) -> tuple[str, ...]:
        """Publish filters granted by scopes (the protocol table comes on top)."""
        return self._publish

    @property
    def subscribe_filters(self) -> tuple[str, ...]:
        """Subscribe filters granted by scopes (the protocol table comes on top)."""
        return self._subscribe

    def __repr__(self) -> str:
        return (
            f"SessionACL(prefix={self._prefix!r}, publish={self._publish!r}, subscribe={self._subscribe!r})"
        )

    # public decisions ------------------------------------------------------

    def can_publish(self, topic: str) -> bool:
        return self._decide("publish", topic, self._publish_decision)

    def can_subscribe(self, topic_filter: str) -> bool:
        return self._decide("subscribe", topic_filter, self._subscribe_decision)

    def can_receive(self, topic: str) -> bool:
        return self._decide("receive", topic, self._receive_decision)

    # internals -------------------------------------------------------------

    def _decide(self, action: str, topic: str, decision: Callable[[str], bool]) -> bool:
        if not isinstance(topic, str):
            return False
        if len(topic) > _CACHE_MAX_TOPIC_CHARS:
            return decision(topic)
        key = (action, topic)
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) >= _CACHE_MAX_ENTRIES:
                self._cache.clear()
            cached = self._cache[key] = decision(topic)
        return cached

    def _reserved(self, topic: str) -> bool:
        return topic == self._prefix or topic.startswith(self._prefix + "/")

    def _table_receivable(self, topic: str) -> bool:
        """Topics any session may subscribe to (exactly) and receive: P/jwks, P/reply/<reply-id>."""
        if topic == f"{self._prefix}/jwks":
            return True
        return topic.startswith(self._reply_prefix) and _valid_reply_id(topic[len(self._reply_prefix) :])

    def _publish_decision(self, topic: str) -> bool:
        if not valid_topic_name(topic):
            return False
        if topic in self._request_topics:
            return True
        if topic.startswith("$") or self._reserved(topic):
            return False
        return any(topic_matches(granted, topic) for granted in self._publish)

    def _subscribe_decision(self, topic_filter: str) -> bool:
        if not valid_topic_filter(topic_filter):
            return False
        inner = unshare(topic_filter)
        if inner is None or not valid_topic_filter(inner):
            return False
        if self._table_receivable(inner):
            return True
        if filters_overlap(inner, f"{self._prefix}/#"):
            return False
        return any(filter_within(inner, granted) for granted in self._subscribe)

    def _receive_decision(self, topic: str) -> bool:
        if not valid_topic_name(topic):
            return False
        if self._table_receivable(topic):
            return True
        if self._reserved(topic):
            return False
        return any(topic_matches(granted, topic) for granted in self._subscribe)


def compile_acl(
    scopes: Iterable[str],
    catalogue: Mapping[str, ScopeRule],
    *,
    client_id: str,
    sub: str,
    prefix: str = DEFAULT_PREFIX,
) -> SessionACL:
    """The ACL of an authenticated session: the protocol table plus the grants of known scopes."""
    if isinstance(scopes, str):
        raise TypeError("scopes must be a collection of scope names, not a space-separated string")
    for field_name, value in (("client_id", client_id), ("sub", sub)):
        if not valid_identity(value):
            raise ValueError(f"{field_name} {value!r} is not a valid identity (1-64 of [A-Za-z0-9._-])")
    publish: list[str] = []
    subscribe: list[str] = []
    for scope in scopes:
        rule = catalogue.get(scope) if isinstance(scope, str) else None
        if rule is None:
            continue  # unknown scopes contribute nothing
        publish.extend(_substitute(t, client_id, sub) for t in rule.publish)
        subscribe.extend(_substitute(t, client_id, sub) for t in rule.subscribe)
    return SessionACL(prefix, publish, subscribe)


def bootstrap_acl(prefix: str = DEFAULT_PREFIX) -> SessionACL:
    """The ACL of a password-less session: only the protocol topic table (protocol.md section 6)."""
    return SessionACL(prefix, (), ())
