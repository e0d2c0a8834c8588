/* Sum all-reduce and all-gather between the ranks of one host through one shared-memory
 * segment (a file under /dev/shm), as vLLM's CPU backend does: a collective between
 * processes on the same host is a copy into shared memory, a flag, and a read, which
 * costs microseconds where a socket round trip through gloo costs tens of them.
 *
 * Segment layout (offsets in bytes):
 *   0     header: magic (stored last, release: the segment is ready), version, world,
 *         slot_bytes, total_bytes, creator pid
 *   128   abort flag (own cache line)
 *   256   seq[r], one per rank, 128 bytes apart (two lines: no false sharing, even with
 *         the adjacent-line prefetcher)
 *   data  slot(r, p): rank r's buffer of parity p, slot_bytes each, page aligned
 *
 * Each step of a collective (a chunk of at most slot_bytes per rank) has a number s,
 * counted alike by every rank. Rank r copies its chunk into slot(r, s & 1), publishes
 * seq[r] = s with a release store, waits for every seq[j] >= s (acquire), then reads
 * all slots of parity s & 1. Double buffering makes that the only barrier: rank r
 * writes parity p again at step s + 2 only after it saw every seq[j] >= s + 1, and
 * rank j publishes s + 1 only after it finished reading the buffers of step s. So no
 * rank can overwrite a buffer someone still reads, and while r waits at step s every
 * seq[j] is s - 1, s or s + 1, never more.
 *
 * seq[r] also carries a 16-bit tag of the call (operation, dtype, size) in its low
 * bits, so ranks that disagree on the collective (a bug in the caller) fail with an
 * error instead of summing garbage. Every pair of ranks sees the other's tag of each
 * step: if j is already past s, it saw r's seq at exactly s.
 *
 * Sums go in rank order 0..N-1 (fp32 accumulation for bf16/fp16, rounded once), so
 * every rank computes bit-identical results; -ffast-math is overridden for this file so
 * the compiler cannot reassociate those additions.
 */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-associative-math")
#endif

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x6672656967687431ull /* "freight1" */
#define VERSION 1u
#define ABORT_OFF 128
#define SEQ_OFF 256
#define SEQ_STRIDE 128
#define MAX_WORLD 64
#define BLOCK 512      /* elements summed per pass: the fp32 accumulator stays in L1 */
#define SPIN_MAX_S 50e-6 /* busy polling before yielding the core to others, at most */
#define SPIN_MIN_S 1e-6

/* Errors are -errno for failed system calls, else these (below any errno). */
enum { OK = 0, NOT_READY = 1, ERR_ABORTED = -1001, ERR_TIMEOUT = -1002, ERR_MISMATCH = -1003, ERR_ARGS = -1004,
       ERR_HEADER = -1005, ERR_DTYPE = -1006 };
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2, OP_GATHER = 3 };

typedef struct {
    uint64_t magic;
    uint32_t version, world;
    uint64_t slot_bytes, total_bytes;
    int64_t creator_pid;
} header_t;

typedef struct {
    uint8_t *base;
    size_t map_bytes, slot_bytes, data_off;
    int rank, world, error_peer;
    uint64_t seq;          /* this rank's last step */
    double timeout_s, spin_s;
    char path[4096];
} comm_t;

static inline uint64_t *seq_of(comm_t *c, int r) { return (uint64_t *)(c->base + SEQ_OFF + r * SEQ_STRIDE); }
static inline uint32_t *abort_flag(comm_t *c) { return (uint32_t *)(c->base + ABORT_OFF); }
static inline uint8_t *slot(comm_t *c, int r, uint64_t s) {
    return c->base + c->data_off + ((size_t)r * 2 + (s & 1)) * c->slot_bytes;
}

