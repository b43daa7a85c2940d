/* A POSIX conformance check for a shared directory, run inside the guest.
 *
 * Modelled on the classic suites (pjdfstest's groups): permissions, ownership, link counts,
 * rename semantics, times, truncate, special files, xattrs and set-id bits, as root and as an
 * unprivileged user (uid/gid 1000, no supplementary groups). Each assertion prints one line,
 * "PASS <id>" or "FAIL <id>: <what>", so the same program can score two daemons on the same
 * kernel. Usage: posixcheck DIR (DIR must be empty and on the file system under test).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

static int failures;

static void check(const char *id, int ok, const char *fmt, ...) {
    if (ok) {
        printf("PASS %s\n", id);
    } else {
        va_list ap;
        printf("FAIL %s: ", id);
        va_start(ap, fmt);
        vprintf(fmt, ap);
        va_end(ap);
        printf(" (errno %d %s)\n", errno, strerror(errno));
        failures++;
    }
    fflush(stdout);
}

/* An operation expected to fail with exactly `want`. */
static void check_err(const char *id, int rc, int want) {
    int got = rc < 0 ? errno : 0;
    errno = got;
    check(id, rc < 0 && got == want, "want errno %d, rc %d", want, rc);
}

static struct stat st_of(const char *path) {
    struct stat st;
    memset(&st, 0, sizeof st);
    if (lstat(path, &st) < 0) st.st_mode = 0;
    return st;
}

static int make_file(const char *path, mode_t mode, const char *data) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, mode);
    if (fd < 0) return -1;
    if (data && write(fd, data, strlen(data)) != (ssize_t)strlen(data)) { close(fd); return -1; }
    close(fd);
    return chmod(path, mode);
}

static long long ns(struct timespec t) { return t.tv_sec * 1000000000LL + t.tv_nsec; }

