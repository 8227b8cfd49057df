"""Redis over TLS: a real redis-server with --tls-port, the gateway's store verifying its certificate.

Certificates are made here (a CA, Redis's certificate for localhost/127.0.0.1, and a second CA and a
certificate for another host for the controls). What must hold: entries and live events travel over
TLS and come back; an untrusted certificate, another host's certificate and a plaintext client are
all refused, and a refused Redis never fails a request (the store is fail-open, the breaker counts).
With mutual TLS (``--tls-auth-clients yes``) Redis takes only clients whose certificate its CA
signed: the gateway's is accepted, none or one from another CA is refused.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import free_port, wait_listening
from invariant.gateway.metrics import Metrics
from invariant.gateway.records import Record
from invariant.gateway.server import GatewayConfigError, build_config
from invariant.gateway.store import Store, tls_options

PASSWORD = "tls-test-password"
RECORD = Record(token_ids=[5, 6, 7], pieces=["a", "b", "c"], finish_reason="length", prompt_tokens=3)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(directory: Path, cn: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{cn}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(directory: Path, stem: str, ca_key, ca_cert, dns: str, ips: list[str],
                     usage=x509.oid.ExtendedKeyUsageOID.SERVER_AUTH) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName(dns)] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (x509.CertificateBuilder().subject_name(_name(dns)).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    crt, pem = directory / f"{stem}.crt", directory / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


class TlsRedis:
    """redis-server serving TLS only (``--port 0``), with a password, as the chart runs it;
    ``auth_clients``: mutual TLS, as the chart runs it with ``redis.tls.clientSecret``."""

    def __init__(self, cert: Path, key: Path, ca: Path, auth_clients: bool = False):
        self.port = free_port()
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (bash .ci/install installs Debian's)")
        self.proc = subprocess.Popen(
            [exe, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
             "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
             "--tls-auth-clients", "yes" if auth_clients else "no",
             "--requirepass", PASSWORD, "--save", "", "--appendonly", "no"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_listening(self.proc, self.port, "redis-server with TLS")
        except RuntimeError as exc:
            if "TLS" in str(exc) and ("not supported" in str(exc) or "Bad directive" in str(exc)):
                pytest.skip(f"this redis-server was built without TLS: {str(exc).splitlines()[-1]}")
            raise

    def url(self, host: str = "localhost", scheme: str = "rediss") -> str:
        return f"{scheme}://:{PASSWORD}@{host}:{self.port}/0"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key, ca_cert = make_ca(d, "invariant-test-ca")
    rogue_ca, rogue_key, rogue_cert = make_ca(d, "someone-else-ca")
    cert, key = make_server_cert(d, "redis", ca_key, ca_cert, "localhost", ["127.0.0.1"])
    other_cert, other_key = make_server_cert(d, "other", ca_key, ca_cert, "cache.other.example", [])
    client = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
    gw_cert, gw_key = make_server_cert(d, "gateway-client", ca_key, ca_cert, "invariant-gateway", [], client)
    rogue_client, rogue_client_key = make_server_cert(d, "rogue-client", rogue_key, rogue_cert, "invariant-gateway",
                                                      [], client)
    return {"ca": ca, "rogue_ca": rogue_ca, "cert": cert, "key": key, "other_cert": other_cert,
            "other_key": other_key, "client": (gw_cert, gw_key), "rogue_client": (rogue_client, rogue_client_key)}


@pytest.fixture(scope="module")
def tls_redis(pki):
    server = TlsRedis(pki["cert"], pki["key"], pki["ca"])
    yield server
    server.stop()


def round_trip(url: str, ca: Path | None, client: tuple[Path, Path] | None = None
               ) -> tuple[bool, Record | None, list, Metrics]:
    """put, get (from Redis: a fresh store, so no in-process copy), a live event out and back."""
    async def scenario():
        metrics = Metrics()
        tls = dict(tls_ca_file=str(ca) if ca else None, tls_cert_file=str(client[0]) if client else None,
                   tls_key_file=str(client[1]) if client else None)
        writer = Store(url, metrics, timeout=2.0, entry_key=b"k" * 32, **tls)
        reader = Store(url, metrics, timeout=2.0, entry_key=b"k" * 32, **tls)
        try:
            stored = await writer.put("tls-key", RECORD, 60)
            got, _ = await reader.get("tls-key")
            await writer.live_publish("tls-key", {"t": "x"}, 10_000)
            events, _ = await reader.live_read("tls-key", "0", 100)
            return stored, got, events, metrics
        finally:
            await writer.close()
            await reader.close()

    return asyncio.run(scenario())


def store_errors(metrics: Metrics) -> float:
    return sum(s.value for family in metrics.registry.collect() if family.name == "invariant_gateway_redis_errors"
               for s in family.samples if s.name.endswith("_total"))


def test_entries_and_live_events_travel_over_tls(tls_redis, pki):
    stored, got, events, metrics = round_trip(tls_redis.url("localhost"), pki["ca"])
    assert stored and got == RECORD
    assert [fields for _id, fields in events] == [{"t": "x"}]
    assert store_errors(metrics) == 0
    # by IP too: the certificate names 127.0.0.1
    stored, got, _, _ = round_trip(tls_redis.url("127.0.0.1"), pki["ca"])
    assert stored and got == RECORD


@pytest.mark.parametrize("case", ["untrusted CA", "system CAs only", "plaintext client"])
def test_a_redis_that_cannot_be_verified_is_refused_and_the_store_fails_open(tls_redis, pki, case):
    url, ca = {"untrusted CA": (tls_redis.url(), pki["rogue_ca"]), "system CAs only": (tls_redis.url(), None),
               "plaintext client": (tls_redis.url(scheme="redis"), None)}[case]
    stored, got, events, metrics = round_trip(url, ca)
    assert not stored and got is None and events == []
    assert store_errors(metrics) >= 1


def test_a_certificate_for_another_host_is_refused(pki):
    server = TlsRedis(pki["other_cert"], pki["other_key"], pki["ca"])
    try:
        stored, got, _, metrics = round_trip(server.url("localhost"), pki["ca"])
        assert not stored and got is None and store_errors(metrics) >= 1
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mtls_redis(pki):
    server = TlsRedis(pki["cert"], pki["key"], pki["ca"], auth_clients=True)
    yield server
    server.stop()


def test_mutual_tls_takes_the_gateway_certificate(mtls_redis, pki):
    stored, got, events, metrics = round_trip(mtls_redis.url(), pki["ca"], pki["client"])
    assert stored and got == RECORD and [f for _i, f in events] == [{"t": "x"}]
    assert store_errors(metrics) == 0


@pytest.mark.parametrize("case", ["no client certificate", "a client certificate from another CA"])
def test_mutual_tls_refuses_other_clients_and_the_store_fails_open(mtls_redis, pki, case):
    client = None if case == "no client certificate" else pki["rogue_client"]
    stored, got, events, metrics = round_trip(mtls_redis.url(), pki["ca"], client)
    assert not stored and got is None and events == []
    assert store_errors(metrics) >= 1
    # control: the same server, the gateway's certificate, the entry goes through
    assert round_trip(mtls_redis.url(), pki["ca"], pki["client"])[0]


def test_tls_settings(tmp_path, monkeypatch, pki):
    assert tls_options("redis://r:6379/0", None) == {}
    assert tls_options("rediss://r:6379/0", "/ca.crt") == {
        "ssl_cert_reqs": "required", "ssl_check_hostname": True, "ssl_ca_certs": "/ca.crt"}
    monkeypatch.setenv("INVARIANT_GATEWAY_REDIS_CA_FILE", str(pki["ca"]))
    cfg = build_config(model_flags=["m=http://127.0.0.1:1"], redis_url="rediss://r:6379/0", config_file=None,
                       api_keys_file=None)
    assert cfg.redis_ca_file == str(pki["ca"])
    with pytest.raises(GatewayConfigError, match="the Redis URL is not rediss://"):
        build_config(model_flags=["m=http://127.0.0.1:1"], redis_url="redis://r:6379/0", config_file=None,
                     api_keys_file=None)
    monkeypatch.setenv("INVARIANT_GATEWAY_REDIS_CA_FILE", str(tmp_path / "missing.crt"))
    with pytest.raises(GatewayConfigError, match="missing.crt: no such file"):
        build_config(model_flags=["m=http://127.0.0.1:1"], redis_url="rediss://r:6379/0", config_file=None,
                     api_keys_file=None)
    monkeypatch.setenv("INVARIANT_GATEWAY_REDIS_CA_FILE", str(pki["ca"]))
    crt, key = pki["client"]
    assert tls_options("rediss://r:6379/0", "/ca.crt", "/c.crt", "/c.key")["ssl_certfile"] == "/c.crt"
    monkeypatch.setenv("INVARIANT_GATEWAY_REDIS_CERT_FILE", str(crt))
    with pytest.raises(GatewayConfigError, match="needs its key"):
        build_config(model_flags=["m=http://127.0.0.1:1"], redis_url="rediss://r:6379/0", config_file=None,
                     api_keys_file=None)
    monkeypatch.setenv("INVARIANT_GATEWAY_REDIS_KEY_FILE", str(key))
    cfg = build_config(model_flags=["m=http://127.0.0.1:1"], redis_url="rediss://r:6379/0", config_file=None,
                       api_keys_file=None)
    assert (cfg.redis_cert_file, cfg.redis_key_file) == (str(crt), str(key))
    monkeypatch.delenv("INVARIANT_GATEWAY_REDIS_CA_FILE")
    with pytest.raises(GatewayConfigError, match="client certificate .* the Redis URL is not rediss://"):
        build_config(model_flags=["m=http://127.0.0.1:1"], redis_url="redis://r:6379/0", config_file=None,
                     api_keys_file=None)
    monkeypatch.setenv("INVARIANT_GATEWAY_REDIS_KEY_FILE", str(tmp_path / "gone.key"))
    with pytest.raises(GatewayConfigError, match="INVARIANT_GATEWAY_REDIS_KEY_FILE .*gone.key: no such file"):
        build_config(model_flags=["m=http://127.0.0.1:1"], redis_url="rediss://r:6379/0", config_file=None,
                     api_keys_file=None)