static size_t data_offset(int world) { return ((size_t)SEQ_OFF + (size_t)world * SEQ_STRIDE + 4095) & ~(size_t)4095; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static comm_t *new_comm(const char *path, uint8_t *base, size_t bytes, int rank, int world, size_t slot_bytes,
                        double timeout_s) {
    comm_t *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->base = base, c->map_bytes = bytes, c->slot_bytes = slot_bytes, c->data_off = data_offset(world);
    c->rank = rank, c->world = world, c->timeout_s = timeout_s, c->error_peer = -1;
    c->spin_s = SPIN_MAX_S;
    snprintf(c->path, sizeof c->path, "%s", path);
    return c;
}

/* Rank 0: build the segment in a private file, then rename it into place, so the others
 * never see a half-initialised one (and a stale file of the same name is replaced). */
int shm_comm_create(const char *path, int world, int64_t slot_bytes, double timeout_s, void **out) {
    if (world < 1 || world > MAX_WORLD || slot_bytes < 64 || slot_bytes % 64) return ERR_ARGS;
    size_t total = data_offset(world) + (size_t)world * 2 * (size_t)slot_bytes;
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, (int)getpid());
    int fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return -errno;
    /* Reserve the pages now: a full tmpfs fails here, not with SIGBUS on a later write. */
    int rc = posix_fallocate(fd, 0, (off_t)total);
    uint8_t *base = MAP_FAILED;
    if (rc == 0) {
        base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
        if (base == MAP_FAILED) rc = errno;
    }
    close(fd);
    if (rc != 0) {
        unlink(tmp);
        return -rc;
    }
    header_t *h = (header_t *)base;
    h->version = VERSION, h->world = (uint32_t)world, h->slot_bytes = (uint64_t)slot_bytes;
    h->total_bytes = total, h->creator_pid = getpid();
    __atomic_store_n(&h->magic, MAGIC, __ATOMIC_RELEASE);
    if (rename(tmp, path) != 0) {
        rc = errno;
        munmap(base, total);
        unlink(tmp);
        return -rc;
    }
    comm_t *c = new_comm(path, base, total, 0, world, (size_t)slot_bytes, timeout_s);
    if (!c) {
        munmap(base, total);
        return -ENOMEM;
    }
    *out = c;
    return OK;
}

/* Ranks 1..N-1: NOT_READY until rank 0's segment is in place (the caller polls). A file
 * left by a dead creator is stale: wait for the live one to replace it. */
int shm_comm_attach(const char *path, int rank, int world, double timeout_s, void **out) {
    if (world < 1 || world > MAX_WORLD || rank < 0 || rank >= world) return ERR_ARGS;
    int fd = open(path, O_RDWR);
    if (fd < 0) return errno == ENOENT ? NOT_READY : -errno;
    struct stat st;
    if (fstat(fd, &st) != 0 || (size_t)st.st_size < data_offset(world)) {
        close(fd);
        return NOT_READY;
    }
    uint8_t *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    int rc = errno;
    close(fd);
    if (base == MAP_FAILED) return -rc;
    header_t *h = (header_t *)base;
    rc = OK;
    if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != MAGIC || h->total_bytes != (uint64_t)st.st_size)
        rc = NOT_READY;
    else if (kill((pid_t)h->creator_pid, 0) != 0 && errno == ESRCH)
        rc = NOT_READY;
    else if (h->version != VERSION || h->world != (uint32_t)world)
        rc = ERR_HEADER;
    comm_t *c = rc == OK ? new_comm(path, base, (size_t)st.st_size, rank, world, h->slot_bytes, timeout_s) : NULL;
    if (rc == OK && !c) rc = -ENOMEM;
    if (rc != OK) {
        munmap(base, (size_t)st.st_size);
        return rc;
    }
    *out = c;
    return OK;
}

void shm_comm_abort(void *h) { __atomic_store_n(abort_flag((comm_t *)h), 1u, __ATOMIC_RELEASE); }

int shm_comm_error_peer(void *h) { return ((comm_t *)h)->error_peer; }

int64_t shm_comm_slot_bytes(void *h) { return (int64_t)((comm_t *)h)->slot_bytes; }

/* Unmap (others may keep theirs: the pages live until the last mapping goes); rank 0 also
 * removes the name. */
void shm_comm_close(void *h, int unlink_file) {
    comm_t *c = h;
    munmap(c->base, c->map_bytes);
    if (unlink_file) unlink(c->path);
    free(c);
}

