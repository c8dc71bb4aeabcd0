/*
 * pymirror.h - the one public header of the pymirror C core.
 *
 * pymirror keeps a mirror of a block volume and restores the volume from it
 * while the host keeps using it.  This header is the whole C API: track
 * tables (bit-packed atomic bitmaps), stores (file and memory backends),
 * and pairs (state machine, background copier, host I/O arbitration).
 *
 * Conventions (see docs/c-api.md):
 *  - Every function that can fail returns 0 (or a non-negative count) on
 *    success and a negative code on failure: a negated errno (-EIO, -ENOMEM,
 *    -EINVAL, ...) or one of the PM_E_* codes below (all below -4096).
 *    pm_strerror(code) names every code; pm_last_error() gives a thread-local
 *    message for the last failure on this thread, prefixed by the function's
 *    name ("pm_pair_write: offset 4096+512 is beyond the volume size 4096").
 *  - Constructors return the object through an out-parameter.  Every
 *    create/open has a destroy; destroy(NULL) is a no-op.
 *  - The core never prints, never aborts on a recoverable error, and never
 *    keeps a pointer to caller memory beyond the call.
 *  - "Thread-safe" means any number of threads may call it at once on the
 *    same object.  "Caller-serialised" means the caller must not run it
 *    concurrently with any other call on the same object.
 *  - Structs that grow (struct pm_copy_config, struct pm_progress, struct
 *    pm_store_ops) begin with `uint32_t size`: the caller sets it to
 *    sizeof(the struct) as its header declares it.  New fields are only ever
 *    added at the end, so a program built against an older header keeps
 *    working with a newer library: an input struct shorter than the
 *    library's gets defaults for the fields it lacks; an output struct is
 *    filled only up to its size; bytes of a longer (newer) struct that this
 *    library does not know are zeroed on output and must be zero on input
 *    (-E2BIG otherwise).  size 0 means the size of the first sized version
 *    (0.2), so zero-initialised structs stay valid forever.
 *    pm_copy_config_default fills the 0.2 fields and sets size accordingly;
 *    pm_copy_config_init(cfg, sizeof *cfg) fills whatever your header has.
 *
 * The block between PM_CDEF_BEGIN and PM_CDEF_END is fed, minus preprocessor
 * lines, to cffi's cdef by pymirror/_build.py: keep it plain C declarations
 * (no macros, no _Atomic, no inline functions, no attributes).
 */
#ifndef PYMIRROR_H
#define PYMIRROR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* PM_CDEF_BEGIN */

/* ---- versions and errors ------------------------------------------------ */

enum {
    PM_VERSION_MAJOR = 0,
    PM_VERSION_MINOR = 2
};

enum pm_error {
    PM_OK = 0,
    PM_E_RANGE = -4097,     /* offset, length or index outside the object */
    PM_E_ALIGN = -4098,     /* an offset or length is not aligned as required */
    PM_E_GEOMETRY = -4099,  /* bad volume or track size, or two volumes differ */
    PM_E_STATE = -4100,     /* the command is not allowed in the pair's state */
    PM_E_READONLY = -4101,  /* the volume is write-protected in this state */
    PM_E_CORRUPT = -4102,   /* metadata fails its magic, checksum or bounds */
    PM_E_FOREIGN = -4103,   /* metadata of another version, pair or volume */
    PM_E_JOB = -4104,       /* the copy job stopped on an error (see progress) */
    PM_E_TIMEDOUT = -4105,  /* a wait ran out of time; nothing is wrong */
    PM_E_CLOSED = -4106,    /* the object is closing or closed */
    PM_E_BUSY = -4107,      /* a volume or metadata file is in use by another pair */
    PM_E_OUTSIDE = -4108,   /* a volume was changed outside pymirror (incremental refused) */
    PM_E_DETACHED = -4109,  /* the mirror is detached after an error (not a point-in-time image) */
    PM_E_NOLIB = -4110      /* an optional library (librbd, libnbd, TLS) is not installed */
};

/* Name of a code: "Input/output error", "pair is in the wrong state", ...
 * Never NULL; unknown codes give "unknown error".  Thread-safe. */
const char *pm_strerror(int code);

/* The message of the last failed call on this thread ("" if none).  The
 * pointer stays valid until the next pymirror call on this thread. */
const char *pm_last_error(void);

/* ---- bitmaps -------------------------------------------------------------
 *
 * A fixed-size array of bits, packed into uint64_t words (bit i lives in word
 * i / 64, at bit position i % 64), with a summary level of one bit per word
 * ("this word may be non-zero") so that scans skip empty regions.  All single-
 * bit operations are atomic; range and whole-map operations are atomic per
 * word.  Every function is thread-safe unless marked otherwise.  Indexes
 * out of range return PM_E_RANGE and change nothing.
 */
typedef struct pm_bitmap pm_bitmap;

int pm_bitmap_create(uint64_t nbits, pm_bitmap **out);
void pm_bitmap_destroy(pm_bitmap *bm);

uint64_t pm_bitmap_size(const pm_bitmap *bm);        /* bits */
uint64_t pm_bitmap_nwords(const pm_bitmap *bm);      /* ceil(bits / 64) */
/* The word array (nwords words, bits past the size always zero).  Read-only
 * for callers: writing through it bypasses the summary level. */
const uint64_t *pm_bitmap_words(const pm_bitmap *bm);

int pm_bitmap_get(const pm_bitmap *bm, uint64_t bit);            /* 0, 1 or <0 */
int pm_bitmap_set(pm_bitmap *bm, uint64_t bit);                  /* old value */
int pm_bitmap_clear(pm_bitmap *bm, uint64_t bit);                /* old value */
int pm_bitmap_test_and_set(pm_bitmap *bm, uint64_t bit);         /* old value */
int pm_bitmap_test_and_clear(pm_bitmap *bm, uint64_t bit);       /* old value */
/* Set or clear bits [start, start+count); returns how many bits changed. */
int64_t pm_bitmap_set_range(pm_bitmap *bm, uint64_t start, uint64_t count);
int64_t pm_bitmap_clear_range(pm_bitmap *bm, uint64_t start, uint64_t count);
int pm_bitmap_fill(pm_bitmap *bm);           /* set every bit */
int pm_bitmap_zero(pm_bitmap *bm);           /* clear every bit */

uint64_t pm_bitmap_count(const pm_bitmap *bm);                   /* set bits */
uint64_t pm_bitmap_count_range(const pm_bitmap *bm, uint64_t start, uint64_t count);
/* First set (clear) bit at or after `from`; -1 if none (also if from >= size). */
int64_t pm_bitmap_next_set(const pm_bitmap *bm, uint64_t from);
int64_t pm_bitmap_next_clear(const pm_bitmap *bm, uint64_t from);
/* The first run of set bits starting at or after `from`: *start is its first
 * bit, *len its length capped at max_len (max_len >= 1).  Returns 1 if a run
 * was found, 0 if no bit is set at or after `from`. */
