/*
 * vring.h: the split-virtqueue engine that Python drives through cffi.
 *
 * This file is the cffi cdef as well as the C header, so it holds only what cffi's parser
 * accepts: no #include, no function-like macros, only integer #defines. vring.c includes the
 * system headers it needs before this one.
 *
 * Everything reachable from a descriptor is guest-controlled. Every index, length and address is
 * checked before use, and each failure has its own code so the daemon can log exactly one line.
 */

/* Limits. */
#define VQ_MAX_REGIONS 64         /* memory slots we accept (QEMU uses up to 32, CH fewer) */
#define VQ_MAX_IOV 1024           /* iovecs one chain may produce, as libvhost-user */
#define VQ_REQ_BUF 8192           /* readable bytes vq_pop copies out for the request parser */
#define VQ_MAX_QUEUE_SIZE 32768   /* largest split ring (virtio 1.x) */

/* Feature switches for one ring, from the negotiated virtio features. */
#define VQ_F_INDIRECT 1           /* VIRTIO_RING_F_INDIRECT_DESC was acked */
#define VQ_F_EVENT_IDX 2          /* VIRTIO_RING_F_EVENT_IDX was acked */

/* vq_pop results: 1 = a chain was taken, 0 = ring empty, negative = the ring is broken. */
#define VQ_ERR_NOT_READY -1       /* ring not mapped, or size not a power of two */
#define VQ_ERR_AVAIL_IDX -2       /* avail->idx ran more than the queue size ahead of us */
#define VQ_ERR_HEAD -3            /* head index >= queue size */
#define VQ_ERR_NEXT -4            /* next index >= table size */
#define VQ_ERR_LOOP -5            /* more hops than descriptors: a loop */
#define VQ_ERR_INDIRECT_FEATURE -6 /* INDIRECT flag without the negotiated feature */
#define VQ_ERR_INDIRECT_LEN -7    /* indirect table length zero, not a multiple of 16, or too big */
#define VQ_ERR_INDIRECT_NESTED -8 /* an indirect table inside an indirect table */
#define VQ_ERR_ORDER -9           /* a readable descriptor after a writable one */
#define VQ_ERR_OVERFLOW -10       /* the chain's total length exceeds 2^32 */
#define VQ_ERR_ADDRESS -11        /* a buffer not wholly inside guest memory regions */
#define VQ_ERR_TOO_MANY_IOV -12   /* more than VQ_MAX_IOV iovecs */
#define VQ_ERR_INUSE -13          /* more chains in flight than the queue size */
#define VQ_ERR_USED_HEAD -14      /* vq_push of a head that is not in flight range */
#define VQ_REPLY_TOO_LONG -15     /* vq_reply*: the reply does not fit the writable part */
#define VQ_REPLY_READ_FAILED -16  /* vq_reply_preadv: the file read failed (errno apart) */

/* One guest RAM region, sorted by gpa in vq_memory. hva is where gpa is mapped in this process. */
struct vq_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t uva;                 /* front-end (QEMU) virtual address of gpa */
    uint64_t hva;
};

/* Python owns the table: it writes every field, between calls, whenever guest memory changes;
 * C only reads it. */
struct vq_memory {
    uint32_t nregions;
    struct vq_region regions[VQ_MAX_REGIONS];
};

/* Same layout as struct iovec (checked at compile time in vring.c). */
struct vq_iov {
    void *base;
    size_t len;
};

/* One split ring. Python allocates it and may write exactly these fields, each marked [py]:
 *   num, features  front-end settings (SET_VRING_NUM, SET_FEATURES), read by vq_ring_map;
 *   last_avail     SET_VRING_BASE, and 0 on a device reset, while the ring is stopped;
 *   inflight       only to carry the count across a vq_ring_map (which starts from an idle
 *                  ring) when guest memory changes under a running ring.
 * Everything else, the host pointers included, is C's: vq_ring_map sets them and vq_ring_unmap
 * (or a failed vq_ring_map) clears them. */
struct vq_ring {
    uint32_t num;                 /* [py] queue size, power of two */
    uint32_t features;            /* [py] VQ_F_* */
    void *desc;                   /* host pointers, set by vq_ring_map */
    void *avail;
    void *used;
    uint16_t last_avail;          /* [py] next avail ring slot to take */
    uint16_t used_idx;            /* shadow of used->idx */
    uint16_t signalled_used;      /* used_idx at the last interrupt (EVENT_IDX) */
    uint8_t signalled_used_valid;
    uint32_t inflight;            /* [py] chains popped but not yet pushed */
};

