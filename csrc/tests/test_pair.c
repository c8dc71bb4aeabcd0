/* test_pair.c - stores and pairs without Python: state machine errors,
 * exact restores, whole/partial writes to PENDING tracks, reads of PENDING
 * tracks, incremental byte counts, failing stores, and the metadata file. */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pymirror.h"
#include "check.h"

#define TS 4096u
#define NT 24u
#define SIZE (NT * TS - 100)   /* a short last track */

static pm_pair *new_pair(pm_store **a, pm_store **b)
{
    pm_pair *p = NULL;
    CHECK_EQ(pm_store_create_memory(SIZE, a), 0);
    CHECK_EQ(pm_store_create_memory(SIZE, b), 0);
    CHECK_EQ(pm_pair_create(*a, *b, TS, &p), 0);
    return p;
}

static void fill(pm_pair *p, int side, unsigned char base)
{
    static unsigned char buf[TS];
    for (uint64_t t = 0; t < NT; t++) {
        memset(buf, base + (int)t, TS);
        uint64_t len = t == NT - 1 ? SIZE - t * TS : TS;
        CHECK_EQ(pm_pair_write(p, side, buf, len, t * TS, 0), 0);
    }
}

static int sides_equal(pm_pair *p)
{
    uint64_t out[NT], next;
    return pm_pair_verify(p, 0, out, NT, &next) == 0;
}

static void slow_config(struct pm_copy_config *c)
{
    pm_copy_config_default(c);
    c->rate_bytes = 1;   /* pays before copying: nothing moves until the rate is lifted */
}

static void state_machine(void)
{
    pm_store *a, *b;
    pm_pair *p = new_pair(&a, &b);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    CHECK_EQ(pm_pair_split(p), PM_E_STATE);
    CHECK(strstr(pm_last_error(), "the pair is new") != NULL);
    CHECK_EQ(pm_pair_restore(p, 0, 1, &c), PM_E_STATE);
    CHECK_EQ(pm_pair_establish(p, 1, &c), PM_E_STATE);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, "x", 1, 0, 0), PM_E_STATE);
    CHECK_EQ(pm_pair_pause(p), PM_E_STATE);
    CHECK_EQ(pm_pair_state(p), PM_STATE_NEW);
    c.copiers = 65;
    CHECK_EQ(pm_pair_establish(p, 0, &c), -EINVAL);
    pm_copy_config_default(&c);
    c.batch_bytes = TS + 1;
    CHECK_EQ(pm_pair_establish(p, 0, &c), -EINVAL);
    CHECK_EQ(pm_pair_state(p), PM_STATE_NEW);
    fill(p, PM_STANDARD, 1);
    pm_copy_config_default(&c);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_ESTABLISHED);
    CHECK(sides_equal(p));
    CHECK_EQ(pm_pair_restore(p, 0, 1, &c), PM_E_STATE);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, "x", 1, 0, 0), PM_E_READONLY);
    CHECK_EQ(pm_pair_split(p), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_SPLIT);
    char buf[8];
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, buf, 8, SIZE - 7), PM_E_RANGE);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, buf, 8, UINT64_MAX - 3, 0), PM_E_RANGE);
    CHECK_EQ(pm_pair_write(p, 7, buf, 1, 0, 0), -EINVAL);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

static void restore_cases(int incremental, int policy)
{
    pm_store *a, *b;
    pm_pair *p = new_pair(&a, &b);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    fill(p, PM_STANDARD, 1);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    fill(p, PM_STANDARD, 100);                     /* every track changed on the standard */
    unsigned char m[TS];
    memset(m, 0xAB, TS);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, m, TS, 3 * TS, 0), 0);   /* and one on the mirror */
    slow_config(&c);
    c.read_policy = policy;
    CHECK_EQ(pm_pair_restore(p, incremental, 1, &c), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORING);
    struct pm_progress pr = { .size = sizeof pr };
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.tracks_total, NT);
    /* reads see the final image at once */
    unsigned char r[TS + 10];
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, r, TS + 10, 3 * TS - 5), 0);
    CHECK(r[0] == 1 + 2 && r[5] == 0xAB && r[TS + 5] == 1 + 4);
    /* whole-track write: no copy; partial: merged */
    unsigned char w[TS];
    memset(w, 0x77, TS);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, TS, 5 * TS, 0), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, 10, 7 * TS + 100, 0), 0);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, w, 1, 0, 0), PM_E_READONLY);
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.tracks_skipped, 1);
    CHECK_EQ(pr.tracks_merged, 1);
    if (policy == PM_READ_REDIRECT)
        CHECK_EQ(pr.reads_redirected, 3);
    else
        CHECK_EQ(pr.reads_hydrated, 3);
    CHECK_EQ(pm_pair_set_rate(p, 0), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORED);
    /* final image: the mirror with the two writes laid over it */
    for (uint64_t t = 0; t < NT; t++) {
        uint64_t len = t == NT - 1 ? SIZE - t * TS : TS;
        CHECK_EQ(pm_pair_read(p, PM_STANDARD, r, len, t * TS), 0);
        for (uint64_t i = 0; i < len; i++) {
            int want = t == 3 ? 0xAB : 1 + (int)t;
            if (t == 5 || (t == 7 && i >= 100 && i < 110))
                want = 0x77;
            if (r[i] != want) {
                CHECK_EQ(r[i], want);
                break;
            }
        }
        CHECK_EQ(pm_pair_read(p, PM_MIRROR, r, len, t * TS), 0);
        CHECK_EQ(r[len - 1], t == 3 ? 0xAB : 1 + (int)t);   /* mirror untouched */
    }
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