int pm_bitmap_next_run(const pm_bitmap *bm, uint64_t from, uint64_t max_len,
                       uint64_t *start, uint64_t *len);
/* Write the indexes of up to `max` set bits at or after `from` into out[];
 * returns how many were written (0 when none are left).  The way to
 * enumerate bits from Python without a per-bit call. */
int64_t pm_bitmap_collect(const pm_bitmap *bm, uint64_t from, uint64_t *out, uint64_t max);

/* dst |= src, dst &= src, dst &= ~src.  Same size required (PM_E_GEOMETRY). */
int pm_bitmap_union(pm_bitmap *dst, const pm_bitmap *src);
int pm_bitmap_intersect(pm_bitmap *dst, const pm_bitmap *src);
int pm_bitmap_subtract(pm_bitmap *dst, const pm_bitmap *src);
int pm_bitmap_copy(pm_bitmap *dst, const pm_bitmap *src);      /* dst = src */
int pm_bitmap_equal(const pm_bitmap *a, const pm_bitmap *b);   /* 1, 0 or <0 */

/* Stable serialisation: ceil(nbits / 8) bytes, bit i in byte i / 8 at bit
 * i % 8 (little-endian), independent of the host's byte order.  Loading
 * rejects a wrong length (PM_E_GEOMETRY) or set bits past the size
 * (PM_E_CORRUPT) and leaves the bitmap unchanged. */
uint64_t pm_bitmap_serial_size(const pm_bitmap *bm);
int pm_bitmap_save(const pm_bitmap *bm, void *buf, uint64_t len);
int pm_bitmap_load(pm_bitmap *bm, const void *buf, uint64_t len);

/* Debug check of internal invariants (summary level consistent with the
 * words, no bits past the size).  0 if sound, PM_E_CORRUPT otherwise.
 * Caller-serialised: only meaningful when no other thread modifies bm. */
int pm_bitmap_validate(const pm_bitmap *bm);

/* Which popcount implementation the run-time dispatch chose:
 * "avx512-vpopcntdq", "popcnt" or "portable". */
const char *pm_popcount_impl(void);

/* ---- track tables --------------------------------------------------------
 *
 * The geometry of one volume (its size cut into tracks of track_size bytes,
 * the last one possibly shorter) and its per-track flag bitmaps.
 */
enum pm_flag {
    PM_PENDING = 0,   /* this side's copy of the track is stale; the other side holds the valid data */
    PM_CHANGED = 1,   /* written since the last split (or since the last establish/restore began) */
    PM_BUSY = 2,      /* claimed by a copier or a host I/O for arbitration */
    PM_NFLAGS = 3
};

enum {
    PM_TRACK_SIZE_MIN = 4096,
    PM_TRACK_SIZE_MAX = 16777216,
    PM_TRACK_SIZE_DEFAULT = 65536
};

typedef struct pm_table pm_table;

/* track_size: a power of two in [PM_TRACK_SIZE_MIN, PM_TRACK_SIZE_MAX];
 * volume_size: > 0 (need not be a multiple of track_size). */
int pm_table_create(uint64_t volume_size, uint32_t track_size, pm_table **out);
void pm_table_destroy(pm_table *t);
uint64_t pm_table_volume_size(const pm_table *t);
uint32_t pm_table_track_size(const pm_table *t);
uint64_t pm_table_tracks(const pm_table *t);
uint32_t pm_table_last_track_size(const pm_table *t);
/* The flag's bitmap, owned by the table (NULL for an unknown flag). */
pm_bitmap *pm_table_flag(pm_table *t, int flag);
/* The track holding a byte offset, and a track's first byte and length. */
int64_t pm_table_track_of(const pm_table *t, uint64_t offset);
int pm_table_track_span(const pm_table *t, uint64_t track, uint64_t *offset, uint32_t *length);

/* ---- stores --------------------------------------------------------------
 *
 * The bytes behind a volume.  All I/O functions are thread-safe and
 * positional; a short read or write is retried inside until done or failed.
 */
typedef struct pm_store pm_store;

enum pm_store_flags {
    PM_STORE_READONLY = 1,  /* open read-only */
    PM_STORE_CREATE = 2,    /* create a new sparse file of `size` bytes; fail if it exists */
    PM_STORE_DIRECT = 4,    /* O_DIRECT where the filesystem supports it */
    PM_STORE_NOLOCK = 8     /* do not take the volume's lock (tools that only look) */
};

/* A regular file or block device.  Without PM_STORE_CREATE, size is ignored
 * and the store's size is the file's or device's size (must be > 0).
 * Ownership: unless PM_STORE_NOLOCK, the volume is locked for the store's
 * lifetime, so a volume belongs to one pair at a time: a regular file with
 * flock (exclusive when writable, shared when read-only), a block device by
 * opening it O_EXCL.  A second open (in this or another process) fails with
 * PM_E_BUSY, the message naming the volume and, when /proc/locks shows it,
 * the holder's pid. */
int pm_store_open_file(const char *path, unsigned flags, uint64_t size, pm_store **out);
/* A zero-filled volume in memory (for tests and scratch pairs). */
int pm_store_create_memory(uint64_t size, pm_store **out);
void pm_store_destroy(pm_store *s);

uint64_t pm_store_size(const pm_store *s);
/* The path given at open ("" for memory stores); owned by the store. */
const char *pm_store_path(const pm_store *s);
int pm_store_read(pm_store *s, void *buf, uint64_t len, uint64_t offset);
int pm_store_write(pm_store *s, const void *buf, uint64_t len, uint64_t offset);
int pm_store_flush(pm_store *s);   /* fdatasync for files */

