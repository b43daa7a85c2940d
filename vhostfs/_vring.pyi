"""Types of the cffi extension built from csrc/vring.h and csrc/lz4_block.h (csrc/build_ffi.py).

The headers are the cdef, so they are the reference: a struct below lists the fields of its C
struct, a method of `_Lib` one C function, with C integers as `int`. The struct classes type
the pointers that `ffi.new("struct ... *")` returns (cffi reads and writes fields through
them). Which `vq_ring` fields Python may write is stated in vring.h.
"""

from typing import Any, Literal, overload

from typing_extensions import Buffer

class CData:
    """Any other cffi value: a pointer, an array or NULL."""

    def __int__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...
    def __setitem__(self, index: int, value: Any) -> None: ...
    def __len__(self) -> int: ...

class Int64Array(CData):
    """`int64_t *` or `int64_t[]`."""

    def __getitem__(self, index: int) -> int: ...
    def __setitem__(self, index: int, value: int) -> None: ...
    def __iter__(self) -> Any: ...

class VqRegion(CData):
    gpa: int
    size: int
    uva: int
    hva: int

class _Regions(CData):
    def __getitem__(self, index: int) -> VqRegion: ...

class VqMemory(CData):
    nregions: int
    regions: _Regions

class VqIov(CData):
    """`struct vq_iov *` or an array of them; + moves along it, as in C."""

    base: CData
    len: int
    def __getitem__(self, index: int) -> VqIov: ...
    def __add__(self, count: int) -> VqIov: ...

class VqRing(CData):
    num: int
    features: int
    desc: CData
    avail: CData
    used: CData
    last_avail: int
    used_idx: int
    signalled_used: int
    signalled_used_valid: int
    inflight: int

class VqChain(CData):
    head: int
    nread: int
    nwrite: int
    read_len: int
    write_len: int
    req_len: int
    req: CData
    iov: VqIov

class VqDirectEntry(CData):
    nodeid: int
    fh: int
    file_start: int
    file_end: int
    eof: int
    pos: int
    dev: int
    ino: int
    fd: int
    tag: int

class _Counts(CData):
    def __getitem__(self, index: int) -> int: ...
    def __setitem__(self, index: int, value: int) -> None: ...
    def __iter__(self) -> Any: ...

class VqDirectAccount(CData):
    reads: int
    bytes: int
    sizes: _Counts
    latencies: _Counts

class _Accounts(CData):
    def __getitem__(self, index: int) -> VqDirectAccount: ...

class _DirectSlots(CData):
    def __getitem__(self, index: int) -> VqDirectEntry: ...

class VqDirect(CData):
    enabled: int
    pad: int
    hits: int
    size_bounds: _Counts
    latency_bounds_ns: _Counts
    accounts: _Accounts
    slots: _DirectSlots

class VqConstEntry(CData):
    nodeid: int
    opcode: int
    args_len: int
    arg_mask: int
    arg_value: int
    len: int
    pad: int
    payload: CData

class _ConstSlots(CData):
    def __getitem__(self, index: int) -> VqConstEntry: ...

class VqConstRange(CData):
    lo: int
    hi: int
    opcode: int
    args_len: int

class _ConstRanges(CData):
    def __getitem__(self, index: int) -> VqConstRange: ...

class VqConst(CData):
    hits: _Counts
    ranges: _ConstRanges
    slots: _ConstSlots

class Uint32Array(CData):
    """`uint32_t *`."""

    def __getitem__(self, index: int) -> int: ...
    def __setitem__(self, index: int, value: int) -> None: ...

class CBuffer:
    """ffi.buffer(): the raw bytes of a cdata, sliceable and writable in place."""

    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __len__(self) -> int: ...
    def __getitem__(self, index: slice) -> bytes: ...
    def __setitem__(self, index: slice, value: Buffer) -> None: ...

class CType:
    """ffi.typeof(): a C type; `fields` (name, field) is there for structs."""

    cname: str
    fields: list[tuple[str, Any]]

class FFI:
    NULL: Any  # cffi's one null pointer: it converts to every pointer type
    @overload
    def new(self, cdecl: Literal["struct vq_ring *"]) -> VqRing: ...
    @overload
    def new(self, cdecl: Literal["struct vq_chain *"]) -> VqChain: ...
    @overload
    def new(self, cdecl: Literal["struct vq_memory *"]) -> VqMemory: ...
    @overload
    def new(self, cdecl: Literal["struct vq_direct *"]) -> VqDirect: ...
    @overload
    def new(self, cdecl: Literal["uint32_t *"]) -> Uint32Array: ...
    @overload
    def new(self, cdecl: Literal["struct vq_const *"]) -> VqConst: ...
    @overload
    def new(
        self, cdecl: Literal["struct vq_iov[]", "struct vq_iov[1]"], init: int = ...
    ) -> VqIov: ...
    @overload
    def new(self, cdecl: Literal["int64_t *", "int64_t[]"], init: int = ...) -> Int64Array: ...
    @overload
    def new(self, cdecl: str, init: Any = ...) -> CData: ...
    def buffer(self, cdata: CData, size: int = ...) -> CBuffer: ...
    def from_buffer(self, python_buffer: Buffer, require_writable: bool = ...) -> CData: ...
    def cast(self, cdecl: str, value: CData | int) -> CData: ...
    def string(self, cdata: CData, maxlen: int = ...) -> bytes: ...
    def release(self, cdata: CData) -> None: ...
    def typeof(self, cdecl: str | CData) -> CType: ...

