/* fsbench: a small static file-system benchmark for the vhostfs microVM bench (qemu/bench.py).
 *
 * Built on the host with `gcc -O2 -static` and dropped into the guest initramfs as
 * /bench/fsbench. Time is measured in the guest with clock_gettime(CLOCK_MONOTONIC). Every
 * result is one machine-readable line on stdout:
 *
 *   FSBENCH label=L op=OP ns=N key=value ...
 *
 * Subcommands (all take an optional `-l LABEL` before the subcommand):
 *   seq FILE [BLOCK]          sequential read in BLOCK bytes (default 1 MiB): bytes, mbps
 *   rand FILE OPS [SEED]      OPS random 4 KiB-aligned 4 KiB preads (xorshift64*, fixed seed,
 *                             POSIX_FADV_RANDOM so each read is one request): ops, iops
 *   walk DIR                  recursive readdir + lstat (fstatat AT_SYMLINK_NOFOLLOW) of every
 *                             entry below DIR: entries, eps
 *   readall DIR               read every regular file below DIR in 1 MiB blocks: files, bytes,
 *                             mbps, fps
 *   time [-c ROOT] [-q] -- ARGV...
 *                             run ARGV (in chroot ROOT with -c; stdout to /dev/null with -q) and
 *                             time it from fork to exit: status
 *   drop                      sync; echo 3 > /proc/sys/vm/drop_caches
 * Exit status: 0 on success, 1 on any error (with a message on stderr).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024 * 1024)

static const char *label = "-";
static char *buf;
static size_t bufsize;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what, const char *path)
{
    fprintf(stderr, "fsbench: %s %s: %s\n", what, path ? path : "", strerror(errno));
    exit(1);
}

static void need_buf(size_t n)
{
    if (bufsize >= n)
        return;
    free(buf);
    if (posix_memalign((void **)&buf, 4096, n) != 0) {
        fprintf(stderr, "fsbench: out of memory\n");
        exit(1);
    }
    bufsize = n;
}

static double secs(uint64_t ns) { return ns / 1e9; }

static int cmd_seq(int argc, char **argv)
{
    if (argc < 1)
        return fprintf(stderr, "usage: seq FILE [BLOCK]\n"), 1;
    size_t bs = argc > 1 ? strtoull(argv[1], NULL, 0) : MIB;
    need_buf(bs);
    uint64_t t0 = now_ns();
    int fd = open(argv[0], O_RDONLY);
    if (fd < 0)
        die("open", argv[0]);
    uint64_t total = 0;
    for (;;) {
        ssize_t n = read(fd, buf, bs);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("read", argv[0]);
        }
        if (n == 0)
            break;
        total += (uint64_t)n;
    }
    close(fd);
    uint64_t ns = now_ns() - t0;
    printf("FSBENCH label=%s op=seq ns=%" PRIu64 " bytes=%" PRIu64 " block=%zu mbps=%.3f\n", label,
           ns, total, bs, total / 1e6 / secs(ns));
    return 0;
}

static uint64_t xs_state;
static uint64_t xorshift64s(void)
{
    uint64_t x = xs_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    xs_state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static int cmd_rand(int argc, char **argv)
{
    if (argc < 2)
        return fprintf(stderr, "usage: rand FILE OPS [SEED]\n"), 1;
    uint64_t ops = strtoull(argv[1], NULL, 0);
    xs_state = argc > 2 ? strtoull(argv[2], NULL, 0) : 0x9E3779B97F4A7C15ull;
    if (xs_state == 0)
        xs_state = 1;
    need_buf(4096);
    int fd = open(argv[0], O_RDONLY);
    if (fd < 0)
        die("open", argv[0]);
    struct stat st;
    if (fstat(fd, &st) < 0)
        die("fstat", argv[0]);
    uint64_t pages = (uint64_t)st.st_size / 4096;
    if (pages == 0)
        return fprintf(stderr, "fsbench: %s is smaller than 4 KiB\n", argv[0]), 1;
    posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < ops; i++) {
        off_t off = (off_t)((xorshift64s() % pages) * 4096);
        ssize_t n = pread(fd, buf, 4096, off);
        if (n != 4096) {
            if (n < 0)
                die("pread", argv[0]);
            fprintf(stderr, "fsbench: short pread at %lld\n", (long long)off);
            return 1;
        }
    }
    uint64_t ns = now_ns() - t0;
    close(fd);
    printf("FSBENCH label=%s op=rand ns=%" PRIu64 " ops=%" PRIu64 " iops=%.1f\n", label, ns, ops,
           ops / secs(ns));
    return 0;
}

struct tally {
    uint64_t entries, files, bytes;
    int read_data;
};

static void read_file(int dirfd, const char *name, struct tally *t)
{
    int fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK);
    if (fd < 0)
        die("open", name);
    for (;;) {
        ssize_t n = read(fd, buf, MIB);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("read", name);
        }
        if (n == 0)
            break;
        t->bytes += (uint64_t)n;
    }
    close(fd);
    t->files++;
}

/* Walk the directory open at fd (consumed). Every entry is lstat'ed (walk) or, when reading
 * data, typed by d_type with an lstat fallback. */
