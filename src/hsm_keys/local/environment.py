"""Everything a real grant needs, on one machine: local AWS, HTTPS issuer, registry, onboarding.

Issuer URLs stay as IAM wants them (https, no port, no query): the library's own HTTPS clients get a
host -> (127.0.0.1, port) mapping and the private CA to trust instead.
"""

from __future__ import annotations

import http.server
import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from hsm_keys.keystore.base import KeyStore
from hsm_keys.local.aws import OPERATIONS_ACCOUNT, REGION, LocalAws
from hsm_keys.local.pki import LocalPki, make_pki
from hsm_keys.local.server import LoopbackIssuerServer
from hsm_keys.provisioning.aws import AwsCaller, AwsEnvironment
from hsm_keys.provisioning.grants import GrantSettings, SupportAccess
from hsm_keys.provisioning.issuer import DirectoryPublisher, HttpsOptions, IssuerScheme
from hsm_keys.provisioning.onboarding import OnboardingHandler, allow_loopback_response_urls
from hsm_keys.provisioning.registry import FileAccountRegistry
from hsm_keys.templates import HOOK_LOGICAL_ID, HOOK_RESOURCE_TYPE

DEFAULT_ISSUER_HOST = "idp.hsm-keys.test"
DEFAULT_CUSTOMER_ACCOUNT = "111122223333"
SERVICE_TOKEN = f"arn:aws:sns:{REGION}:{OPERATIONS_ACCOUNT}:hsm-keys-onboarding"


class ResponseSink:
    """A loopback HTTP server standing in for CloudFormation's pre-signed ResponseURL."""

    def __init__(self) -> None:
        self.responses: list[dict[str, Any]] = []
        self.raw: list[tuple[str, dict[str, str], bytes]] = []
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                sink.raw.append((self.path, dict(self.headers.items()), body))
                sink.responses.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True, name="response-sink")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/{name}?X-Amz-Signature=local"

    def start(self) -> ResponseSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def hook_event(
    request_type: str,
    *,
    stack_id: str,
    role_arn: str,
    account: str,
    response_url: str,
    physical_resource_id: str | None = None,
    old_properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The custom-resource event CloudFormation sends for the template's hook resource.

    ``Version`` is a resource attribute of the hook, not one of its properties, so CloudFormation
    does not include it in ``ResourceProperties``.
    """
    event: dict[str, Any] = {
        "RequestType": request_type,
        "ServiceToken": SERVICE_TOKEN,
        "ResponseURL": response_url,
        "StackId": stack_id,
        "RequestId": str(uuid.uuid4()),
        "LogicalResourceId": HOOK_LOGICAL_ID,
        "ResourceType": HOOK_RESOURCE_TYPE,
        "ResourceProperties": {
            "ServiceToken": SERVICE_TOKEN,
            "RoleArn": role_arn,
            "AccountId": account,
        },
    }
    if physical_resource_id is not None:
        event["PhysicalResourceId"] = physical_resource_id
    if old_properties is not None:
        event["OldResourceProperties"] = old_properties
    return event


@dataclass
class CustomerAccount:
    account: str
    stack_id: str
    role_arn: str
    physical_resource_id: str = ""


@dataclass
class LocalEnvironment:
    """Start with ``with LocalEnvironment(workdir, store) as env:``; ``env.access`` is ready to grant."""

    workdir: Path
    store: KeyStore
    issuer_host: str = DEFAULT_ISSUER_HOST
    aws: LocalAws = field(init=False)
    pki: LocalPki = field(init=False)
    issuer_server: LoopbackIssuerServer = field(init=False)
    sink: ResponseSink = field(init=False)
    access: SupportAccess = field(init=False)
    registry: FileAccountRegistry = field(init=False)
    handler: OnboardingHandler = field(init=False)
    https: HttpsOptions = field(init=False)
    customers: dict[str, CustomerAccount] = field(default_factory=dict)

    def start(self) -> LocalEnvironment:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aws = LocalAws().start()
        self.pki = make_pki(self.issuer_host, self.workdir / "pki")
        self.issuer_server = LoopbackIssuerServer(self.workdir / "issuer", self.pki).start()
        self.sink = ResponseSink().start()
        self.https = HttpsOptions(
            resolve={self.issuer_host: self.issuer_server.address}, ca_bundle=str(self.pki.ca_file)
        )
        self.registry = FileAccountRegistry(self.workdir / "accounts.json")
        aws_env = AwsEnvironment(
            session=self.aws.operations_session(),
            region=REGION,
            endpoint_url=self.aws.endpoint_url,
            retries=AwsCaller(base_delay=0.05),
        )
        settings = GrantSettings(issuer=IssuerScheme(f"https://{self.issuer_host}"), https=self.https)
        self.access = SupportAccess(
            self.store, self.registry, aws_env, DirectoryPublisher(self.issuer_server.root), settings
        )
        self.handler = OnboardingHandler(
            self.registry,
            self.access,
            response_url_check=allow_loopback_response_urls,
            role_id_lookup=aws_env.management_role_id,
        )
        return self

    def stop(self) -> None:
        for stop in (self.sink.stop, self.issuer_server.stop, self.aws.stop):
            try:
                stop()
            except Exception:  # noqa: S112 - stop the rest whatever one of them does
                continue

    def __enter__(self) -> LocalEnvironment:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- the customer's side ----------------------------------------------------------------------

    def deploy_stack(self, account: str = DEFAULT_CUSTOMER_ACCOUNT) -> CustomerAccount:
        """The customer deploys the published template (without the hook; see LocalAws)."""
        outputs = self.aws.deploy_support_stack(account, service_token=SERVICE_TOKEN)
        customer = CustomerAccount(account, outputs["StackId"], outputs["RoleArn"])
        self.customers[account] = customer
        return customer

    def send_hook(self, request_type: str, account: str = DEFAULT_CUSTOMER_ACCOUNT) -> dict[str, Any]:
        """Deliver the event CloudFormation would send for the hook resource; return its answer."""
        customer = self.customers[account]
        event = hook_event(
            request_type,
            stack_id=customer.stack_id,
            role_arn=customer.role_arn,
            account=account,
            response_url=self.sink.url(f"{request_type.lower()}-{len(self.sink.responses)}"),
            physical_resource_id=None if request_type == "Create" else customer.physical_resource_id,
        )
        before = len(self.sink.responses)
        self.handler(event)
        if len(self.sink.responses) != before + 1:
            raise RuntimeError(f"the onboarding handler sent {len(self.sink.responses) - before} responses")
        response = self.sink.responses[-1]
        customer.physical_resource_id = str(response.get("PhysicalResourceId", ""))
        return response

    def onboard(self, account: str = DEFAULT_CUSTOMER_ACCOUNT) -> dict[str, Any]:
        """Deploy the stack and run onboarding; returns the response CloudFormation would receive."""
        self.deploy_stack(account)
        return self.send_hook("Create", account)


@contextmanager
def local_environment(workdir: Path, store: KeyStore, **options: Any) -> Iterator[LocalEnvironment]:
    environment = LocalEnvironment(workdir, store, **options)
    with environment:
        yield environment