static void incremental_counts(void)
{
    pm_store *a, *b;
    pm_pair *p = new_pair(&a, &b);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "s", 1, 2 * TS, 0), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "s", 1, (NT - 1) * TS + 3, 0), 0);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, "m", 1, 2 * TS + 9, 0), 0);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, "m", 1, 9 * TS, 0), 0);
    CHECK_EQ(pm_pair_establish(p, 1, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    struct pm_progress pr = { .size = sizeof pr };
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.tracks_total, 3);
    CHECK_EQ(pr.bytes_read, 2 * TS + (SIZE - (NT - 1) * TS));   /* the short last track counted short */
    CHECK_EQ(pr.bytes_written + pr.bytes_zeroed, pr.bytes_read);   /* zero tracks are zeroed, not written */
    CHECK(sides_equal(p));
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

static void faults(void)
{
    pm_store *a, *b;
    pm_pair *p = new_pair(&a, &b);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    fill(p, PM_MIRROR, 50);
    CHECK_EQ(pm_store_inject_fault(b, PM_FAULT_READ, 6 * TS, TS, -EIO, -1), 0);
    c.retries = 2;
    CHECK_EQ(pm_pair_restore(p, 0, 1, &c), 0);
    CHECK_EQ(pm_pair_wait(p, 10000), PM_E_JOB);
    struct pm_progress pr = { .size = sizeof pr };
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.error, -EIO);
    CHECK_EQ(pr.error_track, 6);
    CHECK_EQ(pr.paused, 1);
    CHECK(pr.tracks_pending >= 1);
    unsigned char r[TS];
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, r, 10, 6 * TS), -EIO);   /* redirected read fails cleanly */
    CHECK_EQ(pm_store_clear_faults(b), 0);
    CHECK_EQ(pm_pair_resume(p), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORED);
    CHECK(sides_equal(p));
    CHECK_EQ(pm_store_inject_fault(a, PM_FAULT_WRITE, 0, 1, 0, 1), -EINVAL);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

static void metadata(void)
{
    char dir[] = "/tmp/pm_test_XXXXXX", s_path[64], m_path[64], meta[64];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(s_path, sizeof s_path, "%s/s.img", dir);
    snprintf(m_path, sizeof m_path, "%s/m.img", dir);
    snprintf(meta, sizeof meta, "%s/p.meta", dir);
    pm_store *a, *b;
    pm_pair *p;
    CHECK_EQ(pm_store_open_file(s_path, PM_STORE_CREATE, SIZE, &a), 0);
    CHECK_EQ(pm_store_open_file(m_path, PM_STORE_CREATE, SIZE, &b), 0);
    pm_store *dup;
    CHECK_EQ(pm_store_open_file(s_path, PM_STORE_CREATE, SIZE, &dup), -EEXIST);
    CHECK(dup == NULL);
    CHECK_EQ(pm_pair_create_meta(meta, NULL, b, TS, &p), -EINVAL);
    CHECK_EQ(pm_pair_create_meta(meta, a, b, TS, &p), 0);
    pm_pair *again;
    CHECK_EQ(pm_pair_create_meta(meta, a, b, TS, &again), -EEXIST);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "z", 1, 4 * TS, 0), 0);
    slow_config(&c);
    CHECK_EQ(pm_pair_restore(p, 1, 1, &c), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "w", 1, 8 * TS, PM_IO_FUA), 0);
    pm_pair_destroy(p);   /* mid-restore */
    struct pm_meta_info info;
    CHECK_EQ(pm_meta_peek(meta, &info), 0);
    CHECK_EQ(info.state, PM_STATE_RESTORING);
    CHECK(strcmp(info.standard_path, s_path) == 0);
    pm_pair *q;
    CHECK_EQ(pm_pair_open_meta(meta, b, a, &q), PM_E_FOREIGN);   /* swapped volumes */
    CHECK_EQ(pm_pair_open_meta(meta, a, b, &q), 0);
    pm_pair *r2;
    CHECK_EQ(pm_pair_open_meta(meta, a, b, &r2), PM_E_BUSY);     /* one pair at a time */
    CHECK(strstr(pm_last_error(), meta) != NULL);
    CHECK_EQ(pm_pair_state(q), PM_STATE_RESTORING);
    struct pm_progress pr = { .size = sizeof pr };
    pm_pair_progress(q, &pr);
    CHECK_EQ(pr.paused, 1);
    CHECK_EQ(pr.tracks_pending, 1);            /* track 4: restore pending; track 8 was only written */
    CHECK_EQ(pr.changed_standard, 1);          /* track 8, written during the restore */
    CHECK_EQ(pm_pair_resume(q), 0);
    CHECK_EQ(pm_pair_wait(q, -1), 0);
    char ch;
    CHECK_EQ(pm_pair_read(q, PM_STANDARD, &ch, 1, 4 * TS), 0);
    CHECK_EQ(ch, 0);
    CHECK_EQ(pm_pair_read(q, PM_STANDARD, &ch, 1, 8 * TS), 0);
    CHECK_EQ(ch, 'w');
    pm_pair_destroy(q);
    /* corrupt both slots' headers: a clear error, nothing written */
    int fd = open(meta, O_RDWR);
    unsigned char byte = 0xFF;
    CHECK_EQ(pwrite(fd, &byte, 1, 100), 1);
    CHECK_EQ(pwrite(fd, &byte, 1, 16384 + 100), 1);
    close(fd);
    CHECK_EQ(pm_meta_peek(meta, &info), PM_E_CORRUPT);
    CHECK_EQ(pm_pair_open_meta(meta, a, b, &q), PM_E_CORRUPT);
    CHECK(strstr(pm_last_error(), "checksum") != NULL);
    fd = open(meta, O_RDWR);
    CHECK_EQ(pwrite(fd, "NOTMAGIC", 8, 0), 8);
    CHECK_EQ(pwrite(fd, "NOTMAGIC", 8, 16384), 8);
    close(fd);
    CHECK_EQ(pm_meta_peek(meta, &info), PM_E_FOREIGN);
    fd = open(meta, O_RDWR);
    CHECK_EQ(pwrite(fd, "PMIRMETA", 8, 0), 8);                   /* ours, but cut short */
    close(fd);
    CHECK_EQ(truncate(meta, 100), 0);
    CHECK_EQ(pm_meta_peek(meta, &info), PM_E_CORRUPT);
    pm_store_destroy(a);
    pm_store_destroy(b);
    unlink(s_path), unlink(m_path), unlink(meta), rmdir(dir);
}

/* Copy a file (the metadata as it is on disk at a "crash"). */
static void copy_file(const char *from, const char *to)
{
    int in = open(from, O_RDONLY), out = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    char buf[65536];
    ssize_t n;
    while ((n = read(in, buf, sizeof buf)) > 0)
        CHECK_EQ(write(out, buf, (size_t)n), n);
    close(in), close(out);
}

/* Write-intent: the metadata on disk at any instant covers every track a
 * host write has touched (by its 4 MiB intent region); after an unclean
 * stop those regions count as CHANGED, so an incremental restore misses
 * nothing. */
