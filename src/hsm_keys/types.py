"""Value types shared by every layer: key specs, signature algorithms, bindings, key metadata.

Algorithm and key-spec facts live here as data (a registry), so backends look them up instead of
branching on names.
"""

from __future__ import annotations

import datetime as _dt
import enum
import re
from dataclasses import dataclass, field
from typing import TypeAlias

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from hsm_keys.errors import InvalidBindingError, UnsupportedAlgorithmError

PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class KeyType(enum.Enum):
    RSA = "RSA"
    EC = "EC"
    OKP = "OKP"  # RFC 8037 octet key pair (Ed25519)


class KeySpec(enum.Enum):
    """What kind of key to generate. Value is the stable name used in labels and CLIs."""

    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"
    EC_P256 = "EC_P256"
    EC_P384 = "EC_P384"
    EC_P521 = "EC_P521"
    ED25519 = "ED25519"

    @property
    def key_type(self) -> KeyType:
        return _SPEC_FACTS[self][0]

    @property
    def size(self) -> int:
        """RSA modulus bits, or EC field bits (256 / 384 / 521; 255 for Ed25519)."""
        return _SPEC_FACTS[self][1]

    @property
    def curve(self) -> str | None:
        """JOSE curve name (``P-256``, ``Ed25519``), or None for RSA."""
        return _SPEC_FACTS[self][2]

    @property
    def coordinate_size(self) -> int:
        """Bytes in one EC coordinate (and half an ECDSA signature); 0 for RSA."""
        return (self.size + 7) // 8 if self.key_type is KeyType.EC else 0

    @classmethod
    def parse(cls, name: str) -> KeySpec:
        """Accept ``EC_P256``, ``ec-p256``, ``P-256``, ``rsa2048`` and similar spellings."""
        wanted = re.sub(r"[^A-Z0-9]", "", str(name).upper())
        for spec in cls:
            aliases = {spec.value.replace("_", ""), (spec.curve or "").upper().replace("-", "")} - {""}
            if wanted in aliases:
                return spec
        raise UnsupportedAlgorithmError(
            f"unknown key spec {name!r}; expected one of {', '.join(s.value for s in cls)}"
        )


_SPEC_FACTS: dict[KeySpec, tuple[KeyType, int, str | None]] = {
    KeySpec.RSA_2048: (KeyType.RSA, 2048, None),
    KeySpec.RSA_3072: (KeyType.RSA, 3072, None),
    KeySpec.RSA_4096: (KeyType.RSA, 4096, None),
    KeySpec.EC_P256: (KeyType.EC, 256, "P-256"),
    KeySpec.EC_P384: (KeyType.EC, 384, "P-384"),
    KeySpec.EC_P521: (KeyType.EC, 521, "P-521"),
    KeySpec.ED25519: (KeyType.OKP, 255, "Ed25519"),
}


class Padding(enum.Enum):
    PKCS1V15 = "PKCS1v15"
    PSS = "PSS"
    ECDSA = "ECDSA"
    EDDSA = "EdDSA"


class SignatureAlgorithm(enum.Enum):
    """JOSE signature algorithms (RFC 7518 / RFC 8037). Value is the JOSE ``alg`` name."""

    RS256 = "RS256"
    RS384 = "RS384"
    RS512 = "RS512"
    PS256 = "PS256"
    PS384 = "PS384"
    PS512 = "PS512"
    ES256 = "ES256"
    ES384 = "ES384"
    ES512 = "ES512"
    EdDSA = "EdDSA"

    @property
    def padding(self) -> Padding:
        return _ALG_FACTS[self][0]

    @property
    def hash_name(self) -> str | None:
        """``sha256`` / ``sha384`` / ``sha512``, or None for EdDSA (which hashes internally)."""
        return _ALG_FACTS[self][1]

    @property
    def hash_size(self) -> int:
        return {None: 0, "sha256": 32, "sha384": 48, "sha512": 64}[self.hash_name]

    @property
    def key_type(self) -> KeyType:
        return {
            Padding.PKCS1V15: KeyType.RSA,
            Padding.PSS: KeyType.RSA,
            Padding.ECDSA: KeyType.EC,
            Padding.EDDSA: KeyType.OKP,
        }[self.padding]

    def allows(self, spec: KeySpec) -> bool:
        """RSA algorithms take any RSA size; ES256/384/512 each need their own curve (RFC 7518 3.4)."""
        if spec.key_type is not self.key_type:
            return False
        required = _ES_CURVE.get(self)
        return required is None or required is spec

    def check_spec(self, spec: KeySpec) -> None:
        if not self.allows(spec):
            allowed = ", ".join(s.value for s in KeySpec if self.allows(s))
            raise UnsupportedAlgorithmError(
                f"algorithm {self.value} cannot be used with an {spec.value} key "
                f"(allowed key specs: {allowed})"
            )

    @classmethod
    def parse(cls, name: str | SignatureAlgorithm) -> SignatureAlgorithm:
        if isinstance(name, SignatureAlgorithm):
            return name
        for alg in cls:
            if alg.value.lower() == str(name).lower():
                return alg
        raise UnsupportedAlgorithmError(
            f"unknown signature algorithm {name!r}; expected one of {', '.join(a.value for a in cls)}"
        )

    @classmethod
    def default_for(cls, spec: KeySpec) -> SignatureAlgorithm:
        return _DEFAULT_ALG[spec]


