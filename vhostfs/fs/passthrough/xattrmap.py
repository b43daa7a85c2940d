"""Xattr name mapping (`--xattrmap`), in virtiofsd's syntax.

Why: the guest's xattr names are not always usable on the host as they are. trusted.* and
most of security.* need CAP_SYS_ADMIN, which an unprivileged (or capability-trimmed) daemon
lacks, and a guest's security.selinux or security.capability would mean something to the host
kernel. A map renames what the guest uses (e.g. trusted.overlay.opaque, which overlayfs in the
guest sets) to names the host takes as opaque data (user.virtiofs.trusted.overlay.opaque), and
back again when the guest lists a file's xattrs.

The map is a string of rules, checked in order, the first that matches deciding. Each rule
starts with its separator, any character that is not white space, and uses it throughout;
white space may surround rules. A rule is

    :type:scope:key:prepend:

- scope: `client` (the rule sees the names the guest sends in GETXATTR, SETXATTR and
  REMOVEXATTR; it matches when key is a prefix of the name), `server` (the rule sees the host's
  names in a LISTXATTR reply; it matches when prepend is a prefix of the name) or `all` (both).
- type, for a guest name: `prefix` uses prepend + name on the host, `ok` the name as it is,
  `bad` refuses it with EPERM and `unsupported` with ENOTSUP. For a host name: `prefix` shows it
  with prepend stripped, `ok` as it is, `bad` and `unsupported` hide it.

An empty key (client) or prepend (server) matches every name. The last rule for each direction
must be such a catch-all (e.g. `:ok:all:::` or `:bad:all:::` ends both), and a map whose rules
for a direction end otherwise is refused here: no name can fall through the rules (virtiofsd
would panic there), and no rule sits unreachable behind a catch-all.

The shorthand `:map:key:prepend:` may only be the last rule. With a key it stands for

    :prefix:all:key:prepend:      guest key* is stored as prepend+key*, listed back stripped
    :bad:server::key:             host names starting with key itself are hidden
    :bad:client:prepend::         the guest may not name prepend* directly
    :ok:all:::                    everything else passes unchanged

and with an empty key for `:prefix:all::prepend:` and `:bad:all:::` (every name is stored
under prepend, host names without it are hidden and the guest may use no other).

As in virtiofsd, a server-side `prefix` rule strips prepend without asking whether the guest
would reach the result through the same rule: under `:map:trusted.:user.virtiofs.:` a host
`user.virtiofs.foo` is listed as `foo`, which the guest's GETXATTR then looks up as plain `foo`.
Security: a map that renames only some names must also keep the guest off the target names
(the third rule above), or an unprivileged guest user could write user.virtiofs.trusted.* and
forge what the guest kernel takes for trusted.*.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from vhostfs.fuse.ops import FuseError

RuleType: TypeAlias = Literal["prefix", "ok", "bad", "unsupported"]
_TYPES: Final[dict[str, RuleType]] = {
    "prefix": "prefix",
    "ok": "ok",
    "bad": "bad",
    "unsupported": "unsupported",
}
_SCOPES: Final[dict[str, tuple[bool, bool]]] = {
    "client": (True, False),
    "server": (False, True),
    "all": (True, True),
}
_REFUSALS: Final[dict[str, int]] = {"bad": errno.EPERM, "unsupported": errno.ENOTSUP}


@dataclass(frozen=True, slots=True)
class XattrRule:
    """One rule, the `map` shorthand already expanded."""

    type: RuleType
    client: bool  # applies to the names the guest sends
    server: bool  # applies to the host's names in a listing
    key: bytes  # matched against guest names
    prepend: bytes  # matched against host names, and prepended to guest names by `prefix`


@dataclass(frozen=True, slots=True)
class XattrMap:
    """A parsed, checked map; build it with XattrMap.parse."""

    rules: tuple[XattrRule, ...]
    source: str  # the string it was parsed from, for messages

    @classmethod
    def parse(cls, text: str) -> XattrMap:
        """Parse a map in virtiofsd's syntax; ValueError names the rule that is wrong."""
        rules: list[tuple[int, XattrRule]] = []  # (the rule's number in text, the rule)
        pos, number, map_number = 0, 0, 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos == len(text):
                break
            number += 1
            if map_number:
                raise ValueError(
                    f"xattrmap rule {number}: follows the 'map' rule {map_number}, which must be"
                    " the last rule"
                )
            start, sep = pos, text[pos]
            fields: list[str] = []
            pos += 1
            while len(fields) < (3 if fields[:1] == ["map"] else 4):
                end = text.find(sep, pos)
                if end < 0:
                    raise ValueError(
                        f"xattrmap rule {number} ({text[start:]!r}): missing a {sep!r} separator"
                        f" (a rule is {sep}type{sep}scope{sep}key{sep}prepend{sep}, or"
                        f" {sep}map{sep}key{sep}prepend{sep})"
                    )
                fields.append(text[pos:end])
                pos = end + 1
            where = f"xattrmap rule {number} ({text[start:pos]!r})"
            if "\0" in text[start:pos]:
                raise ValueError(f"{where}: NUL in a name")
            if fields[0] == "map":
                map_number = number
                rules += ((number, r) for r in _expand_map(_name(fields[1]), _name(fields[2])))
                continue
            kind, scope, key, prepend = fields
            if kind not in _TYPES:
                raise ValueError(
                    f"{where}: unknown type {kind!r} (prefix, ok, bad, unsupported or map)"
                )
            if scope not in _SCOPES:
                raise ValueError(f"{where}: unknown scope {scope!r} (client, server or all)")
            client, server = _SCOPES[scope]
            rules.append(
                (number, XattrRule(_TYPES[kind], client, server, _name(key), _name(prepend)))
            )
        if not rules:
            raise ValueError("xattrmap: no rules")
        _check_catch_all(rules, "client", lambda r: r.client, lambda r: r.key, "key")
        _check_catch_all(rules, "server", lambda r: r.server, lambda r: r.prepend, "prepend")
        return cls(tuple(rule for _, rule in rules), text.strip())

    def host_name(self, name: bytes) -> bytes:
        """The host name for a name the guest sends; FuseError(EPERM or ENOTSUP) if refused."""
        for rule in self.rules:
            if rule.client and name.startswith(rule.key):
                if rule.type == "prefix":
                    return rule.prepend + name
                if rule.type == "ok":
                    return name
                raise FuseError(_REFUSALS[rule.type])
        raise AssertionError("unreachable: parse() requires a client catch-all")

    def guest_name(self, name: bytes) -> bytes | None:
        """What the guest sees of a host name in a listing, or None when it is hidden."""
        for rule in self.rules:
            if rule.server and name.startswith(rule.prepend):
                if rule.type == "prefix":
                    return name[len(rule.prepend) :]
                if rule.type == "ok":
                    return name
                return None
        raise AssertionError("unreachable: parse() requires a server catch-all")

    def guest_names(self, names: Iterable[bytes]) -> list[bytes]:
        """A host listing as the guest sees it: mapped back, hidden names left out."""
        shown = []
        for name in names:
            mapped = self.guest_name(name)
            if mapped:  # a host name that is exactly prepend maps to nothing: leave it out
                shown.append(mapped)
        return shown

    def host_capability_name(self) -> bytes | None:
        """Where the guest's security.capability lives on the host, when it is not there under
        its own name (None: unchanged, or refused to the guest)."""
        try:
            name = self.host_name(b"security.capability")
        except FuseError:
            return None
        return None if name == b"security.capability" else name