static void write_intent_after_crash(void)
{
    char dir[] = "/tmp/pm_crash_XXXXXX", sp[64], mp[64], meta[64], snap[64];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(sp, sizeof sp, "%s/s.img", dir);
    snprintf(mp, sizeof mp, "%s/m.img", dir);
    snprintf(meta, sizeof meta, "%s/p.meta", dir);
    snprintf(snap, sizeof snap, "%s/crash.meta", dir);
    const uint32_t ts = 65536;            /* 64 tracks per 4 MiB region */
    pm_store *a, *b;
    pm_pair *p;
    CHECK_EQ(pm_store_open_file(sp, PM_STORE_CREATE, 512ull * ts, &a), 0);
    CHECK_EQ(pm_store_open_file(mp, PM_STORE_CREATE, 512ull * ts, &b), 0);
    CHECK_EQ(pm_pair_create_meta(meta, a, b, ts, &p), 0);
    CHECK_EQ(pm_pair_assume_established(p), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "x", 1, 100ull * ts + 5, 0), 0);   /* region 1 */
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, "y", 1, 400ull * ts, 0), 0);         /* mirror, region 6 */
    copy_file(meta, snap);                                   /* the power goes out here */
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "z", 1, 300ull * ts, 0), 0);        /* never happened */
    pm_pair_destroy(p);
    copy_file(snap, meta);
    CHECK_EQ(pm_pair_open_meta(meta, a, b, &p), 0);
    pm_bitmap *cs = pm_table_flag(pm_pair_table(p, PM_STANDARD), PM_CHANGED);
    pm_bitmap *cm = pm_table_flag(pm_pair_table(p, PM_MIRROR), PM_CHANGED);
    CHECK_EQ(pm_bitmap_count(cs), 64);                       /* all of region 1 ... */
    CHECK_EQ(pm_bitmap_get(cs, 100), 1);                     /* ... which has the written track */
    CHECK_EQ(pm_bitmap_next_set(cs, 0), 64);
    CHECK_EQ(pm_bitmap_count(cm), 64);
    CHECK_EQ(pm_bitmap_get(cm, 400), 1);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    CHECK_EQ(pm_pair_restore(p, 1, 1, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    struct pm_progress pr = { .size = sizeof pr };
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.tracks_total, 128);                          /* a superset, never less */
    char ch;
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, &ch, 1, 100ull * ts + 5), 0);
    CHECK_EQ(ch, 0);                                         /* restored */
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, &ch, 1, 400ull * ts), 0);
    CHECK_EQ(ch, 'y');                                       /* the mirror's change came over */
    pm_pair_destroy(p);
    /* a clean close: the precise tables alone */
    CHECK_EQ(pm_pair_open_meta(meta, a, b, &p), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "x", 1, 100ull * ts, 0), 0);
    pm_pair_destroy(p);
    CHECK_EQ(pm_pair_open_meta(meta, a, b, &p), 0);
    CHECK_EQ(pm_bitmap_count(pm_table_flag(pm_pair_table(p, PM_STANDARD), PM_CHANGED)), 1);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
    unlink(sp), unlink(mp), unlink(meta), unlink(snap), rmdir(dir);
}


/* ---- every command in every wrong state: PM_E_STATE, nothing changed ---- */

struct snapshot {
    int state;
    pm_bitmap *bm[2][2];   /* [side][PENDING, CHANGED] */
    struct pm_progress pr;
};

static void take(pm_pair *p, struct snapshot *s)
{
    s->state = pm_pair_state(p);
    s->pr.size = sizeof s->pr;
    pm_pair_progress(p, &s->pr);
    for (int side = 0; side < 2; side++)
        for (int f = 0; f < 2; f++) {
            pm_bitmap *src = pm_table_flag(pm_pair_table(p, side), f);
            CHECK_EQ(pm_bitmap_create(pm_bitmap_size(src), &s->bm[side][f]), 0);
            CHECK_EQ(pm_bitmap_copy(s->bm[side][f], src), 0);
        }
}

static void same_as(pm_pair *p, struct snapshot *s)
{
    CHECK_EQ(pm_pair_state(p), s->state);
    struct pm_progress pr = { .size = sizeof pr };
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.tracks_total, s->pr.tracks_total);
    CHECK_EQ(pr.tracks_copied, s->pr.tracks_copied);
    CHECK_EQ(pr.running, s->pr.running);
    for (int side = 0; side < 2; side++)
        for (int f = 0; f < 2; f++) {
            CHECK_EQ(pm_bitmap_equal(s->bm[side][f], pm_table_flag(pm_pair_table(p, side), f)), 1);
            pm_bitmap_destroy(s->bm[side][f]);
        }
}

/* Try every command; those not in `allowed` (a string of letters:
 * E establish, I incremental establish, S split, R restore, A assume) must
 * fail with PM_E_STATE, a message naming the state, and change nothing. */
static void wrong_commands(pm_pair *p, const char *allowed)
{
    struct pm_copy_config c;
    slow_config(&c);
    const char *name = pm_state_name(pm_pair_state(p));
    char want[64];
    snprintf(want, sizeof want, "the pair is %s", name);
    for (const char *cmd = "EISRA"; *cmd; cmd++) {
        if (strchr(allowed, *cmd))
            continue;
        struct snapshot snap;
        take(p, &snap);
        int rc = *cmd == 'E' ? pm_pair_establish(p, 0, &c)
               : *cmd == 'I' ? pm_pair_establish(p, 1, &c)
               : *cmd == 'S' ? pm_pair_split(p)
               : *cmd == 'R' ? pm_pair_restore(p, 0, 1, &c)
               : pm_pair_assume_established(p);
        CHECK_EQ(rc, PM_E_STATE);
        CHECK(strstr(pm_last_error(), want) != NULL);
        CHECK(strstr(pm_last_error(), "allowed") != NULL);
        same_as(p, &snap);
    }
}

