/* Concurrent writers that fsync, for the kill -9 integrity test.
 *
 * fsyncwriter DIR N: N processes, each appending 4 KiB records to DIR/w<i>; after every 8
 * records it fsyncs and, only once fsync returned 0, prints "SYNCED <i> <seq>" (records 0..seq
 * of writer i are durable). Record seq of writer i starts with "w=<i> seq=<seq>\n" and is
 * filled with the byte (i * 131 + seq * 7) & 0xff, so the host can check every byte.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

enum { RECORD = 4096, SYNC_EVERY = 8 };

static void writer(const char *dir, int i) {
    char path[512], rec[RECORD];
    snprintf(path, sizeof path, "%s/w%d", dir, i);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror("open"); _exit(1); }
    for (long seq = 0;; seq++) {
        char header[64];
        int n = snprintf(header, sizeof header, "w=%d seq=%ld\n", i, seq);
        memset(rec, (i * 131 + seq * 7) & 0xff, RECORD);
        memcpy(rec, header, n); /* without snprintf's terminating NUL */
        if (pwrite(fd, rec, RECORD, seq * RECORD) != RECORD) { perror("pwrite"); _exit(1); }
        if (seq % SYNC_EVERY == SYNC_EVERY - 1) {
            if (fsync(fd) != 0) { perror("fsync"); _exit(1); }
            printf("SYNCED %d %ld\n", i, seq);
            fflush(stdout);
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: fsyncwriter DIR N\n"); return 2; }
    int n = atoi(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 0; i < n; i++)
        if (fork() == 0) writer(argv[1], i);
    while (wait(NULL) > 0) {}
    return 0;
}
