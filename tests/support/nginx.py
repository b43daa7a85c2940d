"""nginx standing in for Dragonfly's dfdaemon: a proxy (forward, for http:// origins) or a
mirror in front of a test registry, with a health URL, and an access log that records the
X-Dragonfly-* headers each request carried. It can be stopped and started again on the same
port, to test failover."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.registry import free_port

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


@dataclass
class Nginx:
    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def health_url(self) -> str:
        return f"{self.url}/health"

    def requests(self) -> list[dict[str, str]]:
        """The blob requests it served: method, uri, p2p, priority, prefetch, registry."""
        path = self.directory / "access.log"
        if not path.exists():
            return []
        keys = ("method", "uri", "p2p", "priority", "prefetch", "registry", "status")
        return [
            dict(zip(keys, line.split("|"), strict=True))
            for line in path.read_text().splitlines()
            if "/blobs/" in line
        ]

    def start(self) -> None:
        assert NGINX is not None and self.process is None
        self.process = subprocess.Popen(
            [NGINX, "-p", str(self.directory), "-c", "nginx.conf", "-e", "error.log"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert self.process.poll() is None, (self.directory / "error.log").read_text()
            time.sleep(0.02)
        raise RuntimeError("nginx did not listen")

    def stop(self) -> None:
        """Gone at once, as a crashed dfdaemon would be."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None


@contextlib.contextmanager
def running_nginx(
    directory: Path,
    upstream: str | None = None,
    *,
    root: Path | None = None,
    unix_socket: Path | None = None,
) -> Iterator[Nginx]:
    """nginx proxying to `upstream`, or serving the files under `root` (with Range support),
    on a TCP port and, if given, on `unix_socket` too."""
    if NGINX is None:
        pytest.skip("nginx is not installed (qemu/setup.sh installs nginx-light)")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    fields = "|".join(
        [
            "$request_method",
            "$request_uri",
            "$http_x_dragonfly_use_p2p",
            "$http_x_dragonfly_priority",
            "$http_x_dragonfly_prefetch",
            "$http_x_dragonfly_registry",
            "$status",
        ]
    )
    temp = "client_body_temp_path tmp; proxy_temp_path tmp; fastcgi_temp_path tmp; "
    temp += "uwsgi_temp_path tmp; scgi_temp_path tmp;"
    (directory / "tmp").mkdir(exist_ok=True)
    (directory / "nginx.conf").write_text(
        f"""
daemon off;
master_process off;
pid nginx.pid;
error_log error.log;
events {{}}
http {{
    {temp}
    log_format dfly escape=none '{fields}';
    access_log access.log dfly;
    server {{
        listen 127.0.0.1:{port};
        location = /health {{ return 200 "ok"; }}
        {f"listen unix:{unix_socket};" if unix_socket else ""}
        location / {{
            {f"root {root};" if root else f"proxy_pass {upstream};"}
            proxy_buffering off;
            proxy_http_version 1.1;
        }}
    }}
}}
"""
    )
    nginx = Nginx(directory, port)
    nginx.start()
    try:
        yield nginx
    finally:
        nginx.stop()