static void every_wrong_state(void)
{
    pm_store *a, *b;
    pm_pair *p = new_pair(&a, &b);
    struct pm_copy_config c;
    CHECK_EQ(pm_pair_split(p), PM_E_STATE);
    CHECK(strstr(pm_last_error(), "pm_pair_split: the pair is new; split is allowed only when established") != NULL);
    wrong_commands(p, "EA");
    CHECK_EQ(pm_pair_resume(p), PM_E_STATE);
    CHECK_EQ(pm_pair_wait(p, 0), 0);                 /* no job: nothing to wait for */
    fill(p, PM_STANDARD, 9);
    slow_config(&c);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_SYNCING);
    CHECK_EQ(pm_pair_wait(p, 20), PM_E_TIMEDOUT);
    wrong_commands(p, "");
    unsigned char r[16];
    CHECK_EQ(pm_pair_read(p, PM_MIRROR, r, 16, 0), PM_E_STATE);   /* not consistent yet */
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, r, 16, 0, 0), PM_E_READONLY);
    CHECK_EQ(pm_pair_set_rate(p, 0), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_ESTABLISHED);
    wrong_commands(p, "S");
    CHECK_EQ(pm_pair_pause(p), PM_E_STATE);
    CHECK_EQ(pm_pair_read(p, PM_MIRROR, r, 16, 0), 0);             /* consistent: readable */
    CHECK_EQ(pm_pair_split(p), 0);
    wrong_commands(p, "EIR");
    slow_config(&c);
    CHECK_EQ(pm_pair_restore(p, 0, 1, &c), 0);
    wrong_commands(p, "");
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, r, 16, 0, 0), PM_E_READONLY);
    CHECK(strstr(pm_last_error(), "restoring") != NULL);
    CHECK_EQ(pm_pair_set_rate(p, 0), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORED);
    wrong_commands(p, "EIRS");
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

/* Invariants 1 and 2: a protected restore with no host writes makes the
 * standard equal to the mirror byte for byte, full and incremental, and
 * leaves the mirror as it was. */
static void exact_restore(int incremental)
{
    pm_store *a, *b;
    pm_pair *p = new_pair(&a, &b);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    c.batch_bytes = 3 * TS;                 /* batches that straddle the short last track */
    fill(p, PM_STANDARD, 1);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    /* the standard drifts on some tracks, the mirror on others */
    unsigned char w[TS];
    memset(w, 0xC3, TS);
    for (uint64_t t = 0; t < NT; t += 3)
        CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, t == NT - 1 ? 7 : TS - 1, t * TS + (t == NT - 1 ? 0 : 1), 0), 0);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, w, 5, 4 * TS + 2, 0), 0);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, w, 9, SIZE - 9, 0), 0);
    unsigned char *mir = malloc(SIZE), *got = malloc(SIZE);
    CHECK_EQ(pm_pair_read(p, PM_MIRROR, mir, SIZE, 0), 0);
    CHECK_EQ(pm_pair_restore(p, incremental, 1, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORED);
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, got, SIZE, 0), 0);
    CHECK(memcmp(got, mir, SIZE) == 0);
    CHECK_EQ(pm_pair_read(p, PM_MIRROR, got, SIZE, 0), 0);
    CHECK(memcmp(got, mir, SIZE) == 0);
    struct pm_progress pr = { .size = sizeof pr };
    pm_pair_progress(p, &pr);
    uint64_t want = incremental ? NT / 3 + 2 : NT;      /* tracks 0,3,...,21 (8), 4 and 23 */
    CHECK_EQ(pr.tracks_total, want);
    CHECK_EQ(pr.tracks_copied, want);
    CHECK_EQ(pr.tracks_pending, 0);
    CHECK_EQ(pr.running, 0);
    CHECK_EQ(pr.bytes_read, incremental ? (want - 1) * TS + (SIZE - (NT - 1) * TS) : SIZE);
    CHECK_EQ(pr.bytes_written + pr.bytes_zeroed, pr.bytes_read);   /* zero tracks are zeroed, not written */
    CHECK(pr.elapsed > 0);
    double e1 = pr.elapsed;
    pm_pair_progress(p, &pr);
    CHECK(pr.elapsed == e1);                             /* frozen at the end */
    CHECK(sides_equal(p));
    free(mir), free(got);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

/* Invariant 3 with an explicit pause: writes to PENDING tracks while the
 * copier is held, counted as skipped (whole) or merged (partial); the end
 * image is the mirror overlaid with the writes. */
