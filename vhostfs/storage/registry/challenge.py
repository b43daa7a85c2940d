"""WWW-Authenticate challenges (RFC 9110 11.6.1), parsed strictly.

A registry answers 401 with a challenge that says how to authenticate: `Basic realm="..."`, or
`Bearer realm="https://auth/token",service="registry",scope="repository:lib/x:pull"`. Parameter
values may be quoted strings holding commas, equals signs and escaped quotes, so the header is
tokenised properly rather than split on punctuation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_SCHEME = re.compile(rf"\s*({_TOKEN})")
_PARAM = re.compile(rf'\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))\s*')


class ChallengeError(ValueError):
    """The header is not a challenge we can follow."""


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower case: "basic" or "bearer"
    params: dict[str, str] = field(default_factory=dict)  # keys lower case

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenge(header: str) -> Challenge:
    """The first challenge of a WWW-Authenticate value (registries send one)."""
    match = _SCHEME.match(header)
    if match is None:
        raise ChallengeError(f"WWW-Authenticate {header!r}: no scheme")
    scheme = match.group(1).lower()
    params: dict[str, str] = {}
    position = match.end()
    while position < len(header):
        param = _PARAM.match(header, position)
        if param is None:
            if header[position:].strip():
                raise ChallengeError(f"WWW-Authenticate {header!r}: bad parameter at {position}")
            break
        name, quoted, bare = param.groups()
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        params[name.lower()] = value
        position = param.end()
        if position < len(header):
            if header[position] != ",":
                raise ChallengeError(f"WWW-Authenticate {header!r}: expected ',' at {position}")
            position += 1
    return Challenge(scheme, params)
