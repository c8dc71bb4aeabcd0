/* test_upgrade.c - the in-place upgrade of format-1 metadata survives a
 * power cut at each of its writes.
 *
 * A pair is left restoring, its job paused on an error mid-copy (a protected
 * full restore; the variant "unclean" also loses power before it could close).
 * Its metadata is then rewritten as format 1 wrote it (version 1, nothing
 * past the format-1 fields: what tests/data/format1/ holds, written by that
 * release).  The standard, the mirror and the metadata live on volatile
 * stores sharing one power line (store_volatile.c).  Opening the pair
 * upgrades the file in place; the metadata store counts its writes and cuts
 * the power right after write k, for every k of the upgrade and many seeds
 * (each unflushed write kept, dropped or torn in 512-byte pieces).  After
 * power comes back the pair must open, in the state and with the tables the
 * un-cut upgrade gives, both header slots must then be format 2, and the
 * resumed restore must make the standard equal to the untouched mirror.
 *
 *   ./test_upgrade                     (PM_UPGRADE_SEEDS=200 for more)
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "pymirror.h"
#include "check.h"

#define TS 16384u
#define NTRK 64u
#define VOL ((uint64_t)NTRK * TS)
#define SLOT 16384u
#define V1_END 160u             /* format 1's header fields ended here */
#define PATHS_END (512u + 2u * 4096u)

static uint32_t crc32c(const unsigned char *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    while (n--) {
        c ^= *p++;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    }
    return ~c;
}

/* Rewrite both slots as format 1 wrote them. */
static void downgrade(unsigned char *meta)
{
    for (int s = 0; s < 2; s++) {
        unsigned char *h = meta + (size_t)s * SLOT;
        uint32_t one = 1, crc;
        memcpy(h + 8, &one, 4);
        memset(h + V1_END, 0, 512 - V1_END);
        memset(h + PATHS_END, 0, SLOT - 4 - PATHS_END);
        crc = crc32c(h, SLOT - 4);
        memcpy(h + SLOT - 4, &crc, 4);
    }
}

static uint32_t version_of(const unsigned char *meta, int slot)
{
    uint32_t v;
    memcpy(&v, meta + (size_t)slot * SLOT + 8, 4);
    return v;
}

/* ---- a metadata store that cuts the power after its k-th write ---- */
struct cutter { pm_store *inner; int writes, cut_at; uint64_t seed; };

static int c_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
    return pm_store_read(((struct cutter *)ctx)->inner, buf, len, off);
}
static int c_write(void *ctx, const void *buf, uint64_t len, uint64_t off)
{
    struct cutter *c = ctx;
    int rc = pm_store_write(c->inner, buf, len, off);
    if (rc == 0 && ++c->writes == c->cut_at)
        pm_store_power_loss(c->inner, c->seed);
    return rc;
}
static int c_flush(void *ctx) { return pm_store_flush(((struct cutter *)ctx)->inner); }
static void c_close(void *ctx) { (void)ctx; }

static pm_store *wrap(struct cutter *c)
{
    struct pm_store_ops ops;
    memset(&ops, 0, sizeof ops);
    ops.size = sizeof ops;
    ops.read = c_read, ops.write = c_write, ops.flush = c_flush, ops.close = c_close;
    pm_store *s = NULL;
    CHECK_EQ(pm_store_create_ops(&ops, c, pm_store_size(c->inner), "meta", PM_STORE_NOLOCK, &s), 0);
    return s;
}

/* ---- images ---- */
struct images { unsigned char *std, *mir, *meta; uint64_t meta_size; };
struct line { pm_store *std, *mir, *meta; };

static void load(const struct images *im, struct line *l)
{
    CHECK_EQ(pm_store_create_volatile(VOL, NULL, &l->std), 0);
    CHECK_EQ(pm_store_create_volatile(VOL, l->std, &l->mir), 0);
    CHECK_EQ(pm_store_create_volatile(im->meta_size, l->std, &l->meta), 0);
    CHECK_EQ(pm_store_write(l->std, im->std, VOL, 0), 0);
    CHECK_EQ(pm_store_write(l->mir, im->mir, VOL, 0), 0);
    CHECK_EQ(pm_store_write(l->meta, im->meta, im->meta_size, 0), 0);
    CHECK_EQ(pm_store_flush(l->std) | pm_store_flush(l->mir) | pm_store_flush(l->meta), 0);
}

