/*
 * vring.c: split virtqueue engine (virtio 1.x, little-endian host) for the vhostfs daemon.
 *
 * The guest shares the rings and buffers with us and may rewrite any of them at any moment.
 * Two rules follow and run through this file:
 *   - every guest value is loaded exactly once into a local (load16 for ring fields,
 *     copy_desc for descriptors), and only the local is checked and used afterwards;
 *   - ordering against the guest uses GCC __atomic builtins: acquire when we read an index the
 *     guest publishes, release when we publish used->idx, and a full fence where a store of
 *     ours must be visible before we read a guest field (notification and kick decisions).
 * The Python side owns the locking: one thread drives a ring at a time. The one other thread,
 * the READ helper (vq_offload_*), only reads files into guest buffers of chains the caller has
 * handed it; it never touches ring state, and the caller waits for it before pushing them.
 */

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "vring.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "virtio 1.x rings are little-endian");
_Static_assert(sizeof(struct vq_iov) == sizeof(struct iovec), "vq_iov must match iovec");
_Static_assert(offsetof(struct vq_iov, base) == offsetof(struct iovec, iov_base), "iov_base");
_Static_assert(offsetof(struct vq_iov, len) == offsetof(struct iovec, iov_len), "iov_len");
_Static_assert(VQ_MAX_IOV <= UINT16_MAX, "chain->nread/nwrite are u16");

/* Ring layout (virtio 1.x §2.7). Offsets are spelled out rather than using C structs with
 * flexible arrays, so the trailing event fields are easy to see. */
#define DESC_SIZE 16u
#define DESC_F_NEXT 1u
#define DESC_F_WRITE 2u
#define DESC_F_INDIRECT 4u
#define AVAIL_F_NO_INTERRUPT 1u /* avail->flags */
#define USED_F_NO_NOTIFY 1u     /* used->flags */

/* An indirect table may hold at most this many descriptors (512 KiB). Linux may build tables
 * larger than the ring when it has INDIRECT_DESC, so the ring size is not the bound; the largest
 * legal ring size is. Zero-length entries cost a hop each, so a pop stays O(num + this). */
#define INDIRECT_MAX_DESC VQ_MAX_QUEUE_SIZE

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
_Static_assert(sizeof(struct desc) == DESC_SIZE, "descriptor layout");

/* Compiler barrier: after it, the compiler may not re-read guest memory to rematerialise a
 * local that was copied from it. That is what makes "copy once, then check" hold. */
#define compiler_barrier() __asm__ __volatile__("" ::: "memory")

static inline uint16_t load16(const void *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
}

static inline uint16_t load16_acquire(const void *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}

static inline void store16(void *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED);
}

static inline void store32(void *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED);
}

/* Ring field addresses. avail: flags@0 idx@2 ring[num]@4 used_event@4+2num.
 * used: flags@0 idx@2 ring[num]{id,len}@4 avail_event@4+8num. */
#define AVAIL_FLAGS(r) ((uint8_t *)(r)->avail)
#define AVAIL_IDX(r) ((uint8_t *)(r)->avail + 2)
#define AVAIL_RING(r, slot) ((uint8_t *)(r)->avail + 4 + 2 * (size_t)(slot))
#define USED_EVENT(r) ((uint8_t *)(r)->avail + 4 + 2 * (size_t)(r)->num)
#define USED_FLAGS(r) ((uint8_t *)(r)->used)
#define USED_IDX(r) ((uint8_t *)(r)->used + 2)
#define USED_ELEM(r, slot) ((uint8_t *)(r)->used + 4 + 8 * (size_t)(slot))
#define AVAIL_EVENT(r) ((uint8_t *)(r)->used + 4 + 8 * (size_t)(r)->num)

static inline int is_pow2(uint32_t n) { return n != 0 && (n & (n - 1)) == 0; }

static inline int ring_ready(const struct vq_ring *r)
{
    return r->desc && r->avail && r->used && is_pow2(r->num) && r->num <= VQ_MAX_QUEUE_SIZE;
}

const char *vq_strerror(int err)
{
    switch (err) {
    case 1: return "a chain was taken";
    case 0: return "success";
    case VQ_ERR_NOT_READY: return "ring not mapped or size not a power of two";
    case VQ_ERR_AVAIL_IDX: return "avail index ran more than the queue size ahead";
    case VQ_ERR_HEAD: return "head index beyond the queue size";
    case VQ_ERR_NEXT: return "next index beyond the descriptor table";
    case VQ_ERR_LOOP: return "descriptor chain loops (more hops than descriptors)";
    case VQ_ERR_INDIRECT_FEATURE: return "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC";
    case VQ_ERR_INDIRECT_LEN:
        return "bad indirect descriptor (NEXT set, or table length zero, "
               "not a multiple of 16 or over 512 KiB)";
    case VQ_ERR_INDIRECT_NESTED: return "indirect descriptor inside an indirect table";
    case VQ_ERR_ORDER: return "device-readable descriptor after a device-writable one";
    case VQ_ERR_OVERFLOW: return "descriptor chain longer than 2^32 - 1 bytes";
    case VQ_ERR_ADDRESS: return "buffer outside guest memory";
    case VQ_ERR_TOO_MANY_IOV: return "descriptor chain needs too many iovecs";
    case VQ_ERR_INUSE: return "more chains in flight than the queue size";
    case VQ_ERR_USED_HEAD: return "used head out of range or nothing in flight";
    case VQ_REPLY_TOO_LONG: return "reply larger than the writable part of the chain";
    case VQ_REPLY_READ_FAILED: return "reading the reply data from its file failed";
    default: return "unknown vring error";
    }
}

