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
 * open answers a path whose view Python has opened, checked and served before, from a
 * template Python set on the path's entry: the source path, the view's segments and the
 * source state they were built from. The template goes with any change of the entry (the
 * tree's listener), and is set only by an open Python made through the page cache, of the
 * version the tree serves, once the kernel was told of the path's last change. C opens the
 * source as Python does and serves the handle only if the source is in exactly the
 * template's state; otherwise, or for a write, a full table, a reload since the template
 * (the epoch), the request goes to Python. Such a handle is C's until Python adopts it:
 * on any read C does not answer, and for every handle of a path the tree changes. Python
 * then holds it as one it opened (its version, its checks). An unadopted handle's release
 * is C's alone: it closes the descriptor.
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
#include <fcntl.h>
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
#define TSLOTS (1u << 16) /* templates at once; a colliding one is not set */
#define FREED (2u * TSLOTS) /* freed templates waiting for Python (see dfs_template_set) */
#define C_FH (1ull << 62) /* handles C opens; Python's numbers stay below */

typedef int (*read_buf_fn)(const char *, struct fuse_bufvec **, size_t, off_t,
                           struct fuse_file_info *);
typedef int (*release_fn)(const char *, struct fuse_file_info *);
typedef int (*open_fn)(const char *, struct fuse_file_info *);
typedef int (*getattr_fn)(const char *, struct stat *, struct fuse_file_info *);
typedef struct fuse_context *(*context_fn)(void);

struct tmpl;

struct handle {
    uint64_t fh;
    int fd;
    int marked;   /* to Python for every read: the tree changed this path */
    int users;    /* reads in progress here */
    int released; /* queued by the last read in progress (2: forgotten; 3: C closes it) */
    int c_owned;  /* opened here and not adopted by Python: its release is C's */
    struct tmpl *t;                 /* the template it was opened from (a reference) */
    struct handle *t_prev, *t_next; /* the template's unadopted handles */
    int64_t nlink;                  /* the source's link count at open */
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

/* What open needs of a view Python served (its memory stays owned by Python, which keeps
 * it alive until told the template is freed). */
struct tmpl {
    uint64_t id;
    int refs;               /* the entry it is set on, and each handle opened from it */
    struct handle *handles; /* unadopted handles opened from it */
    uint64_t epoch;
    char *source;           /* the original's path (never logged) */
    const unsigned char *header;
    size_t header_len;
    const unsigned char *pixels;
    size_t pixels_len;
    int64_t pixel_offset;
    size_t pixel_length;
    const uint64_t *zeroed;
    size_t n_zeroed;
    const unsigned char *trailer;
    size_t trailer_len;
    uint64_t dev, ino;
    int64_t size, mtime_ns, ctime_ns;
};

/* One view file of a mount, as getattr answers it. */
struct attr {
    struct attr *next;
    struct tmpl *tmpl; /* what open answers it from, or NULL (Python opens) */
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
    open_fn open;
    uint32_t uid, gid, file_mode;
    uint64_t blksize;
    int open_flags;    /* how Python opens a source (0: C opens nothing) */
    size_t max_open;   /* handles C may hold open at once */
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
static struct tmpl *tslots[TSLOTS];
static uint64_t next_tmpl;
static uint64_t freed[FREED];
static size_t n_freed;
static size_t c_open;       /* unadopted handles C opened */
static uint64_t next_c_fh;  /* numbers of the handles C opens, from C_FH on */
static struct mount *mounts[MOUNTS];
static context_fn get_context;

/* Counters Python adds to its metrics: reads and bytes served here, releases queued,
 * requests handed to Python, getattrs answered here. */
static uint64_t n_reads, n_bytes, n_releases, n_fallbacks, n_getattrs, n_opens;

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

/* Under lock: one reference less; the last frees the template and tells Python, which
 * then lets its memory go. */
static void unref(struct tmpl *t)
{
    if (--t->refs > 0)
        return;
    struct tmpl **s = &tslots[t->id & (TSLOTS - 1)];
    if (*s == t)
        *s = NULL;
    if (n_freed < FREED) /* always: see dfs_template_set */
        freed[n_freed] = t->id, __atomic_store_n(&n_freed, n_freed + 1, __ATOMIC_RELEASE);
    free(t->source);
    free(t);
}

/* Under the write lock of the entry's mount: its template, if any, goes (open asks Python
 * again; handles opened from it keep it until they end). */
static void detach(struct attr *a)
{
    struct tmpl *t = a->tmpl;
    if (!t)
        return;
    a->tmpl = NULL;
    pthread_mutex_lock(&lock);
    unref(t);
    pthread_mutex_unlock(&lock);
}

/* Under lock: an unadopted handle leaves its template's list (Python adopts it, or it
 * ends). */
static void unlink_handle(struct handle *h)
{
    if (!h->c_owned)
        return;
    h->c_owned = 0;
    if (h->t_prev)
        h->t_prev->t_next = h->t_next;
    else
        h->t->handles = h->t_next;
    if (h->t_next)
        h->t_next->t_prev = h->t_prev;
    h->t_prev = h->t_next = NULL;
    c_open--;
}

/* Under lock: a handle no read uses and no slot holds goes, with its template reference
 * (its descriptor is closed by whoever owns it). */
static void free_handle(struct handle *h)
{
    if (h->t) {
        unlink_handle(h);
        unref(h->t);
    }
    free(h);
}

static void free_attrs(struct mount *m)
{
    for (size_t i = 0; i < m->n_buckets; i++) {
        struct attr *a = m->buckets[i];
        while (a) {
            struct attr *next = a->next;
            detach(a);
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
                  open_fn open_cb, uint32_t uid, uint32_t gid, uint32_t file_mode,
                  uint64_t blksize)
{
    struct mount *m = calloc(1, sizeof *m);
    if (!m || !id)
        return free(m), -1;
    *m = (struct mount){.id = id, .read_buf = read_buf, .release = release,
                        .getattr = getattr, .open = open_cb, .uid = uid, .gid = gid,
                        .file_mode = file_mode, .blksize = blksize};
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
            detach(a); /* what the path serves changed: open asks Python again */
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
            detach(a);
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
    out[5] = __atomic_load_n(&n_opens, __ATOMIC_RELAXED);
}

/* Under the lock: h is unregistered and no read uses it; queue it for Python, 0, or -1 if
 * the queue is full. */
static int enqueue(struct handle *h)
{
    if (queued == QUEUE)
        return -1;
    queue[queued] = h->fh;
    __atomic_store_n(&queued, queued + 1, __ATOMIC_RELEASE);
    free_handle(h);
    return 0;
}

static void unuse(struct handle *h, struct mount *m)
{
    uint64_t hand_over = 0;
    int close_fd = -1;
    pthread_mutex_lock(&lock);
    h->users--;
    if (h->released && h->users == 0) {
        /* Released while read (only when the mount is detached while busy). */
        if (h->released == 2) {
            free_handle(h); /* forgotten: Python releases it itself */
        } else if (h->released == 3) {
            close_fd = h->fd; /* C's own: nobody else closes it */
            free_handle(h);
        } else if (enqueue(h) != 0) {
            hand_over = h->fh; /* the queue is full: Python releases it now */
            free_handle(h);
        }
    }
    pthread_mutex_unlock(&lock);
    if (close_fd >= 0)
        close(close_fd);
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
    int done = 1, close_fd = -1;
    if (h->users > 0) {
        h->released = h->c_owned ? 3 : 1; /* the last read closes or queues it */
    } else if (h->c_owned) {
        close_fd = h->fd; /* never adopted: Python does not know it */
        free_handle(h);
    } else if (enqueue(h) != 0) {
        free_handle(h);
        done = 0;
    }
    pthread_mutex_unlock(&lock);
    if (close_fd >= 0)
        close(close_fd);
    if (!done)
        return m && m->release ? m->release(path, fi) : 0;
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
    if (h && h->fh == fh && !h->c_owned) {
        *s = NULL;
        if (h->users > 0) {
            h->released = 2; /* freed by the last read, not queued */
            busy = 1;
        } else {
            free_handle(h);
        }
    }
    pthread_mutex_unlock(&lock);
    return busy;
}

/* -- open from a template ------------------------------------------------------------- */

/* How C opens sources for mount id (Python's flags; 0: it opens none) and how many
 * handles it may hold open at once. */
void dfs_mount_open(uint64_t id, int open_flags, size_t max_open)
{
    struct mount *m = mount_of(id);
    if (m) {
        m->open_flags = open_flags;
        m->max_open = max_open;
    }
}

/* Set what open answers path of mount id from: the view Python opened there (its
 * segments, kept alive by Python until the template is reported freed), the original's
 * path and the state the view was built from, the epoch read before Python's open. The
 * caller holds the tree's lock and has checked that the tree serves this very view at
 * path, so the entry is the view's. Returns the template's id, or 0 (no entry, no memory,
 * no free slot, or too many freed templates Python has not taken yet: freed ones then stay
 * within FREED, since at most TSLOTS are live). */
uint64_t dfs_template_set(uint64_t id, const char *path, size_t len, const char *source,
                          const unsigned char *header, size_t header_len,
                          const unsigned char *pixels, size_t pixels_len, int64_t pixel_offset,
                          size_t pixel_length, const uint64_t *zeroed, size_t n_zeroed,
                          const unsigned char *trailer, size_t trailer_len, uint64_t dev,
                          uint64_t ino, int64_t size, int64_t mtime_ns, int64_t ctime_ns,
                          uint64_t at_epoch)
{
    struct mount *m = mount_of(id);
    if (!m || !m->open_flags)
        return 0;
    struct tmpl *t = calloc(1, sizeof *t);
    char *src = t ? strdup(source) : NULL;
    if (!src)
        return free(t), 0;
    *t = (struct tmpl){
        .refs = 1, .epoch = at_epoch, .source = src,
        .header = header, .header_len = header_len,
        .pixels = pixels, .pixels_len = pixels_len,
        .pixel_offset = pixel_offset, .pixel_length = pixel_length,
        .zeroed = zeroed, .n_zeroed = n_zeroed,
        .trailer = trailer, .trailer_len = trailer_len,
        .dev = dev, .ino = ino, .size = size, .mtime_ns = mtime_ns, .ctime_ns = ctime_ns,
    };
    uint64_t h = hash_of(path, len), tid = 0;
    pthread_rwlock_wrlock(&m->attrs_lock);
    struct attr *a = m->n_buckets ? *find(m, path, len, h) : NULL;
    if (a) {
        pthread_mutex_lock(&lock);
        uint64_t next = ++next_tmpl;
        struct tmpl **s = &tslots[next & (TSLOTS - 1)];
        if (!*s && n_freed <= TSLOTS / 2) {
            t->id = tid = next;
            *s = t;
        }
        pthread_mutex_unlock(&lock);
        if (tid) {
            detach(a);
            a->tmpl = t;
        }
    }
    pthread_rwlock_unlock(&m->attrs_lock);
    if (!tid) {
        free(src);
        free(t);
    }
    return tid;
}

/* Take template tid off path's entry of mount id, if it is still set there. */
void dfs_template_drop(uint64_t id, const char *path, size_t len, uint64_t tid)
{
    struct mount *m = mount_of(id);
    if (!m)
        return;
    uint64_t h = hash_of(path, len);
    pthread_rwlock_wrlock(&m->attrs_lock);
    struct attr *a = m->n_buckets ? *find(m, path, len, h) : NULL;
    if (a && a->tmpl && a->tmpl->id == tid)
        detach(a);
    pthread_rwlock_unlock(&m->attrs_lock);
}

/* Freed templates since the last call: up to max ids into out; how many. */
size_t dfs_templates_freed(uint64_t *out, size_t max)
{
    pthread_mutex_lock(&lock);
    size_t n = n_freed < max ? n_freed : max;
    memcpy(out, freed + (n_freed - n), n * sizeof *out);
    n_freed -= n;
    pthread_mutex_unlock(&lock);
    return n;
}

/* The unadopted handles opened from template tid: up to max into out; how many. */
size_t dfs_template_handles(uint64_t tid, uint64_t *out, size_t max)
{
    size_t n = 0;
    pthread_mutex_lock(&lock);
    struct tmpl *t = tslots[tid & (TSLOTS - 1)];
    if (t && t->id == tid)
        for (struct handle *h = t->handles; h && n < max; h = h->t_next)
            out[n++] = h->fh;
    pthread_mutex_unlock(&lock);
    return n;
}

/* Every unadopted handle C opened (at a mount's end): up to max into out; how many. */
size_t dfs_c_handles(uint64_t *out, size_t max)
{
    size_t n = 0;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < SLOTS && n < max; i++)
        if (slots[i] && slots[i]->c_owned)
            out[n++] = slots[i]->fh;
    pthread_mutex_unlock(&lock);
    return n;
}

/* Freed templates Python has not taken yet (read without the lock: a hint). */
size_t dfs_freed_count(void) { return __atomic_load_n(&n_freed, __ATOMIC_RELAXED); }

/* Unadopted handles C holds open now. */
size_t dfs_c_open(void) { return __atomic_load_n(&c_open, __ATOMIC_RELAXED); }

/* Python takes handle fh, which C opened: out gets its descriptor, template id, the ctime
 * its reads are checked against and the source's link count at open; every later read of
 * it goes to Python, and its release is queued for Python like a registered one's. 0, or
 * -1 (not a handle C holds: unknown, released, or adopted already). */
int dfs_adopt(uint64_t fh, int64_t *out)
{
    int rc = -1;
    pthread_mutex_lock(&lock);
    struct handle *h = *slot_of(fh);
    if (h && h->fh == fh && h->c_owned && !h->released) {
        unlink_handle(h);
        h->marked = 1;
        out[0] = h->fd;
        out[1] = (int64_t)h->t->id;
        out[2] = h->ctime_ns;
        out[3] = h->nlink;
        rc = 0;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

static int same_state(const struct stat *st, const struct tmpl *t)
{
    int64_t mtime = (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec;
    int64_t ctime = (int64_t)st->st_ctim.tv_sec * 1000000000 + st->st_ctim.tv_nsec;
    return (uint64_t)st->st_dev == t->dev && (uint64_t)st->st_ino == t->ino &&
           st->st_size == t->size && mtime == t->mtime_ns && ctime == t->ctime_ns;
}

/* Under attrs_lock: the template set on path now (NULL: none). */
static struct tmpl *template_at(struct mount *m, const char *path, size_t len, uint64_t h)
{
    struct attr *a = m->n_buckets ? *find(m, path, len, h) : NULL;
    return a ? a->tmpl : NULL;
}

static int open_in_python(struct mount *m, const char *path, struct fuse_file_info *fi)
{
    return m->open ? m->open(path, fi) : -EIO;
}

int dfs_open(const char *path, struct fuse_file_info *fi)
{
    struct mount *m = current();
    if (!m)
        return -EIO;
    if (!path || !m->open_flags || (fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC))
        return open_in_python(m, path, fi);
    size_t len = strlen(path);
    uint64_t hsh = hash_of(path, len);
    struct tmpl *t = NULL;
    pthread_rwlock_rdlock(&m->attrs_lock);
    struct tmpl *at = template_at(m, path, len, hsh);
    if (at && at->epoch == __atomic_load_n(&epoch, __ATOMIC_SEQ_CST) &&
        __atomic_load_n(&c_open, __ATOMIC_RELAXED) < m->max_open) {
        t = at;
        pthread_mutex_lock(&lock);
        t->refs++;
        pthread_mutex_unlock(&lock);
    }
    pthread_rwlock_unlock(&m->attrs_lock);
    if (!t)
        return open_in_python(m, path, fi);

    int fd = open(t->source, m->open_flags | O_NOATIME);
    if (fd < 0 && errno == EPERM) /* O_NOATIME needs ownership; reading does not */
        fd = open(t->source, m->open_flags);
    struct stat st;
    struct handle *h = NULL;
    int placed = 0;
    if (fd >= 0 && fstat(fd, &st) == 0 && same_state(&st, t) && (h = calloc(1, sizeof *h))) {
        *h = (struct handle){
            .fh = C_FH | __atomic_add_fetch(&next_c_fh, 1, __ATOMIC_RELAXED),
            .fd = fd, .c_owned = 1, .t = t, .nlink = (int64_t)st.st_nlink,
            .epoch = t->epoch,
            .header = t->header, .header_len = t->header_len,
            .pixels = t->pixels, .pixels_len = t->pixels_len,
            .pixel_offset = t->pixel_offset, .pixel_length = t->pixel_length,
            .zeroed = t->zeroed, .n_zeroed = t->n_zeroed,
            .trailer = t->trailer, .trailer_len = t->trailer_len,
            .dev = t->dev, .ino = t->ino, .size = t->size, .mtime_ns = t->mtime_ns,
            .ctime_ns = t->ctime_ns,
        };
        pthread_mutex_lock(&lock);
        struct handle **s = slot_of(h->fh);
        if (!*s) {
            *s = h;
            h->t_next = t->handles;
            if (t->handles)
                t->handles->t_prev = h;
            t->handles = h;
            c_open++;
            placed = 1;
        }
        pthread_mutex_unlock(&lock);
    }
    if (placed) {
        /* Still set: a change of the path from now on detaches it first and then has
         * Python adopt every handle in its list, this one included. Detached meanwhile:
         * the change may have been adopted before this handle was in the list, so it is
         * taken back, unless Python adopted it (it is then Python's, and checked). */
        pthread_rwlock_rdlock(&m->attrs_lock);
        int current_tmpl = template_at(m, path, len, hsh) == t;
        pthread_rwlock_unlock(&m->attrs_lock);
        if (current_tmpl) {
            fi->fh = h->fh;
            __atomic_add_fetch(&n_opens, 1, __ATOMIC_RELAXED);
            return 0;
        }
        int adopted;
        pthread_mutex_lock(&lock);
        adopted = !h->c_owned;
        if (!adopted) {
            *slot_of(h->fh) = NULL;
            free_handle(h); /* drops its template reference */
        }
        pthread_mutex_unlock(&lock);
        if (adopted) {
            fi->fh = h->fh;
            __atomic_add_fetch(&n_opens, 1, __ATOMIC_RELAXED);
            return 0;
        }
        close(fd);
        return open_in_python(m, path, fi);
    }
    free(h);
    if (fd >= 0)
        close(fd);
    pthread_mutex_lock(&lock);
    unref(t);
    pthread_mutex_unlock(&lock);
    return open_in_python(m, path, fi);
}