static void save(struct line *l, struct images *im)
{
    CHECK_EQ(pm_store_read(l->std, im->std, VOL, 0), 0);
    CHECK_EQ(pm_store_read(l->mir, im->mir, VOL, 0), 0);
    CHECK_EQ(pm_store_read(l->meta, im->meta, im->meta_size, 0), 0);
}

static void drop(struct line *l)
{
    pm_store_destroy(l->meta);
    pm_store_destroy(l->mir);
    pm_store_destroy(l->std);
}

static void fill(pm_store *s, uint64_t off, uint64_t len, unsigned char v)
{
    unsigned char *b = malloc(len);
    memset(b, v, len);
    for (uint64_t i = 0; i < len; i++)
        b[i] = (unsigned char)(v + i / 4096);
    CHECK_EQ(pm_store_write(s, b, len, off), 0);
    free(b);
}

/* A pair left restoring, paused on an error at track 40 (after a few
 * tracks were copied); with `unclean`, the power goes before it closes. */
static void make_format1(struct images *im, int unclean)
{
    struct line l;
    CHECK_EQ(pm_store_create_volatile(VOL, NULL, &l.std), 0);
    CHECK_EQ(pm_store_create_volatile(VOL, l.std, &l.mir), 0);
    CHECK_EQ(pm_store_create_volatile(im->meta_size, l.std, &l.meta), 0);
    fill(l.std, 0, VOL, 1);
    pm_pair *p;
    CHECK_EQ(pm_pair_create_meta_store(l.meta, l.std, l.mir, TS, &p), 0);
    CHECK_EQ(pm_pair_establish(p, 0, NULL), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    unsigned char buf[TS];
    memset(buf, 0xA3, sizeof buf);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, buf, TS, 3 * TS, 0), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, buf, 100, 9 * TS + 7, PM_IO_FUA), 0);
    memset(buf, 0xB4, sizeof buf);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, buf, 4096, 12 * TS, PM_IO_FUA), 0);
    CHECK_EQ(pm_store_inject_fault(l.mir, PM_FAULT_READ, 40 * TS, TS, -EIO, -1), 0);
    struct pm_copy_config cfg;
    pm_copy_config_default(&cfg);
    cfg.copiers = 1;
    cfg.batch_bytes = TS;
    cfg.retries = 1;
    CHECK_EQ(pm_pair_restore(p, 0, 1, &cfg), 0);
    CHECK_EQ(pm_pair_wait(p, -1), PM_E_JOB);       /* paused on the mirror's error */
    if (unclean) {
        pm_store_power_loss(l.std, 7);
        pm_pair_destroy(p);                        /* its close fails: the power is off */
        pm_store_power_on(l.std);
    } else {
        pm_pair_destroy(p);
    }
    pm_store_clear_faults(l.mir);
    save(&l, im);
    drop(&l);
}

struct seen { int state, error; uint64_t pend_std, chg_std, chg_mir; };

static void look(pm_pair *p, struct seen *s)
{
    struct pm_progress pr;
    memset(&pr, 0, sizeof pr);
    pr.size = sizeof pr;
    CHECK_EQ(pm_pair_progress(p, &pr), 0);
    s->state = pm_pair_state(p);
    s->error = pr.error;
    s->pend_std = pm_bitmap_count(pm_table_flag(pm_pair_table(p, PM_STANDARD), PM_PENDING));
    s->chg_std = pm_bitmap_count(pm_table_flag(pm_pair_table(p, PM_STANDARD), PM_CHANGED));
    s->chg_mir = pm_bitmap_count(pm_table_flag(pm_pair_table(p, PM_MIRROR), PM_CHANGED));
}