_ALG_FACTS: dict[SignatureAlgorithm, tuple[Padding, str | None]] = {
    SignatureAlgorithm.RS256: (Padding.PKCS1V15, "sha256"),
    SignatureAlgorithm.RS384: (Padding.PKCS1V15, "sha384"),
    SignatureAlgorithm.RS512: (Padding.PKCS1V15, "sha512"),
    SignatureAlgorithm.PS256: (Padding.PSS, "sha256"),
    SignatureAlgorithm.PS384: (Padding.PSS, "sha384"),
    SignatureAlgorithm.PS512: (Padding.PSS, "sha512"),
    SignatureAlgorithm.ES256: (Padding.ECDSA, "sha256"),
    SignatureAlgorithm.ES384: (Padding.ECDSA, "sha384"),
    SignatureAlgorithm.ES512: (Padding.ECDSA, "sha512"),
    SignatureAlgorithm.EdDSA: (Padding.EDDSA, None),
}

_ES_CURVE: dict[SignatureAlgorithm, KeySpec] = {
    SignatureAlgorithm.ES256: KeySpec.EC_P256,
    SignatureAlgorithm.ES384: KeySpec.EC_P384,
    SignatureAlgorithm.ES512: KeySpec.EC_P521,
}

_DEFAULT_ALG: dict[KeySpec, SignatureAlgorithm] = {
    KeySpec.RSA_2048: SignatureAlgorithm.RS256,
    KeySpec.RSA_3072: SignatureAlgorithm.RS256,
    KeySpec.RSA_4096: SignatureAlgorithm.RS256,
    KeySpec.EC_P256: SignatureAlgorithm.ES256,
    KeySpec.EC_P384: SignatureAlgorithm.ES384,
    KeySpec.EC_P521: SignatureAlgorithm.ES512,
    KeySpec.ED25519: SignatureAlgorithm.EdDSA,
}

# AWS STS accepts these for web-identity tokens; grants refuse the others before any AWS call.
STS_ALGORITHMS: frozenset[SignatureAlgorithm] = frozenset(
    {
        SignatureAlgorithm.RS256,
        SignatureAlgorithm.RS384,
        SignatureAlgorithm.RS512,
        SignatureAlgorithm.ES256,
        SignatureAlgorithm.ES384,
        SignatureAlgorithm.ES512,
    }
)

ROLE_PREFIX = "DoiT-Support-"
ROLE_NAME_MAX = 64
STAFF_MAX = ROLE_NAME_MAX - len(ROLE_PREFIX)
_STAFF_RE = re.compile(r"[A-Za-z0-9+=,.@_-]+")
_ACCOUNT_RE = re.compile(r"[0-9]{12}")


@dataclass(frozen=True)
class Binding:
    """One staff member in one customer account: the unit a key, a role and an issuer belong to.

    Validated on construction so an invalid pair can never reach the HSM or IAM. IAM role names are
    case-insensitive, so ``key`` (used for comparisons across a store) folds case.
    """

    staff: str
    account: str

    def __post_init__(self) -> None:
        if not isinstance(self.staff, str) or not isinstance(self.account, str):
            raise InvalidBindingError(
                "staff and account must be strings (an account id keeps its leading zeros)"
            )
        if not _ACCOUNT_RE.fullmatch(self.account):
            raise InvalidBindingError(f"account id must be exactly 12 digits, got {self.account!r}")
        if not self.staff:
            raise InvalidBindingError("staff id must not be empty")
        if len(self.staff) > STAFF_MAX:
            raise InvalidBindingError(
                f"staff id {self.staff[:20]!r}... is {len(self.staff)} characters; the role name "
                f"{ROLE_PREFIX}<staff> may have at most {ROLE_NAME_MAX}, so at most {STAFF_MAX} are allowed"
            )
        if self.staff in (".", ".."):
            raise InvalidBindingError(f"staff id {self.staff!r} cannot name an issuer path")
        if not _STAFF_RE.fullmatch(self.staff):
            bad = sorted({c for c in self.staff if not _STAFF_RE.fullmatch(c)})
            raise InvalidBindingError(
                f"staff id {self.staff!r} has characters IAM role names do not allow: {''.join(bad)!r} "
                "(allowed: letters, digits and +=,.@_-)"
            )

    @property
    def role_name(self) -> str:
        return ROLE_PREFIX + self.staff

    @property
    def key(self) -> tuple[str, str]:
        """Identity under IAM's case-insensitive naming."""
        return (self.account, self.staff.lower())

    def same_as(self, other: Binding) -> bool:
        return self.key == other.key

    def __str__(self) -> str:
        return f"{self.staff}@{self.account}"


@dataclass(frozen=True)
class KeyInfo:
    """What a store knows of one key. The private half never leaves the store."""

    kid: str
    spec: KeySpec
    binding: Binding
    label: str
    created_at: _dt.datetime
    public_key: PublicKey = field(repr=False, compare=False)

    @property
    def default_algorithm(self) -> SignatureAlgorithm:
        return SignatureAlgorithm.default_for(self.spec)


__all__ = [
    "STS_ALGORITHMS",
    "Binding",
    "KeyInfo",
    "KeySpec",
    "KeyType",
    "Padding",
    "PublicKey",
    "SignatureAlgorithm",
]
