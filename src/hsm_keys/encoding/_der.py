"""Just enough strict DER (X.690) to read the few shapes PKCS#11 tokens hand back.

Tokens wrap EC points and curve names in one TLV; a full ASN.1 library would accept more than we want
(BER lengths, trailing bytes), so this reader insists on minimal lengths and exactly one element.
"""

from __future__ import annotations

from hsm_keys.errors import EncodingError

TAG_INTEGER = 0x02
TAG_BIT_STRING = 0x03
TAG_OCTET_STRING = 0x04
TAG_NULL = 0x05
TAG_OID = 0x06
TAG_UTF8_STRING = 0x0C
TAG_PRINTABLE_STRING = 0x13
TAG_SEQUENCE = 0x30


def read_tlv(data: bytes, what: str) -> tuple[int, bytes, bytes]:
    """Split one element off ``data``: ``(tag, contents, rest)``. Low-tag-number form only."""
    if len(data) < 2:
        raise EncodingError(f"{what}: DER element truncated ({len(data)} bytes)")
    tag, first = data[0], data[1]
    if tag & 0x1F == 0x1F:
        raise EncodingError(f"{what}: high tag numbers are not expected here")
    offset = 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise EncodingError(f"{what}: indefinite length is not DER")
    else:
        count = first & 0x7F
        if count > 4 or len(data) < 2 + count:
            raise EncodingError(f"{what}: DER length field truncated or too large")
        length = int.from_bytes(data[2 : 2 + count], "big")
        if data[2] == 0 or length < 0x80:
            raise EncodingError(f"{what}: DER length is not minimally encoded")
        offset += count
    end = offset + length
    if len(data) < end:
        raise EncodingError(f"{what}: DER element says {length} bytes but only {len(data) - offset} follow")
    return tag, data[offset:end], data[end:]


def read_single(data: bytes, what: str) -> tuple[int, bytes]:
    """Exactly one element and nothing after it."""
    tag, contents, rest = read_tlv(data, what)
    if rest:
        raise EncodingError(f"{what}: {len(rest)} unexpected bytes after the DER element")
    return tag, contents


def encode_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def encode_tlv(tag: int, contents: bytes) -> bytes:
    return bytes([tag]) + encode_length(len(contents)) + contents


def oid_to_dotted(contents: bytes) -> str:
    """Dotted form of an OBJECT IDENTIFIER's contents, for messages (no validation beyond shape)."""
    if not contents or contents[-1] & 0x80:
        raise EncodingError("OBJECT IDENTIFIER contents are empty or truncated")
    arcs: list[int] = []
    value = 0
    for octet in contents:
        value = (value << 7) | (octet & 0x7F)
        if not octet & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in (first, arcs[0] - 40 * first, *arcs[1:]))
