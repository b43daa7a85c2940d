"""FUSE protocol engine for virtio-fs: requests in, replies out, no I/O of its own.

`Dispatcher` serves requests arriving through a `GuestRequest`; a file system implements
`Operations`.
"""

from vhostfs.fuse.dispatch import Dispatcher
from vhostfs.fuse.ops import (
    ROOT_ID,
    Attr,
    AttrOut,
    ConnInfo,
    DirEntry,
    EntryOut,
    FileHandle,
    FileSlice,
    FuseError,
    NodeId,
    OpenOut,
    Operations,
    ReadResult,
    RequestContext,
    SetattrChanges,
    StatFs,
    WriteData,
)

__all__ = [
    "ROOT_ID",
    "Attr",
    "AttrOut",
    "ConnInfo",
    "DirEntry",
    "Dispatcher",
    "EntryOut",
    "FileHandle",
    "FileSlice",
    "FuseError",
    "NodeId",
    "OpenOut",
    "Operations",
    "ReadResult",
    "RequestContext",
    "SetattrChanges",
    "StatFs",
    "WriteData",
]
