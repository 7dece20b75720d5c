"""Issuers: one per (staff, account), their URLs, and publishing their discovery document and JWKS.

An issuer is ``<base>/<account>/<staff>`` with the staff id in lower case (IAM role names are
case-insensitive, so the issuer must be too). Its documents are static files — what a user uploads to
a bucket or CDN — written by an :class:`IssuerPublisher`. The library's own HTTPS clients (thumbprint,
``verify``) honour an :class:`HttpsOptions` host mapping and CA bundle, so local runs keep real issuer
URLs (https, no port) while talking to a loopback server.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import ssl
import tempfile
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hsm_keys.errors import ConfigurationError, InvalidInputError, TlsError
from hsm_keys.oidc import validate_issuer_url
from hsm_keys.types import Binding

DISCOVERY_PATH = ".well-known/openid-configuration"
JWKS_PATH = "jwks.json"
STS_AUDIENCE = "sts.amazonaws.com"


@dataclass(frozen=True)
class HttpsOptions:
    """How the library's own HTTPS clients reach issuers: like curl's ``--resolve`` and ``--cacert``."""

    resolve: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    ca_bundle: str | None = None
    timeout: float = 10.0

    def address(self, host: str, port: int = 443) -> tuple[str, int]:
        mapped = {k.lower(): v for k, v in self.resolve.items()}.get(host.lower())
        return (mapped[0], int(mapped[1])) if mapped else (host, port)


@dataclass(frozen=True)
class IssuerScheme:
    """Names every issuer under one base URL (https, no port, query or fragment)."""

    base_url: str
    audience: str = STS_AUDIENCE
    #: Only a default: a provider's ARN is in its account's partition (``aws``, ``aws-cn``,
    #: ``aws-us-gov``), which the access layer passes from the account's management role ARN.
    partition: str = "aws"

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", validate_issuer_url(self.base_url.rstrip("/")))
        if not self.audience or any(c.isspace() for c in self.audience):
            raise ConfigurationError(f"audience {self.audience!r} is not a valid client id")

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.base_url).hostname or ""

    @property
    def base_path(self) -> str:
        """Path of the base URL without leading or trailing slash ('' when the base is a bare host)."""
        return urllib.parse.urlsplit(self.base_url).path.strip("/")

    def relative_path(self, binding: Binding) -> str:
        return f"{binding.account}/{binding.staff.lower()}"

    def issuer(self, binding: Binding) -> str:
        return f"{self.base_url}/{self.relative_path(binding)}"

    def discovery_url(self, binding: Binding) -> str:
        return f"{self.issuer(binding)}/{DISCOVERY_PATH}"

    def jwks_uri(self, binding: Binding) -> str:
        return f"{self.issuer(binding)}/{JWKS_PATH}"

    def provider_url(self, binding: Binding) -> str:
        """How IAM names the provider: the issuer without ``https://``."""
        return self.issuer(binding).removeprefix("https://")

    def provider_arn(self, binding: Binding, partition: str | None = None) -> str:
        """The provider's ARN in ``partition`` (the account's; default :attr:`partition`)."""
        return (
            f"arn:{partition or self.partition}:iam::{binding.account}:oidc-provider/"
            f"{self.provider_url(binding)}"
        )

    def owns_provider_arn(self, arn: str, account: str, partition: str | None = None) -> bool:
        """True for providers under this base in ``account`` (the library's namespace)."""
        prefix = (
            f"arn:{partition or self.partition}:iam::{account}:oidc-provider/"
            f"{self.base_url.removeprefix('https://')}/"
        )
        return arn.startswith(prefix) and arn[len(prefix) :].startswith(f"{account}/")

    def binding_of_provider_arn(
        self, arn: str, account: str, partition: str | None = None
    ) -> tuple[str, str] | None:
        """(account, lower-case staff) named by one of our provider ARNs, else None."""
        if not self.owns_provider_arn(arn, account, partition):
            return None
        rest = arn.split(":oidc-provider/", 1)[1].removeprefix(self.base_url.removeprefix("https://") + "/")
        parts = rest.split("/")
        if len(parts) != 2 or parts[0] != account:
            return None
        return parts[0], parts[1]


