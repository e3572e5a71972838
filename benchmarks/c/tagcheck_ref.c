/*
 * C reference for bench_tagcheck: the same synchronous tag check as backend.tagcheck's batch
 * path, in a plain loop, over QEMU's tag layout (2 tags per byte: tag byte = offset / 32,
 * address bit 4 = 0 -> low nibble), flat and fully allocated.
 *
 * usage: tagcheck_ref TAGS_FILE ACCESS_FILE RAM_BASE REPEATS
 *   TAGS_FILE   RAM_SIZE/32 bytes of packed tags
 *   ACCESS_FILE n records of {uint64 ptr; uint64 size} (little endian)
 * prints: faults=<n> accesses=<n> best_ns=<fastest pass over all accesses>
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct access { uint64_t ptr, size; };

static void *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc(*len ? *len : 1);
    if (!buf || fread(buf, 1, *len, f) != *len) { perror(path); exit(2); }
    fclose(f);
    return buf;
}

static inline unsigned tag_at(const uint8_t *tags, uint64_t off)
{
    return (tags[off >> 5] >> ((off >> 2) & 4)) & 0xf;
}

/* One pass: count accesses whose granules do not all carry the pointer tag. */
static uint64_t check_all(const uint8_t *tags, const struct access *acc, size_t n, uint64_t base)
{
    uint64_t faults = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t ptr = acc[i].ptr;
        unsigned ptag = (ptr >> 56) & 0xf;
        uint64_t off = (ptr & ((1ULL << 56) - 1)) - base;
        uint64_t first = off >> 4, last = (off + acc[i].size - 1) >> 4;
        for (uint64_t g = first; g <= last; g++) {
            if (tag_at(tags, g << 4) != ptag) { faults++; break; }
        }
    }
    return faults;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s TAGS_FILE ACCESS_FILE RAM_BASE REPEATS\n", argv[0]);
        return 2;
    }
    size_t tag_len, acc_len;
    uint8_t *tags = slurp(argv[1], &tag_len);
    struct access *acc = slurp(argv[2], &acc_len);
    size_t n = acc_len / sizeof(struct access);
    uint64_t base = strtoull(argv[3], NULL, 0);
    int repeats = atoi(argv[4]);
    uint64_t faults = 0, best = UINT64_MAX;
    for (int r = 0; r < repeats; r++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        faults = check_all(tags, acc, n, base);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        uint64_t ns = (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000ULL + (uint64_t)(t1.tv_nsec - t0.tv_nsec);
        if (ns < best) best = ns;
    }
    printf("faults=%llu accesses=%zu best_ns=%llu\n", (unsigned long long)faults, n, (unsigned long long)best);
    return 0;
}
