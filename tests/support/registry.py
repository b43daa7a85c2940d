"""A real OCI registry for tests: Debian's docker-registry (distribution 2.8), started per test.

Three ways to guard it, as real deployments do:

- `htpasswd`: Basic auth against an htpasswd file (bcrypt, as distribution requires);
- `token`: Bearer tokens from `TokenServer`, a token endpoint of our own that signs JWTs the
  registry checks against our certificate (the distribution token spec, with an x5c header);
- TLS with a certificate from a test CA (trustme), for https:// registries.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REGISTRY = shutil.which("docker-registry")


def require_registry() -> None:
    if REGISTRY is None:
        pytest.skip("docker-registry is not installed (qemu/setup.sh installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Registry:
    host: str  # 127.0.0.1:port
    scheme: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class TokenServer:
    """Issues JWTs for the registry; counts what it was asked, for the tests."""

    issuer: str
    service: str
    users: dict[str, str]
    key_pem: bytes
    cert_der: bytes
    lifetime: int = 300
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    refuse_post: bool = False
    port: int = 0

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def token(self, scope: str, user: str | None) -> str:
        import jwt

        access = []
        if scope:
            kind, name, actions = scope.split(":", 2)
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + self.lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        x5c = [base64.b64encode(self.cert_der).decode()]
        return jwt.encode(claims, self.key_pem, algorithm="RS256", headers={"x5c": x5c})

    def answer(
        self, method: str, params: dict[str, str], authorization: str | None
    ) -> tuple[int, bytes]:
        self.requests.append((method, params))
        if method == "POST" and self.refuse_post:
            return 404, b"{}"
        user = None
        if authorization and authorization.startswith("Basic "):
            name, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
            if self.users.get(name) != password:
                return 401, b'{"errors": "bad credentials"}'
            user = name
        elif self.users:
            return 401, b'{"errors": "credentials required"}'
        body = {"token": self.token(params.get("scope", ""), user), "expires_in": self.lifetime}
        return 200, json.dumps(body).encode()


@contextlib.contextmanager
def token_server(users: dict[str, str], *, lifetime: int = 300) -> Iterator[TokenServer]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vhostfs test token issuer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    server = TokenServer(
        issuer="vhostfs-test-issuer",
        service="vhostfs-test-registry",
        users=users,
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        cert_der=cert.public_bytes(serialization.Encoding.DER),
        lifetime=lifetime,
    )

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, method: str, params: dict[str, str]) -> None:
            status, body = server.answer(method, params, self.headers.get("Authorization"))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            query = urllib.parse.urlsplit(self.path).query
            self._reply("GET", dict(urllib.parse.parse_qsl(query)))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = self.rfile.read(length).decode()
            self._reply("POST", dict(urllib.parse.parse_qsl(form)))

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@dataclass(frozen=True)
class TlsFiles:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def tls_files(directory: Path) -> TlsFiles:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca_pem))
    cert.private_key_pem.write_to_path(str(files.key_pem))
    with open(files.cert_pem, "wb") as out:
        for blob in cert.cert_chain_pems:
            out.write(blob.bytes())
    return files


def htpasswd_file(directory: Path, users: dict[str, str]) -> Path:
    path = directory / "htpasswd"
    for i, (user, password) in enumerate(users.items()):
        flags = "-Bbc" if i == 0 else "-Bb"
        subprocess.run(
            ["htpasswd", flags, str(path), user, password], check=True, capture_output=True
        )
    return path


@contextlib.contextmanager
def running_registry(
    directory: Path,
    *,
    htpasswd: dict[str, str] | None = None,
    tokens: TokenServer | None = None,
    tls: TlsFiles | None = None,
) -> Iterator[Registry]:
    require_registry()
    assert REGISTRY is not None
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    lines = [
        "version: 0.1",
        "log: {level: info, accesslog: {disabled: false}}",
        "storage:",
        f"  filesystem: {{rootdirectory: {directory / 'data'}}}",
        "  delete: {enabled: true}",
        "http:",
        f"  addr: 127.0.0.1:{port}",
    ]
    if tls is not None:
        lines.append(f"  tls: {{certificate: {tls.cert_pem}, key: {tls.key_pem}}}")
    if htpasswd is not None:
        path = htpasswd_file(directory, htpasswd)
        lines += ["auth:", f"  htpasswd: {{realm: vhostfs-test, path: {path}}}"]
    if tokens is not None:
        bundle = directory / "token-cert.pem"
        import ssl

        bundle.write_text(ssl.DER_cert_to_PEM_cert(tokens.cert_der))
        lines += [
            "auth:",
            "  token:",
            f"    realm: {tokens.realm}",
            f"    service: {tokens.service}",
            f"    issuer: {tokens.issuer}",
            f"    rootcertbundle: {bundle}",
        ]
    config = directory / "config.yml"
    config.write_text("\n".join(lines) + "\n")
    log_path = directory / "registry.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=log, stderr=log)
    registry = Registry(f"127.0.0.1:{port}", "https" if tls else "http", process, log_path)
    try:
        _wait_listening(port, process, log_path)
        yield registry
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_listening(port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited:\n{log_path.read_text(errors='replace')}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"docker-registry did not listen:\n{log_path.read_text(errors='replace')}")