class IssuerPublisher(Protocol):
    """Where issuer documents live. ``path`` is the issuer's URL path (``<base path>/<account>/<staff>``)."""

    def publish(self, path: str, documents: Mapping[str, bytes]) -> None: ...

    def unpublish(self, path: str) -> None: ...

    def published(self) -> list[str]: ...


def issuer_documents(discovery: Mapping[str, Any], jwks: Mapping[str, Any]) -> dict[str, bytes]:
    return {
        DISCOVERY_PATH: json.dumps(discovery, indent=2, sort_keys=True).encode() + b"\n",
        JWKS_PATH: json.dumps(jwks, indent=2, sort_keys=True).encode() + b"\n",
    }


class DirectoryPublisher:
    """Static files under ``root`` mirroring URL paths; each file replaced atomically."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    def _dir(self, path: str) -> Path:
        clean = path.strip("/")
        parts = clean.split("/")
        if not clean or any(p in ("", ".", "..") for p in parts):
            raise InvalidInputError(f"issuer path {path!r} is not a clean relative path")
        return self.root.joinpath(*parts)

    def publish(self, path: str, documents: Mapping[str, bytes]) -> None:
        target = self._dir(path)
        with self._lock:
            for name, content in documents.items():
                destination = target / name
                destination.parent.mkdir(parents=True, exist_ok=True)
                fd, temporary = tempfile.mkstemp(dir=destination.parent, prefix=".tmp-")
                try:
                    with os.fdopen(fd, "wb") as handle:
                        handle.write(content)
                        handle.flush()
                        os.fsync(handle.fileno())
                    os.chmod(temporary, 0o644)
                    os.replace(temporary, destination)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(temporary)
                    raise

    def unpublish(self, path: str) -> None:
        target = self._dir(path)
        with self._lock:
            shutil.rmtree(target, ignore_errors=True)

    def published(self) -> list[str]:
        found = []
        for discovery in self.root.rglob(JWKS_PATH):
            found.append(discovery.parent.relative_to(self.root).as_posix())
        return sorted(found)


class MemoryPublisher:
    """Documents in a dict: for tests and for services that serve documents themselves."""

    def __init__(self) -> None:
        self.documents: dict[str, dict[str, bytes]] = {}

    def publish(self, path: str, documents: Mapping[str, bytes]) -> None:
        self.documents[path.strip("/")] = dict(documents)

    def unpublish(self, path: str) -> None:
        self.documents.pop(path.strip("/"), None)

    def published(self) -> list[str]:
        return sorted(self.documents)


class _MappedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a mapped address while SNI and certificate checks use the URL's host."""

    def __init__(self, host: str, address: tuple[str, int], context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(host, timeout=timeout, context=context)
        self._address = address
        self._context = context

    def connect(self) -> None:
        sock = socket.create_connection(self._address, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def https_get(url: str, options: HttpsOptions | None = None, *, limit: int = 1 << 20) -> tuple[int, bytes]:
    """GET over verified HTTPS; returns (status, body). Redirects are not followed (STS does not)."""
    options = options or HttpsOptions()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidInputError(f"{url!r} is not an https URL")
    context = ssl.create_default_context(cafile=options.ca_bundle)
    address = options.address(parts.hostname, parts.port or 443)
    connection = _MappedHTTPSConnection(parts.hostname, address, context, options.timeout)
    try:
        connection.request("GET", parts.path or "/", headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read(limit + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise TlsError(f"GET {url} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        connection.close()
    if len(body) > limit:
        raise TlsError(f"GET {url}: response larger than {limit} bytes")
    return response.status, body