static void paused_writes(void)
{
    pm_store *a, *b;
    pm_pair *p = new_pair(&a, &b);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    fill(p, PM_STANDARD, 1);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    fill(p, PM_MIRROR, 40);
    unsigned char *expect = malloc(SIZE), *got = malloc(SIZE);
    CHECK_EQ(pm_pair_read(p, PM_MIRROR, expect, SIZE, 0), 0);
    slow_config(&c);
    CHECK_EQ(pm_pair_restore(p, 0, 1, &c), 0);
    CHECK_EQ(pm_pair_pause(p), 0);
    CHECK_EQ(pm_pair_set_rate(p, 0), 0);     /* paused: still nothing moves */
    struct pm_progress pr = { .size = sizeof pr };
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.paused, 1);
    CHECK_EQ(pr.running, 1);
    CHECK_EQ(pr.error, 0);
    CHECK_EQ(pr.tracks_pending, NT);
    CHECK_EQ(pm_pair_wait(p, 10), PM_E_TIMEDOUT);
    unsigned char w[3 * TS];
    memset(w, 0x5E, sizeof w);
    /* whole tracks 2 and 3 in one write; part of 6 and part of 7 in one
     * write; the short last track whole; zeroes over part of track 10 */
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, 2 * TS, 2 * TS, 0), 0);
    memcpy(expect + 2 * TS, w, 2 * TS);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, TS, 6 * TS + 300, 0), 0);
    memcpy(expect + 6 * TS + 300, w, TS);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, SIZE - (NT - 1) * TS, (NT - 1) * TS, PM_IO_FUA), 0);
    memcpy(expect + (NT - 1) * TS, w, SIZE - (NT - 1) * TS);
    CHECK_EQ(pm_pair_write_zeroes(p, PM_STANDARD, 1000, 10 * TS + 5, 0), 0);
    memset(expect + 10 * TS + 5, 0, 1000);
    /* a second write to a track no longer PENDING goes straight through */
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, 10, 6 * TS, 0), 0);
    memcpy(expect + 6 * TS, w, 10);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, 0, 5 * TS, 0), 0);       /* length 0: nothing */
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.tracks_skipped, 3);
    CHECK_EQ(pr.tracks_merged, 3);
    CHECK_EQ(pr.tracks_copied, 0);
    CHECK_EQ(pr.tracks_pending, NT - 6);
    CHECK_EQ(pr.bytes_read, 3 * TS);            /* one mirror track read per merge */
    CHECK_EQ(pr.bytes_written, 3 * TS);
    CHECK_EQ(pr.changed_standard, 6);
    /* reads during the pause already show the final image */
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, got, SIZE, 0), 0);
    CHECK(memcmp(got, expect, SIZE) == 0);
    CHECK_EQ(pm_pair_resume(p), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORED);
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.tracks_copied, NT - 6);
    CHECK_EQ(pr.tracks_copied + pr.tracks_skipped + pr.tracks_merged, pr.tracks_total);
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, got, SIZE, 0), 0);
    CHECK(memcmp(got, expect, SIZE) == 0);
    /* split from restored keeps what differs: an incremental restore now
     * puts back exactly the mirror */
    CHECK_EQ(pm_pair_split(p), 0);
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.changed_standard, 6);
    pm_copy_config_default(&c);
    CHECK_EQ(pm_pair_restore(p, 1, 1, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.tracks_total, 6);
    CHECK(sides_equal(p));
    /* nothing changed since: an incremental restore ends at once */
    CHECK_EQ(pm_pair_restore(p, 1, 1, &c), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORED);
    CHECK_EQ(pm_pair_wait(p, 0), 0);
    free(expect), free(got);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

/* Establish: writes while syncing; an unprotected restore mirrors writes
 * and ends established; verify names the tracks that differ. */
static void syncing_and_unprotected(void)
{
    pm_store *a, *b;
    pm_pair *p = new_pair(&a, &b);
    struct pm_copy_config c;
    fill(p, PM_STANDARD, 1);
    slow_config(&c);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    unsigned char w[TS];
    memset(w, 0x3C, TS);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, TS, 4 * TS, 0), 0);       /* whole: mirror written too */
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, 100, 9 * TS + 50, 0), 0); /* partial: left PENDING */
    struct pm_progress pr = { .size = sizeof pr };
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.tracks_skipped, 1);
    CHECK_EQ(pr.tracks_pending, NT - 1);
    CHECK_EQ(pm_bitmap_get(pm_table_flag(pm_pair_table(p, PM_MIRROR), PM_PENDING), 9), 1);
    pm_pair_set_rate(p, 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_ESTABLISHED);
    CHECK(sides_equal(p));
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.bytes_read, SIZE - TS);          /* the skipped track was never copied */
    CHECK_EQ(pm_pair_split(p), 0);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, w, 1, 2 * TS, 0), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, 1, 11 * TS, 0), 0);
    uint64_t out[NT], next;
    CHECK_EQ(pm_pair_verify(p, 0, out, NT, &next), 2);
    CHECK_EQ(out[0], 2);
    CHECK_EQ(out[1], 11);
    CHECK_EQ(next, NT);
    CHECK_EQ(pm_pair_verify(p, 0, out, 1, &next), 1);
    CHECK_EQ(next, 3);
    CHECK_EQ(pm_pair_verify(p, next, out, 1, &next), 1);
    CHECK_EQ(out[0], 11);
    slow_config(&c);
    CHECK_EQ(pm_pair_restore(p, 1, 0, &c), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, 7, 2 * TS + 1, 0), 0);   /* merged, and mirrored */
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, 7, 15 * TS, 0), 0);      /* not PENDING, mirrored */
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, w, 1, 0, 0), PM_E_READONLY);
    pm_pair_set_rate(p, 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_ESTABLISHED);
    CHECK(sides_equal(p));
    unsigned char r[8];
    CHECK_EQ(pm_pair_read(p, PM_MIRROR, r, 8, 2 * TS), 0);
    CHECK(r[0] == 0x3C && r[1] == 0x3C && r[7] == 0x3C);
    CHECK_EQ(pm_pair_flush(p, PM_STANDARD), 0);
    CHECK_EQ(pm_pair_flush(p, 2), -EINVAL);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

/* A failing target (ENOSPC on the mirror) pauses an establish; bad
 * geometry and bad arguments change nothing. */
static void more_errors(void)
{
    pm_store *a, *b, *c3;
    pm_pair *p = new_pair(&a, &b);
    CHECK_EQ(pm_store_inject_fault(b, PM_FAULT_WRITE, 13 * TS + 1, 1, -ENOSPC, -1), 0);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    c.retries = 1;
    c.batch_bytes = 8 * TS;
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), PM_E_JOB);
    CHECK(strstr(pm_last_error(), "track 13") != NULL);
    struct pm_progress pr = { .size = sizeof pr };
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.error, -ENOSPC);
    CHECK_EQ(pr.error_track, 13);
    CHECK_EQ(pm_bitmap_get(pm_table_flag(pm_pair_table(p, PM_MIRROR), PM_PENDING), 13), 1);
    CHECK_EQ(pm_pair_resume(p), 0);                       /* still failing: pauses again */
    CHECK_EQ(pm_pair_wait(p, -1), PM_E_JOB);
    CHECK_EQ(pm_store_clear_faults(b), 0);
    CHECK_EQ(pm_pair_resume(p), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_ESTABLISHED);
    /* a host write that fails on the standard reports the standard's error */
    CHECK_EQ(pm_store_inject_fault(a, PM_FAULT_WRITE, 0, SIZE, -EIO, 1), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "q", 1, 5, 0), -EIO);
    CHECK_EQ(pm_store_clear_faults(a), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_ESTABLISHED);
    /* ... one that fails on the mirror succeeds and detaches the mirror */
    CHECK_EQ(pm_store_inject_fault(b, PM_FAULT_WRITE, 0, SIZE, -EIO, 1), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "q", 1, 2 * TS + 5, 0), 0);
    CHECK_EQ(pm_store_clear_faults(b), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_DETACHED);
    CHECK(strcmp(pm_state_name(PM_STATE_DETACHED), "detached") == 0);
    struct pm_detach_info di;
    CHECK_EQ(pm_pair_detach_info(p, &di), 0);
    CHECK_EQ(di.error, -EIO);
    CHECK_EQ(di.track, 2);
    CHECK(di.time > 1.7e9);
    CHECK(pm_pair_mirror_invalid(p) > 0);
    CHECK_EQ(pm_pair_restore(p, 1, 1, NULL), PM_E_DETACHED);
    CHECK(strstr(pm_last_error(), "track 2") != NULL);
    CHECK_EQ(pm_pair_split(p), PM_E_DETACHED);
    char one;
    CHECK_EQ(pm_pair_read(p, PM_MIRROR, &one, 1, 0), PM_E_DETACHED);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "r", 1, 9 * TS, 0), 0);   /* the standard alone */
    CHECK_EQ(pm_pair_flush(p, PM_STANDARD), 0);
    CHECK_EQ(pm_pair_establish(p, 1, &c), 0);                    /* repairs what it missed */
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_ESTABLISHED);
    uint64_t diff[4], nxt;
    CHECK_EQ(pm_pair_verify(p, 0, diff, 4, &nxt), 0);
    CHECK_EQ(pm_pair_detach_info(p, &di), 0);
    CHECK_EQ(di.error, 0);
    CHECK_EQ(di.track, -1);
    CHECK_EQ(pm_pair_mirror_invalid(p), 0);
    /* range errors */
    char buf[8];
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, buf, 0, SIZE), 0);
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, buf, 1, SIZE), PM_E_RANGE);
    char msg[160];
    snprintf(msg, sizeof msg, "offset %u + length 1 is beyond the volume size %u", SIZE, SIZE);
    CHECK(strstr(pm_last_error(), msg) != NULL);
    CHECK_EQ(pm_pair_write_zeroes(p, PM_STANDARD, UINT64_MAX, 1, 0), PM_E_RANGE);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, NULL, 4, 0, 0), -EINVAL);
    pm_pair_destroy(p);
    /* geometry */
    CHECK_EQ(pm_store_create_memory(SIZE + 1, &c3), 0);
    CHECK_EQ(pm_pair_create(a, c3, TS, &p), PM_E_GEOMETRY);
    snprintf(msg, sizeof msg, "%u bytes but the mirror is %u", SIZE, SIZE + 1);
    CHECK(strstr(pm_last_error(), msg) != NULL);
    CHECK_EQ(pm_pair_create(a, b, 3000, &p), PM_E_GEOMETRY);
    CHECK_EQ(pm_pair_create(a, b, 1u << 25, &p), PM_E_GEOMETRY);
    CHECK_EQ(pm_pair_create(a, a, TS, &p), PM_E_GEOMETRY);
    CHECK(p == NULL);
    pm_pair_destroy(NULL);
    pm_store_destroy(a);
    pm_store_destroy(b);
    pm_store_destroy(c3);
}