static void walk_dir(int fd, const char *path, struct tally *t)
{
    DIR *d = fdopendir(fd);
    if (!d)
        die("fdopendir", path);
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d)) != NULL) {
        const char *n = e->d_name;
        if (n[0] == '.' && (n[1] == 0 || (n[1] == '.' && n[2] == 0)))
            continue;
        t->entries++;
        int isdir, isreg;
        if (!t->read_data || e->d_type == DT_UNKNOWN) {
            struct stat st;
            if (fstatat(dirfd(d), n, &st, AT_SYMLINK_NOFOLLOW) < 0)
                die("lstat", n);
            isdir = S_ISDIR(st.st_mode);
            isreg = S_ISREG(st.st_mode);
        } else {
            isdir = e->d_type == DT_DIR;
            isreg = e->d_type == DT_REG;
        }
        if (isdir) {
            int sub = openat(dirfd(d), n, O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
            if (sub < 0)
                die("opendir", n);
            walk_dir(sub, n, t);
        } else if (isreg && t->read_data) {
            read_file(dirfd(d), n, t);
        }
        errno = 0;
    }
    if (errno)
        die("readdir", path);
    closedir(d);
}

static int cmd_tree(int argc, char **argv, int read_data)
{
    if (argc < 1)
        return fprintf(stderr, "usage: %s DIR\n", read_data ? "readall" : "walk"), 1;
    struct tally t = {0, 0, 0, read_data};
    if (read_data)
        need_buf(MIB);
    uint64_t t0 = now_ns();
    int fd = open(argv[0], O_RDONLY | O_DIRECTORY);
    if (fd < 0)
        die("open", argv[0]);
    walk_dir(fd, argv[0], &t);
    uint64_t ns = now_ns() - t0;
    if (read_data)
        printf("FSBENCH label=%s op=readall ns=%" PRIu64 " entries=%" PRIu64 " files=%" PRIu64
               " bytes=%" PRIu64 " mbps=%.3f fps=%.1f\n",
               label, ns, t.entries, t.files, t.bytes, t.bytes / 1e6 / secs(ns),
               t.files / secs(ns));
    else
        printf("FSBENCH label=%s op=walk ns=%" PRIu64 " entries=%" PRIu64 " eps=%.1f\n", label, ns,
               t.entries, t.entries / secs(ns));
    return 0;
}

static int cmd_time(int argc, char **argv)
{
    const char *root = NULL;
    int quiet = 0, i = 0;
    for (; i < argc; i++) {
        if (!strcmp(argv[i], "-c") && i + 1 < argc)
            root = argv[++i];
        else if (!strcmp(argv[i], "-q"))
            quiet = 1;
        else if (!strcmp(argv[i], "--")) {
            i++;
            break;
        } else
            break;
    }
    if (i >= argc)
        return fprintf(stderr, "usage: time [-c ROOT] [-q] -- ARGV...\n"), 1;
    fflush(stdout);
    uint64_t t0 = now_ns();
    pid_t pid = fork();
    if (pid < 0)
        die("fork", NULL);
    if (pid == 0) {
        if (root && (chroot(root) < 0 || chdir("/") < 0))
            die("chroot", root);
        if (quiet) {
            int nul = open("/dev/null", O_WRONLY);
            if (nul >= 0)
                dup2(nul, 1);
        } else {
            dup2(2, 1); /* keep our stdout machine-readable */
        }
        execvp(argv[i], argv + i);
        die("exec", argv[i]);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            die("waitpid", NULL);
    uint64_t ns = now_ns() - t0;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    printf("FSBENCH label=%s op=time ns=%" PRIu64 " status=%d\n", label, ns, code);
    return code != 0;
}

static int cmd_drop(void)
{
    sync();
    int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (fd < 0 || write(fd, "3\n", 2) != 2)
        die("write", "/proc/sys/vm/drop_caches");
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    int i = 1;
    if (i + 1 < argc && !strcmp(argv[i], "-l")) {
        label = argv[i + 1];
        i += 2;
    }
    if (i >= argc) {
        fprintf(stderr, "usage: fsbench [-l LABEL] seq|rand|walk|readall|time|drop ...\n");
        return 2;
    }
    const char *cmd = argv[i++];
    int rc;
    if (!strcmp(cmd, "seq"))
        rc = cmd_seq(argc - i, argv + i);
    else if (!strcmp(cmd, "rand"))
        rc = cmd_rand(argc - i, argv + i);
    else if (!strcmp(cmd, "walk"))
        rc = cmd_tree(argc - i, argv + i, 0);
    else if (!strcmp(cmd, "readall"))
        rc = cmd_tree(argc - i, argv + i, 1);
    else if (!strcmp(cmd, "time"))
        rc = cmd_time(argc - i, argv + i);
    else if (!strcmp(cmd, "drop"))
        rc = cmd_drop();
    else {
        fprintf(stderr, "fsbench: unknown subcommand %s\n", cmd);
        rc = 2;
    }
    fflush(stdout);
    return rc;
}