/* ---- guest address translation ---- */

/* The region containing gpa, by binary search over regions sorted by gpa; NULL if none. */
static const struct vq_region *find_region(const struct vq_memory *mem, uint64_t gpa)
{
    uint32_t lo = 0, hi = mem->nregions < VQ_MAX_REGIONS ? mem->nregions : VQ_MAX_REGIONS;

    /* Find the last region whose gpa <= the address. */
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (mem->regions[mid].gpa <= gpa)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return NULL;
    const struct vq_region *r = &mem->regions[lo - 1];
    return gpa - r->gpa < r->size ? r : NULL;
}

int vq_translate(const struct vq_memory *mem, uint64_t gpa, uint64_t len, struct vq_iov *iov,
                 uint32_t max)
{
    uint64_t end;
    uint32_t n = 0;

    if (len == 0)
        return 0;
    if (__builtin_add_overflow(gpa, len, &end))
        return VQ_ERR_ADDRESS;
    while (len > 0) {
        const struct vq_region *r = find_region(mem, gpa);
        if (!r)
            return VQ_ERR_ADDRESS;
        if (n == max)
            return VQ_ERR_TOO_MANY_IOV;
        /* Clamp the piece at the region end; the loop carries on in the next region, which must
         * start exactly where this one ends or find_region fails (a hole). */
        uint64_t off = gpa - r->gpa;
        uint64_t piece = r->size - off;
        if (piece > len)
            piece = len;
        if (piece > SIZE_MAX)
            piece = SIZE_MAX;
        iov[n].base = (void *)(uintptr_t)(r->hva + off);
        iov[n].len = (size_t)piece;
        n++;
        gpa += piece;
        len -= piece;
    }
    return (int)n;
}

void *vq_uva_to_hva(const struct vq_memory *mem, uint64_t uva, uint64_t len)
{
    uint32_t n = mem->nregions < VQ_MAX_REGIONS ? mem->nregions : VQ_MAX_REGIONS;

    /* Regions are sorted by gpa, not uva, and this runs only on SET_VRING_ADDR: scan. */
    for (uint32_t i = 0; i < n; i++) {
        const struct vq_region *r = &mem->regions[i];
        uint64_t off = uva - r->uva; /* wraps to a huge value when uva < r->uva */
        if (off < r->size && len <= r->size - off)
            return (void *)(uintptr_t)(r->hva + off);
    }
    return NULL;
}

/* ---- ring setup ---- */

int vq_ring_map(struct vq_ring *ring, const struct vq_memory *mem, uint64_t desc_uva,
                uint64_t avail_uva, uint64_t used_uva)
{
    uint32_t num = ring->num;

    ring->desc = ring->avail = ring->used = NULL; /* a failed map leaves the ring not ready */
    if (!is_pow2(num) || num > VQ_MAX_QUEUE_SIZE)
        return VQ_ERR_NOT_READY;
    if ((desc_uva & 15) || (avail_uva & 1) || (used_uva & 3))
        return VQ_ERR_ADDRESS;

    void *desc = vq_uva_to_hva(mem, desc_uva, (uint64_t)DESC_SIZE * num);
    void *avail = vq_uva_to_hva(mem, avail_uva, 6 + 2 * (uint64_t)num);
    void *used = vq_uva_to_hva(mem, used_uva, 6 + 8 * (uint64_t)num);
    if (!desc || !avail || !used)
        return VQ_ERR_ADDRESS;
    /* The host mapping could be less aligned than the front-end address (odd mmap_offset); the
     * atomic accesses below need natural alignment on the host side. */
    if (((uintptr_t)desc & 15) || ((uintptr_t)avail & 1) || ((uintptr_t)used & 3))
        return VQ_ERR_ADDRESS;

    ring->desc = desc;
    ring->avail = avail;
    ring->used = used;
    ring->used_idx = load16_acquire(USED_IDX(ring));
    ring->signalled_used = ring->used_idx;
    ring->signalled_used_valid = 0;
    ring->inflight = 0;
    return 0;
}

void vq_ring_unmap(struct vq_ring *ring)
{
    ring->desc = ring->avail = ring->used = NULL;
}

/* ---- popping a chain ---- */

/* A descriptor table seen as host iovecs: one piece for the main table, one or more for an
 * indirect table (it may straddle regions, and need not be aligned). */
struct table {
    const struct vq_iov *iov;
    uint32_t niov;
    uint32_t size; /* descriptors */
};

/* Copy descriptor i (< t->size) out of guest memory, once. */
static void copy_desc(const struct table *t, uint32_t i, struct desc *d)
{
    if (t->niov == 1)
        memcpy(d, (const uint8_t *)t->iov[0].base + (size_t)i * DESC_SIZE, DESC_SIZE);
    else
        vq_iov_read(t->iov, t->niov, (size_t)i * DESC_SIZE, d, DESC_SIZE);
    compiler_barrier();
}