/* A write larger than one 64 MiB piece, starting and ending inside tracks,
 * over a paused restore: merged at both ends, skipped in between, and the
 * image is exact across the piece boundary. */
static void big_write_pieces(void)
{
    const uint64_t size = (70ull << 20) + 100;
    const uint64_t tracks = (size + TS - 1) / TS;
    pm_store *a, *b;
    pm_pair *p;
    CHECK_EQ(pm_store_create_memory(size, &a), 0);
    CHECK_EQ(pm_store_create_memory(size, &b), 0);
    CHECK_EQ(pm_pair_create(a, b, TS, &p), 0);
    CHECK_EQ(pm_pair_assume_established(p), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    unsigned char *img = malloc(size), *got = malloc(size);
    for (uint64_t i = 0; i < size; i++)
        img[i] = (unsigned char)(i * 7 + (i >> 12));
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, img, size, 0, 0), 0);
    struct pm_copy_config c;
    slow_config(&c);
    CHECK_EQ(pm_pair_restore(p, 0, 1, &c), 0);
    CHECK_EQ(pm_pair_pause(p), 0);
    unsigned char *w = malloc(size);
    memset(w, 0xD4, size);
    const uint64_t off = 100, len = size - 300;
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, len, off, 0), 0);
    memcpy(img + off, w, len);
    struct pm_progress pr = { .size = sizeof pr };
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.tracks_merged, 2);
    CHECK_EQ(pr.tracks_skipped, tracks - 3);   /* the short last track is not written */
    CHECK_EQ(pr.tracks_pending, 1);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, size - (tracks - 1) * TS, (tracks - 1) * TS, 0), 0);
    memcpy(img + (tracks - 1) * TS, w, size - (tracks - 1) * TS);
    CHECK_EQ(pm_pair_wait(p, -1), 0);          /* the host writes finished the job */
    CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORED);
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, got, size, 0), 0);
    CHECK(memcmp(got, img, size) == 0);
    /* zeroes over everything, in pieces too */
    CHECK_EQ(pm_pair_write_zeroes(p, PM_STANDARD, size - 1, 1, PM_IO_FUA), 0);
    memset(img + 1, 0, size - 1);
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, got, size, 0), 0);
    CHECK(memcmp(got, img, size) == 0);
    free(img), free(got), free(w);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

/* Cancel an establish: PENDING(mirror) becomes CHANGED(mirror), the pair is
 * split, the mirror is marked inconsistent (persisted), restore is refused
 * until an establish completes.  A failed establish keeps its error and the
 * invalid count across a reopen; resume clears the error. */