static void root_checks(void) {
    struct stat st, st2;
    int fd;
    char buf[64];

    /* Creation and ownership. */
    fd = open("f", O_RDWR | O_CREAT | O_EXCL, 0640);
    st = st_of("f");
    check("create.mode", fd >= 0 && (st.st_mode & 07777) == 0640, "mode %o", st.st_mode);
    check("create.owner", st.st_uid == 0 && st.st_gid == 0, "%d:%d", st.st_uid, st.st_gid);
    check("create.nlink", st.st_nlink == 1 && st.st_size == 0, "nlink %lu", st.st_nlink);
    check_err("create.excl", open("f", O_RDWR | O_CREAT | O_EXCL, 0644), EEXIST);
    check("write.size", write(fd, "hello world", 11) == 11 && st_of("f").st_size == 11, "size");
    check("read.back", pread(fd, buf, 11, 0) == 11 && memcmp(buf, "hello world", 11) == 0, "data");
    check("lseek.end", lseek(fd, 0, SEEK_END) == 11, "end");
    check("ftruncate.shrink", ftruncate(fd, 5) == 0 && st_of("f").st_size == 5, "size");
    check("ftruncate.grow", ftruncate(fd, 4096) == 0 && st_of("f").st_size == 4096, "size");
    check("pread.hole", pread(fd, buf, 4, 100) == 4 && memcmp(buf, "\0\0\0\0", 4) == 0, "zeros");
    check("truncate.path", truncate("f", 3) == 0 && st_of("f").st_size == 3, "size");
    close(fd);
    fd = open("f", O_WRONLY | O_TRUNC);
    check("open.trunc", fd >= 0 && st_of("f").st_size == 0, "size");
    close(fd);
    fd = open("f", O_WRONLY | O_APPEND);
    check("append", write(fd, "ab", 2) == 2 && write(fd, "cd", 2) == 2 && st_of("f").st_size == 4,
          "size %ld", (long)st_of("f").st_size);
    close(fd);
    fd = open("f", O_RDONLY);
    check_err("write.rdonly", (int)write(fd, "x", 1), EBADF);
    close(fd);

    /* Links. */
    check("link", link("f", "f2") == 0 && st_of("f").st_nlink == 2 && st_of("f2").st_nlink == 2,
          "nlink");
    check("link.same_inode", st_of("f").st_ino == st_of("f2").st_ino, "ino");
    check("unlink.nlink", unlink("f2") == 0 && st_of("f").st_nlink == 1, "nlink");
    check_err("link.exists", link("f", "f"), EEXIST);
    check("mkdir", mkdir("d", 0755) == 0 && S_ISDIR(st_of("d").st_mode) &&
          (st_of("d").st_mode & 07777) == 0755, "mode");
    check_err("link.dir", link("d", "dl"), EPERM);
    st = st_of(".");
    check("mkdir.parent_nlink", mkdir("d2", 0700) == 0 && st_of(".").st_nlink == st.st_nlink + 1,
          "nlink %lu", st_of(".").st_nlink);
    check("rmdir.parent_nlink", rmdir("d2") == 0 && st_of(".").st_nlink == st.st_nlink, "nlink");
    check("mkdir.nlink", st_of("d").st_nlink == 2, "nlink %lu", st_of("d").st_nlink);
    make_file("d/inner", 0644, "x");
    check_err("rmdir.notempty", rmdir("d"), ENOTEMPTY);
    check_err("rmdir.file", rmdir("f"), ENOTDIR);
    check_err("unlink.dir", unlink("d"), EISDIR);
    check_err("mkdir.exists", mkdir("f", 0755), EEXIST);
    check_err("unlink.missing", unlink("missing"), ENOENT);
    check_err("open.missing", open("missing", O_RDONLY), ENOENT);
    check_err("lookup.notdir", open("f/x", O_RDONLY), ENOTDIR);

    /* Rename. */
    make_file("r1", 0644, "one");
    make_file("r2", 0644, "two");
    st = st_of("r1");
    check("rename.replace", rename("r1", "r2") == 0 && st_of("r2").st_ino == st.st_ino &&
          st_of("r1").st_mode == 0, "ino");
    mkdir("rd1", 0755);
    mkdir("rd2", 0755);
    check("rename.dir_over_empty", rename("rd1", "rd2") == 0 && S_ISDIR(st_of("rd2").st_mode),
          "dir");
    check_err("rename.dir_over_full", rename("rd2", "d"), ENOTEMPTY);
    check_err("rename.file_over_dir", rename("r2", "rd2"), EISDIR);
    check_err("rename.dir_over_file", rename("rd2", "r2"), ENOTDIR);
    check_err("rename.into_self", rename("d", "d/inner2"), EINVAL);
    check("rename.across_dirs", rename("r2", "d/r2") == 0 && st_of("d/r2").st_ino == st.st_ino,
          "ino");
    check("rename.nlink_moves", rename("rd2", "d/rd2") == 0 && st_of("d").st_nlink == 3,
          "nlink %lu", st_of("d").st_nlink);
    make_file("x1", 0644, "x1");
    make_file("x2", 0644, "x2");
    check_err("rename2.noreplace",
              (int)syscall(SYS_renameat2, AT_FDCWD, "x1", AT_FDCWD, "x2", RENAME_NOREPLACE), EEXIST);
    st = st_of("x1");
    check("rename2.exchange",
          syscall(SYS_renameat2, AT_FDCWD, "x1", AT_FDCWD, "x2", RENAME_EXCHANGE) == 0 &&
          st_of("x2").st_ino == st.st_ino, "ino");
    check("rename2.whiteout",
          syscall(SYS_renameat2, AT_FDCWD, "x1", AT_FDCWD, "x3", RENAME_WHITEOUT) == 0 &&
          S_ISCHR(st_of("x1").st_mode) && st_of("x1").st_rdev == 0, "mode %o", st_of("x1").st_mode);
    check_err("rename.missing", rename("missing", "y"), ENOENT);

    /* Symlinks and special files. */
    check("symlink", symlink("../some/target", "l") == 0 && S_ISLNK(st_of("l").st_mode), "mode");
    ssize_t n = readlink("l", buf, sizeof buf);
    check("readlink", n == 14 && memcmp(buf, "../some/target", 14) == 0, "n %zd", n);
    check("symlink.size", st_of("l").st_size == 14, "size %ld", (long)st_of("l").st_size);
    check_err("symlink.exists", symlink("x", "l"), EEXIST);
    symlink("loop2", "loop1");
    symlink("loop1", "loop2");
    check_err("symlink.loop", open("loop1", O_RDONLY), ELOOP);
    check("symlink.follow", symlink("d/inner", "l2") == 0 && stat("l2", &st) == 0 &&
          st.st_ino == st_of("d/inner").st_ino, "ino");
    check("link.symlink", link("l", "lh") == 0 && S_ISLNK(st_of("lh").st_mode) &&
          st_of("l").st_nlink == 2, "nlink %lu", st_of("l").st_nlink);
    check("mkfifo", mkfifo("p", 0600) == 0 && S_ISFIFO(st_of("p").st_mode), "mode");
    check_err("mkfifo.exists", mkfifo("p", 0600), EEXIST);
    check("mknod.sock", mknod("s", S_IFSOCK | 0600, 0) == 0 && S_ISSOCK(st_of("s").st_mode),
          "mode");
    check("mknod.reg", mknod("rg", S_IFREG | 0600, 0) == 0 && S_ISREG(st_of("rg").st_mode),
          "mode");
    check("mknod.whiteout", mknod("wh", S_IFCHR | 0600, 0) == 0 && S_ISCHR(st_of("wh").st_mode),
          "mode");

    /* Modes, owners, set-id bits. */
    check("chmod", chmod("f", 04755) == 0 && (st_of("f").st_mode & 07777) == 04755, "mode");
    check("chown", chown("f", 1000, 1000) == 0 && st_of("f").st_uid == 1000 &&
          st_of("f").st_gid == 1000, "owner");
    check("chown.kills_suid", (st_of("f").st_mode & 07777) == 0755, "mode %o",
          st_of("f").st_mode & 07777);
    check("lchown", lchown("l", 1000, 1000) == 0 && st_of("l").st_uid == 1000, "owner");
    check("chmod.dir", chmod("d", 01777) == 0 && (st_of("d").st_mode & 07777) == 01777, "mode");
    mkdir("g", 02777);
    chmod("g", 02777);
    chown("g", 0, 4242);
    make_file("g/f", 0644, NULL);
    mkdir("g/sub", 0755);
    check("sgid.file_group", st_of("g/f").st_gid == 4242, "gid %d", st_of("g/f").st_gid);
    check("sgid.dir_inherits", (st_of("g/sub").st_mode & S_ISGID) && st_of("g/sub").st_gid == 4242,
          "mode %o", st_of("g/sub").st_mode);

    /* Times. */
    struct timespec times[2] = {{1000000, 1}, {2000000, 2}};
    st = st_of("d/inner");
    check("utimens", utimensat(AT_FDCWD, "d/inner", times, 0) == 0 &&
          ns(st_of("d/inner").st_atim) == 1000000000000001LL &&
          ns(st_of("d/inner").st_mtim) == 2000000000000002LL, "times");
    struct timespec omit[2] = {{0, UTIME_OMIT}, {3000000, 0}};
    check("utimens.omit", utimensat(AT_FDCWD, "d/inner", omit, 0) == 0 &&
          ns(st_of("d/inner").st_atim) == 1000000000000001LL &&
          st_of("d/inner").st_mtim.tv_sec == 3000000, "times");
    check("utimens.now", utimensat(AT_FDCWD, "d/inner", NULL, 0) == 0 &&
          labs(st_of("d/inner").st_mtim.tv_sec - time(NULL)) < 120, "mtime");
    struct timespec old[2] = {{1000, 0}, {1000, 0}};
    utimensat(AT_FDCWD, "d/inner", old, 0);
    st = st_of("d/inner");
    fd = open("d/inner", O_WRONLY);
    sleep(1);
    check("write.mtime", write(fd, "y", 1) == 1 && fsync(fd) == 0 &&
          st_of("d/inner").st_mtim.tv_sec > 1000 && ns(st_of("d/inner").st_ctim) > ns(st.st_ctim),
          "mtime %ld", st_of("d/inner").st_mtim.tv_sec);
    close(fd);
    st = st_of("d/inner");
    sleep(1);
    chmod("d/inner", 0600);
    st2 = st_of("d/inner");
    check("chmod.ctime_only", ns(st2.st_ctim) > ns(st.st_ctim) && ns(st2.st_mtim) == ns(st.st_mtim),
          "ctime");
    st = st_of("d");
    sleep(1);
    make_file("d/newer", 0644, NULL);
    check("create.dir_mtime", ns(st_of("d").st_mtim) > ns(st.st_mtim), "mtime");
    check("lutimens", utimensat(AT_FDCWD, "l", times, AT_SYMLINK_NOFOLLOW) == 0 &&
          st_of("l").st_mtim.tv_sec == 2000000, "mtime");

    /* Extended attributes. */
    check("xattr.user", setxattr("d/inner", "user.k", "v1", 2, 0) == 0 &&
          getxattr("d/inner", "user.k", buf, sizeof buf) == 2 && memcmp(buf, "v1", 2) == 0, "value");
    check_err("xattr.create", setxattr("d/inner", "user.k", "v2", 2, XATTR_CREATE), EEXIST);
    check_err("xattr.replace", setxattr("d/inner", "user.none", "v", 1, XATTR_REPLACE), ENODATA);
    check("xattr.trusted", setxattr("d/inner", "trusted.overlay.opaque", "y", 1, 0) == 0 &&
          getxattr("d/inner", "trusted.overlay.opaque", buf, sizeof buf) == 1, "value");
    char names[256];
    ssize_t len = listxattr("d/inner", names, sizeof names);
    check("xattr.list", len > 0 && memmem(names, len, "user.k", 7) != NULL, "len %zd", len);
    check("xattr.remove", removexattr("d/inner", "user.k") == 0 &&
          getxattr("d/inner", "user.k", buf, sizeof buf) < 0 && errno == ENODATA, "gone");
    check("xattr.symlink", lsetxattr("l", "trusted.t", "1", 1, 0) == 0 &&
          lgetxattr("l", "trusted.t", buf, sizeof buf) == 1, "value");
    check_err("xattr.symlink_user", lsetxattr("l", "user.t", "1", 1, 0), EPERM);
    check("xattr.dir", setxattr("d", "trusted.overlay.opaque", "y", 1, 0) == 0, "set");

    /* Data ops. */
    fd = open("sparse", O_RDWR | O_CREAT, 0644);
    check("pwrite.hole", pwrite(fd, "tail", 4, 1 << 20) == 4 && st_of("sparse").st_size ==
          (1 << 20) + 4, "size");
    check("seek.data", lseek(fd, 0, SEEK_DATA) > 0, "data");
    check("seek.hole", lseek(fd, 0, SEEK_HOLE) == 0, "hole %ld", (long)lseek(fd, 0, SEEK_HOLE));
    check("fallocate", fallocate(fd, 0, 0, 8192) == 0 && st_of("sparse").st_blocks >= 16, "blocks");
    pwrite(fd, "\xff\xff\xff\xff", 4, 0);
    check("fallocate.punch", fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096) == 0
          && pread(fd, buf, 4, 0) == 4 && memcmp(buf, "\0\0\0\0", 4) == 0, "zeros");
    int out = open("copy", O_RDWR | O_CREAT, 0644);
    loff_t off_in = 1 << 20, off_out = 0;
    check("copy_file_range", copy_file_range(fd, &off_in, out, &off_out, 4, 0) == 4 &&
          pread(out, buf, 4, 0) == 4 && memcmp(buf, "tail", 4) == 0, "data");
    check("fsync", fsync(fd) == 0 && fdatasync(fd) == 0 && syncfs(fd) == 0, "sync");
    close(out);
    close(fd);
    fd = open("gone", O_RDWR | O_CREAT, 0644);
    write(fd, "still", 5);
    unlink("gone");
    struct stat fst;
    check("unlink.open_file", fstat(fd, &fst) == 0 && fst.st_nlink == 0 &&
          pread(fd, buf, 5, 0) == 5 && memcmp(buf, "still", 5) == 0, "nlink %lu", fst.st_nlink);
    close(fd);
    struct statvfs sv;
    check("statvfs", statvfs(".", &sv) == 0 && sv.f_namemax >= 255 && sv.f_blocks > 0, "statvfs");
    char longname[300];
    memset(longname, 'n', 255);
    longname[255] = 0;
    check("name.255", make_file(longname, 0644, NULL) == 0, "create");
    longname[255] = 'n';
    longname[256] = 0;
    check_err("name.256", open(longname, O_CREAT | O_WRONLY, 0644), ENAMETOOLONG);

    /* Listing. */
    mkdir("ls", 0755);
    make_file("ls/a", 0644, NULL);
    make_file("ls/b", 0644, NULL);
    mkdir("ls/c", 0755);
    DIR *dir = opendir("ls");
    int seen = 0, dots = 0;
    struct dirent *e;
    while (dir && (e = readdir(dir)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) dots++;
        else if (!strcmp(e->d_name, "a") || !strcmp(e->d_name, "b") || !strcmp(e->d_name, "c")) seen++;
        else seen += 100;
    }
    if (dir) closedir(dir);
    check("readdir", seen == 3 && dots == 2, "seen %d dots %d", seen, dots);
}

