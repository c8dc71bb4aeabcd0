/* test_table.c - track-table geometry (exact and short last tracks, every
 * track size, sizes near 2^64), the flag bitmaps, and one check per error
 * return. */
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "pymirror.h"
#include "check.h"

static int has(const char *needle)
{
    return strstr(pm_last_error(), needle) != NULL;
}

/* Every track's span tiles the volume exactly, and track_of inverts it. */
static void tiles(uint64_t size, uint32_t ts)
{
    pm_table *t;
    CHECK_EQ(pm_table_create(size, ts, &t), 0);
    uint64_t tracks = size / ts + (size % ts != 0);
    CHECK_EQ(pm_table_volume_size(t), size);
    CHECK_EQ(pm_table_track_size(t), ts);
    CHECK_EQ(pm_table_tracks(t), tracks);
    CHECK_EQ(pm_table_last_track_size(t), size % ts ? size % ts : ts);
    uint64_t next = 0;
    for (uint64_t k = 0; k < tracks; k++) {
        uint64_t off = 1;
        uint32_t len = 0;
        CHECK_EQ(pm_table_track_span(t, k, &off, &len), 0);
        if (off != next || len == 0 || len > ts) {
            CHECK_EQ(off, next);
            break;
        }
        CHECK_EQ(pm_table_track_of(t, off), k);
        CHECK_EQ(pm_table_track_of(t, off + len - 1), k);
        next = off + len;
    }
    CHECK_EQ(next, size);
    for (int f = 0; f < PM_NFLAGS; f++) {
        pm_bitmap *bm = pm_table_flag(t, f);
        CHECK(bm != NULL);
        CHECK_EQ(pm_bitmap_size(bm), tracks);
        CHECK_EQ(pm_bitmap_count(bm), 0);
        CHECK_EQ(pm_bitmap_validate(bm), 0);
    }
    pm_table_destroy(t);
}

static void geometry(void)
{
    /* the examples of the docs: exact fit and a short last track */
    tiles(1 << 20, 65536);
    tiles((1 << 20) + 1, 65536);
    tiles(10 * 4096 + 5, 4096);
    tiles(1, 4096);                       /* one track of one byte */
    tiles(4096, 4096);
    tiles(4097, 4096);
    tiles(64 * 4096 - 1, 4096);           /* around a bitmap word boundary */
    tiles(64 * 4096, 4096);
    tiles(64 * 4096 + 1, 4096);
    tiles(3 * 16777216u + 12345, 16777216u);
    for (uint32_t ts = PM_TRACK_SIZE_MIN; ts <= PM_TRACK_SIZE_MAX && ts != 0; ts <<= 1)
        tiles(5 * (uint64_t)ts + ts / 2 + 1, ts);

    /* a 1 TiB volume at the default track size: 16 Mi tracks */
    pm_table *t;
    CHECK_EQ(pm_table_create((uint64_t)1 << 40, PM_TRACK_SIZE_DEFAULT, &t), 0);
    CHECK_EQ(pm_table_tracks(t), 16u << 20);
    CHECK_EQ(pm_table_last_track_size(t), 65536);
    CHECK_EQ(pm_table_track_of(t, ((uint64_t)1 << 40) - 1), (16 << 20) - 1);
    pm_table_destroy(t);

    /* sizes near 2^64 do not overflow the track count: 2^64-1 bytes at
     * 4 KiB is 2^52 tracks (not 0 or 1 after a wrap), and refused */
    CHECK_EQ(pm_table_create(UINT64_MAX, 4096, &t), PM_E_GEOMETRY);
    CHECK(t == NULL);
    CHECK(has("needs 4503599627370496 tracks"));
    CHECK(has("18446744073709551615"));
}

