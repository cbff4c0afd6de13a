/* deidfs fast read path: libfuse's read_buf and release for open views, in C.
 *
 * Python opens a view (renders or finds its header, checks the source) and registers the
 * open handle here: its source descriptor, the view's segments (header, in-memory pixels,
 * a source range with zeroed ranges, trailer; the memory stays owned by Python, which keeps
 * it alive until the handle is released) and the source state it was checked against.
 *
 * read_buf then answers without entering Python: the segments are copied into a buffer
 * libfuse owns and frees, pixel bytes read from the source with pread, and the source is
 * checked after the read exactly as the Python path checks it (dev, ino, size, mtime and
 * ctime unchanged), so bytes are handed to libfuse only once they are known to be the
 * indexed ones. Anything else (a handle not registered or marked, a short read, a changed
 * state, no memory) is not decided here: the request goes to the Python callback mfusepy
 * made, which holds every rule, refuses, counts and logs. This code never refuses a read
 * and never serves one the Python path would not.
 *
 * release unregisters the handle and queues it; Python drains the queue (closing the
 * descriptor and its own state) on its next open and periodically. A queue that is full
 * hands the release to Python at once.
 *
 * getattr answers from a table of the mount's view files (path -> inode, size, time) that
 * Python keeps in step with its tree, under the tree's lock; a path not in it (a directory,
 * a file gone, one not yet added) goes to Python.
 *
 * Each mount has its own fallbacks and table, found through libfuse's context: the mount's
 * init answers its id, which libfuse keeps as the context's private_data.
 *
 * No Python API is used: the code runs on libfuse's threads without the GIL. It needs only
 * libfuse's struct declarations (fuse3/fuse.h), no libfuse symbol.
 */
#define FUSE_USE_VERSION 31
#define _GNU_SOURCE
#include <errno.h>
#include <fuse.h>
#include <fuse_log.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SLOTS (1u << 16) /* handles registered at once; a colliding one stays in Python */
#define QUEUE (1u << 16) /* releases waiting for Python */

typedef int (*read_buf_fn)(const char *, struct fuse_bufvec **, size_t, off_t,
                           struct fuse_file_info *);
typedef int (*release_fn)(const char *, struct fuse_file_info *);
typedef int (*getattr_fn)(const char *, struct stat *, struct fuse_file_info *);
typedef struct fuse_context *(*context_fn)(void);

struct handle {
    uint64_t fh;
    int fd;
    int marked;   /* to Python for every read: the tree changed this path */
    int users;    /* reads in progress here */
    int released; /* queued by the last read in progress */
    uint64_t epoch;
    const unsigned char *header;
    size_t header_len;
    const unsigned char *pixels;
    size_t pixels_len;
    int64_t pixel_offset;
    size_t pixel_length;
    const uint64_t *zeroed; /* sorted, disjoint [start, end) pairs, from pixel_offset */
    size_t n_zeroed;
    const unsigned char *trailer;
    size_t trailer_len;
    uint64_t dev, ino;
    int64_t size, mtime_ns, ctime_ns;
};

/* One view file of a mount, as getattr answers it. */
struct attr {
    struct attr *next;
    uint64_t hash;
    uint64_t ino;
    int64_t size, mtime_ns;
    size_t len;
    char path[];
};

struct mount {
    uint64_t id;
    read_buf_fn read_buf;
    release_fn release;
    getattr_fn getattr;
    uint32_t uid, gid, file_mode;
    uint64_t blksize;
    pthread_rwlock_t attrs_lock;
    struct attr **buckets; /* a power of two of them */
    size_t n_buckets, n_attrs;
};

#define MOUNTS 1024u /* mounts known at once (by id); an older one's slot is reused */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct handle *slots[SLOTS];
static uint64_t queue[QUEUE];
static size_t queued;
static uint64_t epoch; /* moved by Python whenever a folder's views change (reload) */
static struct mount *mounts[MOUNTS];
static context_fn get_context;

/* Counters Python adds to its metrics: reads and bytes served here, releases queued,
 * requests handed to Python, getattrs answered here. */
static uint64_t n_reads, n_bytes, n_releases, n_fallbacks, n_getattrs;

static struct handle **slot_of(uint64_t fh) { return &slots[fh & (SLOTS - 1)]; }

static struct mount *mount_of(uint64_t id)
{
    struct mount *m = id ? __atomic_load_n(&mounts[id % MOUNTS], __ATOMIC_ACQUIRE) : NULL;
    return m && m->id == id ? m : NULL;
}