/* Walk the chain at head into chain->iov. Touches nothing in the ring on failure. */
static int walk_chain(const struct vq_ring *ring, const struct vq_memory *mem, uint16_t head,
                      struct vq_chain *chain)
{
    struct vq_iov main_iov = {ring->desc, (size_t)DESC_SIZE * ring->num};
    struct vq_iov indirect_iov[VQ_MAX_REGIONS];
    struct table t = {&main_iov, 1, ring->num};
    uint32_t i = head;
    uint32_t hops_left = ring->num; /* a chain visits each descriptor at most once */
    int in_indirect = 0, seen_write = 0;
    uint32_t niov = 0, nread = 0, nwrite = 0;
    uint64_t read_len = 0, write_len = 0;

    for (;;) {
        struct desc d;

        if (hops_left-- == 0)
            return VQ_ERR_LOOP;
        copy_desc(&t, i, &d);

        if (d.flags & DESC_F_INDIRECT) {
            if (!(ring->features & VQ_F_INDIRECT))
                return VQ_ERR_INDIRECT_FEATURE;
            if (in_indirect)
                return VQ_ERR_INDIRECT_NESTED;
            /* The spec forbids INDIRECT with NEXT; we refuse it rather than guess which the
             * driver meant, under the "bad indirect descriptor" code. */
            if ((d.flags & DESC_F_NEXT) || d.len == 0 || d.len % DESC_SIZE ||
                d.len > INDIRECT_MAX_DESC * DESC_SIZE)
                return VQ_ERR_INDIRECT_LEN;
            int n = vq_translate(mem, d.addr, d.len, indirect_iov, VQ_MAX_REGIONS);
            if (n < 0)
                return VQ_ERR_ADDRESS;
            /* The indirect descriptor ends the main chain; continue in the table. The WRITE flag
             * of the indirect descriptor itself is ignored, as the spec requires. */
            t = (struct table){indirect_iov, (uint32_t)n, d.len / DESC_SIZE};
            i = 0;
            hops_left = t.size;
            in_indirect = 1;
            continue;
        }

        int writable = (d.flags & DESC_F_WRITE) != 0;
        if (writable)
            seen_write = 1;
        else if (seen_write)
            return VQ_ERR_ORDER;
        /* Chain total as virtio 1.x §2.7.5.2 bounds it; read_len/write_len are u32 so the sum of
         * both must stay representable. */
        if (read_len + write_len + d.len > UINT32_MAX)
            return VQ_ERR_OVERFLOW;

        /* Zero-length buffers are legal and produce no iovec (address unchecked: never used). */
        int n = vq_translate(mem, d.addr, d.len, &chain->iov[niov], VQ_MAX_IOV - niov);
        if (n < 0)
            return n;
        niov += (uint32_t)n;
        if (writable) {
            nwrite += (uint32_t)n;
            write_len += d.len;
        } else {
            nread += (uint32_t)n;
            read_len += d.len;
        }

        if (!(d.flags & DESC_F_NEXT))
            break;
        if (d.next >= t.size)
            return VQ_ERR_NEXT;
        i = d.next;
    }

    chain->head = head;
    chain->nread = (uint16_t)nread;
    chain->nwrite = (uint16_t)nwrite;
    chain->read_len = (uint32_t)read_len;
    chain->write_len = (uint32_t)write_len;
    /* Snapshot the request header and arguments so the parser sees bytes that cannot change
     * under it; larger payloads are read from guest memory later, by offset. */
    chain->req_len = read_len < VQ_REQ_BUF ? (uint32_t)read_len : VQ_REQ_BUF;
    vq_iov_read(chain->iov, nread, 0, chain->req, chain->req_len);
    return 1;
}

int vq_pop(struct vq_ring *ring, const struct vq_memory *mem, struct vq_chain *chain)
{
    if (!ring_ready(ring))
        return VQ_ERR_NOT_READY;

    /* Acquire pairs with the driver's write barrier before its avail->idx store: the ring slot
     * and the descriptors it points at are read after this load. */
    uint16_t avail_idx = load16_acquire(AVAIL_IDX(ring));
    uint16_t pending = (uint16_t)(avail_idx - ring->last_avail);
    if (pending == 0)
        return 0;
    if (pending > ring->num)
        return VQ_ERR_AVAIL_IDX;
    if (ring->inflight >= ring->num)
        return VQ_ERR_INUSE;

    uint16_t head = load16(AVAIL_RING(ring, ring->last_avail & (ring->num - 1)));
    if (head >= ring->num)
        return VQ_ERR_HEAD;
    int rc = walk_chain(ring, mem, head, chain);
    if (rc < 0)
        return rc;

    ring->last_avail++;
    ring->inflight++;
    /* Tell the driver how far we have read, so it kicks again only for entries past this one.
     * No fence here: the "enable, fence, re-check" step in vq_set_kicks closes the race. */
    if (ring->features & VQ_F_EVENT_IDX)
        store16(AVAIL_EVENT(ring), ring->last_avail);
    return 1;
}

/* ---- completing a chain ---- */

int vq_push(struct vq_ring *ring, uint16_t head, uint32_t len)
{
    if (!ring_ready(ring))
        return VQ_ERR_NOT_READY;
    if (head >= ring->num || ring->inflight == 0)
        return VQ_ERR_USED_HEAD;

    uint8_t *elem = USED_ELEM(ring, ring->used_idx & (ring->num - 1));
    store32(elem, head);
    store32(elem + 4, len);
    ring->used_idx++;
    /* Release: the element above is visible to the driver before the index that covers it. */
    __atomic_store_n((uint16_t *)USED_IDX(ring), ring->used_idx, __ATOMIC_RELEASE);
    ring->inflight--;
    return 0;
}

