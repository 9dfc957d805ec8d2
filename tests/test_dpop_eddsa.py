"""EdDSA (Ed25519) proofs: refused by default, accepted end to end once `dpop.algorithms` names EdDSA."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from joserfc.jwk import OKPKey

from tests.conftest import start_server
from tests.wire import Device, decode_jwt

EDDSA = '[dpop]\nalgorithms = ["ES256", "EdDSA"]\n'


def okp_thumbprint(key: OKPKey) -> str:
    """RFC 7638 for an OKP key: the required members crv, kty, x in order, no whitespace."""
    public = key.as_dict(private=False)
    canonical = json.dumps({"crv": public["crv"], "kty": "OKP", "x": public["x"]}, separators=(",", ":"))
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


@pytest.fixture
def eddsa_server(settings, clock):
    srv = start_server(settings, clock, EDDSA)
    yield srv
    srv.stop()


def test_an_ed25519_device_pairs_gets_a_bound_token_and_connects(eddsa_server):
    key = OKPKey.generate_key("Ed25519", private=True)
    dev = Device(eddsa_server.mqtt_port, "thermo-1", eddsa_server.clock, key=key)
    auth = dev.request("device_authorization", dpop=dev.proof("device_authorization", alg="EdDSA"))
    eddsa_server.approve(auth["user_code"])
    tokens = dev.poll(auth["device_code"], dpop=dev.proof("token", alg="EdDSA"))
    assert tokens["token_type"] == "DPoP"
    assert decode_jwt(tokens["access_token"])[1]["cnf"] == {"jkt": okp_thumbprint(key)}
    token = tokens["access_token"]
    session = dev.session(token, password=f"{token} {dev.connect_proof(token, alg='EdDSA')}")
    assert session.connack == 0


def test_an_ed25519_proof_is_refused_when_only_es256_is_configured(server):
    key = OKPKey.generate_key("Ed25519", private=True)
    dev = Device(server.mqtt_port, "thermo-1", server.clock, key=key)
    reply = dev.request("device_authorization", dpop=dev.proof("device_authorization", alg="EdDSA"))
    assert reply["error"] == "invalid_dpop_proof"