/* The mount the calling libfuse thread serves (NULL: none known). */
static struct mount *current(void)
{
    struct fuse_context *c = get_context ? get_context() : NULL;
    return c ? mount_of((uint64_t)(uintptr_t)c->private_data) : NULL;
}

static void free_attrs(struct mount *m)
{
    for (size_t i = 0; i < m->n_buckets; i++) {
        struct attr *a = m->buckets[i];
        while (a) {
            struct attr *next = a->next;
            free(a);
            a = next;
        }
    }
    free(m->buckets);
    m->buckets = NULL;
    m->n_buckets = m->n_attrs = 0;
}

/* libfuse's fuse_get_context (from the library mfusepy loaded), once per process. */
void dfs_set_context(context_fn fn) { get_context = fn; }

/* A mount about to start, with the Python callbacks every request this code does not
 * answer goes to; 0, or -1 without memory. The slot of an older mount with the same id
 * modulo MOUNTS is taken over (that mount's loop ended long before). */
int dfs_mount_new(uint64_t id, read_buf_fn read_buf, release_fn release, getattr_fn getattr,
                  uint32_t uid, uint32_t gid, uint32_t file_mode, uint64_t blksize)
{
    struct mount *m = calloc(1, sizeof *m);
    if (!m || !id)
        return free(m), -1;
    *m = (struct mount){.id = id, .read_buf = read_buf, .release = release,
                        .getattr = getattr, .uid = uid, .gid = gid, .file_mode = file_mode,
                        .blksize = blksize};
    pthread_rwlock_init(&m->attrs_lock, NULL);
    struct mount *old = __atomic_exchange_n(&mounts[id % MOUNTS], m, __ATOMIC_ACQ_REL);
    if (old) {
        free_attrs(old);
        pthread_rwlock_destroy(&old->attrs_lock);
        free(old);
    }
    return 0;
}

/* The mount's loop has ended: its table goes (the struct stays until the slot is reused). */
void dfs_mount_end(uint64_t id)
{
    struct mount *m = mount_of(id);
    if (!m)
        return;
    pthread_rwlock_wrlock(&m->attrs_lock);
    free_attrs(m);
    pthread_rwlock_unlock(&m->attrs_lock);
}

static uint64_t hash_of(const char *path, size_t len)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)path[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* Under attrs_lock, with buckets: where the entry of path is (or would be linked). */
static struct attr **find(struct mount *m, const char *path, size_t len, uint64_t h)
{
    struct attr **at = &m->buckets[h & (m->n_buckets - 1)];
    while (*at && !((*at)->hash == h && (*at)->len == len && !memcmp((*at)->path, path, len)))
        at = &(*at)->next;
    return at;
}

static int grow(struct mount *m)
{
    size_t n = m->n_buckets ? m->n_buckets * 2 : 1024;
    struct attr **b = calloc(n, sizeof *b);
    if (!b)
        return -1;
    for (size_t i = 0; i < m->n_buckets; i++) {
        struct attr *a = m->buckets[i];
        while (a) {
            struct attr *next = a->next;
            a->next = b[a->hash & (n - 1)];
            b[a->hash & (n - 1)] = a;
            a = next;
        }
    }
    free(m->buckets);
    m->buckets = b;
    m->n_buckets = n;
    return 0;
}

/* Set what getattr answers for a view file of mount id; 0, or -1 (no such mount, no
 * memory: the path is then left out, and Python answers it). */
int dfs_attr_set(uint64_t id, const char *path, size_t len, uint64_t ino, int64_t size,
                 int64_t mtime_ns)
{
    struct mount *m = mount_of(id);
    if (!m)
        return -1;
    uint64_t h = hash_of(path, len);
    int rc = -1;
    pthread_rwlock_wrlock(&m->attrs_lock);
    if (m->n_attrs >= m->n_buckets)
        grow(m); /* without memory, chains only get longer */
    if (m->n_buckets) {
        struct attr **at = find(m, path, len, h);
        struct attr *a = *at;
        if (!a && (a = malloc(sizeof *a + len))) {
            *a = (struct attr){.hash = h, .len = len};
            memcpy(a->path, path, len);
            *at = a;
            m->n_attrs++;
        }
        if (a) {
            a->ino = ino;
            a->size = size;
            a->mtime_ns = mtime_ns;
            rc = 0;
        }
    }
    pthread_rwlock_unlock(&m->attrs_lock);
    return rc;
}

/* The path is no longer a view file of mount id. */
void dfs_attr_del(uint64_t id, const char *path, size_t len)
{
    struct mount *m = mount_of(id);
    if (!m)
        return;
    uint64_t h = hash_of(path, len);
    pthread_rwlock_wrlock(&m->attrs_lock);
    if (m->n_buckets) {
        struct attr **at = find(m, path, len, h);
        struct attr *a = *at;
        if (a) {
            *at = a->next;
            free(a);
            m->n_attrs--;
        }
    }
    pthread_rwlock_unlock(&m->attrs_lock);
}

size_t dfs_attr_count(uint64_t id)
{
    struct mount *m = mount_of(id);
    if (!m)
        return 0;
    pthread_rwlock_rdlock(&m->attrs_lock);
    size_t n = m->n_attrs;
    pthread_rwlock_unlock(&m->attrs_lock);
    return n;
}

/* getattr of a path in mount m, as the Python getattr answers a view file; 1 if found. */
static int stat_of(struct mount *m, const char *path, struct stat *st)
{
    size_t len = strlen(path);
    uint64_t h = hash_of(path, len);
    pthread_rwlock_rdlock(&m->attrs_lock);
    struct attr *a = m->n_buckets ? *find(m, path, len, h) : NULL;
    if (a) {
        memset(st, 0, sizeof *st);
        st->st_ino = a->ino;
        st->st_mode = m->file_mode;
        st->st_nlink = 1;
        st->st_size = a->size;
        st->st_uid = m->uid;
        st->st_gid = m->gid;
        st->st_blksize = (blksize_t)m->blksize;
        st->st_blocks = (a->size + 511) / 512;
        struct timespec t = {.tv_sec = a->mtime_ns / 1000000000,
                             .tv_nsec = a->mtime_ns % 1000000000};
        st->st_atim = st->st_mtim = st->st_ctim = t;
    }
    pthread_rwlock_unlock(&m->attrs_lock);
    return a != NULL;
}

int dfs_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
    struct mount *m = current();
    if (!m)
        return -EIO;
    if (path && stat_of(m, path, st)) {
        __atomic_add_fetch(&n_getattrs, 1, __ATOMIC_RELAXED);
        return 0;
    }
    return m->getattr ? m->getattr(path, st, fi) : -EIO;
}