int vq_should_notify(struct vq_ring *ring)
{
    if (!ring_ready(ring))
        return 0;
    /* Full fence: our used->idx store must be visible before we read used_event / avail flags.
     * Otherwise the driver can read the old used->idx, decide to wait for an interrupt, and we
     * read its old used_event and decide not to send one: a lost wakeup. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);

    if (!(ring->features & VQ_F_EVENT_IDX))
        return !(load16(AVAIL_FLAGS(ring)) & AVAIL_F_NO_INTERRUPT);

    uint16_t old = ring->signalled_used, new = ring->used_idx;
    int valid = ring->signalled_used_valid;
    ring->signalled_used = new;
    ring->signalled_used_valid = 1;
    if (!valid)
        return 1; /* nothing known about what the driver last saw: interrupt to be safe */
    /* vring_need_event: notify iff used_event lies in [old, new), in u16 arithmetic. */
    uint16_t used_event = load16(USED_EVENT(ring));
    return (uint16_t)(new - used_event - 1) < (uint16_t)(new - old);
}

int vq_complete(struct vq_ring *ring, uint16_t head, uint32_t len, int call_fd)
{
    int rc = vq_push(ring, head, len);
    if (rc < 0)
        return rc;
    return vq_notify(ring, call_fd);
}

int vq_notify(struct vq_ring *ring, int call_fd)
{
    /* Decide even without a call fd, so the event-idx bookkeeping stays in step. */
    if (!vq_should_notify(ring) || call_fd < 0)
        return 0;

    uint64_t one = 1;
    for (;;) {
        ssize_t w = write(call_fd, &one, sizeof one);
        if (w == (ssize_t)sizeof one)
            return 1;
        if (w < 0 && errno == EINTR)
            continue;
        /* EAGAIN: the eventfd counter is saturated, so an interrupt is pending anyway. */
        return w < 0 && errno == EAGAIN ? 1 : 0;
    }
}

int vq_reply(struct vq_ring *ring, const struct vq_chain *chain, const void *data, uint32_t len,
             int notify, int call_fd)
{
    if (len > chain->write_len)
        return VQ_REPLY_TOO_LONG;
    vq_iov_write(chain->iov + chain->nread, chain->nwrite, 0, data, len);
    int rc = vq_push(ring, chain->head, len);
    if (rc < 0 || !notify)
        return rc;
    return vq_notify(ring, call_fd);
}

/* fuse_out_header, as the kernel lays it out (little-endian). */
struct out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};
_Static_assert(sizeof(struct out_header) == 16, "fuse_out_header is 16 bytes");

int vq_reply_preadv(struct vq_ring *ring, const struct vq_chain *chain, int fd, int64_t pos,
                    uint32_t size, uint64_t unique, int notify, int call_fd, int64_t *read_result)
{
    const struct vq_iov *writable = chain->iov + chain->nread;
    struct out_header header = {0, 0, unique};

    if (read_result)
        *read_result = 0;
    if (chain->write_len < sizeof header)
        return VQ_REPLY_TOO_LONG;
    if (size > chain->write_len - sizeof header)
        size = chain->write_len - (uint32_t)sizeof header;
    int64_t got = 0;
    if (size > 0) {
        got = vq_iov_preadv(fd, writable, chain->nwrite, sizeof header, size, pos);
        if (read_result)
            *read_result = got;
        if (got < 0)
            return VQ_REPLY_READ_FAILED;
    }
    header.len = (uint32_t)(sizeof header + (uint64_t)got);
    vq_iov_write(writable, chain->nwrite, 0, &header, sizeof header);
    int rc = vq_push(ring, chain->head, header.len);
    if (rc < 0 || !notify)
        return rc;
    return vq_notify(ring, call_fd);
}

/* ---- offloaded READ replies ---- */

struct offload_job {
    const struct vq_chain *chain;
    int fd; /* our own dup, closed by whoever runs the job */
    int64_t pos;
    uint32_t size;
    uint64_t unique;
    int64_t result;     /* bytes read or -errno */
    uint32_t reply_len; /* what to push */
};

/* The queue: the caller fills jobs[queued % max] and then publishes queued + 1; both threads
 * claim jobs by advancing claimed with a CAS; done counts finished jobs. The three counters only
 * grow (wrapping), so a stale claim attempt can never succeed on a job already run; the caller
 * starts each batch at base, and a batch holds at most VQ_OFFLOAD_MAX jobs. */
static struct offload_job jobs[VQ_OFFLOAD_MAX];
static uint32_t queued, claimed, done, base;
static uint32_t helper_sleeping, caller_waiting; /* futex words */
static int helper_started;
static uint32_t helper_stop; /* set by vq_offload_stop, read by the helper before it sleeps */
static pthread_t helper_thread;

static long futex(uint32_t *word, int op, uint32_t value)
{
    return syscall(SYS_futex, word, op, value, NULL, NULL, 0);
}

