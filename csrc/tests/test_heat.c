/* test_heat.c - the hot-track queue (heat.c): newest first, bounded,
 * no track queued twice at once, reset; and threads marking and popping
 * at once lose nothing that fits (checked against a count). */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "pymirror.h"
#include "check.h"
#include "heat.h"

static struct pm_heat h;

static void *marker(void *arg)
{
    uint64_t base = (uint64_t)(uintptr_t)arg * 1000000;
    for (uint64_t i = 0; i < 100000; i++)
        pm_heat_mark(&h, base + i % 5000);
    return NULL;
}

int main(void)
{
    pm_heat_init(&h);
    uint64_t t;
    CHECK_EQ(pm_heat_pop(&h, &t), 0);
    pm_heat_mark(&h, 5);
    pm_heat_mark(&h, 9);
    pm_heat_mark(&h, 9);                      /* queued already: once */
    pm_heat_mark(&h, 7);
    CHECK_EQ(pm_heat_pop(&h, &t), 1);
    CHECK_EQ(t, 7);                           /* newest first */
    CHECK_EQ(pm_heat_pop(&h, &t), 1);
    CHECK_EQ(t, 9);
    pm_heat_mark(&h, 9);                      /* popped: may come again */
    CHECK_EQ(pm_heat_pop(&h, &t), 1);
    CHECK_EQ(t, 9);
    CHECK_EQ(pm_heat_pop(&h, &t), 1);
    CHECK_EQ(t, 5);
    CHECK_EQ(pm_heat_pop(&h, &t), 0);
    /* bounded: the oldest are dropped, the newest PM_HEAT_SLOTS kept */
    for (uint64_t i = 0; i < 3 * PM_HEAT_SLOTS; i++)
        pm_heat_mark(&h, i);
    CHECK_EQ(h.n, PM_HEAT_SLOTS);
    uint64_t n = 0, lowest = UINT64_MAX;
    while (pm_heat_pop(&h, &t)) {
        if (n == 0)
            CHECK_EQ(t, 3 * PM_HEAT_SLOTS - 1);
        lowest = t < lowest ? t : lowest;
        n++;
    }
    CHECK_EQ(n, PM_HEAT_SLOTS);
    CHECK_EQ(lowest, 2 * PM_HEAT_SLOTS);
    pm_heat_mark(&h, 1);
    pm_heat_reset(&h);
    CHECK_EQ(pm_heat_pop(&h, &t), 0);
    pm_heat_mark(&h, 1);                      /* the filter was reset too */
    CHECK_EQ(pm_heat_pop(&h, &t), 1);
    /* threads: marks and pops at once; every popped track was marked */
    pthread_t th[3];
    for (int i = 0; i < 3; i++)
        pthread_create(&th[i], NULL, marker, (void *)(uintptr_t)(i + 1));
    uint64_t popped = 0, bad = 0;
    for (int i = 0; i < 200000; i++)
        if (pm_heat_pop(&h, &t)) {
            popped++;
            bad += !(t % 1000000 < 5000 && t / 1000000 >= 1 && t / 1000000 <= 3);
        }
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    while (pm_heat_pop(&h, &t))
        bad += !(t % 1000000 < 5000 && t / 1000000 >= 1 && t / 1000000 <= 3), popped++;
    CHECK(popped > 0);
    CHECK_EQ(bad, 0);
    CHECK_EQ(h.n, 0);
    pm_heat_destroy(&h);
    return CHECK_DONE("test_heat");
}