/* Fixtures the unprivileged part works against, made by root. */
static void make_fixtures(void) {
    mkdir("fix", 0755);
    make_file("fix/private", 0600, "secret");
    make_file("fix/public", 0644, "public");
    make_file("fix/shared", 0666, "shared");
    make_file("fix/setid", 06777, "setid");
    make_file("fix/setuid", 04777, "setuid");
    mkdir("fix/sticky", 01777);
    chmod("fix/sticky", 01777);
    make_file("fix/sticky/roots", 0666, NULL);
    mkdir("fix/g", 02777);
    chmod("fix/g", 02777);
    chown("fix/g", 0, 4242);
    mkdir("user", 0777);
    chmod("user", 0777);
}

static void user_checks(void) {
    char buf[16];
    struct stat st;
    int fd;

    check("user.ids", getuid() == 1000 && getgid() == 1000 && getgroups(0, NULL) == 0, "ids");
    fd = open("user/mine", O_RDWR | O_CREAT | O_EXCL, 0644);
    st = st_of("user/mine");
    check("user.create_owner", fd >= 0 && st.st_uid == 1000 && st.st_gid == 1000, "%d:%d",
          st.st_uid, st.st_gid);
    close(fd);
    check("user.mkdir_owner", mkdir("user/dir", 0755) == 0 && st_of("user/dir").st_uid == 1000,
          "owner");
    check("user.symlink_owner", symlink("mine", "user/l") == 0 && st_of("user/l").st_uid == 1000,
          "owner");
    check("user.mkfifo_owner", mkfifo("user/p", 0644) == 0 && st_of("user/p").st_uid == 1000,
          "owner");
    check_err("user.read_private", open("fix/private", O_RDONLY), EACCES);
    fd = open("fix/public", O_RDONLY);
    check("user.read_public", fd >= 0 && read(fd, buf, 6) == 6, "read");
    close(fd);
    check_err("user.write_public", open("fix/public", O_WRONLY), EACCES);
    check_err("user.create_in_roots_dir", open("fix/new", O_CREAT | O_WRONLY, 0644), EACCES);
    check_err("user.mkdir_in_roots_dir", mkdir("fix/newdir", 0755), EACCES);
    check_err("user.unlink_in_roots_dir", unlink("fix/public"), EACCES);
    check_err("user.chmod_others", chmod("fix/public", 0777), EPERM);
    check_err("user.chown_to_root", chown("user/mine", 0, 0), EPERM);
    check_err("user.chown_others", chown("fix/shared", 1000, 1000), EPERM);
    check("user.chmod_own", chmod("user/mine", 0600) == 0 &&
          (st_of("user/mine").st_mode & 07777) == 0600, "mode");
    check("user.chgrp_own_group", chown("user/mine", -1, 1000) == 0, "chgrp");
    check_err("user.chgrp_other_group", chown("user/mine", -1, 4242), EPERM);
    check_err("user.sticky_unlink", unlink("fix/sticky/roots"), EPERM);
    check("user.sticky_own", make_file("fix/sticky/mine", 0644, NULL) == 0 &&
          unlink("fix/sticky/mine") == 0, "own");
    check("user.rename_own", rename("user/mine", "user/mine2") == 0, "rename");

    /* Set-gid directories (CVE-2022-0358): not in group 4242. */
    fd = open("fix/g/f", O_WRONLY | O_CREAT | O_EXCL, 02755);
    st = st_of("fix/g/f");
    check("user.sgid_group", fd >= 0 && st.st_gid == 4242, "gid %d", st.st_gid);
    check("user.sgid_file_cleared", !(st.st_mode & S_ISGID), "mode %o", st.st_mode & 07777);
    close(fd);
    check("user.sgid_dir_kept", mkdir("fix/g/d", 0755) == 0 &&
          (st_of("fix/g/d").st_mode & S_ISGID), "mode %o", st_of("fix/g/d").st_mode & 07777);
    check("user.chmod_sgid_other_group", chmod("fix/g/f", 02755) == 0 &&
          !(st_of("fix/g/f").st_mode & S_ISGID), "mode %o", st_of("fix/g/f").st_mode & 07777);

    /* Set-id bits go when an unprivileged user writes or truncates. */
    fd = open("fix/setid", O_WRONLY);
    check("user.write_kills_setid", fd >= 0 && write(fd, "x", 1) == 1 && fsync(fd) == 0 &&
          (st_of("fix/setid").st_mode & 07000) == 0, "mode %o", st_of("fix/setid").st_mode & 07777);
    close(fd);
    check("user.truncate_kills_suid", truncate("fix/setuid", 0) == 0 &&
          (st_of("fix/setuid").st_mode & 07000) == 0, "mode %o",
          st_of("fix/setuid").st_mode & 07777);

    /* Times on others' files. */
    struct timespec times[2] = {{5, 0}, {5, 0}};
    check_err("user.utimens_others", utimensat(AT_FDCWD, "fix/shared", times, 0), EPERM);
    check("user.utimens_now_writable", utimensat(AT_FDCWD, "fix/shared", NULL, 0) == 0, "now");

    /* Extended attributes. */
    check_err("user.xattr_trusted", setxattr("user/mine2", "trusted.x", "1", 1, 0), EPERM);
    check("user.xattr_user", setxattr("user/mine2", "user.x", "1", 1, 0) == 0, "user.*");
    check_err("user.xattr_others", setxattr("fix/public", "user.x", "1", 1, 0), EACCES);
}

int main(int argc, char **argv) {
    if (argc != 2 || chdir(argv[1]) < 0) {
        fprintf(stderr, "usage: posixcheck EMPTY_DIR\n");
        return 2;
    }
    umask(022);
    mkdir("root", 0755);
    if (chdir("root") < 0) return 2;
    root_checks();
    if (chdir("..") < 0) return 2;
    make_fixtures();
    pid_t pid = fork();
    if (pid == 0) {
        if (setgroups(0, NULL) < 0 || setresgid(1000, 1000, 1000) < 0 ||
            setresuid(1000, 1000, 1000) < 0) {
            printf("FAIL user.setup: cannot become uid 1000\n");
            _exit(1);
        }
        user_checks();
        fflush(stdout);
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    printf("DONE\n");
    return 0;
}