static void cancel_and_job_errors(void)
{
    pm_store *a, *b, *m;
    pm_pair *p;
    CHECK_EQ(pm_store_create_memory(SIZE, &a), 0);
    CHECK_EQ(pm_store_create_memory(SIZE, &b), 0);
    CHECK_EQ(pm_store_create_memory(pm_meta_size(SIZE, TS), &m), 0);
    CHECK_EQ(pm_pair_create_meta_store(m, a, b, TS, &p), 0);
    fill(p, PM_STANDARD, 10);
    CHECK_EQ(pm_pair_cancel(p), PM_E_STATE);                 /* new: nothing to cancel */
    CHECK_EQ(pm_pair_mirror_invalid(p), 0);
    struct pm_copy_config c;
    slow_config(&c);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_mirror_invalid(p), NT);                /* syncing: every track still to copy */
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "abc", 3, 2 * TS + 9, 0), 0);
    CHECK_EQ(pm_pair_cancel(p), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_SPLIT);
    CHECK_EQ(pm_pair_mirror_invalid(p), NT);
    struct pm_progress pr = { .size = sizeof pr };
    CHECK_EQ(pm_pair_progress(p, &pr), 0);
    CHECK_EQ(pr.running, 0);
    CHECK_EQ(pr.mirror_invalid, NT);
    CHECK_EQ(pr.changed_mirror, NT);                         /* PENDING became CHANGED */
    CHECK_EQ(pr.tracks_pending, 0);
    CHECK_EQ(pm_pair_wait(p, 0), 0);                         /* no job left */
    CHECK_EQ(pm_pair_cancel(p), PM_E_STATE);
    pm_copy_config_default(&c);
    CHECK_EQ(pm_pair_restore(p, 1, 1, &c), PM_E_STATE);
    CHECK(strstr(pm_last_error(), "24 of its tracks") != NULL);
    CHECK(strstr(pm_last_error(), "establish again") != NULL);
    CHECK_EQ(pm_pair_state(p), PM_STATE_SPLIT);
    pm_pair_destroy(p);
    /* persisted */
    CHECK_EQ(pm_pair_open_meta_store(m, a, b, &p), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_SPLIT);
    CHECK_EQ(pm_pair_mirror_invalid(p), NT);
    CHECK_EQ(pm_pair_restore(p, 0, 1, &c), PM_E_STATE);
    /* an incremental establish copies them and clears the mark */
    CHECK_EQ(pm_pair_establish(p, 1, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_ESTABLISHED);
    CHECK_EQ(pm_pair_mirror_invalid(p), 0);
    CHECK(sides_equal(p));
    CHECK_EQ(pm_pair_split(p), 0);
    /* a failing establish: paused with its error, mirror invalid while syncing */
    fill(p, PM_STANDARD, 70);
    CHECK_EQ(pm_store_inject_fault(b, PM_FAULT_WRITE, 5 * TS, 1, -ENOSPC, -1), 0);
    c.retries = 1;
    CHECK_EQ(pm_pair_establish(p, 1, &c), 0);
    CHECK_EQ(pm_pair_wait(p, 10000), PM_E_JOB);
    CHECK_EQ(pm_pair_progress(p, &pr), 0);
    CHECK_EQ(pr.error, -ENOSPC);
    CHECK_EQ(pr.error_track, 5);
    CHECK(pr.mirror_invalid >= 1);
    pm_pair_destroy(p);
    CHECK_EQ(pm_pair_open_meta_store(m, a, b, &p), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_SYNCING);
    CHECK_EQ(pm_pair_progress(p, &pr), 0);
    CHECK_EQ(pr.paused, 1);
    CHECK_EQ(pr.error, -ENOSPC);                             /* the error survived the reopen */
    CHECK_EQ(pr.error_track, 5);
    CHECK(pr.mirror_invalid >= 1);
    CHECK_EQ(pm_pair_wait(p, 1000), PM_E_JOB);
    CHECK_EQ(pm_pair_restore(p, 0, 1, &c), PM_E_STATE);
    /* resume (still failing): the error comes back; cancel: split, invalid */
    CHECK_EQ(pm_pair_resume(p), 0);
    CHECK_EQ(pm_pair_wait(p, 10000), PM_E_JOB);
    uint64_t left = pm_pair_mirror_invalid(p);
    CHECK(left >= 1);
    CHECK_EQ(pm_pair_cancel(p), 0);
    CHECK_EQ(pm_pair_mirror_invalid(p), left);
    CHECK_EQ(pm_pair_progress(p, &pr), 0);
    CHECK_EQ(pr.error, 0);
    pm_pair_destroy(p);
    CHECK_EQ(pm_pair_open_meta_store(m, a, b, &p), 0);
    CHECK_EQ(pm_pair_progress(p, &pr), 0);
    CHECK_EQ(pr.error, 0);
    CHECK_EQ(pr.mirror_invalid, left);
    CHECK_EQ(pm_pair_state(p), PM_STATE_SPLIT);
    /* the fault again, then resume after it clears: error gone for good */
    CHECK_EQ(pm_pair_establish(p, 1, &c), 0);
    CHECK_EQ(pm_pair_wait(p, 10000), PM_E_JOB);
    pm_pair_destroy(p);
    CHECK_EQ(pm_pair_open_meta_store(m, a, b, &p), 0);
    CHECK_EQ(pm_pair_progress(p, &pr), 0);
    CHECK_EQ(pr.error, -ENOSPC);
    CHECK_EQ(pm_store_clear_faults(b), 0);
    CHECK_EQ(pm_pair_resume(p), 0);
    CHECK_EQ(pm_pair_progress(p, &pr), 0);
    CHECK_EQ(pr.error, 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_mirror_invalid(p), 0);
    pm_pair_destroy(p);
    CHECK_EQ(pm_pair_open_meta_store(m, a, b, &p), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_ESTABLISHED);
    CHECK_EQ(pm_pair_progress(p, &pr), 0);
    CHECK_EQ(pr.error, 0);
    CHECK_EQ(pr.mirror_invalid, 0);
    CHECK(sides_equal(p));
    /* a restore cannot be cancelled: the reason and "pause" are given */
    CHECK_EQ(pm_pair_split(p), 0);
    slow_config(&c);
    CHECK_EQ(pm_pair_restore(p, 0, 1, &c), 0);
    CHECK_EQ(pm_pair_cancel(p), PM_E_STATE);
    CHECK(strstr(pm_last_error(), "depends on the mirror") != NULL);
    CHECK(strstr(pm_last_error(), "pause") != NULL);
    CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORING);
    pm_pair_destroy(p);
    pm_store_destroy(m);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

