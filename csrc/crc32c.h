#ifndef PM_CRC32C_H
#define PM_CRC32C_H
#include <stddef.h>
#include "internal.h"
/* CRC-32C of buf, continuing from crc (0 to start). */
uint32_t pm_crc32c(uint32_t crc, const void *buf, size_t len);
#endif
