"""--xattrmap: the parser, the mapping in both directions, and the passthrough under a map."""

from __future__ import annotations

import errno

import pytest

from vhostfs.fs.passthrough.xattrmap import XattrMap, XattrRule
from vhostfs.fuse.ops import FuseError

TRUSTED_MAP = ":map:trusted.:user.virtiofs.:"
ALL_MAP = ":map::user.virtiofs.:"

# The parser.


def test_map_shorthand_with_a_key_expands_to_four_rules() -> None:
    assert XattrMap.parse(TRUSTED_MAP).rules == (
        XattrRule("prefix", True, True, b"trusted.", b"user.virtiofs."),
        XattrRule("bad", False, True, b"", b"trusted."),
        XattrRule("bad", True, False, b"user.virtiofs.", b""),
        XattrRule("ok", True, True, b"", b""),
    )


def test_map_shorthand_without_a_key_is_prefix_all_then_bad_all() -> None:
    assert XattrMap.parse(ALL_MAP).rules == (
        XattrRule("prefix", True, True, b"", b"user.virtiofs."),
        XattrRule("bad", True, True, b"", b""),
    )
    assert XattrMap.parse(":prefix:all::user.virtiofs.::bad:all:::").rules == (
        XattrMap.parse(ALL_MAP).rules
    )


def test_the_long_form_of_a_keyed_map_is_the_same_map() -> None:
    long_form = """/prefix/all/trusted./user.virtiofs./
                   /bad/server//trusted./
                   /bad/client/user.virtiofs.//
                   /ok/all///"""
    assert XattrMap.parse(long_form).rules == XattrMap.parse(TRUSTED_MAP).rules
    assert XattrMap.parse("  " + TRUSTED_MAP + "\n").source == TRUSTED_MAP


@pytest.mark.parametrize(
    ("text", "rules"),
    [
        (":ok:all:::", (XattrRule("ok", True, True, b"", b""),)),
        (
            ":unsupported:client:security.::|ok|client|||  ,bad,server,,,",
            (
                XattrRule("unsupported", True, False, b"security.", b""),
                XattrRule("ok", True, False, b"", b""),
                XattrRule("bad", False, True, b"", b""),
            ),
        ),
        (  # each rule its own separator; fields may hold other rules' separators
            "/prefix/client/a:b/c:/ :ok:all:::",
            (
                XattrRule("prefix", True, False, b"a:b", b"c:"),
                XattrRule("ok", True, True, b"", b""),
            ),
        ),
        (  # a rule for the other direction may follow one direction's catch-all
            ":ok:client::: :bad:server::x.: :ok:server:::",
            (
                XattrRule("ok", True, False, b"", b""),
                XattrRule("bad", False, True, b"", b"x."),
                XattrRule("ok", False, True, b"", b""),
            ),
        ),
        (":bad:all:security.:security.: :map:trusted.:t.:", None),
    ],
)
def test_valid_maps(text: str, rules: tuple[XattrRule, ...] | None) -> None:
    parsed = XattrMap.parse(text)
    if rules is not None:
        assert parsed.rules == rules


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no rules"),
        (" \n\t", "no rules"),
        (":okay:all:::", "rule 1 (':okay:all:::'): unknown type 'okay'"),
        (":ok:all::: :prefix:both:a:b:", "rule 2 (':prefix:both:a:b:'): unknown scope 'both'"),
        (":ok:all::", "rule 1 (':ok:all::'): missing a ':' separator"),
        (":map:a:b", "rule 1 (':map:a:b'): missing a ':' separator"),
        (":ok:all::: /bad/all//", "rule 2 ('/bad/all//'): missing a '/' separator"),
        (":map:a:b: :ok:all:::", "rule 2: follows the 'map' rule 1, which must be the last"),
        (":map:a:b::map:c:d:", "rule 2: follows the 'map' rule 1"),
        (":ok:all:a\0b::", "NUL in a name"),
        (":ok:client:::", "no rule applies to server names"),
        (":ok:server::: :ok:client:user.::", "the last rule for client names (rule 2) has a"),
        (":prefix:all:a.:b.: :ok:server:::", "client names (rule 1) has a non-empty key"),
        (":prefix:all::user.vm.:", "the last rule for server names (rule 1) has a non-empty"),
        (":ok:client::: :bad:server::user.:", "server names (rule 2) has a non-empty prepend"),
        (":ok:all::: :bad:client:x::", "rule 2 comes after rule 1, the catch-all for client"),
    ],
)
def test_bad_maps_are_refused_with_the_rule_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="xattrmap") as caught:
        XattrMap.parse(text)
    assert message in str(caught.value)