/* A popped descriptor chain: iov[0..nread) readable, iov[nread..nread+nwrite) writable.
 * vq_pop fills it; Python only reads it, and hands it back to vq_reply* / vq_offload_read. */
struct vq_chain {
    uint16_t head;
    uint16_t nread;
    uint16_t nwrite;
    uint32_t read_len;
    uint32_t write_len;
    uint32_t req_len;             /* bytes copied into req: min(read_len, VQ_REQ_BUF) */
    uint8_t req[VQ_REQ_BUF];
    struct vq_iov iov[VQ_MAX_IOV];
};

/* Text for a VQ_ERR_* code (static string). */
const char *vq_strerror(int err);

/* Translate [gpa, gpa+len) into at most max iovecs, split at region borders.
 * Returns the number of iovecs, VQ_ERR_ADDRESS or VQ_ERR_TOO_MANY_IOV. */
int vq_translate(const struct vq_memory *mem, uint64_t gpa, uint64_t len,
                 struct vq_iov *iov, uint32_t max);

/* Host pointer for a front-end virtual address range that lies inside one region, else NULL. */
void *vq_uva_to_hva(const struct vq_memory *mem, uint64_t uva, uint64_t len);

/* Point the ring at its three areas, given as front-end virtual addresses (SET_VRING_ADDR).
 * Checks alignment and that each area lies inside one region. Reads used->idx into used_idx.
 * Returns 0 or VQ_ERR_NOT_READY / VQ_ERR_ADDRESS. */
int vq_ring_map(struct vq_ring *ring, const struct vq_memory *mem,
                uint64_t desc_uva, uint64_t avail_uva, uint64_t used_uva);

/* Forget the ring's host pointers (device reset): every call then sees VQ_ERR_NOT_READY. */
void vq_ring_unmap(struct vq_ring *ring);

/* Take the next available chain. Returns 1, 0 (empty) or VQ_ERR_*. */
int vq_pop(struct vq_ring *ring, const struct vq_memory *mem, struct vq_chain *chain);

/* Put head on the used ring with len bytes written, then publish the new used->idx. */
int vq_push(struct vq_ring *ring, uint16_t head, uint32_t len);

/* Whether the guest wants an interrupt for what was pushed since the last one. */
int vq_should_notify(struct vq_ring *ring);

/* vq_push, then write the call eventfd if the guest wants it (call_fd < 0: never).
 * Returns 1 if notified, 0 if not, VQ_ERR_* on a bad head. */
int vq_complete(struct vq_ring *ring, uint16_t head, uint32_t len, int call_fd);

/* Send the guest an interrupt for what was pushed since the last decision, if it wants one
 * (call_fd < 0: decide, but never write). Lets a caller push many chains, then notify once.
 * Returns 1 if notified, 0 if not. */
int vq_notify(struct vq_ring *ring, int call_fd);

/* Reply in one call: copy len bytes (fuse_out_header and payload) to the start of the chain's
 * writable part, push the head with len written, then, if notify, do what vq_notify does.
 * Returns 0/1 as vq_notify (0 when !notify), VQ_REPLY_TOO_LONG (nothing done) if len exceeds
 * the writable part, or a VQ_ERR_* from the push. */
int vq_reply(struct vq_ring *ring, const struct vq_chain *chain, const void *data, uint32_t len,
             int notify, int call_fd);

/* A READ reply in one call: preadv up to size bytes of fd at pos into the writable part after
 * the 16-byte fuse_out_header, write that header (len = 16 + bytes read, error 0, unique),
 * push and maybe notify as vq_reply. A short read at end of file is a success.
 * File and ring outcomes travel apart, so neither can be mistaken for the other:
 *   *read_result = bytes read (>= 0) or -errno of the failed read (NULL: not wanted);
 *   return = as vq_reply: 0/1 (notified), VQ_REPLY_TOO_LONG (the header does not fit; nothing
 *            done) or a VQ_ERR_* from the push; or VQ_REPLY_READ_FAILED when the read failed:
 *            then nothing is written or pushed, and the caller answers with an error. */
int vq_reply_preadv(struct vq_ring *ring, const struct vq_chain *chain, int fd, int64_t pos,
                    uint32_t size, uint64_t unique, int notify, int call_fd, int64_t *read_result);

/* vq_pop, and when the ring is empty, ask the guest to kick again (vq_set_kicks(ring, 1)) and
 * re-check, as a device loop does before it sleeps. Chains that arrived meanwhile are taken with
 * kicks off again (vq_set_kicks(ring, 0)). Returns as vq_pop: 1, 0 (empty, kicks on) or
 * VQ_ERR_*. */