_Bytes = bytes | CData  # a `const void *` / `const uint8_t *` argument

class _Lib:
    # vring.h
    VQ_MAX_REGIONS: int
    VQ_MAX_IOV: int
    VQ_REQ_BUF: int
    VQ_MAX_QUEUE_SIZE: int
    VQ_F_INDIRECT: int
    VQ_F_EVENT_IDX: int
    VQ_ERR_NOT_READY: int
    VQ_ERR_AVAIL_IDX: int
    VQ_ERR_HEAD: int
    VQ_ERR_NEXT: int
    VQ_ERR_LOOP: int
    VQ_ERR_INDIRECT_FEATURE: int
    VQ_ERR_INDIRECT_LEN: int
    VQ_ERR_INDIRECT_NESTED: int
    VQ_ERR_ORDER: int
    VQ_ERR_OVERFLOW: int
    VQ_ERR_ADDRESS: int
    VQ_ERR_TOO_MANY_IOV: int
    VQ_ERR_INUSE: int
    VQ_ERR_USED_HEAD: int
    VQ_REPLY_TOO_LONG: int
    VQ_REPLY_READ_FAILED: int
    VQ_OFFLOAD_MAX: int
    VQ_DIRECT_SLOTS: int
    VQ_DIRECT_WINDOW_SHIFT: int
    VQ_DIRECT_TAGS: int
    VQ_DIRECT_CLASSES: int
    VQ_CONST_SLOTS: int
    VQ_CONST_PAYLOAD: int
    VQ_CONST_OPCODES: int
    VQ_CONST_RANGES: int
    def vq_strerror(self, err: int) -> CData: ...
    def vq_translate(self, mem: VqMemory, gpa: int, len: int, iov: VqIov, max: int) -> int: ...
    def vq_uva_to_hva(self, mem: VqMemory, uva: int, len: int) -> CData: ...
    def vq_ring_map(
        self, ring: VqRing, mem: VqMemory, desc_uva: int, avail_uva: int, used_uva: int
    ) -> int: ...
    def vq_ring_unmap(self, ring: VqRing) -> None: ...
    def vq_pop(self, ring: VqRing, mem: VqMemory, chain: VqChain) -> int: ...
    def vq_push(self, ring: VqRing, head: int, len: int) -> int: ...
    def vq_should_notify(self, ring: VqRing) -> int: ...
    def vq_complete(self, ring: VqRing, head: int, len: int, call_fd: int) -> int: ...
    def vq_notify(self, ring: VqRing, call_fd: int) -> int: ...
    def vq_reply(
        self, ring: VqRing, chain: VqChain, data: _Bytes, len: int, notify: int, call_fd: int
    ) -> int: ...
    def vq_reply_preadv(
        self,
        ring: VqRing,
        chain: VqChain,
        fd: int,
        pos: int,
        size: int,
        unique: int,
        notify: int,
        call_fd: int,
        read_result: Int64Array,
    ) -> int: ...
    def vq_pop_or_arm(self, ring: VqRing, mem: VqMemory, chain: VqChain) -> int: ...
    def vq_direct_add(
        self,
        d: VqDirect,
        nodeid: int,
        fh: int,
        file_start: int,
        file_end: int,
        eof: int,
        fd: int,
        pos: int,
        tag: int,
    ) -> int: ...
    def vq_direct_drop(self, d: VqDirect, nodeid: int, fh: int) -> None: ...
    def vq_direct_clear(self, d: VqDirect) -> None: ...
    def vq_const_add(
        self,
        c: VqConst,
        nodeid: int,
        opcode: int,
        args_len: int,
        arg_mask: int,
        arg_value: int,
        payload: _Bytes,
        len: int,
    ) -> int: ...
    def vq_const_clear(self, c: VqConst) -> None: ...
    def vq_const_add_range(
        self, c: VqConst, opcode: int, args_len: int, lo: int, hi: int
    ) -> int: ...
    def vq_pop_direct(
        self,
        ring: VqRing,
        mem: VqMemory,
        chain: VqChain,
        d: VqDirect,
        c: VqConst,
        answered: Uint32Array,
    ) -> int: ...
    def vq_offload_start(self) -> int: ...
    def vq_offload_stop(self) -> int: ...
    def vq_offload_read(self, chain: VqChain, fd: int, pos: int, size: int, unique: int) -> int: ...
    def vq_offload_busy(self) -> int: ...
    def vq_offload_finish(self, ring: VqRing, results: Int64Array) -> int: ...
    def vq_set_kicks(self, ring: VqRing, enable: int) -> int: ...
    def vq_pending(self, ring: VqRing) -> int: ...
    def vq_iov_read(self, iov: VqIov, n: int, offset: int, dst: CData, len: int) -> int: ...
    def vq_iov_write(self, iov: VqIov, n: int, offset: int, src: _Bytes, len: int) -> int: ...
    def vq_iov_preadv(
        self, fd: int, iov: VqIov, n: int, offset: int, len: int, pos: int
    ) -> int: ...
    def vq_iov_pwritev(
        self, fd: int, iov: VqIov, n: int, offset: int, len: int, pos: int
    ) -> int: ...
    # lz4_block.h
    LZ4B_ERR_TRUNCATED: int
    LZ4B_ERR_OUTPUT_FULL: int
    LZ4B_ERR_OFFSET: int
    LZ4B_ERR_EMPTY: int
    def lz4_block_decompress(self, src: _Bytes, src_len: int, dst: CData, dst_cap: int) -> int: ...

ffi: FFI
lib: _Lib