static void flags(void)
{
    pm_table *t;
    CHECK_EQ(pm_table_create(100 * 4096 - 1, 4096, &t), 0);
    pm_bitmap *p = pm_table_flag(t, PM_PENDING), *c = pm_table_flag(t, PM_CHANGED),
              *b = pm_table_flag(t, PM_BUSY);
    CHECK(p != c && c != b && p != b);
    CHECK(pm_table_flag(t, PM_PENDING) == p);   /* the same bitmap every time */
    /* the flags are independent */
    CHECK_EQ(pm_bitmap_set_range(p, 0, 100), 100);
    CHECK_EQ(pm_bitmap_set(c, 99), 0);
    CHECK_EQ(pm_bitmap_count(p), 100);
    CHECK_EQ(pm_bitmap_count(c), 1);
    CHECK_EQ(pm_bitmap_count(b), 0);
    CHECK_EQ(pm_bitmap_subtract(p, c), 0);
    CHECK_EQ(pm_bitmap_get(p, 99), 0);
    CHECK_EQ(pm_bitmap_union(b, p), 0);
    CHECK_EQ(pm_bitmap_count(b), 99);
    for (int f = 0; f < PM_NFLAGS; f++)
        CHECK_EQ(pm_bitmap_validate(pm_table_flag(t, f)), 0);
    pm_table_destroy(t);
}

static void errors(void)
{
    pm_table *t = (pm_table *)1;
    /* create */
    CHECK_EQ(pm_table_create(1 << 20, 4096, NULL), -EINVAL);
    CHECK(has("pm_table_create: out must not be NULL"));
    static const uint32_t bad_sizes[] = { 0, 1, 512, 2048, 4095, 4097, 3 * 4096, 65535,
                                          (1u << 24) + 1, 1u << 25, 1u << 31, UINT32_MAX };
    for (size_t i = 0; i < sizeof bad_sizes / sizeof *bad_sizes; i++) {
        t = (pm_table *)1;
        CHECK_EQ(pm_table_create(1 << 20, bad_sizes[i], &t), PM_E_GEOMETRY);
        CHECK(t == NULL);
        CHECK(has("is not a power of two from 4096 to 16777216"));
    }
    CHECK_EQ(pm_table_create(1 << 20, 3 * 4096, &t), PM_E_GEOMETRY);
    CHECK(has("pm_table_create: track size 12288"));
    CHECK_EQ(pm_table_create(0, 4096, &t), PM_E_GEOMETRY);
    CHECK(has("volume size must be greater than zero"));
    CHECK(t == NULL);
    CHECK_EQ(pm_table_create(UINT64_MAX, 4096, &t), PM_E_GEOMETRY);   /* too many tracks */
    CHECK(has("more than 2^48"));

    /* lookups */
    CHECK_EQ(pm_table_create(10 * 4096 + 5, 4096, &t), 0);
    CHECK(pm_table_flag(t, -1) == NULL);
    CHECK(has("unknown flag -1"));
    CHECK(pm_table_flag(t, PM_NFLAGS) == NULL);
    CHECK(has("unknown flag 3"));
    CHECK_EQ(pm_table_track_of(t, 10 * 4096 + 5), PM_E_RANGE);
    CHECK(has("pm_table_track_of: offset 40965 is beyond the volume size 40965"));
    CHECK_EQ(pm_table_track_of(t, UINT64_MAX), PM_E_RANGE);
    CHECK_EQ(pm_table_track_of(t, 10 * 4096 + 4), 10);   /* the last byte is fine */
    uint64_t off = 7;
    uint32_t len = 7;
    CHECK_EQ(pm_table_track_span(t, 11, &off, &len), PM_E_RANGE);
    CHECK(has("pm_table_track_span: track 11 is beyond the last track 10"));
    CHECK_EQ(pm_table_track_span(t, UINT64_MAX, &off, &len), PM_E_RANGE);
    CHECK(off == 7 && len == 7);                          /* untouched on failure */
    CHECK_EQ(pm_table_track_span(t, 0, NULL, &len), -EINVAL);
    CHECK_EQ(pm_table_track_span(t, 0, &off, NULL), -EINVAL);
    CHECK_EQ(pm_table_track_span(t, 10, &off, &len), 0);
    CHECK(off == 40960 && len == 5);
    pm_table_destroy(t);
    pm_table_destroy(NULL);
}

int main(void)
{
    geometry();
    flags();
    errors();
    return CHECK_DONE("test_table");
}