int vq_pop_or_arm(struct vq_ring *ring, const struct vq_memory *mem, struct vq_chain *chain);

/* Offloaded READ replies: a helper thread copies file data into guest memory while the caller
 * goes on decoding the next requests, so Python work and memory copies overlap when the guest
 * queues several READs. The helper never touches the ring: the caller pushes in
 * vq_offload_finish. One caller thread (the event loop) and one helper per process.
 *
 * vq_offload_start starts the helper once; 0 or -errno.
 * vq_offload_stop ends and joins the helper (the daemon is stopping), so no thread outlives
 * the server; -EBUSY while jobs are queued. 0 or -errno; vq_offload_start may follow.
 * vq_offload_read queues "vq_reply_preadv without the push" for chain: the helper reads into
 * the writable part after the header, then writes the header (len = 16 + bytes read, or
 * len = 16 and error = -errno if nothing could be read). fd is duplicated, so the caller may
 * close it at once. Returns the number of queued jobs, or -1 (queue full, no helper, or dup
 * failed): then the caller replies itself. The chain must stay untouched until finish.
 * vq_offload_busy: whether jobs are queued and not finished.
 * vq_offload_finish waits for (and helps with) every queued job, then pushes each chain in
 * queue order with its reply length, and stores each job's bytes read or -errno in results
 * (room for every queued job; NULL: not wanted). Does not notify. Returns the number of jobs finished, or a
 * VQ_ERR_* from a push (every job is finished all the same; results stay valid). */
#define VQ_OFFLOAD_MAX 1024
int vq_offload_start(void);
int vq_offload_stop(void);
int vq_offload_read(const struct vq_chain *chain, int fd, int64_t pos, uint32_t size,
                    uint64_t unique);
int vq_offload_busy(void);
int vq_offload_finish(struct vq_ring *ring, int64_t *results);

/* Kick suppression: enable=0 asks the guest not to kick, enable=1 asks it to kick again.
 * Returns 1 if new chains arrived meanwhile (re-check after enabling). */
int vq_set_kicks(struct vq_ring *ring, int enable);

/* Number of chains available and not yet popped (0 if broken/unmapped). */
int vq_pending(struct vq_ring *ring);

/* Copies across iovec borders, starting `offset` bytes into the list. Return bytes copied. */
size_t vq_iov_read(const struct vq_iov *iov, uint32_t n, size_t offset, void *dst, size_t len);
size_t vq_iov_write(const struct vq_iov *iov, uint32_t n, size_t offset, const void *src,
                    size_t len);

/* preadv/pwritev between file fd at position pos and the iovec list, starting `offset` bytes
 * into it, at most len bytes. Retries short transfers and EINTR; stops at EOF.
 * Returns bytes moved or -errno. */
int64_t vq_iov_preadv(int fd, const struct vq_iov *iov, uint32_t n, size_t offset, size_t len,
                      int64_t pos);
int64_t vq_iov_pwritev(int fd, const struct vq_iov *iov, uint32_t n, size_t offset, size_t len,
                       int64_t pos);

/* Direct reads: READ requests the ring answers by itself, without a round trip through Python,
 * from file ranges Python has vouched for. An entry says "READs of (nodeid, fh) inside
 * [file_start, file_end) are fd's bytes at pos + (offset - file_start)"; eof >= 0 is the
 * file's size, where reads are clipped (-1: the file may grow, preadv decides). Each entry lies
 * within one window of 2^VQ_DIRECT_WINDOW_SHIFT bytes of the file, and the table is direct
 * mapped by (nodeid, fh, window): a new entry replaces whatever held its slot.
 *
 * vq_direct_add records fd's device and inode; a hit whose fd no longer is that file (closed
 * and reused) drops the entry and goes to Python, so a missed vq_direct_drop can never serve
 * another file. Python still drops entries before it closes their fds: vq_direct_drop for one
 * handle (RELEASE), vq_direct_clear for all (session changes, unmounts). Python owns the
 * struct; C writes only the counters and slots, inside these calls. */
#define VQ_DIRECT_SLOTS 4096
#define VQ_DIRECT_WINDOW_SHIFT 24
#define VQ_DIRECT_TAGS 256        /* accounts hits are counted in (a mount each) */
#define VQ_DIRECT_CLASSES 8       /* size and latency classes per account */

struct vq_direct_entry {
    uint64_t nodeid;
    uint64_t fh;
    int64_t file_start;
    int64_t file_end;
    int64_t eof;
    int64_t pos;
    uint64_t dev;
    uint64_t ino;
    int32_t fd;                   /* -1: empty */
    uint32_t tag;                 /* the account hits go to */
};

