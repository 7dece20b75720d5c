"""The certificate chain a live TLS endpoint actually serves (what IAM's thumbprint is taken from).

Python before 3.13 has no public API for the peer's chain (``getpeercert`` gives the leaf only), and
reaching into ``_ssl`` internals is not an option. So the standard library performs a complete,
normal handshake -- certificate and hostname verification, Finished messages and all -- over memory
BIOs, while we relay the bytes between the socket and the BIOs ourselves. TLS 1.2 sends the server's
Certificate handshake message in the clear, so the chain is read, exactly as served and in order,
from the bytes we relayed. The handshake is pinned to TLS 1.2 for that reason: TLS 1.3 encrypts the
Certificate message. A server that only speaks TLS 1.3 therefore gets a clear ``TlsError``.

Reading what was relayed (rather than what the verifier built) matters: IAM pins the last CA the
server *sends*, and a verified chain would include the unsent root from the local trust store.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from collections.abc import Mapping

from cryptography import x509

from hsm_keys.errors import InvalidInputError, TlsError

_CONTENT_CHANGE_CIPHER_SPEC = 20
_CONTENT_ALERT = 21
_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CERTIFICATE = 11
_RECORD_HEADER = 5
_READ_SIZE = 65536


class _ServerClosedError(Exception):
    """The peer closed the socket before the handshake finished."""


def fetch_chain(
    host: str,
    port: int = 443,
    *,
    server_name: str | None = None,
    resolve: Mapping[str, tuple[str, int]] | None = None,
    ca_bundle: str | os.PathLike[str] | bytes | None = None,
    verify: bool = True,
    timeout: float = 10.0,
) -> list[x509.Certificate]:
    """Certificates the server at ``host:port`` sends, leaf first, after a verified handshake.

    ``server_name`` (default ``host``) is sent as SNI and checked against the leaf. ``resolve``
    maps a host name to the ``(address, port)`` to connect to instead, like curl's ``--resolve``.
    ``ca_bundle`` is a PEM file path, or PEM/DER bytes, to trust instead of the system store.
    ``verify=False`` reads the chain without checking it (for diagnosing a broken endpoint).
    ``timeout`` bounds the whole exchange, in seconds.
    """
    if not isinstance(host, str) or not host:
        raise InvalidInputError("host must be a non-empty string")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidInputError(f"port must be an integer between 1 and 65535, got {port!r}")
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise InvalidInputError(f"timeout must be a positive number of seconds, got {timeout!r}")
    name = server_name or host
    address = (host, port)
    if resolve:
        override = {key.lower(): value for key, value in resolve.items()}.get(host.lower())
        if override is not None:
            address = (override[0], int(override[1]))
    where = f"{host}:{port}"
    if address != (host, port):
        where += f" (connecting to {address[0]}:{address[1]})"

    context = _client_context(ca_bundle, verify)
    deadline = time.monotonic() + timeout
    try:
        stream, leaf = _handshake(context, address, name, deadline)
    except _ServerClosedError as exc:
        raise TlsError(f"{where}: the server closed the connection during the handshake") from exc
    except (OSError, ssl.SSLError) as exc:  # ssl.SSLError is an OSError; listed for clarity
        raise _tls_error(exc, where, timeout) from exc

    ders = certificates_from_server_stream(stream)
    if not ders:
        raise TlsError(f"{where}: the server sent no Certificate message")
    if leaf is not None and ders[0] != leaf:
        raise TlsError(f"{where}: the relayed Certificate message does not match the verified leaf")
    try:
        return [x509.load_der_x509_certificate(der) for der in ders]
    except ValueError as exc:
        raise TlsError(f"{where}: the server sent a certificate that does not parse: {exc}") from exc


def _client_context(ca_bundle: str | os.PathLike[str] | bytes | None, verify: bool) -> ssl.SSLContext:
    try:
        if ca_bundle is None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        elif isinstance(ca_bundle, bytes):
            cadata: str | bytes = ca_bundle.decode("ascii") if b"-----BEGIN" in ca_bundle else ca_bundle
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=cadata)
        else:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.fspath(ca_bundle))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"could not load the CA bundle: {exc}") from exc
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _handshake(
    context: ssl.SSLContext, address: tuple[str, int], server_name: str, deadline: float
) -> tuple[bytes, bytes | None]:
    """Run the handshake, relaying bytes; return what the server sent and the verified leaf (DER)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    received = bytearray()
    with socket.create_connection(address, timeout=_remaining(deadline)) as sock:
        tls = context.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_name)

        def flush() -> None:
            pending = outgoing.read()
            if pending:
                sock.settimeout(_remaining(deadline))
                sock.sendall(pending)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                sock.settimeout(_remaining(deadline))
                data = sock.recv(_READ_SIZE)
                if not data:
                    raise _ServerClosedError from None
                received += data
                incoming.write(data)
            except ssl.SSLError:
                with contextlib.suppress(OSError):  # let the server see our alert
                    flush()
                raise
        flush()
        if tls.version() != "TLSv1.2":  # pragma: no cover - the context pins TLS 1.2
            raise TlsError(f"negotiated {tls.version()}, but the chain can only be read from TLS 1.2")
        leaf = tls.getpeercert(binary_form=True)
        # close_notify is a courtesy; the server may already have gone.
        with contextlib.suppress(ssl.SSLError, OSError):
            tls.unwrap()
        with contextlib.suppress(OSError):
            flush()
    return bytes(received), leaf