def _name(field: str) -> bytes:
    return os.fsencode(field)


def _expand_map(key: bytes, prepend: bytes) -> list[XattrRule]:
    if not key:
        return [
            XattrRule("prefix", True, True, b"", prepend),
            XattrRule("bad", True, True, b"", b""),
        ]
    return [
        XattrRule("prefix", True, True, key, prepend),
        XattrRule("bad", False, True, b"", key),
        XattrRule("bad", True, False, prepend, b""),
        XattrRule("ok", True, True, b"", b""),
    ]


def _check_catch_all(
    rules: list[tuple[int, XattrRule]],
    direction: str,
    applies: Callable[[XattrRule], bool],
    match: Callable[[XattrRule], bytes],
    field: str,
) -> None:
    applying = [(n, r) for n, r in rules if applies(r)]
    if applying and not match(applying[-1][1]):
        return
    catch_all = next((n for n, r in applying if not match(r)), None)
    if not applying:
        problem = f"no rule applies to {direction} names"
    elif catch_all is not None:
        problem = (
            f"rule {applying[-1][0]} comes after rule {catch_all}, the catch-all for"
            f" {direction} names, and would never apply to them"
        )
    else:
        problem = (
            f"the last rule for {direction} names (rule {applying[-1][0]}) has a non-empty {field}"
        )
    raise ValueError(
        f"xattrmap: {problem}; the rules for {direction} names must end with a catch-all"
        f" (an empty {field}), e.g. ':ok:all:::' or ':bad:all:::'"
    )