static void run_job(struct offload_job *job)
{
    const struct vq_chain *chain = job->chain;
    const struct vq_iov *writable = chain->iov + chain->nread;
    struct out_header header = {0, 0, job->unique};
    uint32_t size = job->size;

    if (size > chain->write_len - sizeof header) /* write_len >= 16: checked when queued */
        size = chain->write_len - (uint32_t)sizeof header;
    int64_t got = 0;
    if (size > 0)
        got = vq_iov_preadv(job->fd, writable, chain->nwrite, sizeof header, size, job->pos);
    close(job->fd);
    if (got < 0) {
        header.len = sizeof header;
        header.error = (int32_t)got;
    } else {
        header.len = (uint32_t)(sizeof header + (uint64_t)got);
    }
    vq_iov_write(writable, chain->nwrite, 0, &header, sizeof header);
    job->result = got;
    job->reply_len = header.len;
}

/* Claim and run queued jobs until none is left unclaimed. */
static void run_jobs(void)
{
    for (;;) {
        uint32_t have = __atomic_load_n(&queued, __ATOMIC_ACQUIRE);
        uint32_t next = __atomic_load_n(&claimed, __ATOMIC_RELAXED);
        if (next == have)
            return;
        if (!__atomic_compare_exchange_n(&claimed, &next, next + 1, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_RELAXED))
            continue;
        run_job(&jobs[next % VQ_OFFLOAD_MAX]);
        __atomic_add_fetch(&done, 1, __ATOMIC_RELEASE);
        if (__atomic_load_n(&caller_waiting, __ATOMIC_SEQ_CST))
            futex(&done, FUTEX_WAKE_PRIVATE, 1);
    }
}

static void *helper_main(void *arg)
{
    (void)arg;
    while (!__atomic_load_n(&helper_stop, __ATOMIC_SEQ_CST)) {
        run_jobs();
        /* Sleep until the caller queues more: announce, re-check, wait. */
        __atomic_store_n(&helper_sleeping, 1, __ATOMIC_SEQ_CST);
        uint32_t have = __atomic_load_n(&queued, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&claimed, __ATOMIC_SEQ_CST) == have &&
            !__atomic_load_n(&helper_stop, __ATOMIC_SEQ_CST))
            futex(&queued, FUTEX_WAIT_PRIVATE, have);
        __atomic_store_n(&helper_sleeping, 0, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

int vq_offload_start(void)
{
    if (helper_started)
        return 0;
    pthread_attr_t attr;
    pthread_t thread;
    int rc = pthread_attr_init(&attr);
    if (rc)
        return -rc;
    pthread_attr_setstacksize(&attr, 64 * 1024);
    __atomic_store_n(&helper_stop, 0, __ATOMIC_SEQ_CST);
    rc = pthread_create(&thread, &attr, helper_main, NULL);
    pthread_attr_destroy(&attr);
    if (rc)
        return -rc;
    helper_thread = thread;
    helper_started = 1;
    return 0;
}

int vq_offload_stop(void)
{
    if (!helper_started)
        return 0;
    if (vq_offload_busy())
        return -EBUSY; /* finish the queued jobs first: their chains are still open */
    __atomic_store_n(&helper_stop, 1, __ATOMIC_SEQ_CST);
    /* Bump the futex word's waiters out of their sleep; queued itself is not changed. */
    futex(&queued, FUTEX_WAKE_PRIVATE, 1);
    int rc = pthread_join(helper_thread, NULL);
    helper_started = 0;
    return -rc;
}

int vq_offload_read(const struct vq_chain *chain, int fd, int64_t pos, uint32_t size,
                    uint64_t unique)
{
    uint32_t n = queued; /* only this thread writes it */
    if (!helper_started || n - base >= VQ_OFFLOAD_MAX ||
        chain->write_len < sizeof(struct out_header))
        return -1;
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0)
        return -1;
    jobs[n % VQ_OFFLOAD_MAX] = (struct offload_job){chain, own, pos, size, unique, 0, 0};
    __atomic_store_n(&queued, n + 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&helper_sleeping, __ATOMIC_SEQ_CST))
        futex(&queued, FUTEX_WAKE_PRIVATE, 1);
    return (int)(n + 1 - base);
}

int vq_offload_busy(void)
{
    return queued != base;
}

int vq_offload_finish(struct vq_ring *ring, int64_t *results)
{
    uint32_t n = queued;
    if (n == base)
        return 0;
    run_jobs(); /* help with what the helper has not started */
    /* Wait for the helper's last job: spin briefly (it is copying), then sleep. */
    for (int spin = 0; __atomic_load_n(&done, __ATOMIC_ACQUIRE) != n; spin++) {
        if (spin < 2000) {
            __builtin_ia32_pause();
            continue;
        }
        __atomic_store_n(&caller_waiting, 1, __ATOMIC_SEQ_CST);
        uint32_t seen = __atomic_load_n(&done, __ATOMIC_SEQ_CST);
        if (seen != n)
            futex(&done, FUTEX_WAIT_PRIVATE, seen);
        __atomic_store_n(&caller_waiting, 0, __ATOMIC_SEQ_CST);
    }
    int rc = (int)(n - base);
    for (uint32_t i = 0; base + i != n; i++) {
        const struct offload_job *job = &jobs[(base + i) % VQ_OFFLOAD_MAX];
        if (results)
            results[i] = job->result;
        int err = vq_push(ring, job->chain->head, job->reply_len);
        if (err < 0 && rc > 0)
            rc = err;
    }
    base = n;
    return rc;
}

/* ---- kick suppression ---- */

