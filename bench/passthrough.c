/* A read-only passthrough on libfuse3's high-level API: the C floor of bench_mount.py.
 *
 *   passthrough SOURCE MOUNTPOINT [fuse options, e.g. -f -o ro,auto_cache,...]
 *
 * getattr is an fstatat (no symlinks followed) of the source, readdir fills each entry's mode
 * and inode from d_type (no readdirplus: the high-level API of mfusepy cannot give it either),
 * open opens the source O_RDONLY and keeps the fd in fi->fh, read is a pread into libfuse's
 * buffer (built with -DPT_READ_BUF: read_buf answers with a bufvec naming the fd and offset,
 * libfuse does the read or splice), release closes. Paths are resolved relative to a
 * descriptor of SOURCE opened before fuse_main (which changes the cwd to /). Mount options
 * come from the command line: bench_mount.py passes deidfs's own.
 */
#define FUSE_USE_VERSION 31
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int source_fd = -1;

/* "/a/b" -> "a/b", "/" -> "." (relative to source_fd). */
static const char *rel(const char *path) { return path[1] ? path + 1 : "."; }

static int pt_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
    if (fi != NULL && fstat((int)fi->fh, st) == 0) return 0;
    return fstatat(source_fd, rel(path), st, AT_SYMLINK_NOFOLLOW) == 0 ? 0 : -errno;
}

static int pt_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t offset,
                      struct fuse_file_info *fi, enum fuse_readdir_flags flags) {
    (void)offset, (void)fi, (void)flags;
    int fd = openat(source_fd, rel(path), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -errno;
    DIR *dir = fdopendir(fd);
    if (dir == NULL) {
        int err = errno;
        close(fd);
        return -err;
    }
    struct dirent *de;
    while ((de = readdir(dir)) != NULL) {
        struct stat st;
        memset(&st, 0, sizeof st);
        st.st_ino = de->d_ino;
        st.st_mode = (mode_t)DTTOIF(de->d_type);
        if (fill(buf, de->d_name, &st, 0, 0)) break;
    }
    closedir(dir);
    return 0;
}

static int pt_open(const char *path, struct fuse_file_info *fi) {
    if ((fi->flags & O_ACCMODE) != O_RDONLY) return -EROFS;
    int fd = openat(source_fd, rel(path), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    fi->fh = (uint64_t)fd;
    return 0;
}

#ifndef PT_READ_BUF
static int pt_read(const char *path, char *buf, size_t size, off_t offset,
                   struct fuse_file_info *fi) {
    (void)path;
    ssize_t n = pread((int)fi->fh, buf, size, offset);
    return n < 0 ? -errno : (int)n;
}
#else
static int pt_read_buf(const char *path, struct fuse_bufvec **out, size_t size, off_t offset,
                       struct fuse_file_info *fi) {
    (void)path;
    struct fuse_bufvec *vec = malloc(sizeof *vec); /* libfuse frees it */
    if (vec == NULL) return -ENOMEM;
    *vec = FUSE_BUFVEC_INIT(size);
    vec->buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    vec->buf[0].fd = (int)fi->fh;
    vec->buf[0].pos = offset;
    *out = vec;
    return 0;
}
#endif

static int pt_release(const char *path, struct fuse_file_info *fi) {
    (void)path;
    close((int)fi->fh);
    return 0;
}

static const struct fuse_operations ops = {
    .getattr = pt_getattr,
    .readdir = pt_readdir,
    .open = pt_open,
#ifndef PT_READ_BUF
    .read = pt_read,
#else
    .read_buf = pt_read_buf,
#endif
    .release = pt_release,
};

int main(int argc, char *argv[]) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s SOURCE MOUNTPOINT [fuse options]\n", argv[0]);
        return 2;
    }
    source_fd = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (source_fd < 0) {
        perror(argv[1]);
        return 1;
    }
    argv[1] = argv[0]; /* fuse_main sees: prog MOUNTPOINT [options] */
    return fuse_main(argc - 1, argv + 1, &ops, NULL);
}