static int fail(comm_t *c, int j, int rc) {
    c->error_peer = j;
    shm_comm_abort(c);  /* the others must not wait forever for this rank either */
    return rc;
}

/* Wait until rank j posted step s. Spin first (a peer on another core is usually well
 * under a microsecond away), then yield (ranks may share cores with each other and with
 * other processes), then, after 10 ms, sleep in 50 us naps so a long wait does not burn a
 * core. The spin adapts as an adaptive mutex does: it halves each time the peer came only
 * after it (likely on our core: spinning only delays it) and doubles each time the peer
 * came during it, between SPIN_MIN_S and SPIN_MAX_S. The clock is read every 32 polls. */
static int wait_rank(comm_t *c, int j, uint64_t s, uint32_t tag) {
    const uint64_t *q = seq_of(c, j);
    const uint32_t *ab = abort_flag(c);
    double start = 0, waited = 0;
    for (uint64_t i = 0;; i++) {
        uint64_t v = __atomic_load_n(q, __ATOMIC_ACQUIRE);
        if ((v >> 16) >= s) {
            if (i > 0 && waited < c->spin_s) c->spin_s = c->spin_s * 2 < SPIN_MAX_S ? c->spin_s * 2 : SPIN_MAX_S;
            else if (i > 0) c->spin_s = c->spin_s / 2 > SPIN_MIN_S ? c->spin_s / 2 : SPIN_MIN_S;
            return (v >> 16) == s && (v & 0xffff) != tag ? fail(c, j, ERR_MISMATCH) : OK;
        }
        if (__atomic_load_n(ab, __ATOMIC_ACQUIRE)) return c->error_peer = j, ERR_ABORTED;
        if ((i & 31) == 0) {
            double t = now();
            if (i == 0) start = t;
            waited = t - start;
            if (waited > c->timeout_s) return fail(c, j, ERR_TIMEOUT);
        }
        if (waited < c->spin_s) {
            cpu_relax();
        } else if (waited < 0.01) {
            sched_yield();
        } else {
            struct timespec nap = {0, 50000};
            nanosleep(&nap, NULL);
        }
    }
}

/* Publish this rank's buffer of step s and wait for everyone's. */
static int exchange(comm_t *c, uint64_t s, uint32_t tag) {
    __atomic_store_n(seq_of(c, c->rank), (s << 16) | tag, __ATOMIC_RELEASE);
    for (int j = 0; j < c->world; j++) {
        if (j == c->rank) continue;
        int rc = wait_rank(c, j, s, tag);
        if (rc != OK) return rc;
    }
    return OK;
}

static uint32_t make_tag(uint64_t op, uint64_t a, uint64_t b) {
    uint64_t x = (op + 1) * 0x9E3779B97F4A7C15ull ^ a * 0xC2B2AE3D27D4EB4Full ^ b * 0x165667B19E3779F9ull;
    return (uint32_t)((x ^ (x >> 29) ^ (x >> 47)) & 0xffff);
}