int vq_set_kicks(struct vq_ring *ring, int enable)
{
    if (!ring_ready(ring))
        return 0;
    int event_idx = (ring->features & VQ_F_EVENT_IDX) != 0;
    uint16_t flags = load16(USED_FLAGS(ring));

    if (!enable) {
        /* With EVENT_IDX, not moving avail_event is the suppression. */
        if (!event_idx)
            store16(USED_FLAGS(ring), (uint16_t)(flags | USED_F_NO_NOTIFY));
        return 0;
    }
    if (event_idx)
        store16(AVAIL_EVENT(ring), ring->last_avail);
    else
        store16(USED_FLAGS(ring), (uint16_t)(flags & ~USED_F_NO_NOTIFY));
    /* Full fence: the re-enable must be visible before we re-read avail->idx, or the driver can
     * add an entry without kicking while we miss it here. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return load16_acquire(AVAIL_IDX(ring)) != ring->last_avail;
}

int vq_pop_or_arm(struct vq_ring *ring, const struct vq_memory *mem, struct vq_chain *chain)
{
    /* At most two rounds: vq_set_kicks(ring, 1) only reports news when avail->idx moved, and
     * then vq_pop takes a chain or fails. */
    for (;;) {
        int rc = vq_pop(ring, mem, chain);
        if (rc != 0)
            return rc;
        if (!vq_set_kicks(ring, 1))
            return 0;
        vq_set_kicks(ring, 0);
    }
}

int vq_pending(struct vq_ring *ring)
{
    if (!ring_ready(ring))
        return 0;
    uint16_t pending = (uint16_t)(load16_acquire(AVAIL_IDX(ring)) - ring->last_avail);
    return pending > ring->num ? 0 : pending;
}

/* ---- iovec helpers ---- */

/* Find the element and in-element offset `offset` bytes into the list. Returns the index (n if
 * the list is shorter than offset). */
static uint32_t iov_seek(const struct vq_iov *iov, uint32_t n, size_t offset, size_t *skip)
{
    uint32_t k = 0;
    while (k < n && offset >= iov[k].len) {
        offset -= iov[k].len;
        k++;
    }
    *skip = offset;
    return k;
}

size_t vq_iov_read(const struct vq_iov *iov, uint32_t n, size_t offset, void *dst, size_t len)
{
    size_t skip, done = 0;
    for (uint32_t k = iov_seek(iov, n, offset, &skip); k < n && done < len; k++, skip = 0) {
        size_t chunk = iov[k].len - skip;
        if (chunk > len - done)
            chunk = len - done;
        memcpy((uint8_t *)dst + done, (const uint8_t *)iov[k].base + skip, chunk);
        done += chunk;
    }
    return done;
}

size_t vq_iov_write(const struct vq_iov *iov, uint32_t n, size_t offset, const void *src,
                    size_t len)
{
    size_t skip, done = 0;
    for (uint32_t k = iov_seek(iov, n, offset, &skip); k < n && done < len; k++, skip = 0) {
        size_t chunk = iov[k].len - skip;
        if (chunk > len - done)
            chunk = len - done;
        memcpy((uint8_t *)iov[k].base + skip, (const uint8_t *)src + done, chunk);
        done += chunk;
    }
    return done;
}

/* One iovec batch per syscall; IOV_MAX is 1024 on Linux, the same as a chain's limit. */
#define IO_BATCH VQ_MAX_IOV

static int64_t iov_file_io(int fd, const struct vq_iov *iov, uint32_t n, size_t offset,
                           size_t len, int64_t pos, int writing)
{
    struct iovec batch[IO_BATCH];
    size_t done = 0;

    if (pos < 0)
        return -EINVAL;
    while (done < len) {
        size_t skip;
        uint32_t k = iov_seek(iov, n, offset + done, &skip);
        uint32_t cnt = 0;
        size_t want = 0;

        /* Build the window [offset+done, offset+len) of the list, clipped to the batch. */
        for (; k < n && cnt < IO_BATCH && want < len - done; k++, skip = 0) {
            size_t piece = iov[k].len - skip;
            if (piece == 0)
                continue;
            if (piece > len - done - want)
                piece = len - done - want;
            batch[cnt].iov_base = (uint8_t *)iov[k].base + skip;
            batch[cnt].iov_len = piece;
            cnt++;
            want += piece;
        }
        if (cnt == 0)
            break; /* the list holds fewer than len bytes */

        ssize_t r = writing ? pwritev(fd, batch, (int)cnt, (off_t)pos)
                            : preadv(fd, batch, (int)cnt, (off_t)pos);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            /* Report what already moved; the caller sees the error on its next call. */
            return done ? (int64_t)done : -errno;
        }
        if (r == 0)
            break; /* end of file (or a device that accepts nothing) */
        done += (size_t)r;
        pos += r;
    }
    return (int64_t)done;
}

int64_t vq_iov_preadv(int fd, const struct vq_iov *iov, uint32_t n, size_t offset, size_t len,
                      int64_t pos)
{
    return iov_file_io(fd, iov, n, offset, len, pos, 0);
}

int64_t vq_iov_pwritev(int fd, const struct vq_iov *iov, uint32_t n, size_t offset, size_t len,
                       int64_t pos)
{
    return iov_file_io(fd, iov, n, offset, len, pos, 1);
}

/* ---- direct reads ---- */

#include <sys/stat.h>
#include <time.h>

#define FUSE_READ_OPCODE 15
#define FUSE_IN_HEADER_LEN 40
#define FUSE_READ_IN_LEN 40