/* What the hits of one tag came to. A read of n bytes counts in sizes[k], k the number of
 * size_bounds <= n; one that took t ns in latencies[k], k the number of latency_bounds_ns < t
 * (nydusd's classes, which Python sets). Python reads and zeroes them between calls. */
struct vq_direct_account {
    uint64_t reads;
    uint64_t bytes;
    uint64_t sizes[VQ_DIRECT_CLASSES];
    uint64_t latencies[VQ_DIRECT_CLASSES];
};

struct vq_direct {
    uint32_t enabled;             /* [py] 0: every request goes to Python */
    uint32_t pad;
    uint64_t hits;                /* READs answered here (bytes and classes: accounts) */
    uint64_t size_bounds[VQ_DIRECT_CLASSES - 1];       /* [py] ascending */
    uint64_t latency_bounds_ns[VQ_DIRECT_CLASSES - 1]; /* [py] ascending */
    struct vq_direct_account accounts[VQ_DIRECT_TAGS]; /* [py] may zero them */
    struct vq_direct_entry slots[VQ_DIRECT_SLOTS];
};

/* Constant replies: requests whose answer never changes (an immutable image's GETATTR, OPEN,
 * FLUSH, RELEASE), answered from the reply Python gave the first time. An entry matches a
 * request with the same opcode and nodeid, exactly args_len bytes of in-args, and a first
 * in-arg u32 with (arg & arg_mask) == arg_value (OPEN's flags); the reply is fuse_out_header
 * then the entry's payload. Direct mapped by (nodeid, opcode), like the spans. */
#define VQ_CONST_SLOTS 4096
#define VQ_CONST_PAYLOAD 112          /* fuse_attr_out is 104 bytes, fuse_open_out 16 */
#define VQ_CONST_OPCODES 64           /* hits are counted for opcodes below this */

struct vq_const_entry {
    uint64_t nodeid;
    uint32_t opcode;                  /* 0: empty */
    uint32_t args_len;
    uint32_t arg_mask;
    uint32_t arg_value;
    uint32_t len;                     /* payload bytes */
    uint32_t pad;
    uint8_t payload[VQ_CONST_PAYLOAD];
};

/* Whole ranges of nodes whose requests of one opcode get an empty reply (an image's FLUSH and
 * RELEASE: nothing to flush, nothing to release), for requests with exactly args_len bytes of
 * in-args. opcode 0: a free range. */
#define VQ_CONST_RANGES 64

struct vq_const_range {
    uint64_t lo;                      /* node ids lo..hi, both included */
    uint64_t hi;
    uint32_t opcode;
    uint32_t args_len;
};

struct vq_const {
    uint64_t hits[VQ_CONST_OPCODES];  /* [py] may zero them */
    struct vq_const_range ranges[VQ_CONST_RANGES];
    struct vq_const_entry slots[VQ_CONST_SLOTS];
};

/* 0, or -EINVAL (opcode 0 or out of range, payload too long). */
int vq_const_add(struct vq_const *c, uint64_t nodeid, uint32_t opcode, uint32_t args_len,
                 uint32_t arg_mask, uint32_t arg_value, const uint8_t *payload, uint32_t len);
void vq_const_clear(struct vq_const *c);
/* 0 (added, or there already), -EINVAL (opcode out of range, lo > hi) or -ENOSPC. */
int vq_const_add_range(struct vq_const *c, uint32_t opcode, uint32_t args_len, uint64_t lo,
                       uint64_t hi);

/* 0, -EINVAL (a range that is empty, negative or spans windows, a tag out of range), or
 * -errno from fstat. */
int vq_direct_add(struct vq_direct *d, uint64_t nodeid, uint64_t fh, int64_t file_start,
                  int64_t file_end, int64_t eof, int fd, int64_t pos, uint32_t tag);
void vq_direct_drop(struct vq_direct *d, uint64_t nodeid, uint64_t fh);
void vq_direct_clear(struct vq_direct *d);

/* As vq_pop_or_arm, but a READ that an entry of d covers, or a request an entry of c matches,
 * is answered here (pushed, not notified) and the next chain is taken; d->enabled gates both.
 * Returns as vq_pop_or_arm: 1 = a chain for the caller, 0 = empty (kicks on), or VQ_ERR_*.
 * *answered counts the requests answered. */
int vq_pop_direct(struct vq_ring *ring, const struct vq_memory *mem, struct vq_chain *chain,
                  struct vq_direct *d, struct vq_const *c, uint32_t *answered);