/* ---- stores of your own --------------------------------------------------
 *
 * A tool gives pymirror its own volumes by filling a table of callbacks;
 * the built-in file, memory and volatile stores are tables like it.  Every
 * callback gets the `ctx` given to pm_store_create_ops, returns 0 (or a
 * count) or a negative errno / PM_E_* code, and may be called from several
 * threads at once (reads and writes of different ranges run concurrently;
 * the pair never issues overlapping writes at once).  Bounds are checked
 * before a callback is called.  Ownership: pm_store_destroy calls close(ctx)
 * once (after lock(ctx, PM_LOCK_RELEASE) if it locked); until
 * pm_store_create_ops succeeds, ctx stays the caller's.
 *
 * Required: read, write (the whole length, or an error), flush (what was
 * written is durable), close.  Optional, NULL for "not offered":
 *  - write_zeroes(len, offset, flags): zeroes, PM_ZERO_PUNCH allowing the
 *    store to deallocate; -EOPNOTSUPP or NULL: pymirror writes zero buffers.
 *  - extents(offset, len, out, max): describe [offset, offset+len) from its
 *    start as up to max consecutive extents (data, hole, or zero), returning
 *    how many; NULL or -EOPNOTSUPP: all data.
 *  - identity(buf, len): a NUL-terminated string naming the volume itself
 *    (not the path to it: "file:DEV:INO", "rbd:pool/image@id", ...), so two
 *    names of one volume can be told apart; NULL: the name (unnamed: the
 *    store object).  A pair refuses a standard and mirror of one identity.
 *  - lock(mode): PM_LOCK_EXCLUSIVE (writable) or PM_LOCK_SHARED (read-only)
 *    when the store is created, unless PM_STORE_NOLOCK; PM_E_BUSY when
 *    another owner holds it; PM_LOCK_RELEASE before close.
 *  - submit(io): start an asynchronous I/O and return 0 (then the store
 *    calls pm_io_complete(io, result) exactly once, from any thread, maybe
 *    before submit returns) or a negative code (then it never completes).
 *    pm_store_submit does the I/O synchronously for stores without it.
 *  - change_stamp(buf, len) (0.3): a NUL-terminated string (under 128
 *    bytes) that changes whenever anyone may have written the volume, such
 *    as a file's "size=..,ino=..,mtime=..,ctime=.."; pymirror records it at
 *    each commit and, after a clean close, compares it at open to find
 *    writes made behind its back.  NULL or -EOPNOTSUPP: the store cannot
 *    tell (remote stores, disks), and query says so.
 *
 * Growth: size first (see the conventions on top); a shorter, older table
 * has NULL for the callbacks it lacks.
 */
enum pm_extent_kind { PM_EXTENT_DATA = 0, PM_EXTENT_HOLE = 1, PM_EXTENT_ZERO = 2 };

struct pm_extent {
    uint64_t offset;
    uint64_t length;
    uint32_t kind;             /* enum pm_extent_kind; a hole reads as zeroes */
    uint32_t reserved;
};

enum pm_zero_flags { PM_ZERO_PUNCH = 1 };
enum pm_lock_mode { PM_LOCK_RELEASE = 0, PM_LOCK_SHARED = 1, PM_LOCK_EXCLUSIVE = 2 };
enum pm_io_op { PM_IO_READ = 1, PM_IO_WRITE = 2, PM_IO_FLUSH = 3, PM_IO_WRITE_ZEROES = 4 };

/* One asynchronous I/O: filled by the submitter, which owns it (and its
 * buffer) until done is called. */
struct pm_io {
    uint32_t op;               /* enum pm_io_op */
    uint32_t flags;            /* PM_ZERO_PUNCH for write-zeroes */
    void *buf;                 /* read into / write from (len bytes) */
    uint64_t len;
    uint64_t offset;
    void (*done)(struct pm_io *io, int result);   /* called once: 0 or a negative code */
    void *user;                /* the submitter's */
};

struct pm_store_ops {
    uint32_t size;             /* sizeof(struct pm_store_ops), or 0: see the growth rule on top */
    uint32_t reserved;         /* 0 */
    int (*read)(void *ctx, void *buf, uint64_t len, uint64_t offset);
    int (*write)(void *ctx, const void *buf, uint64_t len, uint64_t offset);
    int (*flush)(void *ctx);
    void (*close)(void *ctx);
    int (*write_zeroes)(void *ctx, uint64_t len, uint64_t offset, unsigned flags);
    int64_t (*extents)(void *ctx, uint64_t offset, uint64_t len, struct pm_extent *out, uint64_t max);
    int (*identity)(void *ctx, char *buf, size_t len);
    int (*lock)(void *ctx, int mode);
    int (*submit)(void *ctx, struct pm_io *io);
    /* -- 0.3, branch metatrust (issue 16) -- */
    int (*change_stamp)(void *ctx, char *buf, size_t len);
};

/* A store over a caller's callbacks: `size` bytes, `name` used in messages
 * and recorded as the volume's path by pm_pair_create_meta; flags:
 * PM_STORE_READONLY, PM_STORE_NOLOCK.  The table is copied. */
int pm_store_create_ops(const struct pm_store_ops *ops, void *ctx, uint64_t size, const char *name,
                        unsigned flags, pm_store **out);
/* The optional calls, with their fallbacks, on any store (thread-safe). */
int pm_store_write_zeroes(pm_store *s, uint64_t len, uint64_t offset, unsigned flags);
int64_t pm_store_extents(pm_store *s, uint64_t offset, uint64_t len, struct pm_extent *out, uint64_t max);
int pm_store_identity(pm_store *s, char *buf, size_t len);
/* Asynchronous I/O: 0 when started (io->done will be called), else an error
 * (io->done will not be called). */
int pm_store_submit(pm_store *s, struct pm_io *io);
/* Called by a store's submit path when an I/O finishes. */
void pm_io_complete(struct pm_io *io, int result);

/* Injected faults, for tests: the next `count` reads (or writes) that touch
 * [offset, offset+len) fail with `error` (a negative errno such as -EIO or
 * -ENOSPC); count -1 means until cleared by pm_store_clear_faults. */
enum pm_fault_op { PM_FAULT_READ = 1, PM_FAULT_WRITE = 2 };
int pm_store_inject_fault(pm_store *s, int op, uint64_t offset, uint64_t len, int error, int64_t count);
int pm_store_clear_faults(pm_store *s);

/* A memory volume with a volatile write cache, for crash tests: a write is
 * visible at once but durable only after pm_store_flush.  Stores created
 * with the same `share_power_with` store (NULL: a new line) share one power
 * line; all their I/O is serialised on it. */
int pm_store_create_volatile(uint64_t size, pm_store *share_power_with, pm_store **out);
/* Cut the power of the line: on every store of it, each write since its
 * last flush is kept whole, dropped, or kept in random 512-byte pieces
 * (chosen from `seed`); from then on every I/O fails with -EIO.  Returns
 * how many unflushed writes there were. */
int64_t pm_store_power_loss(pm_store *s, uint64_t seed);
/* Power back on: the stores hold what survived. */
int pm_store_power_on(pm_store *s);

