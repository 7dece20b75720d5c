"""fetch_chain against real TLS servers on 127.0.0.1 with a generated root -> intermediate -> leaf.

The served chain is cross-checked with ``openssl s_client -showcerts``, and the IAM thumbprint must
be the intermediate's: not the leaf's, and not the root's (which the server does not send).
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsm_keys.encoding import certificate_thumbprint, oidc_thumbprint
from hsm_keys.errors import InvalidInputError, TlsError
from hsm_keys.tls import certificates_from_server_stream, fetch_chain

HOST = "idp.example.test"
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str, key: PrivateKey, issuer: x509.Certificate | None, issuer_key: PrivateKey, *, ca: bool
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    else:
        usage = x509.KeyUsage(True, False, True, False, False, False, False, False, False)
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.add_extension(usage, critical=True).sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    root: x509.Certificate
    intermediate: x509.Certificate
    leaf: x509.Certificate
    root_pem: Path
    served_two: Path  # leaf + intermediate
    served_three: Path  # leaf + intermediate + root
    key: Path


def _make_pki(directory: Path, kind: str) -> Pki:
    def new_key() -> PrivateKey:
        return (
            ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
        )

    root_key, inter_key, leaf_key = new_key(), new_key(), new_key()
    root = _issue("Test Root CA", root_key, None, root_key, ca=True)
    inter = _issue("Test Intermediate CA", inter_key, root, root_key, ca=True)
    leaf = _issue(HOST, leaf_key, inter, inter_key, ca=False)
    pem = {name: c.public_bytes(Encoding.PEM) for name, c in (("r", root), ("i", inter), ("l", leaf))}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "root.pem").write_bytes(pem["r"])
    (directory / "two.pem").write_bytes(pem["l"] + pem["i"])
    (directory / "three.pem").write_bytes(pem["l"] + pem["i"] + pem["r"])
    (directory / "key.pem").write_bytes(
        leaf_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    return Pki(
        root,
        inter,
        leaf,
        directory / "root.pem",
        directory / "two.pem",
        directory / "three.pem",
        directory / "key.pem",
    )


class TlsServer:
    """Accepts connections on 127.0.0.1 and completes TLS handshakes (or stays silent)."""

    def __init__(
        self, chain: Path | None, key: Path | None, *, tls13_only: bool = False, hang_up: bool = False
    ) -> None:
        self.hang_up = hang_up
        self.context: ssl.SSLContext | None = None
        if chain is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(chain, key)
            if tls13_only:
                self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TlsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._held:
            conn.close()
        self.listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            if self.hang_up:
                conn.close()
                continue
            if self.context is None:  # silent: accept, then never answer
                self._held.append(conn)
                continue
            try:
                conn.settimeout(5)
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)  # wait for the client's close_notify or EOF
            except (OSError, ssl.SSLError):
                pass  # clients that abort the handshake are part of the tests
            finally:
                conn.close()


@pytest.fixture(scope="module", params=["ec", "rsa"])
def pki(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _make_pki(tmp_path_factory.mktemp(f"pki-{request.param}"), request.param)


@pytest.fixture
def server(pki: Pki) -> Iterator[TlsServer]:
    with TlsServer(pki.served_two, pki.key) as srv:
        yield srv


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _s_client_chain(port: int) -> list[bytes]:
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", HOST, "-showcerts"],
        input=b"",
        capture_output=True,
        timeout=30,
        check=False,
    ).stdout
    pems = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", out, re.S)
    return [_der(x509.load_pem_x509_certificate(pem)) for pem in pems]


def test_chain_is_leaf_then_intermediate_as_served(pki: Pki, server: TlsServer) -> None:
    chain = fetch_chain(HOST, 443, resolve={HOST: ("127.0.0.1", server.port)}, ca_bundle=pki.root_pem)
    assert [_der(c) for c in chain] == [_der(pki.leaf), _der(pki.intermediate)]
    assert [_der(c) for c in chain] == _s_client_chain(server.port)


def test_iam_thumbprint_is_the_intermediates(pki: Pki, server: TlsServer) -> None:
    chain = fetch_chain(HOST, 443, resolve={HOST: ("127.0.0.1", server.port)}, ca_bundle=pki.root_pem)
    thumbprint = oidc_thumbprint(chain)
    assert thumbprint == certificate_thumbprint(pki.intermediate, "sha1")
    assert thumbprint != certificate_thumbprint(pki.leaf, "sha1")
    assert thumbprint != certificate_thumbprint(pki.root, "sha1")


def test_a_root_sent_along_is_read_but_not_pinned(pki: Pki) -> None:
    with TlsServer(pki.served_three, pki.key) as srv:
        chain = fetch_chain("127.0.0.1", srv.port, server_name=HOST, ca_bundle=pki.root_pem.read_bytes())
    assert [_der(c) for c in chain] == [_der(pki.leaf), _der(pki.intermediate), _der(pki.root)]
    assert oidc_thumbprint(chain) == certificate_thumbprint(pki.intermediate, "sha1")


def test_resolve_matches_host_names_case_insensitively(pki: Pki, server: TlsServer) -> None:
    chain = fetch_chain(HOST.upper(), resolve={HOST: ("127.0.0.1", server.port)}, ca_bundle=pki.root_pem)
    assert _der(chain[0]) == _der(pki.leaf)


def test_a_name_the_leaf_does_not_cover_fails_verification(pki: Pki, server: TlsServer) -> None:
    with pytest.raises(TlsError, match="verification failed"):
        fetch_chain("127.0.0.1", server.port, server_name="other.example.test", ca_bundle=pki.root_pem)


def test_an_untrusted_chain_fails_unless_verification_is_off(pki: Pki, server: TlsServer) -> None:
    with pytest.raises(TlsError, match="verification failed"):
        fetch_chain("127.0.0.1", server.port, server_name=HOST)
    chain = fetch_chain("127.0.0.1", server.port, server_name=HOST, verify=False)
    assert [_der(c) for c in chain] == [_der(pki.leaf), _der(pki.intermediate)]


def test_a_tls13_only_server_is_reported_clearly(pki: Pki) -> None:
    with (
        TlsServer(pki.served_two, pki.key, tls13_only=True) as srv,
        pytest.raises(TlsError, match=r"TLS 1\.3"),
    ):
        fetch_chain("127.0.0.1", srv.port, server_name=HOST, ca_bundle=pki.root_pem)


def test_a_server_that_never_answers_times_out() -> None:
    with TlsServer(None, None) as srv, pytest.raises(TlsError, match=r"within 0\.5 s"):
        fetch_chain("127.0.0.1", srv.port, server_name=HOST, timeout=0.5)


def test_a_server_that_hangs_up_is_a_tls_error() -> None:
    with TlsServer(None, None, hang_up=True) as srv, pytest.raises(TlsError, match="closed the connection"):
        fetch_chain("127.0.0.1", srv.port, server_name=HOST, timeout=5)


def test_a_closed_port_is_a_tls_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(TlsError, match="could not connect"):
        fetch_chain("127.0.0.1", port, timeout=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host": ""}, "host"),
        ({"host": HOST, "port": 0}, "port"),
        ({"host": HOST, "port": True}, "port"),
        ({"host": HOST, "timeout": 0}, "timeout"),
        ({"host": HOST, "ca_bundle": "/nonexistent/ca.pem"}, "CA bundle"),
        ({"host": HOST, "ca_bundle": b"-----BEGIN CERTIFICATE-----\nnope\n"}, "CA bundle"),
    ],
)
def test_bad_arguments_are_rejected_before_connecting(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        fetch_chain(**kwargs)  # type: ignore[arg-type]


# -- the record parser on its own ---------------------------------------------------------------


def _record(content_type: int, body: bytes) -> bytes:
    return bytes([content_type, 3, 3]) + len(body).to_bytes(2, "big") + body


def _handshake(msg_type: int, body: bytes) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def _certificate_message(ders: list[bytes]) -> bytes:
    entries = b"".join(len(d).to_bytes(3, "big") + d for d in ders)
    return _handshake(11, len(entries).to_bytes(3, "big") + entries)


def test_certificate_message_split_across_records_is_reassembled() -> None:
    ders = [b"\x30\x03leaf", b"\x30\x05inter"]
    messages = _handshake(2, b"server hello") + _certificate_message(ders) + _handshake(14, b"")
    stream = (
        _record(22, messages[:7])
        + _record(22, messages[7:20])
        + _record(22, messages[20:])
        + _record(20, b"\x01")
        + _record(22, b"encrypted finished: not parsed")
    )
    assert certificates_from_server_stream(stream) == ders


def test_stream_without_certificate_message() -> None:
    assert certificates_from_server_stream(_record(22, _handshake(2, b"hello")) + _record(20, b"\x01")) == []


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (_record(23, b"app data"), "record type 23"),
        (_record(22, _handshake(11, b"\x00\x00\x06\x00\x00\x05abc")), "truncated"),
        (_record(22, _handshake(11, b"\x00\x00\x05\x00\x00\x05abcde")), "inconsistent"),
        (_record(22, _handshake(11, b"\x00\x00\x03\x00\x00\x00")), "empty"),
        (_record(22, b"\x0b\x00\x01\x00"), "truncated"),
    ],
    ids=["application-data", "short-entry", "bad-total", "empty-entry", "short-message"],
)
def test_malformed_certificate_messages_are_tls_errors(stream: bytes, message: str) -> None:
    with pytest.raises(TlsError, match=message):
        certificates_from_server_stream(stream)
