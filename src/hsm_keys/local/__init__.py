"""The embedded defaults for demos and tests: a private PKI, a loopback HTTPS issuer, a local AWS.

Nothing here is used in production paths; it lets ``hsm-keys demo`` and the integration tests run a
real grant on one machine with real TLS, real HTTP and real boto3 clients.
"""

from hsm_keys.local.pki import LocalPki, make_pki
from hsm_keys.local.server import LoopbackIssuerServer

__all__ = ["LocalPki", "LoopbackIssuerServer", "make_pki"]
