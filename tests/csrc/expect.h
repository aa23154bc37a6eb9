/* EXPECT for the C test programs: report a failed condition with its place and carry on; main() returns
 * the count. */
#ifndef MEMOPT_TESTS_EXPECT_H
#define MEMOPT_TESTS_EXPECT_H

#include <stdio.h>

static int failures;
#define EXPECT(cond, ...)                                  \
    do {                                                   \
        if (!(cond)) {                                     \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
            printf(__VA_ARGS__);                           \
            printf("\n");                                  \
            failures++;                                    \
        }                                                  \
    } while (0)

#endif
