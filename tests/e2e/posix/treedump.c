/* Print a directory tree as overlayfs left it: one line per entry, sorted by path, with its
 * type, mode, size, device number, link target and every trusted.overlay.* xattr. Used on a
 * guest tmpfs upper dir and on the host's copy of the passthrough's upper dir, so the two can
 * be compared line for line. Usage: treedump DIR
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

static int by_name(const struct dirent **a, const struct dirent **b) {
    return strcmp((*a)->d_name, (*b)->d_name);
}

static void dump(const char *root, const char *rel) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", root, rel);
    struct stat st;
    if (lstat(path, &st) < 0) { printf("%s ERROR\n", rel); return; }
    if (!*rel) goto children; /* the upper dir itself: made by whoever set the mount up */
    char kind = S_ISDIR(st.st_mode) ? 'd' : S_ISLNK(st.st_mode) ? 'l' : S_ISCHR(st.st_mode) ? 'c'
              : S_ISREG(st.st_mode) ? 'f' : '?';
    printf("%s %c %04o", rel, kind, st.st_mode & 07777);
    if (S_ISREG(st.st_mode)) printf(" size=%lld", (long long)st.st_size);
    if (S_ISCHR(st.st_mode)) printf(" rdev=%u:%u", major(st.st_rdev), minor(st.st_rdev));
    if (S_ISLNK(st.st_mode)) {
        char target[4096];
        ssize_t n = readlink(path, target, sizeof target - 1);
        target[n < 0 ? 0 : n] = 0;
        printf(" -> %s", target);
    }
    char names[4096];
    ssize_t len = llistxattr(path, names, sizeof names);
    for (char *name = names; len > 0 && name < names + len; name += strlen(name) + 1) {
        if (strncmp(name, "trusted.overlay.", 16)) continue;
        char value[256];
        ssize_t n = lgetxattr(path, name, value, sizeof value - 1);
        value[n < 0 ? 0 : n] = 0;
        printf(" %s=", name);
        for (ssize_t i = 0; i < n; i++)
            printf(value[i] >= 32 && value[i] < 127 ? "%c" : "\\x%02x", (unsigned char)value[i]);
    }
    printf("\n");
children:
    if (!S_ISDIR(st.st_mode)) return;
    struct dirent **entries;
    int count = scandir(path, &entries, NULL, by_name);
    for (int i = 0; i < count; i++) {
        const char *name = entries[i]->d_name;
        if (strcmp(name, ".") && strcmp(name, "..")) {
            char child[4096];
            snprintf(child, sizeof child, "%s%s%s", rel, *rel ? "/" : "", name);
            dump(root, child);
        }
        free(entries[i]);
    }
    if (count >= 0) free(entries);
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: treedump DIR\n"); return 2; }
    dump(argv[1], "");
    return 0;
}
