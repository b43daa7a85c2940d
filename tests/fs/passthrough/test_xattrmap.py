"""--xattrmap: the parser, the mapping in both directions, and the passthrough under a map."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import fuse_client as fc
from tests.support.frontend import fuse_session
from tests.support.passthrough_guest import Guest
from vhostfs.fs import Passthrough
from vhostfs.fs.passthrough.xattrmap import XattrMap, XattrRule
from vhostfs.fuse.abi import SetattrValid as V
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


# Through the passthrough, as the guest kernel sends them.

CAP = b"security.capability"
MAPPED_CAP = b"user.virtiofs.security.capability"
CAP_BLOB = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep
WRITE_KILL_SUIDGID = 1 << 2


@contextlib.contextmanager
def _guest(tree: Path, text: str, **kw: bool) -> Iterator[Guest]:
    fs = Passthrough(tree, xattrmap=XattrMap.parse(text), **kw)  # type: ignore[arg-type]
    try:
        yield Guest(fs)
    finally:
        fs.close()


@pytest.fixture
def trusted(tree: Path) -> Iterator[Guest]:
    with _guest(tree, TRUSTED_MAP) as g:
        yield g


def _listed(g: Guest, node: int) -> list[bytes]:
    payload = g.send(fc.listxattr(node, 4096)).payload
    return payload.split(b"\0")[:-1]


def _host(path: Path) -> list[bytes]:
    return sorted(os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False))


def test_overlayfs_trusted_names_land_under_user_virtiofs(trusted: Guest, tree: Path) -> None:
    node = trusted.walk(b"file.txt")
    assert trusted.send(trusted.setxattr(node, b"trusted.overlay.opaque", b"y")).error == 0
    assert _host(tree / "file.txt") == [b"user.virtiofs.trusted.overlay.opaque"]
    assert trusted.send(fc.getxattr(node, b"trusted.overlay.opaque", 10)).payload == b"y"
    assert _listed(trusted, node) == [b"trusted.overlay.opaque"]
    assert trusted.send(trusted.setxattr(node, b"user.color", b"red")).error == 0  # unchanged
    assert os.getxattr(tree / "file.txt", "user.color") == b"red"
    assert sorted(_listed(trusted, node)) == [b"trusted.overlay.opaque", b"user.color"]
    assert trusted.send(fc.removexattr(node, b"trusted.overlay.opaque")).error == 0
    assert _host(tree / "file.txt") == [b"user.color"]
    assert trusted.errno_of(fc.getxattr(node, b"trusted.overlay.opaque", 10)) == errno.ENODATA


def test_the_guest_cannot_reach_the_mapped_names_directly(trusted: Guest, tree: Path) -> None:
    node = trusted.walk(b"file.txt")
    os.setxattr(tree / "file.txt", "user.virtiofs.trusted.overlay.opaque", b"y")
    forged = b"user.virtiofs.trusted.overlay.opaque"
    assert trusted.errno_of(trusted.setxattr(node, forged, b"y")) == errno.EPERM
    assert trusted.errno_of(fc.getxattr(node, forged, 10)) == errno.EPERM
    assert trusted.errno_of(fc.removexattr(node, forged)) == errno.EPERM
    assert os.getxattr(tree / "file.txt", forged) == b"y"


def test_host_names_are_listed_as_the_rules_say(trusted: Guest, tree: Path) -> None:
    path = tree / "file.txt"
    os.setxattr(path, "trusted.overlay.opaque", b"host's own")  # hidden: a bad server rule
    os.setxattr(path, "user.virtiofs.foo", b"v")  # prefixed but not trusted.*: stripped
    os.setxattr(path, "user.plain", b"v")  # passes through
    node = trusted.walk(b"file.txt")
    assert sorted(_listed(trusted, node)) == [b"foo", b"user.plain"]
    # The guest reads "foo" as the plain host name "foo" (virtiofsd's rules), which Linux
    # does not have: the stripped name is listed but not readable.
    assert trusted.errno_of(fc.getxattr(node, b"foo", 10)) == errno.EOPNOTSUPP
    # The host's raw trusted.* stays out of the guest's reach as well as its listing.
    assert trusted.send(fc.getxattr(node, b"trusted.overlay.opaque", 20)).error == errno.ENODATA


def test_listxattr_sizes_are_those_of_the_mapped_list(trusted: Guest, tree: Path) -> None:
    path = tree / "file.txt"
    os.setxattr(path, "user.virtiofs.trusted.overlay.opaque", b"y")
    os.setxattr(path, "trusted.hidden", b"y")
    node = trusted.walk(b"file.txt")
    wanted = len(b"trusted.overlay.opaque\0")
    assert fc.parse_u32_size(trusted.send(fc.listxattr(node, 0)).payload) == wanted
    assert trusted.errno_of(fc.listxattr(node, wanted - 1)) == errno.ERANGE
    assert trusted.send(fc.listxattr(node, wanted)).payload == b"trusted.overlay.opaque\0"
    os.removexattr(path, "user.virtiofs.trusted.overlay.opaque")
    assert fc.parse_u32_size(trusted.send(fc.listxattr(node, 0)).payload) == 0  # all hidden
    assert trusted.send(fc.listxattr(node, 10)).payload == b""


@pytest.mark.parametrize(
    ("text", "name", "err"),
    [
        (":bad:client:security.:: :ok:all:::", b"security.selinux", errno.EPERM),
        (":unsupported:client:security.:: :ok:all:::", b"security.selinux", errno.ENOTSUP),
        (ALL_MAP, b"user.virtiofs.x", None),  # everything is prefixed: nothing is refused
    ],
)
def test_refused_names_get_the_rules_errno(
    tree: Path, text: str, name: bytes, err: int | None
) -> None:
    with _guest(tree, text) as g:
        node = g.walk(b"file.txt")
        if err is None:
            assert g.send(g.setxattr(node, name, b"v")).error == 0
            assert os.getxattr(tree / "file.txt", b"user.virtiofs." + name) == b"v"
            return
        for request in (
            g.setxattr(node, name, b"v"),
            fc.getxattr(node, name, 10),
            fc.removexattr(node, name),
        ):
            assert g.errno_of(request) == err
        assert g.errno_of(g.setxattr(node, b"security.other", b"v")) == err
        assert _host(tree / "file.txt") == []


@pytest.fixture
def capable(tree: Path) -> Iterator[tuple[Guest, Path, int]]:
    """Under `:map::user.virtiofs.:`, a setuid file the guest gave a capability."""
    path = tree / "setid"
    path.write_bytes(b"")
    path.chmod(0o4755)
    with _guest(tree, ALL_MAP) as g:
        node = g.walk(b"setid")
        assert g.send(g.setxattr(node, CAP, CAP_BLOB)).error == 0
        assert _host(path) == [MAPPED_CAP]
        assert g.send(fc.getxattr(node, CAP, 64)).payload == CAP_BLOB
        assert _listed(g, node) == [CAP]
        yield g, path, node


def test_a_kill_suid_write_removes_the_mapped_capability(
    capable: tuple[Guest, Path, int],
) -> None:
    g, path, node = capable
    fh = g.open(node, os.O_WRONLY)
    assert g.send(fc.write(node, fh, 0, b"plain")).error == 0
    assert _host(path) == [MAPPED_CAP]  # a privileged writer: the guest's kernel decides
    os.setxattr(path, CAP.decode(), CAP_BLOB)  # the host's own, too
    killing = fc.write(node, fh, 0, b"x", write_flags=WRITE_KILL_SUIDGID, uid=1000, gid=1000)
    assert g.send(killing).error == 0
    assert _host(path) == [] and stat.S_IMODE(path.stat().st_mode) == 0o755
    assert _listed(g, node) == []


@pytest.mark.parametrize(
    ("valid", "kw"),
    [(V.UID | V.GID, {"uid": 1000, "gid": 1000}), (V.SIZE, {"size": 0}), (V.KILL_SUIDGID, {})],
    ids=["chown", "truncate", "kill-suidgid"],
)
def test_chown_and_truncate_remove_the_mapped_capability(
    capable: tuple[Guest, Path, int], valid: int, kw: dict[str, int]
) -> None:
    g, path, node = capable
    assert g.send(fc.setattr_(node, valid, **kw)).error == 0
    assert MAPPED_CAP not in _host(path)
    assert g.errno_of(fc.getxattr(node, CAP, 64)) == errno.ENODATA


def test_an_o_trunc_open_removes_the_mapped_capability(
    capable: tuple[Guest, Path, int],
) -> None:
    g, path, node = capable
    g.open(node, os.O_RDONLY)
    assert _host(path) == [MAPPED_CAP]
    g.open(node, os.O_WRONLY | os.O_TRUNC)
    assert _host(path) == []


def test_without_a_map_names_pass_unchanged(w: Guest, tree: Path) -> None:
    node = w.walk(b"file.txt")
    assert w.send(w.setxattr(node, b"user.virtiofs.x", b"v")).error == 0
    assert w.send(w.setxattr(node, b"trusted.x", b"v")).error == 0
    assert _host(tree / "file.txt") == [b"trusted.x", b"user.virtiofs.x"]
    assert sorted(_listed(w, node)) == [b"trusted.x", b"user.virtiofs.x"]
    assert w.fs.capability_names == (CAP,)


def test_xattrs_off_wins_over_a_map(tree: Path) -> None:
    with _guest(tree, ALL_MAP, xattr=False) as g:
        node = g.walk(b"file.txt")
        assert g.errno_of(g.setxattr(node, b"user.a", b"v")) == errno.ENOSYS
        assert g.errno_of(fc.listxattr(node, 0)) == errno.ENOSYS


# Through `vhostfs serve --xattrmap`, the real socket and a test front-end as the guest.


def _serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "vhostfs", "serve", *args]


def test_serve_with_an_xattrmap(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"")
    os.setxattr(share / "f", "trusted.host", b"h")  # the host's own: hidden from the guest
    sock = tmp_path / "s.sock"
    argv = _serve("--socket", str(sock), "--shared-dir", str(share), "--xattrmap", TRUSTED_MAP)
    queue = 1

    def errno_of(reply: bytes) -> int:
        return -fc.parse_out_header(reply).error

    with fuse_session(argv, sock, tmp_path / "log") as (_, frontend):
        entry = frontend.request(queue, fc.lookup(fc.ROOT, b"f"), 16 + 128)
        node = fc.parse_entry_out(entry[16:]).nodeid
        opaque = fc.setxattr(node, b"trusted.overlay.opaque", b"y", setxattr_flags=0)
        assert errno_of(frontend.request(queue, opaque, 16)) == 0
        forged = fc.setxattr(node, b"user.virtiofs.trusted.x", b"y", setxattr_flags=0)
        assert errno_of(frontend.request(queue, forged, 16)) == errno.EPERM
        listing = frontend.request(queue, fc.listxattr(node, 4096), 16 + 4096)
        assert listing[16:] == b"trusted.overlay.opaque\0"
    assert _host(share / "f") == [b"trusted.host", b"user.virtiofs.trusted.overlay.opaque"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--xattrmap", ":ok:client:::"), "no rule applies to server names"),
        (("--xattrmap", ":prefix:every::user.:"), "unknown scope 'every'"),
        (("--xattrmap", ALL_MAP, "--no-xattr"), "--xattrmap needs --shared-dir with xattrs on"),
    ],
)
def test_serve_refuses_a_bad_xattrmap(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    sock = tmp_path / "s.sock"
    argv = _serve("--socket", str(sock), "--shared-dir", str(tmp_path), *args)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.stderr
    assert not sock.exists()
