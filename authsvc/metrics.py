"""Prometheus metrics, served at /metrics. Counters only count; nothing secret goes in a label."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry()

REQUESTS = Counter("iotauth_requests_total", "MQTT requests answered, by endpoint and outcome",
                   ["endpoint", "outcome"], registry=REGISTRY)
REQUESTS_DROPPED = Counter("iotauth_requests_dropped_total", "MQTT requests dropped unanswered",
                           ["endpoint"], registry=REGISTRY)
CONNECTS = Counter("iotauth_connects_total", "MQTT CONNECT decisions", ["outcome"], registry=REGISTRY)
ACL_DENIED = Counter("iotauth_acl_denied_total", "Publishes, subscriptions and deliveries refused by the ACL",
                     ["action"], registry=REGISTRY)
DISCONNECTS = Counter("iotauth_forced_disconnects_total", "Sessions closed by the server", ["reason"],
                      registry=REGISTRY)
SESSIONS = Gauge("iotauth_sessions", "Live MQTT sessions", ["kind"], registry=REGISTRY)