/* ---- pairs ---------------------------------------------------------------
 *
 * A standard volume (the host's) and its mirror, their track tables, the
 * pair's state, and one background copy job at a time.  The states:
 *
 *   NEW --establish--> SYNCING --(copy done)--> ESTABLISHED --split--> SPLIT
 *   SPLIT/RESTORED --establish--> SYNCING
 *   SPLIT/RESTORED --restore--> RESTORING --(copy done)--> RESTORED (protect)
 *                                                     \--> ESTABLISHED (no protect)
 *   SYNCING/ESTABLISHED --(mirror error on a host write)--> DETACHED --establish--> SYNCING
 *
 * The pair borrows its two stores: they must outlive it.  All pair functions
 * are thread-safe.
 */
typedef struct pm_pair pm_pair;

enum pm_state {
    PM_STATE_NEW = 0,
    PM_STATE_SYNCING = 1,
    PM_STATE_ESTABLISHED = 2,
    PM_STATE_SPLIT = 3,
    PM_STATE_RESTORING = 4,
    PM_STATE_RESTORED = 5,
    PM_STATE_DETACHED = 6      /* the mirror failed on a host write: see pm_pair_detach_info */
};

enum pm_side { PM_STANDARD = 0, PM_MIRROR = 1 };

enum pm_read_policy {
    PM_READ_REDIRECT = 0,   /* a read of a PENDING track is served from the source side */
    PM_READ_HYDRATE = 1     /* ... or the track is copied first, then served */
};

enum pm_io_flags { PM_IO_FUA = 1 };

struct pm_copy_config {
    uint32_t size;          /* sizeof(struct pm_copy_config), or 0: see the growth rule on top */
    uint32_t copiers;       /* copier threads, 1 to 64; 0 (the default) = chosen from the stores */
    uint32_t batch_bytes;   /* largest copy I/O, a multiple of the track size;
                               0 (the default) = chosen from the stores (docs/copier.md) */
    uint64_t rate_bytes;    /* bytes per second for the background copy, 0 = unlimited */
    uint32_t retries;       /* attempts per failed track copy before the job pauses (default 3) */
    int32_t read_policy;    /* enum pm_read_policy */
    /* -- 0.3 fields, branch pace (issue 13) -- */
    int32_t pace;           /* enum pm_pace: PM_PACE_AUTO (0, the default) or PM_PACE_OFF */
    int32_t order;          /* enum pm_order: PM_ORDER_HOT (0, the default) or PM_ORDER_ASCENDING */
    uint32_t latency_factor_milli;  /* host p99 target as a multiple of its idle baseline, in
                               thousandths, 1000 to 1000000; 0 (the default) = 2000 (2x) */
    uint32_t reserved0;     /* 0 */
    uint64_t latency_target_ns;     /* host p99 target as a time (ns, up to 60 s); 0 = the factor */

};

/* Fill a config with the defaults above (the fields of version 0.2; size
 * is set to their size).  pm_copy_config_init fills `size` bytes, whatever
 * the caller's header version: call it as pm_copy_config_init(&c, sizeof c).
 * -EINVAL if size is too small to hold the size field. */
void pm_copy_config_default(struct pm_copy_config *cfg);
int pm_copy_config_init(struct pm_copy_config *cfg, size_t size);

/* Output of pm_pair_progress: set size (e.g. struct pm_progress pr =
 * { sizeof pr };) before the call. */
struct pm_progress {
    uint32_t size;             /* sizeof(struct pm_progress), or 0: see the growth rule on top */
    int32_t state;             /* enum pm_state */
    int32_t running;           /* 1 while a copy job exists and has not finished */
    int32_t paused;            /* 1 while paused by request or by an error */
    int32_t error;             /* 0, or the code that paused the job */
    int64_t error_track;       /* the track that failed, or -1 */
    int32_t incremental;       /* the current/last job was incremental */
    int32_t protect;           /* the current/last restore is protected */
    uint64_t tracks_total;     /* tracks marked PENDING when the job began */
    uint64_t tracks_pending;   /* tracks still PENDING now */
    uint64_t tracks_copied;    /* tracks copied by the copier or by hydrating reads */
    uint64_t tracks_skipped;   /* tracks whose copy a whole-track host write made unnecessary */
    uint64_t tracks_merged;    /* partial host writes merged with the source's track */
    uint64_t reads_redirected; /* host reads of PENDING tracks served from the source */
    uint64_t reads_hydrated;   /* host reads that copied their track first */
    uint64_t bytes_read;       /* bytes the job read from the source (copies and merges) */
    uint64_t bytes_written;    /* bytes the job wrote to the target (copies and merges) */
    uint64_t changed_standard; /* tracks CHANGED on the standard now */
    uint64_t changed_mirror;   /* tracks CHANGED on the mirror now */
    double elapsed;            /* seconds since the job began (frozen when it ends) */
    uint64_t commits;          /* metadata commits since the pair was opened */
    uint64_t syncs;            /* data and metadata syncs those commits made */
    uint64_t mirror_invalid;   /* mirror tracks not part of a point-in-time image (0: consistent) */
    /* -- 0.3 fields, branch pace (issue 13) -- */
    /* Host I/O on the standard during the job, as the arbitration times it
     * (the last window the pacing judged; 0 = no samples): p50 / p99 in ns. */
    uint64_t host_read_p50_ns, host_read_p99_ns;
    uint64_t host_write_p50_ns, host_write_p99_ns;
    uint64_t host_flush_p50_ns, host_flush_p99_ns;
    /* The idle baselines (p99 of host I/O while the copy was quiet; 0 = not known yet). */
    uint64_t idle_read_p99_ns, idle_write_p99_ns, idle_flush_p99_ns;
    /* Host writes that merged a PENDING track (they read the source's track): p50 / p99, idle p99. */
    uint64_t host_merge_p50_ns, host_merge_p99_ns, idle_merge_p99_ns;
    uint64_t pace_rate;        /* bytes/s the pacing lets the copy go now; 0 = full speed (or pacing off) */
    uint64_t tracks_hot;       /* tracks the copier took first because the host used them */
    uint64_t pace_quiet;       /* quiet windows the pacing took to learn the baseline */

    /* -- 0.3 fields, branch sparse (issue 13) -- */
    uint64_t bytes_zeroed;     /* bytes the job zeroed on the target (holes and zero tracks of the
                                  source: punched, not copied); not in bytes_read/bytes_written */

    /* -- 0.3 fields, branch compare (issue 16) -- */
    int32_t compare;           /* the current/last job began by comparing the sides (--compare) */
    int32_t comparing;         /* 1 while that job's compare phase runs (copiers start after it) */
    uint64_t tracks_compared;  /* tracks the compare phase has compared so far */
    uint64_t tracks_equal;     /* tracks it found equal: no copy (their PENDING bit cleared) */
    uint64_t compare_bytes;    /* bytes the compare phase read from both sides */

};

