/* check.h - the tiny assertion kit of the C tests (no framework needed). */
#ifndef PM_CHECK_H
#define PM_CHECK_H
#include <stdio.h>
#include <stdlib.h>

static int check_failures;
static int check_count;

#define CHECK(cond) do { \
    check_count++; \
    if (!(cond)) { \
        fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        check_failures++; \
        if (check_failures > 20) exit(1); \
    } \
} while (0)

#define CHECK_EQ(a, b) do { \
    long long check_a_ = (long long)(a), check_b_ = (long long)(b); \
    check_count++; \
    if (check_a_ != check_b_) { \
        fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %lld, %s == %lld\n", \
                __FILE__, __LINE__, #a, check_a_, #b, check_b_); \
        check_failures++; \
        if (check_failures > 20) exit(1); \
    } \
} while (0)

/* End of main: prints the plain closing line and returns the exit code. */
#define CHECK_DONE(name) ( \
    printf("%s: %d passed, %d failed\n", (name), check_count - check_failures, check_failures), \
    check_failures ? 1 : 0)
#endif