/* The fuse_in_header fields the shortcuts look at, from a request copied whole into req. */
struct in_header {
    uint32_t len;
    uint32_t opcode;
    uint64_t unique;
    uint64_t nodeid;
    uint16_t extlen;
};

static int whole_request(const struct vq_chain *chain, struct in_header *h)
{
    if (chain->req_len < FUSE_IN_HEADER_LEN || chain->req_len != chain->read_len)
        return 0;
    memcpy(&h->len, chain->req, 4);
    memcpy(&h->opcode, chain->req + 4, 4);
    memcpy(&h->unique, chain->req + 8, 8);
    memcpy(&h->nodeid, chain->req + 16, 8);
    memcpy(&h->extlen, chain->req + 36, 2);
    return h->len == chain->read_len && h->extlen == 0;
}

static struct vq_direct_entry *direct_slot(struct vq_direct *d, uint64_t nodeid, uint64_t fh,
                                           uint64_t window)
{
    /* A multiplicative mix: node ids of one mount differ in their low bits, windows in small
     * steps, and the slot must spread both. */
    uint64_t h = (nodeid * 0x9E3779B97F4A7C15ull) ^ (fh * 0xC2B2AE3D27D4EB4Full) ^
                 (window * 0x165667B19E3779F9ull);
    return &d->slots[(h >> 32) % VQ_DIRECT_SLOTS];
}

int vq_direct_add(struct vq_direct *d, uint64_t nodeid, uint64_t fh, int64_t file_start,
                  int64_t file_end, int64_t eof, int fd, int64_t pos, uint32_t tag)
{
    if (fd < 0 || file_start < 0 || file_end <= file_start || pos < 0 || eof < -1 ||
        tag >= VQ_DIRECT_TAGS)
        return -EINVAL;
    uint64_t window = (uint64_t)file_start >> VQ_DIRECT_WINDOW_SHIFT;
    if (((uint64_t)(file_end - 1) >> VQ_DIRECT_WINDOW_SHIFT) != window)
        return -EINVAL;
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    struct vq_direct_entry *e = direct_slot(d, nodeid, fh, window);
    *e = (struct vq_direct_entry){nodeid, fh, file_start, file_end, eof, pos,
                                  (uint64_t)st.st_dev, (uint64_t)st.st_ino, fd, tag};
    return 0;
}

void vq_direct_drop(struct vq_direct *d, uint64_t nodeid, uint64_t fh)
{
    for (uint32_t i = 0; i < VQ_DIRECT_SLOTS; i++)
        if (d->slots[i].fd >= 0 && d->slots[i].nodeid == nodeid && d->slots[i].fh == fh)
            d->slots[i].fd = -1;
}

void vq_direct_clear(struct vq_direct *d)
{
    for (uint32_t i = 0; i < VQ_DIRECT_SLOTS; i++)
        d->slots[i].fd = -1;
}

/* 1 and the chain answered; 0: not ours (the caller gets the chain); VQ_ERR_* from the push. */
static int direct_answer(struct vq_ring *ring, const struct vq_chain *chain, struct vq_direct *d)
{
    struct in_header h;
    if (chain->read_len != FUSE_IN_HEADER_LEN + FUSE_READ_IN_LEN || !whole_request(chain, &h) ||
        h.opcode != FUSE_READ_OPCODE)
        return 0;
    uint64_t unique = h.unique, nodeid = h.nodeid, fh;
    int64_t offset;
    uint32_t size;
    memcpy(&fh, chain->req + 40, 8);
    memcpy(&offset, chain->req + 48, 8);
    memcpy(&size, chain->req + 56, 4);
    if (offset < 0)
        return 0;
    uint64_t window = (uint64_t)offset >> VQ_DIRECT_WINDOW_SHIFT;
    struct vq_direct_entry *e = direct_slot(d, nodeid, fh, window);
    if (e->fd < 0 || e->nodeid != nodeid || e->fh != fh || offset < e->file_start ||
        offset >= e->file_end || chain->write_len < 16)
        return 0;
    uint64_t room = chain->write_len - 16;
    uint64_t want = size < room ? size : room;
    if (e->eof >= 0) {
        if (offset >= e->eof)
            return 0;
        if ((uint64_t)(e->eof - offset) < want)
            want = (uint64_t)(e->eof - offset);
    }
    /* A read running past the entry goes to Python, unless the entry ends at end of file. */
    if ((uint64_t)(e->file_end - offset) < want)
        return 0;
    struct stat st;
    if (fstat(e->fd, &st) < 0 || (uint64_t)st.st_dev != e->dev || (uint64_t)st.st_ino != e->ino) {
        e->fd = -1;
        return 0;
    }
    int64_t got = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc = vq_reply_preadv(ring, chain, e->fd, e->pos + (offset - e->file_start),
                             (uint32_t)want, unique, 0, -1, &got);
    if (rc == VQ_REPLY_READ_FAILED) {
        e->fd = -1; /* Python reads it again and answers the errno */
        return 0;
    }
    if (rc < 0)
        return rc;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    uint64_t ns = (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000u + (uint64_t)t1.tv_nsec -
                  (uint64_t)t0.tv_nsec;
    d->hits++;
    struct vq_direct_account *a = &d->accounts[e->tag];
    uint32_t size_class = 0, latency_class = 0;
    while (size_class < VQ_DIRECT_CLASSES - 1 && d->size_bounds[size_class] <= (uint64_t)got)
        size_class++;
    while (latency_class < VQ_DIRECT_CLASSES - 1 && d->latency_bounds_ns[latency_class] < ns)
        latency_class++;
    a->reads++;
    a->bytes += (uint64_t)got;
    a->sizes[size_class]++;
    a->latencies[latency_class]++;
    return 1;
}

static struct vq_const_entry *const_slot(struct vq_const *c, uint64_t nodeid, uint32_t opcode)
{
    uint64_t h = (nodeid * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)opcode * 0xC2B2AE3D27D4EB4Full);
    return &c->slots[(h >> 32) % VQ_CONST_SLOTS];
}