/* For tests: what dfs_getattr answers for path in mount id without libfuse's context;
 * 0 if found, -ENOENT if Python would be asked. */
int dfs_stat(uint64_t id, const char *path, struct stat *st)
{
    struct mount *m = mount_of(id);
    return m && stat_of(m, path, st) ? 0 : -ENOENT;
}

/* libfuse's log lines, written to standard error with one write(2) each. libfuse's own
 * logger writes through stdio, whose lock a libfuse worker can die holding (workers are
 * cancelled while they read the device, which may print an error): every later line, and
 * the interpreter's flush of standard error at exit, would then wait for it forever. */
void dfs_fuse_log(enum fuse_log_level level, const char *fmt, va_list ap)
{
    (void)level;
    char line[1024];
    int n = vsnprintf(line, sizeof line, fmt, ap);
    if (n <= 0)
        return;
    size_t len = (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
    int saved = errno;
    ssize_t w = write(2, line, len);
    (void)w;
    errno = saved;
}

/* Register an open handle; 0 on success, -1 if its slot is taken (it stays in Python). */
int dfs_register(uint64_t fh, int fd, const unsigned char *header, size_t header_len,
                 const unsigned char *pixels, size_t pixels_len, int64_t pixel_offset,
                 size_t pixel_length, const uint64_t *zeroed, size_t n_zeroed,
                 const unsigned char *trailer, size_t trailer_len, uint64_t dev, uint64_t ino,
                 int64_t size, int64_t mtime_ns, int64_t ctime_ns, uint64_t at_epoch)
{
    struct handle *h = calloc(1, sizeof *h);
    if (!h)
        return -1;
    *h = (struct handle){
        .fh = fh, .fd = fd, .epoch = at_epoch,
        .header = header, .header_len = header_len,
        .pixels = pixels, .pixels_len = pixels_len,
        .pixel_offset = pixel_offset, .pixel_length = pixel_length,
        .zeroed = zeroed, .n_zeroed = n_zeroed,
        .trailer = trailer, .trailer_len = trailer_len,
        .dev = dev, .ino = ino, .size = size, .mtime_ns = mtime_ns, .ctime_ns = ctime_ns,
    };
    pthread_mutex_lock(&lock);
    struct handle **s = slot_of(fh);
    int ok = *s == NULL;
    if (ok)
        *s = h;
    pthread_mutex_unlock(&lock);
    if (!ok)
        free(h);
    return ok ? 0 : -1;
}

/* Send every later read of handle fh to Python (a newer version, a changed source). */
void dfs_mark(uint64_t fh)
{
    pthread_mutex_lock(&lock);
    struct handle *h = *slot_of(fh);
    if (h && h->fh == fh)
        h->marked = 1;
    pthread_mutex_unlock(&lock);
}

/* A folder's views change (reload): every handle registered before goes to Python. The
 * epoch only grows, so one mount's reload never makes another's handles current again. */
uint64_t dfs_bump_epoch(void)
{
    return __atomic_add_fetch(&epoch, 1, __ATOMIC_SEQ_CST);
}

uint64_t dfs_epoch(void)
{
    return __atomic_load_n(&epoch, __ATOMIC_SEQ_CST);
}

/* Released handles waiting for Python: up to max of them into out; how many. */
size_t dfs_drain(uint64_t *out, size_t max)
{
    pthread_mutex_lock(&lock);
    size_t n = queued < max ? queued : max;
    memcpy(out, queue + (queued - n), n * sizeof *out);
    __atomic_store_n(&queued, queued - n, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&lock);
    return n;
}

/* How many released handles wait for Python (read without the lock: a hint). */
size_t dfs_queued(void) { return __atomic_load_n(&queued, __ATOMIC_RELAXED); }

void dfs_counters(uint64_t *out)
{
    out[0] = __atomic_load_n(&n_reads, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&n_bytes, __ATOMIC_RELAXED);
    out[2] = __atomic_load_n(&n_releases, __ATOMIC_RELAXED);
    out[3] = __atomic_load_n(&n_fallbacks, __ATOMIC_RELAXED);
    out[4] = __atomic_load_n(&n_getattrs, __ATOMIC_RELAXED);
}

/* Under the lock: h is unregistered and no read uses it; queue it for Python, 0, or -1 if
 * the queue is full. */
static int enqueue(struct handle *h)
{
    if (queued == QUEUE)
        return -1;
    queue[queued] = h->fh;
    __atomic_store_n(&queued, queued + 1, __ATOMIC_RELEASE);
    free(h);
    return 0;
}

static void unuse(struct handle *h, struct mount *m)
{
    uint64_t hand_over = 0;
    pthread_mutex_lock(&lock);
    h->users--;
    if (h->released && h->users == 0) {
        /* Released while read (only when the mount is detached while busy). */
        if (h->released == 2) {
            free(h); /* forgotten: Python releases it itself */
        } else if (enqueue(h) != 0) {
            hand_over = h->fh; /* the queue is full: Python releases it now */
            free(h);
        }
    }
    pthread_mutex_unlock(&lock);
    if (hand_over && m && m->release) {
        struct fuse_file_info fi;
        memset(&fi, 0, sizeof fi);
        fi.fh = hand_over;
        m->release(NULL, &fi);
    }
}

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

/* Bytes [off, off + n) of the view into mem; 0, or -1 when the source did not give them. */
static int fill(const struct handle *h, unsigned char *mem, size_t off, size_t n, int *touched)
{
    size_t end = off + n;
    size_t at = 0; /* view offset where the current segment starts */
    const unsigned char *mems[2] = {h->header, h->pixels};
    size_t lens[2] = {h->header_len, h->pixels_len};
    for (int i = 0; i < 2; i++) {
        size_t seg_end = at + lens[i];
        if (end > at && off < seg_end) {
            size_t start = off > at ? off : at, stop = min_size(end, seg_end);
            memcpy(mem + (start - off), mems[i] + (start - at), stop - start);
        }
        at = seg_end;
    }
    size_t p_end = at + h->pixel_length;
    if (h->pixel_length && end > at && off < p_end) {
        size_t start = off > at ? off : at, stop = min_size(end, p_end);
        unsigned char *into = mem + (start - off);
        size_t want = stop - start;
        off_t pos = h->pixel_offset + (off_t)(start - at);
        *touched = 1;
        while (want) {
            ssize_t got = pread(h->fd, into, want, pos);
            if (got <= 0) {
                if (got < 0 && errno == EINTR)
                    continue;
                return -1;
            }
            into += got;
            want -= (size_t)got;
            pos += got;
        }
        /* Mask rectangles of native pixel data: zeros where the view has them. */
        size_t c0 = start - at, c1 = stop - at;
        for (size_t z = 0; z < h->n_zeroed; z++) {
            uint64_t z0 = h->zeroed[2 * z], z1 = h->zeroed[2 * z + 1];
            if (z0 >= c1)
                break;
            if (z1 <= c0)
                continue;
            size_t a = z0 > c0 ? z0 : c0, b = z1 < c1 ? z1 : c1;
            memset(mem + (start - off) + (a - c0), 0, b - a);
        }
    }
    at = p_end;
    if (end > at) {
        size_t start = off > at ? off : at;
        memcpy(mem + (start - off), h->trailer + (start - at), end - start);
    }
    return 0;
}

/* The source still holds the bytes the view was built from: the state Python checked. */
static int unchanged(const struct handle *h)
{
    struct stat st;
    if (fstat(h->fd, &st) != 0)
        return 0;
    int64_t mtime = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
    int64_t ctime = (int64_t)st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec;
    return (uint64_t)st.st_dev == h->dev && (uint64_t)st.st_ino == h->ino &&
           st.st_size == h->size && mtime == h->mtime_ns && ctime == h->ctime_ns;
}

static int to_python(struct mount *m, const char *path, struct fuse_bufvec **bufp,
                     size_t size, off_t off, struct fuse_file_info *fi)
{
    __atomic_add_fetch(&n_fallbacks, 1, __ATOMIC_RELAXED);
    return m && m->read_buf ? m->read_buf(path, bufp, size, off, fi) : -EIO;
}

int dfs_read_buf(const char *path, struct fuse_bufvec **bufp, size_t size, off_t off,
                 struct fuse_file_info *fi)
{
    struct mount *m = current();
    pthread_mutex_lock(&lock);
    struct handle *h = *slot_of(fi->fh);
    if (!h || h->fh != fi->fh || h->marked || h->released ||
        h->epoch != __atomic_load_n(&epoch, __ATOMIC_SEQ_CST)) {
        pthread_mutex_unlock(&lock);
        return to_python(m, path, bufp, size, off, fi);
    }
    h->users++;
    pthread_mutex_unlock(&lock);

    size_t view = h->header_len + h->pixels_len + h->pixel_length + h->trailer_len;
    size_t n = off < 0 || (size_t)off >= view ? 0 : min_size(size, view - (size_t)off);
    unsigned char *mem = n ? malloc(n) : NULL;
    struct fuse_bufvec *vec = malloc(sizeof *vec);
    int touched = 0;
    if ((n && !mem) || !vec || (n && fill(h, mem, (size_t)off, n, &touched) != 0) ||
        (touched && !unchanged(h))) {
        free(mem);
        free(vec);
        unuse(h, m);
        return to_python(m, path, bufp, size, off, fi);
    }
    unuse(h, m);
    *vec = (struct fuse_bufvec)FUSE_BUFVEC_INIT(n);
    vec->buf[0].mem = mem;
    *bufp = vec;
    __atomic_add_fetch(&n_reads, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&n_bytes, n, __ATOMIC_RELAXED);
    return 0;
}

int dfs_release(const char *path, struct fuse_file_info *fi)
{
    struct mount *m = current();
    pthread_mutex_lock(&lock);
    struct handle **s = slot_of(fi->fh);
    struct handle *h = *s;
    if (!h || h->fh != fi->fh) {
        pthread_mutex_unlock(&lock);
        return m && m->release ? m->release(path, fi) : 0;
    }
    *s = NULL;
    int done = 0;
    if (h->users > 0) {
        h->released = 1; /* the last read queues it */
        done = 1;
    } else {
        done = enqueue(h) == 0;
    }
    pthread_mutex_unlock(&lock);
    if (!done) {
        free(h);
        return m && m->release ? m->release(path, fi) : 0;
    }
    __atomic_add_fetch(&n_releases, 1, __ATOMIC_RELAXED);
    return 0;
}

/* Forget handle fh: Python releases it itself (from its own release callback, or at
 * shutdown). 1 if a read is still in progress on it (possible only when the mount is
 * detached while busy): the view's memory must then stay alive, since that read still
 * copies from it; it frees the handle when it ends. */
int dfs_forget(uint64_t fh)
{
    int busy = 0;
    pthread_mutex_lock(&lock);
    struct handle **s = slot_of(fh);
    struct handle *h = *s;
    if (h && h->fh == fh) {
        *s = NULL;
        if (h->users > 0) {
            h->released = 2; /* freed by the last read, not queued */
            busy = 1;
        } else {
            free(h);
        }
    }
    pthread_mutex_unlock(&lock);
    return busy;
}
