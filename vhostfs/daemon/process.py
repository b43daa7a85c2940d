"""Process-wide settings the daemon needs before it opens anything."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

NR_OPEN = "/proc/sys/fs/nr_open"


def raise_nofile_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE to `wanted`, capped by fs.nr_open (nydusd's --rlimit-nofile: a
    passthrough of a big tree holds an fd per inode the guest knows). 0 leaves it alone.
    Returns the soft limit in force afterwards; failing to raise it is logged, not fatal."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted <= 0:
        return soft
    try:
        with open(NR_OPEN) as f:
            wanted = min(wanted, int(f.read()))
    except (OSError, ValueError):
        pass
    if wanted <= soft:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (OSError, ValueError):
        try:  # unprivileged: the hard limit is as far as we may go
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
        except (OSError, ValueError) as e:
            log.warning("cannot raise the open-file limit to %d: %s", wanted, e)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