int vq_const_add(struct vq_const *c, uint64_t nodeid, uint32_t opcode, uint32_t args_len,
                 uint32_t arg_mask, uint32_t arg_value, const uint8_t *payload, uint32_t len)
{
    if (opcode == 0 || opcode >= VQ_CONST_OPCODES || len > VQ_CONST_PAYLOAD ||
        args_len > VQ_REQ_BUF - FUSE_IN_HEADER_LEN || (arg_mask && args_len < 4))
        return -EINVAL;
    struct vq_const_entry *e = const_slot(c, nodeid, opcode);
    e->opcode = 0; /* half-written entries never match */
    e->nodeid = nodeid;
    e->args_len = args_len;
    e->arg_mask = arg_mask;
    e->arg_value = arg_value & arg_mask;
    e->len = len;
    memcpy(e->payload, payload, len);
    e->opcode = opcode;
    return 0;
}

void vq_const_clear(struct vq_const *c)
{
    for (uint32_t i = 0; i < VQ_CONST_SLOTS; i++)
        c->slots[i].opcode = 0;
    for (uint32_t i = 0; i < VQ_CONST_RANGES; i++)
        c->ranges[i].opcode = 0;
}

int vq_const_add_range(struct vq_const *c, uint32_t opcode, uint32_t args_len, uint64_t lo,
                       uint64_t hi)
{
    if (opcode == 0 || opcode >= VQ_CONST_OPCODES || lo > hi ||
        args_len > VQ_REQ_BUF - FUSE_IN_HEADER_LEN)
        return -EINVAL;
    struct vq_const_range *free_range = NULL;
    for (uint32_t i = 0; i < VQ_CONST_RANGES; i++) {
        struct vq_const_range *r = &c->ranges[i];
        if (r->opcode == opcode && r->lo == lo && r->hi == hi && r->args_len == args_len)
            return 0;
        if (r->opcode == 0 && free_range == NULL)
            free_range = r;
    }
    if (free_range == NULL)
        return -ENOSPC;
    free_range->lo = lo;
    free_range->hi = hi;
    free_range->args_len = args_len;
    free_range->opcode = opcode;
    return 0;
}

static int in_empty_range(const struct vq_const *c, uint32_t opcode, uint64_t nodeid,
                          uint32_t args_len)
{
    for (uint32_t i = 0; i < VQ_CONST_RANGES; i++) {
        const struct vq_const_range *r = &c->ranges[i];
        if (r->opcode == opcode && r->args_len == args_len && r->lo <= nodeid && nodeid <= r->hi)
            return 1;
    }
    return 0;
}

/* As direct_answer, for the constant replies. */
static int const_answer(struct vq_ring *ring, const struct vq_chain *chain, struct vq_const *c)
{
    struct in_header h;
    if (!whole_request(chain, &h) || h.opcode == 0 || h.opcode >= VQ_CONST_OPCODES)
        return 0;
    uint32_t len = h.len, opcode = h.opcode, arg = 0;
    uint64_t unique = h.unique, nodeid = h.nodeid;
    struct vq_const_entry *e = const_slot(c, nodeid, opcode);
    if (e->opcode != opcode || e->nodeid != nodeid) {
        if (chain->write_len < 16 || !in_empty_range(c, opcode, nodeid, len - FUSE_IN_HEADER_LEN))
            return 0;
        struct out_header empty = {16, 0, unique};
        int rc = vq_reply(ring, chain, &empty, sizeof empty, 0, -1);
        if (rc < 0)
            return rc;
        c->hits[opcode]++;
        return 1;
    }
    if (len != FUSE_IN_HEADER_LEN + e->args_len || chain->write_len < 16 + e->len)
        return 0;
    if (e->arg_mask) {
        memcpy(&arg, chain->req + FUSE_IN_HEADER_LEN, 4);
        if ((arg & e->arg_mask) != e->arg_value)
            return 0;
    }
    uint8_t reply[16 + VQ_CONST_PAYLOAD];
    struct out_header header = {16 + e->len, 0, unique};
    memcpy(reply, &header, sizeof header);
    memcpy(reply + 16, e->payload, e->len);
    int rc = vq_reply(ring, chain, reply, 16 + e->len, 0, -1);
    if (rc < 0)
        return rc;
    c->hits[opcode]++;
    return 1;
}

int vq_pop_direct(struct vq_ring *ring, const struct vq_memory *mem, struct vq_chain *chain,
                  struct vq_direct *d, struct vq_const *c, uint32_t *answered)
{
    for (;;) {
        int rc = vq_pop_or_arm(ring, mem, chain);
        if (rc != 1 || !d->enabled)
            return rc;
        int done = direct_answer(ring, chain, d);
        if (done == 0)
            done = const_answer(ring, chain, c);
        if (done < 0)
            return done;
        if (done == 0)
            return 1;
        (*answered)++;
    }
}
