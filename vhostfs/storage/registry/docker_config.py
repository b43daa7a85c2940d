"""Registry credentials from docker's config.json, where nydusify (and docker login) keep them.

The file is `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. Its `auths` map is keyed
by registry host, sometimes written as a URL (`https://host/`, and for Docker Hub the legacy
`https://index.docker.io/v1/`); an entry holds `auth` (base64 of user:password) or `username`
and `password`. Credential helpers (`credsStore`, `credHelpers`) run external programs; they are
not supported, and a host that names one gets a warning and no credentials.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from vhostfs.storage.registry.auth import Credentials
from vhostfs.storage.registry.errors import RegistryError
from vhostfs.storage.registry.reference import DOCKER_HUB, DOCKER_HUB_API

log = logging.getLogger(__name__)

_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", DOCKER_HUB, DOCKER_HUB_API)


def config_path(environ: Mapping[str, str] = os.environ) -> Path:
    directory = environ.get("DOCKER_CONFIG")
    if directory:
        return Path(directory) / "config.json"
    return Path(environ.get("HOME", str(Path.home()))) / ".docker" / "config.json"


def docker_credentials(host: str, environ: Mapping[str, str] = os.environ) -> Credentials:
    """The credentials config.json holds for `host` (as in an image reference), or none."""
    path = config_path(environ)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return Credentials()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegistryError(f"{path}: cannot read it: {e}", retryable=False) from None
    if not isinstance(document, dict):
        raise RegistryError(f"{path}: not a JSON object", retryable=False)
    auths = document.get("auths", {})
    if not isinstance(auths, dict):
        raise RegistryError(f"{path}: auths is not an object", retryable=False)
    wanted = _HUB_KEYS if host in (DOCKER_HUB, DOCKER_HUB_API) else (host,)
    for key, entry in auths.items():
        if _host_of(key) in wanted or key in wanted:
            if not isinstance(entry, dict):
                raise RegistryError(f"{path}: auths.{key} is not an object", retryable=False)
            return _entry_credentials(entry, f"{path}: auths.{key}")
    helpers = document.get("credHelpers", {})
    if (isinstance(helpers, dict) and host in helpers) or document.get("credsStore"):
        log.warning("%s: credential helpers are not supported; no credentials for %s", path, host)
    return Credentials()


def _host_of(key: str) -> str:
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme) :]
    return key.split("/", 1)[0]


def _entry_credentials(entry: Mapping[str, object], where: str) -> Credentials:
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        return Credentials.from_config(auth, None)
    user, password = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(password, str) and user:
        return Credentials(base64.b64encode(f"{user}:{password}".encode()).decode())
    raise RegistryError(f"{where}: no auth and no username/password", retryable=False)
