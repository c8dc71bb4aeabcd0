/*
 * store_volatile.c - a memory store with a volatile write cache, to test
 * crash safety: the model of a disk whose writes since the last flush may be
 * lost when the power goes, each wholly or in 512-byte sectors.
 *
 * Layer 2 (with table.c): may call store.c (1) and the layer-0 helpers.
 *
 * A store keeps the visible image (what reads return) and the durable image
 * (what survives), plus the list of writes since its last flush.  A flush
 * applies the list to the durable image.  A power loss applies a random
 * subset of the list, in order, each write whole, not at all, or sector by
 * sector, then makes the durable image the visible one.  Stores that share
 * a power line lose power together: one mutex serialises all their I/O, so
 * the cut is one instant for all of them.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "store.h"

#define MAX_ON_LINE 8

struct pm_power {
    pthread_mutex_t lock;
    int off;
    int nstores;
    pm_store *stores[MAX_ON_LINE];
};

struct pm_unflushed {
    struct pm_unflushed *next;
    uint64_t off, len;
    unsigned char data[];
};

static int vol_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
    pm_store *s = ctx;
    pthread_mutex_lock(&s->power->lock);
    int rc = s->power->off ? -EIO : 0;
    if (rc == 0)
        memcpy(buf, s->mem + off, (size_t)len);
    pthread_mutex_unlock(&s->power->lock);
    return rc ? PM_FAIL(rc, "volatile store: the power is off") : 0;
}

static int vol_write(void *ctx, const void *buf, uint64_t len, uint64_t off)
{
    pm_store *s = ctx;
    struct pm_unflushed *u = malloc(sizeof *u + (size_t)len);
    if (u == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    u->next = NULL, u->off = off, u->len = len;
    memcpy(u->data, buf, (size_t)len);
    pthread_mutex_lock(&s->power->lock);
    int rc = s->power->off ? -EIO : 0;
    if (rc == 0) {
        memcpy(s->mem + off, buf, (size_t)len);
        if (s->unflushed_tail)
            s->unflushed_tail->next = u;
        else
            s->unflushed = u;
        s->unflushed_tail = u;
    }
    pthread_mutex_unlock(&s->power->lock);
    if (rc) {
        free(u);
        return PM_FAIL(rc, "volatile store: the power is off");
    }
    return 0;
}

static void drop_list(pm_store *s)
{
    struct pm_unflushed *u = s->unflushed;
    while (u) {
        struct pm_unflushed *n = u->next;
        free(u);
        u = n;
    }
    s->unflushed = s->unflushed_tail = NULL;
}

static int vol_flush(void *ctx)
{
    pm_store *s = ctx;
    pthread_mutex_lock(&s->power->lock);
    int rc = s->power->off ? -EIO : 0;
    if (rc == 0) {
        for (struct pm_unflushed *u = s->unflushed; u; u = u->next)
            memcpy(s->durable + u->off, u->data, (size_t)u->len);
        drop_list(s);
    }
    pthread_mutex_unlock(&s->power->lock);
    return rc ? PM_FAIL(rc, "volatile store: the power is off") : 0;
}

static void vol_close(void *ctx)
{
    pm_store *s = ctx;
    struct pm_power *pw = s->power;
    pthread_mutex_lock(&pw->lock);
    drop_list(s);
    int left = 0;
    for (int i = 0; i < pw->nstores; i++) {
        if (pw->stores[i] != s)
            pw->stores[left++] = pw->stores[i];
    }
    pw->nstores = left;
    pthread_mutex_unlock(&pw->lock);
    munmap(s->mem, (size_t)s->size);
    munmap(s->durable, (size_t)s->size);
    if (left == 0) {
        pthread_mutex_destroy(&pw->lock);
        free(pw);
    }
}

/* the same callback table as any store (pymirror.h), its context the store */
static const struct pm_store_ops volatile_ops = {
    .size = sizeof(struct pm_store_ops),
    .read = vol_read, .write = vol_write, .flush = vol_flush, .close = vol_close,
};