/* Structs that grow: older (shorter) and newer (longer) callers. */
static void abi_growth(void)
{
    pm_store *a, *b;
    pm_pair *p = new_pair(&a, &b);
    /* a config as a program built before read_policy existed would pass it */
    struct pm_copy_config c;
    memset(&c, 0xAB, sizeof c);
    CHECK_EQ(pm_copy_config_init(&c, offsetof(struct pm_copy_config, read_policy)), 0);
    CHECK_EQ(c.size, offsetof(struct pm_copy_config, read_policy));
    CHECK_EQ(c.copiers, 0);                                 /* 0: chosen from the stores */
    CHECK_EQ((unsigned)c.read_policy, 0xABABABABu);       /* beyond its size: untouched */
    CHECK_EQ(pm_pair_configure(p, &c), 0);                  /* the missing field gets its default */
    CHECK_EQ(pm_copy_config_init(&c, 2), -EINVAL);
    /* a newer program's longer config: zero tail accepted, set fields refused */
    struct { struct pm_copy_config c; uint64_t future; } big;
    CHECK_EQ(pm_copy_config_init(&big.c, sizeof big), 0);
    CHECK_EQ(big.future, 0);
    CHECK_EQ(pm_pair_configure(p, &big.c), 0);
    big.future = 7;
    CHECK_EQ(pm_pair_configure(p, &big.c), -E2BIG);
    CHECK(strstr(pm_last_error(), "does not know") != NULL);
    /* size 0: the first sized version */
    memset(&c, 0, sizeof c);
    c.copiers = 1, c.batch_bytes = TS, c.retries = 1;
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    pm_copy_config_default(&c);
    CHECK_EQ(c.size, 32);                                   /* 0.2's size (0.3 grew it: branch pace) */
    CHECK(sizeof c > 32);
    /* 0.3 fields: pacing, order, latency target */
    CHECK_EQ(pm_copy_config_init(&c, sizeof c), 0);
    CHECK_EQ(c.pace, PM_PACE_AUTO);
    CHECK_EQ(c.order, PM_ORDER_HOT);
    CHECK_EQ(c.latency_factor_milli, 2000);
    CHECK_EQ(c.latency_target_ns, 0);
    c.pace = 2;
    CHECK_EQ(pm_pair_configure(p, &c), -EINVAL);
    CHECK(strstr(pm_last_error(), "pace") != NULL);
    c.pace = PM_PACE_OFF, c.order = 7;
    CHECK_EQ(pm_pair_configure(p, &c), -EINVAL);
    CHECK(strstr(pm_last_error(), "order") != NULL);
    c.order = PM_ORDER_ASCENDING, c.latency_factor_milli = 500;
    CHECK_EQ(pm_pair_configure(p, &c), -EINVAL);
    CHECK(strstr(pm_last_error(), "factor") != NULL);
    c.latency_factor_milli = 0, c.latency_target_ns = 61000000000ull;
    CHECK_EQ(pm_pair_configure(p, &c), -EINVAL);
    c.latency_target_ns = 5000000;
    CHECK_EQ(pm_pair_configure(p, &c), 0);
    /* progress into a shorter struct: nothing written past its size */
    struct { struct pm_progress pr; uint64_t guard; } out;
    memset(&out, 0x77, sizeof out);
    out.pr.size = offsetof(struct pm_progress, commits);
    CHECK_EQ(pm_pair_progress(p, &out.pr), 0);
    CHECK_EQ(out.pr.state, PM_STATE_ESTABLISHED);
    CHECK_EQ(out.pr.size, offsetof(struct pm_progress, commits));
    CHECK_EQ(out.pr.commits, 0x7777777777777777ull);
    CHECK_EQ(out.guard, 0x7777777777777777ull);
    /* into a longer one: the unknown tail reads 0 */
    out.pr.size = sizeof out;
    CHECK_EQ(pm_pair_progress(p, &out.pr), 0);
    CHECK_EQ(out.pr.size, sizeof out.pr);
    CHECK_EQ(out.guard, 0);
    struct pm_progress zero;
    memset(&zero, 0, sizeof zero);
    CHECK_EQ(pm_pair_progress(p, &zero), 0);
    CHECK_EQ(zero.state, PM_STATE_ESTABLISHED);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

/* A mirror whose flush fails too (a loop device over a full filesystem,
 * a dying disk): its own write errors pause the job, and the paused job's
 * error is still recorded in the metadata -- the commit that records it does
 * not sync the failing volume -- so a reopened pair still says why. */
struct flaky { pm_store *mem; int fail_flush; };
static int flaky_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
    return pm_store_read(((struct flaky *)ctx)->mem, buf, len, off);
}
static int flaky_write(void *ctx, const void *buf, uint64_t len, uint64_t off)
{
    return pm_store_write(((struct flaky *)ctx)->mem, buf, len, off);
}
static int flaky_flush(void *ctx) { return ((struct flaky *)ctx)->fail_flush ? -EIO : 0; }
static void flaky_close(void *ctx) { (void)ctx; }

static void error_recorded_when_the_mirror_cannot_sync(void)
{
    struct flaky fm = { NULL, 0 };
    pm_store *a, *b, *meta;
    CHECK_EQ(pm_store_create_memory(SIZE, &a), 0);
    CHECK_EQ(pm_store_create_memory(SIZE, &fm.mem), 0);
    struct pm_store_ops ops = { .size = sizeof ops, .read = flaky_read, .write = flaky_write,
                                .flush = flaky_flush, .close = flaky_close };
    CHECK_EQ(pm_store_create_ops(&ops, &fm, SIZE, "flaky mirror", PM_STORE_NOLOCK, &b), 0);
    CHECK_EQ(pm_store_create_memory(pm_meta_size(SIZE, TS), &meta), 0);
    pm_pair *p;
    CHECK_EQ(pm_pair_create_meta_store(meta, a, b, TS, &p), 0);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    c.retries = 1;
    CHECK_EQ(pm_store_inject_fault(b, PM_FAULT_WRITE, 5 * TS, TS, -EIO, -1), 0);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    fm.fail_flush = 1;                         /* from now on the mirror cannot sync either */
    CHECK_EQ(pm_pair_wait(p, -1), PM_E_JOB);
    pm_pair_destroy(p);                       /* its closing commit syncs the mirror: fails */
    CHECK_EQ(pm_pair_open_meta_store(meta, a, b, &p), 0);
    struct pm_progress pr = { .size = sizeof pr };
    CHECK_EQ(pm_pair_progress(p, &pr), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_SYNCING);
    CHECK_EQ(pr.error, -EIO);                  /* still there after the "restart" */
    CHECK_EQ(pr.error_track, 5);
    /* a host write then detaches it; the record is committed although the
     * mirror cannot sync, and survives too */
    char buf[TS];
    memset(buf, 7, TS);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, buf, TS, 5 * TS, PM_IO_FUA), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_DETACHED);
    CHECK_EQ(pm_pair_flush(p, PM_STANDARD), 0);
    pm_pair_destroy(p);
    CHECK_EQ(pm_pair_open_meta_store(meta, a, b, &p), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_DETACHED);
    struct pm_detach_info di;
    CHECK_EQ(pm_pair_detach_info(p, &di), 0);
    CHECK_EQ(di.error, -EIO);
    CHECK_EQ(di.track, 5);
    fm.fail_flush = 0;
    CHECK_EQ(pm_store_clear_faults(b), 0);
    CHECK_EQ(pm_pair_establish(p, 1, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    uint64_t diff[2], nxt;
    CHECK_EQ(pm_pair_verify(p, 0, diff, 2, &nxt), 0);
    pm_pair_destroy(p);
    pm_store_destroy(meta);
    pm_store_destroy(b);
    pm_store_destroy(fm.mem);
    pm_store_destroy(a);
}

int main(void)
{
    state_machine();
    every_wrong_state();
    exact_restore(0);
    exact_restore(1);
    paused_writes();
    syncing_and_unprotected();
    more_errors();
    big_write_pieces();
    restore_cases(0, PM_READ_REDIRECT);
    restore_cases(1, PM_READ_HYDRATE);
    incremental_counts();
    faults();
    metadata();
    write_intent_after_crash();
    cancel_and_job_errors();
    abi_growth();
    error_recorded_when_the_mirror_cannot_sync();
    return CHECK_DONE("test_pair");
}