/* Open the line's pair through a cutter; returns the open's result. */
static int open_cut(struct line *l, int cut_at, uint64_t seed, int *writes, pm_pair **out)
{
    struct cutter c = { l->meta, 0, cut_at, seed };
    pm_store *w = wrap(&c);
    *out = NULL;
    int rc = pm_pair_open_meta_store(w, l->std, l->mir, out);
    if (rc == 0)
        pm_pair_destroy(*out);
    *writes = c.writes;
    pm_store_destroy(w);
    return rc;
}

static void run(int unclean, int seeds)
{
    struct images im;
    im.meta_size = pm_meta_size(VOL, TS);
    im.std = malloc(VOL), im.mir = malloc(VOL), im.meta = malloc(im.meta_size);
    make_format1(&im, unclean);
    CHECK_EQ(version_of(im.meta, 0), 2);
    downgrade(im.meta);

    /* the upgrade without a cut: how many writes, and what it gives */
    struct line l;
    struct seen want;
    load(&im, &l);
    int nwrites = 0;
    pm_pair *p;
    CHECK_EQ(open_cut(&l, 0, 0, &nwrites, &p), 0);
    CHECK(nwrites >= 4);                           /* two commits: tables and header each */
    CHECK_EQ(pm_pair_open_meta_store(l.meta, l.std, l.mir, &p), 0);
    look(p, &want);
    pm_pair_destroy(p);
    CHECK_EQ(want.state, PM_STATE_RESTORING);
    CHECK(unclean || want.error != 0);             /* the power may go before the error's commit */
    CHECK(want.pend_std > 0 && (unclean || want.pend_std < NTRK));
    drop(&l);

    for (int k = 1; k <= nwrites; k++) {
        for (int seed = 0; seed < seeds; seed++) {
            load(&im, &l);
            int w;
            open_cut(&l, k, (uint64_t)(k * 1000 + seed), &w, &p);   /* may fail: the power went */
            CHECK_EQ(pm_store_power_on(l.std), 0);
            struct cutter none = { l.meta, 0, 0, 0 };
            pm_store *meta = wrap(&none);
            int rc = pm_pair_open_meta_store(meta, l.std, l.mir, &p);
            CHECK_EQ(rc, 0);
            if (rc != 0) {
                fprintf(stderr, "cut after write %d, seed %d: %s\n", k, seed, pm_last_error());
                pm_store_destroy(meta);
                drop(&l);
                continue;
            }
            struct seen got;
            look(p, &got);
            CHECK_EQ(got.state, want.state);
            CHECK_EQ(got.error, want.error);
            CHECK_EQ(got.pend_std, want.pend_std);
            CHECK_EQ(got.chg_std, want.chg_std);
            CHECK_EQ(got.chg_mir, want.chg_mir);
            unsigned char hdr[2 * SLOT];
            CHECK_EQ(pm_store_read(l.meta, hdr, sizeof hdr, 0), 0);
            CHECK_EQ(version_of(hdr, 0), 2);
            CHECK_EQ(version_of(hdr, 1), 2);
            CHECK_EQ(pm_pair_resume(p), 0);
            CHECK_EQ(pm_pair_wait(p, -1), 0);
            CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORED);
            pm_pair_destroy(p);
            pm_store_destroy(meta);
            unsigned char *a = malloc(VOL), *b = malloc(VOL);
            CHECK_EQ(pm_store_read(l.std, a, VOL, 0), 0);
            CHECK_EQ(pm_store_read(l.mir, b, VOL, 0), 0);
            CHECK(memcmp(a, b, VOL) == 0);             /* the restore is exact */
            CHECK(memcmp(b, im.mir, VOL) == 0);        /* and the mirror untouched */
            free(a), free(b);
            drop(&l);
        }
    }
    printf("%s format-1 pair: power cut after each of %d upgrade writes, %d seeds each\n",
           unclean ? "unclean" : "clean", nwrites, seeds);
    free(im.std), free(im.mir), free(im.meta);
}

int main(void)
{
    const char *env = getenv("PM_UPGRADE_SEEDS");
    int seeds = env ? atoi(env) : 10;
    run(0, seeds);
    run(1, seeds);
    return CHECK_DONE("test_upgrade");
}