int pm_store_create_volatile(uint64_t size, pm_store *share_power_with, pm_store **out)
{
    if (out == NULL)
        return PM_FAIL(-EINVAL, "out must not be NULL");
    *out = NULL;
    if (size == 0 || size > ((uint64_t)1 << 40))
        return PM_FAIL(PM_E_GEOMETRY, "a volatile store needs a size from 1 byte to 1 TiB");
    if (share_power_with != NULL && share_power_with->ops != &volatile_ops)
        return PM_FAIL(-EINVAL, "can share a power line only with another volatile store");
    pm_store *s = pm__store_alloc("");
    if (s == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    s->mem = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, flags, -1, 0);
    s->durable = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, flags, -1, 0);
    struct pm_power *pw = share_power_with ? share_power_with->power : calloc(1, sizeof *pw);
    if (s->mem == MAP_FAILED || s->durable == MAP_FAILED || pw == NULL) {
        if (s->mem != MAP_FAILED) munmap(s->mem, (size_t)size);
        if (s->durable != MAP_FAILED) munmap(s->durable, (size_t)size);
        if (share_power_with == NULL) free(pw);
        pm_store_destroy(s);
        return PM_FAIL(-ENOMEM, "cannot map %llu bytes", (unsigned long long)size);
    }
    if (share_power_with == NULL)
        pthread_mutex_init(&pw->lock, NULL);
    pthread_mutex_lock(&pw->lock);
    if (pw->nstores == MAX_ON_LINE) {
        pthread_mutex_unlock(&pw->lock);
        munmap(s->mem, (size_t)size);
        munmap(s->durable, (size_t)size);
        pm_store_destroy(s);
        return PM_FAIL(-EINVAL, "at most %d stores share a power line", MAX_ON_LINE);
    }
    pw->stores[pw->nstores++] = s;
    pthread_mutex_unlock(&pw->lock);
    s->power = pw;
    s->size = size;
    s->ops = &volatile_ops;
    s->ctx = s;
    *out = s;
    return 0;
}

static uint64_t next_rand(uint64_t *x)
{
    *x ^= *x << 13, *x ^= *x >> 7, *x ^= *x << 17;
    return *x;
}

int64_t pm_store_power_loss(pm_store *s, uint64_t seed)
{
    if (s == NULL || s->ops != &volatile_ops)
        return PM_FAIL(-EINVAL, "not a volatile store");
    struct pm_power *pw = s->power;
    uint64_t x = seed * 0x9E3779B97F4A7C15ULL + 1;
    int64_t n = 0;
    pthread_mutex_lock(&pw->lock);
    pw->off = 1;
    for (int i = 0; i < pw->nstores; i++) {
        pm_store *t = pw->stores[i];
        for (struct pm_unflushed *u = t->unflushed; u; u = u->next, n++) {
            switch (next_rand(&x) % 4) {
            case 0:   /* reached the disk */
                memcpy(t->durable + u->off, u->data, (size_t)u->len);
                break;
            case 1:   /* lost */
                break;
            default:  /* some of its sectors reached the disk */
                for (uint64_t o = u->off; o < u->off + u->len;) {
                    uint64_t end = (o / 512 + 1) * 512;
                    if (end > u->off + u->len)
                        end = u->off + u->len;
                    if (next_rand(&x) & 1)
                        memcpy(t->durable + o, u->data + (o - u->off), (size_t)(end - o));
                    o = end;
                }
            }
        }
        drop_list(t);
        memcpy(t->mem, t->durable, (size_t)t->size);
    }
    pthread_mutex_unlock(&pw->lock);
    return n;
}

int pm_store_power_on(pm_store *s)
{
    if (s == NULL || s->ops != &volatile_ops)
        return PM_FAIL(-EINVAL, "not a volatile store");
    pthread_mutex_lock(&s->power->lock);
    s->power->off = 0;
    pthread_mutex_unlock(&s->power->lock);
    return 0;
}