/* A new pair over two stores of equal size, in state NEW. */
int pm_pair_create(pm_store *standard, pm_store *mirror, uint32_t track_size, pm_pair **out);
/* Stops the copier (the job stays resumable from the tables) and frees. */
void pm_pair_destroy(pm_pair *p);

int pm_pair_state(const pm_pair *p);                 /* enum pm_state */
const char *pm_state_name(int state);                /* "new", "syncing", ... */
pm_table *pm_pair_table(pm_pair *p, int side);       /* owned by the pair */
uint64_t pm_pair_size(const pm_pair *p);
uint32_t pm_pair_track_size(const pm_pair *p);

/* Commands.  Each checks the state (PM_E_STATE, with a message naming the
 * state and what is allowed) and the config (-EINVAL), and returns at once:
 * the copy runs on copier threads.  A pair has at most one job. */
int pm_pair_establish(pm_pair *p, int incremental, const struct pm_copy_config *cfg);
int pm_pair_split(pm_pair *p);
/* NEW -> ESTABLISHED without copying, for two volumes the caller knows to
 * be identical (e.g. both freshly created, hence all zeroes).  Like mdadm's
 * --assume-clean: if they are not identical, nothing will notice. */
int pm_pair_assume_established(pm_pair *p);
int pm_pair_restore(pm_pair *p, int incremental, int protect, const struct pm_copy_config *cfg);

/* Job control.  wait returns 0 when no job is running (done), PM_E_TIMEDOUT
 * when timeout_ms passed first (timeout_ms < 0 waits forever), or PM_E_JOB
 * if the job is paused on an error.  pause/resume return PM_E_STATE when
 * there is no job; resume also clears an error pause and retries. */
int pm_pair_wait(pm_pair *p, int64_t timeout_ms);
int pm_pair_pause(pm_pair *p);
int pm_pair_resume(pm_pair *p);
int pm_pair_set_rate(pm_pair *p, uint64_t rate_bytes);
int pm_pair_progress(const pm_pair *p, struct pm_progress *out);

/* End an establish (SYNCING, running or paused): the copy stops, the
 * tracks still PENDING on the mirror become CHANGED(mirror) (a later
 * incremental establish copies them), the pair goes to SPLIT, and the mirror
 * is marked inconsistent: pm_pair_mirror_invalid gives how many tracks are
 * invalid, persisted in the metadata, and restore is refused until an
 * establish completes.  A restore cannot be cancelled (PM_E_STATE: the
 * standard depends on the mirror until it is done; pause it instead).
 * Committed before it returns. */
int pm_pair_cancel(pm_pair *p);
/* Mirror tracks that are not part of a point-in-time image: while syncing,
 * the tracks still PENDING on the mirror; after a cancelled establish, the
 * count it left; 0 once an establish completes. */
uint64_t pm_pair_mirror_invalid(const pm_pair *p);

/* Host I/O, arbitrated against the copier per track.  side PM_STANDARD is
 * the host's volume; PM_MIRROR is allowed for reads whenever the mirror is
 * consistent and for writes only when split or restored (PM_E_READONLY
 * otherwise).  Out-of-range I/O returns PM_E_RANGE and does nothing. */
int pm_pair_read(pm_pair *p, int side, void *buf, uint64_t len, uint64_t offset);
int pm_pair_write(pm_pair *p, int side, const void *buf, uint64_t len, uint64_t offset, unsigned flags);
int pm_pair_write_zeroes(pm_pair *p, int side, uint64_t len, uint64_t offset, unsigned flags);
int pm_pair_flush(pm_pair *p, int side);

/* The I/O barrier, for acting on a group of pairs at one instant.
 * pm_pair_hold_io: from now on host writes, write-zeroes and flushes on
 * either side block at the pair's barrier, and the call returns once those
 * already in flight have completed.  Reads and the background copy go on.
 * Holds nest (each hold needs one release).  While held, the holding thread
 * may give commands (split, restore, establish, ...), but a host write from
 * it would wait for itself.  pm_pair_release_io lets blocked I/O go on;
 * PM_E_STATE if not held.  Release every hold before pm_pair_destroy.
 * Thread-safe. */
int pm_pair_hold_io(pm_pair *p);
int pm_pair_release_io(pm_pair *p);

/* Compare the two sides track by track, writing the numbers of up to `max`
 * differing tracks at or after track `from` into out[]; returns how many,
 * and sets *next to the track to continue from (tracks when done).  Only
 * meaningful while no job runs.  Both sides are read at once, in bounded
 * memory (the engine of pm_pair_compare, below, with progress and cancel). */
int64_t pm_pair_verify(pm_pair *p, uint64_t from, uint64_t *out, uint64_t max, uint64_t *next);

/* ---- persistence ---------------------------------------------------------
 *
 * A pair's durable state lives in one metadata file (format and commit
 * protocol: docs/format.md): the geometry and identity of both volumes,
 * their paths, the state, the job's kind, and the track tables.
 */
enum { PM_PATH_MAX = 4096 };

struct pm_meta_info {
    int32_t state;                 /* enum pm_state as last committed */
    int32_t incremental;
    int32_t protect;
    uint32_t track_size;
    uint64_t volume_size;
    uint64_t generation;           /* bumped by every state change */
    char standard_path[4096];      /* as given at creation */
    char mirror_path[4096];
    int32_t error;                 /* the code that paused the job, or 0 */
    int64_t error_track;           /* ... at this track, or -1 */
    uint64_t mirror_invalid;       /* see pm_pair_mirror_invalid */
};

/* Read a metadata file's header without opening the pair (to find the
 * volumes' paths).  Writes nothing.  PM_E_CORRUPT / PM_E_FOREIGN / -ENOENT. */
int pm_meta_peek(const char *meta_path, struct pm_meta_info *out);
/* Like pm_pair_create, and also create the metadata file (it must not
 * exist); the stores' paths are recorded in it. */
int pm_pair_create_meta(const char *meta_path, pm_store *standard, pm_store *mirror,
                        uint32_t track_size, pm_pair **out);
/* Open a pair from its metadata.  The stores must be the ones it names (same
 * size and identity, else PM_E_FOREIGN).  A pair that was SYNCING or
 * RESTORING comes back in that state with its job paused: host I/O is
 * arbitrated at once, and pm_pair_resume continues the copy. */
int pm_pair_open_meta(const char *meta_path, pm_store *standard, pm_store *mirror, pm_pair **out);
/* The same on a store of your own (for instance the simulated volatile
 * cache below): at least pm_meta_size() bytes; the pair borrows it. */
uint64_t pm_meta_size(uint64_t volume_size, uint32_t track_size);
int pm_pair_create_meta_store(pm_store *meta, pm_store *standard, pm_store *mirror,
                              uint32_t track_size, pm_pair **out);
