"""An OCI distribution (registry) client: authenticated, checked range reads of blobs, and the
pulls and pushes that image conversion needs.

- `client`: RegistryClient and its options (redirects, timeouts, retries, range checks);
- `auth`: credentials and the bearer tokens they buy, cached per scope;
- `challenge`: WWW-Authenticate parsing;
- `errors`: RegistryError, which says whether a retry can help.
"""

from vhostfs.storage.registry.auth import Credentials
from vhostfs.storage.registry.client import Manifest, RegistryClient, RegistryOptions
from vhostfs.storage.registry.errors import RegistryError

__all__ = ["Credentials", "Manifest", "RegistryClient", "RegistryError", "RegistryOptions"]