def certificates_from_server_stream(stream: bytes) -> list[bytes]:
    """DER certificates of the first Certificate message in a server's TLS 1.2 byte stream.

    Handshake messages may span records and records may hold several messages (RFC 5246 section
    6.2.1), so record bodies are joined before messages are split. Reading stops at the server's
    ChangeCipherSpec: everything after it is encrypted.
    """
    handshake = bytearray()
    pos = 0
    while pos + _RECORD_HEADER <= len(stream):
        content_type = stream[pos]
        length = int.from_bytes(stream[pos + 3 : pos + 5], "big")
        body = stream[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
        if len(body) < length:
            break
        pos += _RECORD_HEADER + length
        if content_type == _CONTENT_CHANGE_CIPHER_SPEC:
            break
        if content_type == _CONTENT_HANDSHAKE:
            handshake += body
        elif content_type != _CONTENT_ALERT:
            raise TlsError(f"unexpected TLS record type {content_type} before the server's ChangeCipherSpec")

    pos = 0
    while pos + 4 <= len(handshake):
        msg_type = handshake[pos]
        length = int.from_bytes(handshake[pos + 1 : pos + 4], "big")
        body = bytes(handshake[pos + 4 : pos + 4 + length])
        if len(body) < length:
            raise TlsError("the server's handshake messages are truncated")
        pos += 4 + length
        if msg_type == _HANDSHAKE_CERTIFICATE:
            return _certificate_list(body)
    return []


def _certificate_list(body: bytes) -> list[bytes]:
    """RFC 5246 section 7.4.2: a 3-byte total length, then 3-byte-length-prefixed DER certificates."""
    if len(body) < 3 or int.from_bytes(body[:3], "big") != len(body) - 3:
        raise TlsError("the server's Certificate message has an inconsistent length")
    certificates: list[bytes] = []
    pos = 3
    while pos < len(body):
        if pos + 3 > len(body):
            raise TlsError("the server's Certificate message is truncated")
        length = int.from_bytes(body[pos : pos + 3], "big")
        der = body[pos + 3 : pos + 3 + length]
        if length == 0 or len(der) != length:
            raise TlsError("the server's Certificate message holds an empty or truncated certificate")
        certificates.append(der)
        pos += 3 + length
    return certificates


def _tls_error(exc: BaseException, where: str, timeout: float) -> TlsError:
    """The one place socket and ssl errors become ``TlsError``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TlsError(f"{where}: certificate verification failed: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        reason = str(getattr(exc, "reason", "") or exc)
        if "VERSION" in reason.upper() or "UNSUPPORTED_PROTOCOL" in reason.upper():
            return TlsError(
                f"{where}: could not negotiate TLS 1.2 ({reason}); the served chain is read from a "
                "TLS 1.2 handshake, so a server that only offers TLS 1.3 cannot be read"
            )
        return TlsError(f"{where}: TLS handshake failed: {reason}")
    if isinstance(exc, TimeoutError):
        return TlsError(f"{where}: no complete handshake within {timeout:g} s")
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return TlsError(f"{where}: the server closed the connection during the handshake ({exc})")
    if isinstance(exc, socket.gaierror):
        return TlsError(f"{where}: could not resolve the host name: {exc}")
    return TlsError(f"{where}: could not connect: {exc}")


__all__ = ["certificates_from_server_stream", "fetch_chain"]