int pm_pair_open_meta_store(pm_store *meta, pm_store *standard, pm_store *mirror, pm_pair **out);
/* Make the pair's current state and tables durable (a no-op without a
 * metadata file). */
int pm_pair_commit(pm_pair *p);
/* Settings for the current and later jobs (used by resume after open). */
int pm_pair_configure(pm_pair *p, const struct pm_copy_config *cfg);

/* ---- branch pace: latency-aware pacing, hot tracks first, exact rate (issue 13) ---- */

enum pm_pace { PM_PACE_AUTO = 0, PM_PACE_OFF = 1 };
enum pm_order { PM_ORDER_HOT = 0, PM_ORDER_ASCENDING = 1 };

/* ---- branch sparse: holes and zeros, block status, plans (issue 13) ---- */

/* pm_pair_write_zeroes flag: the range may be deallocated (a hole punched
 * in a file, a discard that guarantees zeroes or BLKZEROOUT on a block
 * device), as NBD's TRIM and WRITE_ZEROES without NO_HOLE allow.  Without
 * it the zeroes stay allocated.  Either way the tracks are marked CHANGED
 * and, where the pair mirrors writes, the mirror is zeroed the same way. */
enum pm_pair_zero_flags { PM_IO_PUNCH = 256 };

/* What pm_pair_block_status describes:
 *  PM_CONTEXT_ALLOCATION: what a read of the side returns, as the stores
 *    report it: kind PM_EXTENT_DATA, PM_EXTENT_HOLE (reads as zeroes,
 *    not allocated) or PM_EXTENT_ZERO (reads as zeroes).  During a restore
 *    a PENDING track of the standard is described by the mirror's extents
 *    (a read is served from there).
 *  PM_CONTEXT_PENDING: kind 1 for tracks still PENDING on the side (not yet
 *    restored or established: a read is served from the other side), 0 for
 *    local ones. */
enum pm_block_context { PM_CONTEXT_ALLOCATION = 0, PM_CONTEXT_PENDING = 1 };

/* Describe [offset, offset+len) of a side from offset on as up to `max`
 * consecutive extents (adjacent ones of one kind merged); returns how many
 * (fewer than the range needs when max runs out: ask again from the end of
 * the last).  PM_E_RANGE outside the volume, -EINVAL for a bad side,
 * context or max 0.  Thread-safe; a snapshot (host I/O may change it). */
int64_t pm_pair_block_status(pm_pair *p, int side, int context, uint64_t offset, uint64_t len,
                             struct pm_extent *out, uint64_t max);

/* ---- branch compare: comparing the two sides in C, compare-restore, adopt (issue 16) ---- */

/* Comparing the two sides (docs/compare.md).  Two reader threads, one per
 * side, read batches of whole tracks ahead of the comparing thread into a
 * ring of a few buffers each, so memory is bounded (2 sides x 3 batches of
 * 4 MiB) and both volumes are read at once.
 *
 * A pm_compare is a handle to follow and stop a compare from another
 * thread: pass it to pm_pair_compare (or pm_pair_adopt); read its progress
 * with pm_compare_progress and stop it with pm_compare_cancel (the compare
 * then returns -ECANCELED) at any time, from any thread (a cancel given
 * before the compare starts stops it at once).  One compare at a time per
 * handle; a handle may be reused after the compare returned. */
typedef struct pm_compare pm_compare;

struct pm_compare_progress {
    uint32_t size;             /* sizeof(struct pm_compare_progress), or 0 (this version) */
    int32_t running;           /* 1 while a compare runs with this handle */
    uint64_t tracks_total;     /* tracks to compare */
    uint64_t tracks_done;      /* tracks compared so far */
    uint64_t tracks_differ;    /* ... of which differ */
    uint64_t bytes_read;       /* data bytes read from the two sides */
    uint64_t tracks_hashed;    /* track-sides compared by the store's hash instead of its data */
    double elapsed;            /* seconds since the compare began (frozen when it ends) */
};

int pm_compare_create(pm_compare **out);
void pm_compare_destroy(pm_compare *c);
int pm_compare_cancel(pm_compare *c);                                  /* thread-safe */
int pm_compare_progress(const pm_compare *c, struct pm_compare_progress *out);   /* thread-safe */

/* Compare tracks [first, first+count) of the two sides (count 0: to the
 * end), setting the bit of every differing track in `out` (a bitmap of
 * pm_pair's track count; other bits are left as they are).  Blocks until
 * done; returns the number of differing tracks, -ECANCELED when cancelled,
 * or a read error naming the side and track.  It reads the volumes
 * directly, not through the host's arbitration: run it while no job runs
 * (a host write racing it can make one track compare either way).  `c`
 * may be NULL. */
int64_t pm_pair_compare(pm_pair *p, uint64_t first, uint64_t count, pm_bitmap *out, pm_compare *c);

/* establish / restore whose PENDING set is computed by comparing: the job
 * begins like a full one (every track PENDING on the target, the host may
 * use the pair at once, arbitrated as usual), then a compare phase clears
 * PENDING on every track found equal that the host has not written since
 * the job began (decided under the track's lock, so a host write is never
 * missed: a written track stays PENDING and is copied), and only then do
 * the copiers start, copying exactly the tracks that differ (plus those the
 * host wrote meanwhile, which the arbitration may already have settled).
 * Progress: pm_progress.compare/comparing/tracks_compared/tracks_equal.
 * States as pm_pair_establish (new, split, restored) and pm_pair_restore
 * (split, restored; a consistent mirror).  Returns at once. */
int pm_pair_establish_compare(pm_pair *p, const struct pm_copy_config *cfg);
int pm_pair_restore_compare(pm_pair *p, int protect, const struct pm_copy_config *cfg);

/* A NEW pair over two existing volumes: compare them, mark every differing
 * track CHANGED on both sides (and keep what the host wrote meanwhile),
 * and move to SPLIT, so an incremental establish or restore copies exactly
 * those.  Blocks; `c` (may be NULL) follows or cancels it.  Returns the
 * number of differing tracks; on error or cancel the pair stays NEW. */
int64_t pm_pair_adopt(pm_pair *p, pm_compare *c);

/* Per-track hashes, for a store whose data is far away: a store may offer
 * a function that hashes tracks next to the data (CRC-32C of each whole
 * track of [offset, offset+len), track_size bytes each, the last one
 * possibly shorter, into out[]), so a compare moves 4 bytes per track
 * instead of the track.  When either side offers one, both sides are
 * compared by hash (the other side hashes what it reads).  hash NULL
 * withdraws the offer.  Not thread-safe against a compare in progress. */
