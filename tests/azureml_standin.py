"""A local stand-in for the Azure ML control plane, for the push/pull tests.

It answers, over HTTPS with a test-only CA, exactly the calls that azure-ai-ml 1.35 and azure-identity make for
``models.create_or_update``, ``models.list/get`` and ``models.download`` on a workspace, keeping state in memory:

- ARM cloud metadata (``ARM_CLOUD_METADATA_URL``): a cloud whose Resource Manager is this server and whose storage
  suffix is ``core.olivepress.test`` (.test is a reserved TLD, so no real name is ever impersonated);
- an App Service managed-identity token endpoint (``IDENTITY_ENDPOINT``/``IDENTITY_HEADER``), so the real
  ``DefaultAzureCredential`` chain signs in without any network;
- model versions list/get/put, the list of models (containers), datastore get and listSecrets;
- for ``jobs.create_or_update`` of a pipeline job (tests/test_azureml_pipeline.py): compute get, environment and
  component version PUTs, the job PUT and GET (every PUT body kept in ``State.puts``), the workspace and its
  discovery URLs, and the run-history "children" call that ``jobs.list(parent_job_name=...)`` makes.

Blob traffic goes to Azurite: the SDK builds ``https://<account>.blob.core.olivepress.test`` URLs, which cannot resolve,
so a small CONNECT proxy (``HTTPS_PROXY``) tunnels them, and only them, to Azurite's HTTPS port.  Azurite reads the
account from the host name (its "production-style URL" mode).  The SDK itself is not patched anywhere.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import select
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# The storage SDK finds the account name only in hosts of the form <account>.blob.core.<anything>.
STORAGE_SUFFIX = "core.olivepress.test"
ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, documented by Microsoft).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CONTAINER = "azureml-blobstore-olivepress"
TOKEN = "olivepress-standin-token"  # the subject of every token the stand-in issues (token_for)
IDENTITY_HEADER = "olivepress-standin-identity"
CLOUD = "OlivepressLocal"


def token_for(resource: str) -> str:
    """An unsigned JWT naming ``resource`` as its audience: the SDK decodes the Azure ML-scoped token that a
    pipeline job submission sends along, and checks its ``aud`` (it never verifies the signature)."""
    import base64

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    claims = {"aud": resource.rstrip("/"), "sub": TOKEN}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}.c3RhbmRpbg"  # signature: "standin", unchecked


def make_certs(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, localhost and *.blob.core.olivepress.test.

    Returns (ca.pem, server.pem, server.key): the CA goes into REQUESTS_CA_BUNDLE, the pair to the servers.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "olivepress test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )  # digital_signature, key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [
        x509.DNSName("localhost"),
        x509.DNSName(f"*.blob.{STORAGE_SUFFIX}"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    ca_pem, cert_pem, key_pem = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_pem, cert_pem, key_pem


@dataclass
class Fault:
    """Answer ``count`` requests matching ``method`` and ``path`` (a regex) with ``status``."""

    method: str
    path: str
    status: int
    count: int


@dataclass
class State:
    models: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    tokens_issued: int = 0
    # Pipeline jobs (tests/test_azureml_pipeline.py): compute name -> its properties; every PUT body of an
    # environment, component or job version, in order; and the stored resources, by path below the workspace.
    computes: dict[str, dict[str, Any]] = field(default_factory=dict)
    puts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    children: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # run history: job name -> its steps
    lock: threading.Lock = field(default_factory=threading.Lock)


HISTORY = "/history/v1.0"
DISCOVERY_KEYS = ("api", "catalog", "experimentation", "history", "hyperdrive", "modelmanagement", "pipelines")
_WS = (
    r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)"
    r"/providers/Microsoft\.MachineLearningServices/workspaces/(?P<ws>[^/]+)"
)


def _signed_in(header: str) -> bool:
    """A bearer token this stand-in issued (for any audience: the Azure ML scope's token reaches ARM too)."""
    import base64

    scheme, _, token = header.partition(" ")
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return False
    return scheme == "Bearer" and claims.get("sub") == TOKEN


class _ControlPlane(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: the tests read State.requests
        pass

    # --- plumbing -------------------------------------------------------------------------------------------

    def _send(self, status: int, body: Any = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", "standin")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, {"error": {"code": code, "message": message}})

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else None

    def _handle(self) -> None:
        state = self.server.state
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with state.lock:
            state.requests.append((self.command, url.path))
            for fault in state.faults:
                if fault.count > 0 and fault.method == self.command and re.search(fault.path, url.path):
                    fault.count -= 1
                    body = self._body()  # drain it, so the connection stays usable
                    del body
                    return self._error(fault.status, "ServiceUnavailable", "injected fault")
        if url.path == "/metadata/endpoints":
            return self._send(200, self._cloud_metadata())
        if url.path == "/msi/token":
            return self._token(query)
        if url.path == "/discovery":
            # The workspace's data-plane base URLs (run history: a pipeline's steps), all this server. The SDK fetches
            # them without a token, as from the real discovery service.
            return self._send(200, {key: self._base_url() for key in DISCOVERY_KEYS})
        if not _signed_in(self.headers.get("Authorization", "")):
            return self._error(401, "AuthenticationFailed", "missing or wrong bearer token")
        history = url.path.startswith(HISTORY)
        path = url.path[len(HISTORY) :] if history else url.path
        match = re.fullmatch(_WS + r"(?P<rest>/.*)?", path)
        if not match:
            return self._error(404, "NotFound", f"no route for {url.path}")
        rest = match.group("rest") or ""
        base = path[: len(path) - len(rest)]
        if history:
            if m := re.fullmatch(r"/runs/(?P<run>[^/]+)/children", rest):
                self._body()
                with state.lock:
                    children = list(state.children.get(m["run"], []))
                return self._send(200, {"value": children})
            return self._error(404, "NotFound", f"no route for {url.path}")
        if not rest:
            return self._workspace(base, match["ws"])
        if rest == "/models":
            return self._list_models(base)
        if m := re.fullmatch(r"/models/(?P<name>[^/]+)/versions", rest):
            return self._list_versions(base, m["name"], query)
        if m := re.fullmatch(r"/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", rest):
            return self._version(base, m["name"], m["version"])
        if m := re.fullmatch(r"/datastores/(?P<name>[^/]+)", rest):
            return self._datastore(base, m["name"])
        if m := re.fullmatch(r"/datastores/(?P<name>[^/]+)/listSecrets", rest):
            self._body()
            return self._send(200, {"secretsType": "AccountKey", "key": ACCOUNT_KEY})
        if m := re.fullmatch(r"/computes/(?P<name>[^/]+)", rest):
            return self._compute(base, m["name"])
        if re.fullmatch(r"/(environments|components)/[^/]+/versions/[^/]+|/jobs/[^/]+", rest):
            return self._resource(base, rest)
        if rest == "/jobs":
            return self._list_jobs(query)
        return self._error(404, "NotFound", f"no route for {rest}")

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _handle

    # --- the resources --------------------------------------------------------------------------------------

    def _base_url(self) -> str:
        return f"https://127.0.0.1:{self.server.server_address[1]}"

    def _workspace(self, base: str, name: str) -> None:
        self._send(
            200,
            {
                "id": base,
                "name": name,
                "type": "Microsoft.MachineLearningServices/workspaces",
                "location": "westeurope",
                "kind": "Default",
                "properties": {"discoveryUrl": f"{self._base_url()}/discovery", "workspaceId": "standin"},
            },
        )

    def _cloud_metadata(self) -> list[dict[str, Any]]:
        host = f"https://127.0.0.1:{self.server.server_address[1]}/"
        return [
            {
                "name": CLOUD,
                "portal": "https://portal.olivepress.test/",
                "resourceManager": host,
                "authentication": {"loginEndpoint": host, "audiences": [host]},
                "suffixes": {"storage": STORAGE_SUFFIX},
            }
        ]

    def _token(self, query: dict[str, str]) -> None:
        if self.headers.get("X-IDENTITY-HEADER") != IDENTITY_HEADER:
            return self._error(401, "Unauthorized", "wrong X-IDENTITY-HEADER")
        with self.server.state.lock:
            self.server.state.tokens_issued += 1
        expires = int(time.time()) + 3600
        self._send(
            200,
            {
                "access_token": token_for(query.get("resource", "")),
                "expires_on": str(expires),
                "resource": query.get("resource", ""),
                "token_type": "Bearer",
            },
        )

    def _list_versions(self, base: str, name: str, query: dict[str, str]) -> None:
        with self.server.state.lock:
            versions = list(self.server.state.models.get(name, {}).values())
        # The SDK asks for the latest with $orderBy=createdtime desc&$top=1; honour both.
        versions.sort(key=lambda v: v["systemData"]["createdAt"], reverse="desc" in query.get("$orderBy", "desc"))
        if "$top" in query:
            versions = versions[: int(query["$top"])]
        self._send(200, {"value": versions})

    def _list_models(self, base: str) -> None:
        """The model containers, one per name, as ``models.list()`` without a name asks for them."""
        with self.server.state.lock:
            names = {name: list(versions.values()) for name, versions in self.server.state.models.items() if versions}
        containers = []
        for name, versions in sorted(names.items()):
            newest = max(versions, key=lambda v: v["systemData"]["createdAt"])
            containers.append(
                {
                    "id": f"{base}/models/{name}",
                    "name": name,
                    "type": "Microsoft.MachineLearningServices/workspaces/models",
                    "properties": {"latestVersion": newest["name"], "isArchived": False, "tags": {}},
                    "systemData": newest["systemData"],
                }
            )
        self._send(200, {"value": containers})

    def _version(self, base: str, name: str, version: str) -> None:
        state = self.server.state
        if self.command == "GET":
            with state.lock:
                found = state.models.get(name, {}).get(version)
            if found is None:
                return self._error(404, "UserError", f"Could not find asset with ID: {name}:{version}")
            return self._send(200, found)
        if self.command != "PUT":
            return self._error(405, "MethodNotAllowed", self.command)
        body = self._body() or {}
        props = dict(body.get("properties") or {})
        props.setdefault("flavors", {})
        props["provisioningState"] = "Succeeded"
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        with state.lock:
            existing = state.models.setdefault(name, {}).get(version)
            if existing is not None and existing["properties"].get("modelUri") != props.get("modelUri"):
                # Azure ML model versions are immutable: a different payload for an existing version is refused.
                return self._error(409, "UserError", f"model {name}:{version} already exists with other content")
            resource = {
                "id": f"{base}/models/{name}/versions/{version}",
                "name": version,
                "type": "Microsoft.MachineLearningServices/workspaces/models/versions",
                "properties": props,
                "systemData": {"createdAt": now, "createdBy": "standin", "lastModifiedAt": now},
            }
            state.models[name][version] = resource
        self._send(201 if existing is None else 200, resource)

    def _compute(self, base: str, name: str) -> None:
        found = self.server.state.computes.get(name)
        if found is None:
            return self._error(404, "ResourceNotFound", f"compute {name} not found")
        self._send(
            200,
            {
                "id": f"{base}/computes/{name}",
                "name": name,
                "type": "Microsoft.MachineLearningServices/workspaces/computes",
                "location": "westeurope",
                "properties": {"computeType": "AmlCompute", "provisioningState": "Succeeded", "properties": found},
            },
        )

    def _resource(self, base: str, rest: str) -> None:
        """Environment and component versions and jobs: PUT stores the body (and records it), GET returns it.

        Like the service, a job starts as NotStarted, and a PUT answers with what was stored plus an id and state.
        """
        state = self.server.state
        if self.command == "GET":
            with state.lock:
                found = state.resources.get(rest)
            if found is None:
                return self._error(404, "UserError", f"{rest} not found")
            return self._send(200, found)
        if self.command != "PUT":
            return self._error(405, "MethodNotAllowed", self.command)
        body = self._body() or {}
        props = dict(body.get("properties") or {})
        if rest.startswith("/jobs/"):
            props.setdefault("status", "NotStarted")
            props.setdefault("services", {"Studio": {"endpoint": f"https://ml.olivepress.test/runs{rest[5:]}"}})
        else:
            props.setdefault("provisioningState", "Succeeded")
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        resource = {
            "id": base + rest,
            "name": rest.rsplit("/", 1)[1],
            "type": "Microsoft.MachineLearningServices/workspaces" + re.sub(r"/[^/]+(?=/|$)", "", rest, count=0),
            "properties": props,
            "systemData": {"createdAt": now, "createdBy": "standin", "lastModifiedAt": now},
        }
        with state.lock:
            state.puts.append((rest, body))
            existing = state.resources.get(rest)
            state.resources[rest] = resource
        self._send(200 if existing else 201, resource)

    def _list_jobs(self, query: dict[str, str]) -> None:
        with self.server.state.lock:
            jobs = [r for path, r in self.server.state.resources.items() if path.startswith("/jobs/")]
        self._send(200, {"value": jobs})

    def _datastore(self, base: str, name: str) -> None:
        self._send(
            200,
            {
                "id": f"{base}/datastores/{name}",
                "name": name,
                "type": "Microsoft.MachineLearningServices/workspaces/datastores",
                "properties": {
                    "datastoreType": "AzureBlob",
                    "accountName": ACCOUNT,
                    "containerName": CONTAINER,
                    "endpoint": STORAGE_SUFFIX,
                    "protocol": "https",
                    "credentials": {"credentialsType": "AccountKey"},
                    "isDefault": True,
                },
            },
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: State


class _Proxy(socketserver.ThreadingTCPServer):
    """A CONNECT-only proxy that tunnels ``*.blob.core.olivepress.test:443`` to Azurite and refuses anything else."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, target_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.target_port = target_port
        self.tunnels = 0
        self.sent = 0  # bytes from the SDK to blob storage (uploads), TLS included
        self.received = 0  # bytes from blob storage to the SDK (downloads), TLS included
        self.lock = threading.Lock()


class _ProxyHandler(socketserver.StreamRequestHandler):
    server: _Proxy

    def handle(self) -> None:
        request = self.rfile.readline(65537).decode("latin-1").split()
        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
            pass
        if len(request) < 2 or request[0] != "CONNECT" or not request[1].endswith(f".blob.{STORAGE_SUFFIX}:443"):
            self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        with self.server.lock:
            self.server.tunnels += 1
        upstream = socket.create_connection(("127.0.0.1", self.server.target_port))
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.wfile.flush()
        client = self.connection
        try:
            sockets = [client, upstream]
            while True:
                readable, _, _ = select.select(sockets, [], [], 30)
                if not readable:
                    return
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    with self.server.lock:
                        if sock is client:
                            self.server.sent += len(data)
                        else:
                            self.server.received += len(data)
                    (upstream if sock is client else client).sendall(data)
        finally:
            upstream.close()


class StandIn:
    """The control plane plus the blob proxy, each on a free loopback port, in daemon threads."""

    def __init__(self, cert: Path, key: Path, azurite_port: int) -> None:
        self.state = State()
        self._http = _Server(("127.0.0.1", 0), _ControlPlane)
        self._http.state = self.state
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self._http.socket = context.wrap_socket(self._http.socket, server_side=True)
        self._proxy = _Proxy(azurite_port)
        self._threads = [
            threading.Thread(target=server.serve_forever, daemon=True) for server in (self._http, self._proxy)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._http.server_address[1]}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self._proxy.server_address[1]}"

    @property
    def blob_tunnels(self) -> int:
        """How many connections the SDK opened to blob storage so far."""
        return self._proxy.tunnels

    @property
    def blob_bytes(self) -> tuple[int, int]:
        """Bytes sent to and received from blob storage so far (uploads, downloads), TLS included."""
        with self._proxy.lock:
            return self._proxy.sent, self._proxy.received

    def env(self, ca: Path) -> dict[str, str]:
        """What a process needs to talk to this stand-in with the real SDK and the real credential chain."""
        return {
            "ARM_CLOUD_METADATA_URL": f"{self.url}/metadata/endpoints",
            "AZUREML_CURRENT_CLOUD": CLOUD,
            "IDENTITY_ENDPOINT": f"{self.url}/msi/token",
            "IDENTITY_HEADER": IDENTITY_HEADER,
            "REQUESTS_CA_BUNDLE": str(ca),
            "SSL_CERT_FILE": str(ca),
            "HTTPS_PROXY": self.proxy_url,
            "NO_PROXY": "127.0.0.1,localhost",
        }

    def fail(self, method: str, path: str, status: int, count: int = 1) -> None:
        with self.state.lock:
            self.state.faults.append(Fault(method, path, status, count))

    def set_job_status(self, name: str, status: str, steps: dict[str, str]) -> None:
        """Move job ``name`` to ``status`` and its steps (by display name) to theirs, as the service would."""
        with self.state.lock:
            job = next(r for path, r in self.state.resources.items() if path == f"/jobs/{name}")
            job["properties"]["status"] = status
            self.state.children[name] = [
                {"runId": f"{name}_{step}", "displayName": step, "status": state, "parentRunId": name}
                for step, state in steps.items()
            ]

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def close(self) -> None:
        for server in (self._http, self._proxy):
            server.shutdown()
            server.server_close()


def blob_container(account_url: str, ca: Path) -> Any:
    """The workspace's blob container in Azurite, reached directly (not through the SDK): created if missing."""
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient(
        account_url, credential={"account_name": ACCOUNT, "account_key": ACCOUNT_KEY}, connection_verify=str(ca)
    )
    container = service.get_container_client(CONTAINER)
    if not container.exists():
        container.create_container()
    return container