/* bf16 <-> fp32: round to nearest even; NaN stays a (quiet) NaN. */
static inline float bf_load(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint16_t bf_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#define F32_LOAD(x) (x)
#define F32_STORE(x) (x)
#define F16_LOAD(x) ((float)(x))
#define F16_STORE(x) ((_Float16)(x))

/* out = src[0] + src[1] + ... in this order, element-wise, BLOCK elements at a time.
 * out may be one of the sources: each block is read whole before it is written. */
#define REDUCE(NAME, T, LOAD, STORE)                                               \
    static void NAME(T *out, const void *const *src, int n_src, int64_t m) {     \
        float acc[BLOCK];                                                        \
        for (int64_t b = 0; b < m; b += BLOCK) {                                 \
            int64_t k = m - b < BLOCK ? m - b : BLOCK;                           \
            const T *s0 = (const T *)src[0] + b;                                 \
            for (int64_t i = 0; i < k; i++) acc[i] = LOAD(s0[i]);               \
            for (int j = 1; j < n_src; j++) {                                    \
                const T *sj = (const T *)src[j] + b;                             \
                for (int64_t i = 0; i < k; i++) acc[i] += LOAD(sj[i]);          \
            }                                                                    \
            for (int64_t i = 0; i < k; i++) out[b + i] = STORE(acc[i]);         \
        }                                                                        \
    }

REDUCE(reduce_f32, float, F32_LOAD, F32_STORE)
REDUCE(reduce_bf16, uint16_t, bf_load, bf_store)
#ifdef __FLT16_MAX__
REDUCE(reduce_f16, _Float16, F16_LOAD, F16_STORE)
#endif

int shm_comm_has_f16(void) {
#ifdef __FLT16_MAX__
    return 1;
#else
    return 0;
#endif
}

/* data (n elements of dtype) = the sum over ranks of everyone's data, in place. */
int shm_comm_all_reduce(void *h, void *data, int64_t n, int dtype) {
    comm_t *c = h;
    size_t es = dtype == DT_F32 ? 4 : 2;
    if (dtype == DT_F16 && !shm_comm_has_f16()) return ERR_DTYPE;
    if (dtype < DT_F32 || dtype > DT_F16) return ERR_DTYPE;
    if (__atomic_load_n(abort_flag(c), __ATOMIC_ACQUIRE)) return ERR_ABORTED;
    uint32_t tag = make_tag((uint64_t)dtype, (uint64_t)n, 0);
    int64_t chunk = (int64_t)(c->slot_bytes / es);
    const void *src[MAX_WORLD];
    for (int64_t off = 0; off < n; off += chunk) {
        int64_t m = n - off < chunk ? n - off : chunk;
        uint8_t *mine = (uint8_t *)data + off * es;
        uint64_t s = ++c->seq;
        memcpy(slot(c, c->rank, s), mine, (size_t)m * es);
        int rc = exchange(c, s, tag);
        if (rc != OK) return rc;
        for (int j = 0; j < c->world; j++) src[j] = j == c->rank ? mine : slot(c, j, s);
        if (dtype == DT_F32) reduce_f32((float *)mine, src, c->world, m);
        else if (dtype == DT_BF16) reduce_bf16((uint16_t *)mine, src, c->world, m);
#ifdef __FLT16_MAX__
        else reduce_f16((_Float16 *)mine, src, c->world, m);
#endif
    }
    return OK;
}

/* Rank j's src (nbytes, rows of row_bytes) goes to dst viewed as [rows][world][row_bytes]:
 * torch.cat along the dimension whose trailing size is row_bytes. */
int shm_comm_all_gather(void *h, const void *src, void *dst, int64_t nbytes, int64_t row_bytes) {
    comm_t *c = h;
    if (row_bytes <= 0 || nbytes % row_bytes) return ERR_ARGS;
    if (__atomic_load_n(abort_flag(c), __ATOMIC_ACQUIRE)) return ERR_ABORTED;
    uint32_t tag = make_tag(OP_GATHER, (uint64_t)nbytes, (uint64_t)row_bytes);
    int64_t chunk = (int64_t)c->slot_bytes, out_row = row_bytes * c->world;
    for (int64_t off = 0; off < nbytes; off += chunk) {
        int64_t m = nbytes - off < chunk ? nbytes - off : chunk;
        const uint8_t *mine = (const uint8_t *)src + off;
        uint64_t s = ++c->seq;
        memcpy(slot(c, c->rank, s), mine, (size_t)m);
        int rc = exchange(c, s, tag);
        if (rc != OK) return rc;
        for (int j = 0; j < c->world; j++) {
            const uint8_t *from = j == c->rank ? mine : slot(c, j, s);
            /* bytes [off, off + m) of rank j's input, cut at row boundaries */
            for (int64_t k = off; k < off + m;) {
                int64_t row = k / row_bytes, col = k % row_bytes;
                int64_t len = row_bytes - col < off + m - k ? row_bytes - col : off + m - k;
                memcpy((uint8_t *)dst + row * out_row + j * row_bytes + col, from + (k - off), (size_t)len);
                k += len;
            }
        }
    }
    return OK;
}