int pm_store_set_track_hash(pm_store *s,
                            int (*hash)(void *ctx, uint64_t offset, uint64_t len, uint32_t track_size,
                                        uint32_t *out),
                            void *ctx);
/* The tracks' hashes of any store: its offered hash, else read and hashed
 * here.  Thread-safe. */
int pm_store_track_hashes(pm_store *s, uint64_t offset, uint64_t len, uint32_t track_size, uint32_t *out);
/* A hash function to offer for a pm_store given as ctx, hashing its data
 * where the store runs (what an NBD or RBD server would do on its side). */
int pm_store_crc32c_tracks(void *store, uint64_t offset, uint64_t len, uint32_t track_size, uint32_t *out);

/* ---- branch metatrust: volume identity, changes outside pymirror, metadata check and relocate (issue 16) ---- */

/* A store's change stamp (see change_stamp above): 0, or -EOPNOTSUPP when
 * the store cannot tell (buf is then ""). */
int pm_store_change_stamp(pm_store *s, char *buf, size_t len);

/* What opening a pair found about one of its volumes (docs/format.md). */
enum pm_outside {
    PM_OUTSIDE_NONE = 0,         /* checked: unchanged since the pair was last closed cleanly */
    PM_OUTSIDE_CHANGED = 1,      /* changed outside pymirror: incremental jobs refused (PM_E_OUTSIDE) */
    PM_OUTSIDE_UNCHECKED = 2,    /* not checked: the pair was not closed cleanly (its own writes moved the times) */
    PM_OUTSIDE_UNDETECTABLE = 3, /* the store cannot tell (a disk, a remote volume) */
    PM_OUTSIDE_NO_STAMP = 4      /* nothing recorded yet (a format-1 file): checked from the next clean close */
};

struct pm_volume_trust {
    uint32_t size;               /* sizeof(struct pm_volume_trust), or 0 */
    int32_t outside;             /* enum pm_outside */
    int32_t identity_stable;     /* 1: the identity names the volume itself, not device numbers */
    int32_t identity_recorded;   /* 1: the metadata records it and open checked it */
    char identity[256];          /* what the store says it is now */
    char note[256];              /* the finding in words (for query) */
};
/* Side PM_STANDARD or PM_MIRROR.  A pair without a metadata file reports
 * PM_OUTSIDE_UNDETECTABLE. */
int pm_pair_volume_trust(pm_pair *p, int side, struct pm_volume_trust *out);
/* Accept the CHANGED tables although a volume was changed outside
 * pymirror (--trust): incremental jobs are allowed again; persisted with
 * the next commit.  A full establish or restore does the same by itself. */
int pm_pair_trust(pm_pair *p);

/* A warning left by the last metadata read on this thread ("" if none):
 * e.g. that the newer header slot was damaged and the older one used.
 * pm_meta_peek, pm_pair_open_meta and pm_meta_check set or clear it. */
const char *pm_meta_last_warning(void);

/* The health of a metadata file, slot by slot, without opening the pair
 * (writes nothing).  Returns 0 when it could be read at all (see the
 * slots), else -errno. */
struct pm_meta_slot_health {
    int32_t status;              /* 0 valid, else the code that makes it invalid */
    uint32_t version;            /* format version found (0: no header) */
    uint64_t generation;
    int32_t state;               /* enum pm_state as recorded */
    int32_t clean;               /* closed cleanly */
    uint32_t ntables;            /* tables checked (6 in a valid slot) */
    uint32_t tables_bad;         /* bit i: table i fails its CRC-32C */
    uint32_t table_crc[6];       /* as recorded */
    char why[256];               /* "" or why the slot is invalid */
};
struct pm_meta_health {
    uint32_t size;               /* sizeof(struct pm_meta_health), or 0 */
    int32_t current;             /* the slot a pair would use, or -1 */
    uint64_t file_size, needed_size;
    struct pm_meta_slot_health slot[2];
};
int pm_meta_check(const char *meta_path, struct pm_meta_health *out);

/* Open a pair whose volumes moved: `standard` and `mirror` replace the
 * recorded volumes after checking that they are the same volumes (size,
 * and the checksums of a sample of tracks recorded at the last clean
 * close; PM_E_FOREIGN naming the first mismatch).  The new paths and
 * identities are committed before it returns. */
int pm_pair_relocate_meta(const char *meta_path, pm_store *standard, pm_store *mirror, pm_pair **out);

/* ---- branch detach: a failing mirror detaches, FUA-light (issue 16) ---- */

/* A failing mirror never fails the host.  When a host write (or flush)
 * succeeds on the standard but fails on the mirror while SYNCING or
 * ESTABLISHED, the pair goes to PM_STATE_DETACHED: the host's I/O succeeds,
 * the mirror is no point-in-time image any more, every track it may have
 * missed is CHANGED, and the error, its track and its time are committed to
 * the metadata.  From DETACHED: establish (full or incremental) repairs the
 * mirror; restore and split fail with PM_E_DETACHED; pm_pair_wait on the
 * establish that was running returns PM_E_DETACHED.  The record stays
 * (error != 0) until an establish completes. */
struct pm_detach_info {
    int32_t error;             /* the mirror's error (a negative code), or 0: not detached */
    int32_t reserved;
    int64_t track;             /* the first track of the failed write, or -1 */
    double time;               /* when, in seconds since the Unix epoch (UTC) */
};
/* Thread-safe.  -EINVAL for NULL arguments. */
int pm_pair_detach_info(const pm_pair *p, struct pm_detach_info *out);

/* ---- branch nbdstore: NBD volumes over libnbd, loaded at run time (issue 14) ---- */

/* A volume on an NBD server (docs/volumes.md), through libnbd, which is
 * loaded at run time: PM_E_NOLIB, naming the Debian package libnbd0, when
 * it is missing.  uri: libnbd's forms, nbd://HOST[:PORT]/EXPORT,
 * nbd+unix:///EXPORT?socket=PATH (nbds:// with TLS), plus pymirror's own
 * query parameters, which libnbd does not see:
 *   qd=N       requests in flight per I/O, 1 to 64 (default 8): a large
 *              read or write is split into up to N concurrent requests
 *   conns=N    connections at most, 1 to 16 (default 4), used only when the
 *              server advertises multi-conn (else 1)
 *   timeout=S  seconds of silence from the server before an I/O fails and
 *              the connection is dropped, 0 = wait forever (default 30)
 * flags: PM_STORE_READONLY, PM_STORE_NOLOCK (NBD has no lock: the store
 * takes none).  The store's path is uri as given; its identity is
 * "nbd:EXPORT:SIZE@SERVER".  A connection that breaks is closed and the
 * next I/O connects again. */
int pm_store_open_nbd(const char *uri, unsigned flags, pm_store **out);