def test_a_map_is_immutable() -> None:
    xmap = XattrMap.parse(TRUSTED_MAP)
    with pytest.raises(AttributeError):
        xmap.rules = ()  # type: ignore[misc]
    assert hash(xmap) == hash(XattrMap.parse(TRUSTED_MAP))


# Mapping tables.


def _client(xmap: XattrMap, name: bytes) -> bytes | int:
    try:
        return xmap.host_name(name)
    except FuseError as e:
        return e.errno


@pytest.mark.parametrize(
    ("text", "guest", "host"),
    [
        (TRUSTED_MAP, b"trusted.overlay.opaque", b"user.virtiofs.trusted.overlay.opaque"),
        (TRUSTED_MAP, b"user.color", b"user.color"),
        (TRUSTED_MAP, b"security.capability", b"security.capability"),
        (TRUSTED_MAP, b"user.virtiofs.trusted.overlay.opaque", errno.EPERM),  # no forging
        (TRUSTED_MAP, b"user.virtiofs.", errno.EPERM),
        (ALL_MAP, b"user.color", b"user.virtiofs.user.color"),
        (ALL_MAP, b"security.capability", b"user.virtiofs.security.capability"),
        (ALL_MAP, b"user.virtiofs.x", b"user.virtiofs.user.virtiofs.x"),
        (":unsupported:client:security.:: :ok:all:::", b"security.selinux", errno.ENOTSUP),
        (":unsupported:client:security.:: :ok:all:::", b"securityx", b"securityx"),
        (":bad:server::user.: :bad:client:user.:: :ok:all:::", b"user.a", errno.EPERM),
        (":prefix:server::x.: :ok:all:::", b"x.a", b"x.a"),  # server rules never map guest names
    ],
)
def test_guest_names_to_host_names(text: str, guest: bytes, host: bytes | int) -> None:
    assert _client(XattrMap.parse(text), guest) == host


@pytest.mark.parametrize(
    ("text", "host", "guest"),
    [
        (TRUSTED_MAP, b"user.virtiofs.trusted.overlay.opaque", b"trusted.overlay.opaque"),
        (TRUSTED_MAP, b"trusted.overlay.opaque", None),  # the host's own trusted.*: hidden
        (TRUSTED_MAP, b"user.color", b"user.color"),
        (TRUSTED_MAP, b"security.selinux", b"security.selinux"),
        # As virtiofsd: the server side strips the prepend whatever follows it.
        (TRUSTED_MAP, b"user.virtiofs.foo", b"foo"),
        (ALL_MAP, b"user.virtiofs.user.color", b"user.color"),
        (ALL_MAP, b"user.color", None),
        (ALL_MAP, b"security.selinux", None),
        (":bad:server::security.: :ok:all:::", b"security.selinux", None),
        (":unsupported:all:x.:x.: :ok:all:::", b"x.y", None),
        (":prefix:client:a.:b.: :ok:all:::", b"b.a.z", b"b.a.z"),  # client rules never list
    ],
)
def test_host_names_to_listed_names(text: str, host: bytes, guest: bytes | None) -> None:
    assert XattrMap.parse(text).guest_name(host) == guest


def test_a_listing_is_mapped_and_filtered_in_order() -> None:
    listing = [
        b"user.virtiofs.trusted.overlay.opaque",
        b"trusted.overlay.opaque",
        b"user.a",
        b"user.virtiofs.",  # would list as an empty name: left out
        b"user.virtiofs.trusted.overlay.redirect",
    ]
    assert XattrMap.parse(TRUSTED_MAP).guest_names(listing) == [
        b"trusted.overlay.opaque",
        b"user.a",
        b"trusted.overlay.redirect",
    ]
    assert XattrMap.parse(ALL_MAP).guest_names([b"user.a", b"trusted.b"]) == []


def test_where_the_guests_capabilities_live() -> None:
    assert XattrMap.parse(ALL_MAP).host_capability_name() == b"user.virtiofs.security.capability"
    assert XattrMap.parse(TRUSTED_MAP).host_capability_name() is None  # unchanged
    refused = XattrMap.parse(":bad:all:security.:security.: :ok:all:::")
    assert refused.host_capability_name() is None
