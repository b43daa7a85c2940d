"""The file tree an image is built from: nodes, and layers applied on top of each other.

A Node is one inode. Directories hold their entries by name; a hard link is the same Node
under two names, so link counts come from the tree, never from the source's st_nlink (which
may count links outside it).

Layers follow the OCI image layout: a later layer replaces what an earlier one had at the same
path, merges directories, and removes lower entries with whiteouts: `.wh.NAME` deletes NAME in
its directory, `.wh..wh..opq` hides everything the lower layers had in that directory. Whiteouts
only affect lower layers, so an entry and a whiteout for it in the same layer leave the entry.
Whiteout files never appear in the result.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from vhostfs.rafs.build.errors import BuildError

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
IMPLICIT_DIRECTORY_MODE = stat.S_IFDIR | 0o755

Path = tuple[bytes, ...]  # components below the root; () is the root


@dataclass(frozen=True, slots=True)
class FileData:
    """Where a regular file's bytes are: `size` bytes at `offset` in the file at `path`."""

    path: str
    offset: int
    size: int


@dataclass(eq=False, slots=True)
class Node:
    mode: int  # st_mode, file type included
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    rdev: int = 0  # as os.makedev() encodes it
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    data: FileData | None = None  # regular files with content
    target: bytes = b""  # symlinks
    entries: dict[bytes, Node] = field(default_factory=dict)  # directories
    layer: int = 0  # the source (layer) that put it, counted from 0: whose blob gets its data

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def size(self) -> int:
        """Bytes of content: file data or symlink target (directories are sized by the writer)."""
        if self.kind == stat.S_IFLNK:
            return len(self.target)
        return self.data.size if self.data is not None else 0


def display(path: Path) -> str:
    return "/" + b"/".join(path).decode(errors="backslashreplace")


class Tree:
    """The merged result of the layers applied so far."""

    def __init__(self) -> None:
        self.root = Node(IMPLICIT_DIRECTORY_MODE)
        # (directory, name) of each entry the current layer put; Nodes hash by identity.
        self._added: set[tuple[Node, bytes]] = set()
        self.layer = -1

    def begin_layer(self) -> None:
        self._added = set()
        self.layer += 1

    def add(self, path: Path, node: Node) -> None:
        """Put `node` at `path`, or apply the whiteout that `path` names."""
        if not path:
            if not node.is_dir:
                raise BuildError("the root of a layer must be a directory")
            self._update_directory(self.root, node)
            return
        parent = self._directory(path[:-1])
        name = path[-1]
        if name == OPAQUE_MARKER:
            self._hide_lower_entries(parent)
        elif name.startswith(WHITEOUT_PREFIX):
            self._white_out(parent, name[len(WHITEOUT_PREFIX) :])
        else:
            node.layer = max(self.layer, 0)
            self._put(parent, name, node)

    def link(self, path: Path, target: Path) -> None:
        """A hard link at `path` to the non-directory already at `target`."""
        node = self.lookup(target)
        if node is None:
            raise BuildError(f"hard link {display(path)}: target {display(target)} not found")
        if node.is_dir:
            raise BuildError(f"hard link {display(path)}: target {display(target)} is a directory")
        if not path or path[-1].startswith(WHITEOUT_PREFIX):
            raise BuildError(f"hard link {display(path)}: not a valid link name")
        self._put(self._directory(path[:-1]), path[-1], node)

    def lookup(self, path: Path) -> Node | None:
        node: Node | None = self.root
        for name in path:
            if node is None or not node.is_dir:
                return None
            node = node.entries.get(name)
        return node

    def _directory(self, path: Path) -> Node:
        """The directory at `path`, created (and replacing non-directories) as needed, as tar
        extraction does for entries whose parents the archive never listed."""
        node = self.root
        for name in path:
            child = node.entries.get(name)
            if child is None or not child.is_dir:
                child = Node(IMPLICIT_DIRECTORY_MODE)
                self._put(node, name, child)
            node = child
        return node

    def _put(self, parent: Node, name: bytes, node: Node) -> None:
        existing = parent.entries.get(name)
        if existing is not None and existing.is_dir and node.is_dir:
            self._update_directory(existing, node)  # directories merge across layers
        else:
            parent.entries[name] = node
        self._added.add((parent, name))

    @staticmethod
    def _update_directory(existing: Node, update: Node) -> None:
        existing.mode = update.mode
        existing.uid, existing.gid = update.uid, update.gid
        existing.mtime, existing.mtime_nsec = update.mtime, update.mtime_nsec
        existing.xattrs = dict(update.xattrs)

    def _hide_lower_entries(self, directory: Node) -> None:
        for name in list(directory.entries):
            if (directory, name) not in self._added:
                del directory.entries[name]

    def _white_out(self, directory: Node, name: bytes) -> None:
        if name and (directory, name) not in self._added:
            directory.entries.pop(name, None)


@dataclass(frozen=True, slots=True)
class Inode:
    """A node as the image stores it: its place in inode order and its link count."""

    number: int  # 0 for the root, then in breadth-first order of first appearance
    node: Node
    path: Path  # the first path it is found at
    parent: Node  # for "..": the directory it was first found in (the root for the root)
    nlink: int


def number_inodes(root: Node) -> list[Inode]:
    """Every node once, breadth first with each directory's entries in name order, so that a
    directory's children sit next to each other and the result depends on nothing but the tree.
    """
    # Each directory is listed exactly once, so counting the names that lead to each
    # non-directory while listing them gives its link count.
    links: dict[Node, int] = {}
    order: list[tuple[Path, Node, Node]] = [((), root, root)]
    seen: set[Node] = {root}
    subdirectories: dict[Node, int] = {}
    for path, node, _ in order:  # grows while it is walked: a breadth-first queue
        if not node.is_dir:
            continue
        count = 0
        for name in sorted(node.entries):
            child = node.entries[name]
            if child.is_dir:
                count += 1
            else:
                links[child] = links.get(child, 0) + 1
            if child not in seen:
                seen.add(child)
                order.append(((*path, name), child, node))
        subdirectories[node] = count
    return [
        Inode(number, node, path, parent, 2 + subdirectories[node] if node.is_dir else links[node])
        for number, (path, node, parent) in enumerate(order)
    ]