/* ---- branch rbd: RBD volumes over librbd, loaded at run time (issue 14) ---- */

/* An RBD image in a Ceph cluster (docs/volumes.md).  librbd and librados
 * are loaded at run time: without them every call below fails with
 * PM_E_NOLIB, its message naming the Debian package (librbd1).  Strings
 * are copied; NULL or "" means "not given". */
struct pm_rbd_config {
    uint32_t size;             /* sizeof(struct pm_rbd_config), or 0 */
    uint32_t qd;               /* requests in flight inside one read or write, 1 to 256; 0: 8 */
    const char *pool;          /* required */
    const char *image;         /* required */
    const char *snap;          /* a snapshot of the image: opened read-only */
    const char *conf;          /* ceph.conf; none: librados's search ($CEPH_CONF, /etc/ceph/CLUSTER.conf) */
    const char *id;            /* the client's id (client.ID); none: admin */
    const char *cluster;       /* the cluster's name; none: ceph */
    uint32_t timeout;          /* seconds before a stalled OSD, monitor or mount fails a request; 0: 30 */
    uint32_t reserved;         /* 0 */
};
/* 0 when librbd can be loaded, else PM_E_NOLIB (thread-safe). */
int pm_rbd_available(void);
/* Open an image (or a snapshot, read-only) as a store.  `name` is used in
 * messages and recorded as the volume's path (pymirror passes the URI);
 * NULL: "rbd:POOL/IMAGE[@SNAP]".  Flags: PM_STORE_READONLY (PM_STORE_NOLOCK
 * is accepted; RBD volumes take no lock).  Identity: "rbd:POOL/ID[@SNAP]"
 * (the image id, stable across renames).  Thread-safe I/O; a request that
 * fails because the client was cut off (blocklisted) makes the next I/O
 * reconnect. */
int pm_store_open_rbd(const struct pm_rbd_config *cfg, const char *name, unsigned flags, pm_store **out);
/* Create an image of `size` bytes with the cluster's default features
 * (-EEXIST if it exists: nothing is overwritten). */
int pm_rbd_create(const struct pm_rbd_config *cfg, uint64_t size);
/* ---- branch nbdc: the NBD request loop in C, TLS (issue 15) ---- */

/* The transmission phase of one NBD connection, after the (Python)
 * handshake: requests parsed, carried out on the pair and answered in C,
 * by a small pool of threads per connection (docs/nbd.md, "The C request
 * loop").  fd is the connected socket (borrowed: the caller closes it after
 * pm_nbd_conn_run returns); side PM_STANDARD or PM_MIRROR; flags
 * PM_NBD_STRUCTURED (structured replies were negotiated), PM_NBD_READONLY
 * (the export was offered read-only); name names the export in messages;
 * max_threads 1 to 64 (requests carried out at once); tls a session made by
 * pm_tls_start for this fd, or NULL. */
typedef struct pm_nbd_conn pm_nbd_conn;
enum pm_nbd_flags { PM_NBD_STRUCTURED = 1, PM_NBD_READONLY = 2 };
enum pm_nbd_limits { PM_NBD_MAX_REQUEST = 67108864, PM_NBD_PIECE = 4194304 };
typedef struct pm_tls pm_tls;
int pm_nbd_conn_new(int fd, pm_pair *pair, int side, unsigned flags, const char *name,
                    uint32_t max_threads, pm_tls *tls, pm_nbd_conn **out);
/* Meta context ids negotiated for NBD_CMD_BLOCK_STATUS (-1: not negotiated):
 * base:allocation and pymirror:pending.  Before pm_nbd_conn_run. */
int pm_nbd_conn_set_contexts(pm_nbd_conn *c, int64_t allocation_id, int64_t pending_id);
/* Serve until the client disconnects, breaks the protocol, or stop/abort;
 * returns when every request is answered and every thread has ended
 * (0, or a negative errno if a thread could not be started at all). */
int pm_nbd_conn_run(pm_nbd_conn *c);
/* Drain (any thread): read no further requests; those received and not
 * started get ESHUTDOWN, those being carried out finish. */
void pm_nbd_conn_stop(pm_nbd_conn *c);
/* Cut the connection off now (a client that reads no replies). */
void pm_nbd_conn_abort(pm_nbd_conn *c);
/* The pair is about to be freed: wait for the requests using it, then
 * answer later ones ESHUTDOWN without touching it. */
void pm_nbd_conn_detach(pm_nbd_conn *c);
/* Counters: requests answered, of them errors. */
uint64_t pm_nbd_conn_requests(const pm_nbd_conn *c);
uint64_t pm_nbd_conn_errors(const pm_nbd_conn *c);
void pm_nbd_conn_free(pm_nbd_conn *c);

/* TLS through GnuTLS, loaded at run time (dlopen of libgnutls.so.30;
 * PM_E_NOLIB naming Debian's libgnutls30 when it is missing).  Credentials:
 * x509 from a directory in the layout qemu-nbd and nbdkit use (ca-cert.pem
 * optional, server-cert.pem, server-key.pem), or PSK from a psktool file
 * ("username:hexkey" lines).  x509 flags: PM_TLS_VERIFY_PEER, clients must
 * present a certificate signed by the CA of ca-cert.pem (then required),
 * and not revoked by ca-crl.pem if that file exists. */
typedef struct pm_tls_creds pm_tls_creds;
enum pm_tls_flags { PM_TLS_VERIFY_PEER = 1 };
int pm_tls_creds_x509(const char *dir, unsigned flags, pm_tls_creds **out);
int pm_tls_creds_psk(const char *file, pm_tls_creds **out);
void pm_tls_creds_free(pm_tls_creds *c);
/* The server side of a TLS handshake on fd (after NBD_OPT_STARTTLS was
 * acknowledged), at most timeout_ms; the session borrows creds and fd. */
int pm_tls_start(pm_tls_creds *creds, int fd, int timeout_ms, pm_tls **out);
/* Bytes received (0: the peer closed) or sent, or a negative error; both
 * may be called at once from two threads (one receiving, one sending). */
int64_t pm_tls_recv(pm_tls *t, void *buf, uint64_t len);
int64_t pm_tls_send(pm_tls *t, const void *buf, uint64_t len);
/* Bytes received and not read yet: decrypted, or taken off the socket and
 * not decrypted yet (part of a record, perhaps). */
uint64_t pm_tls_pending(pm_tls *t);
/* Who the client is: for PSK the user name it gave; for x509 with
 * PM_TLS_VERIFY_PEER its certificate's distinguished name; else "". */
const char *pm_tls_user(pm_tls *t);
void pm_tls_free(pm_tls *t);

/* PM_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* PYMIRROR_H */
