"""RFC 7515 section 2 base64url: URL-safe alphabet, no padding on output, strict on input."""

from __future__ import annotations

import base64
import binascii
import re

from hsm_keys.errors import EncodingError

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str | bytes | bytearray | memoryview) -> bytes:
    """Decode unpadded base64url; padding, whitespace and the standard alphabet are refused."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError as exc:
            raise EncodingError("base64url text must be ASCII") from exc
    elif not isinstance(text, str):
        raise EncodingError(f"base64url text must be str or bytes, got {type(text).__name__}")
    if not _B64URL_RE.fullmatch(text):
        raise EncodingError("base64url text may only hold A-Z a-z 0-9 - _ (no padding)")
    if len(text) % 4 == 1:
        raise EncodingError(f"base64url text of length {len(text)} cannot be valid")
    try:
        decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:  # pragma: no cover - the regex and length check exclude it
        raise EncodingError(f"invalid base64url: {exc}") from exc
    if b64url_encode(decoded) != text:
        raise EncodingError("base64url text has non-zero trailing bits (not canonical)")
    return decoded
