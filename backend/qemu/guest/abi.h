/* The guest side of backend/qemu/guest_abi.py: addresses and record layouts shared with mtevm.
 * tests/qemu/test_guest.py checks every #define here against the Python constants. */
#ifndef MTEVM_GUEST_ABI_H
#define MTEVM_GUEST_ABI_H

#define ABI_VERSION        1
#define MAX_VCPUS          8

#define RAM_BASE           0x40000000UL
#define IMAGE_ADDR         0x40080000UL
#define PARAM_ADDR         0x40200000UL
#define PARAM_AREA_SIZE    0x100000UL
#define STATUS_ADDR        0x40300000UL
#define RESULTS_ADDR       0x40400000UL
#define RESULTS_AREA_SIZE  0x100000UL
#define BOOT_TAG_ADDR      0x40500000UL
#define BOOT_TAG_SIZE      0x1000UL
#define TRACE_ARENA_BASE   0x40600000UL
#define TRACE_ARENA_SIZE   0x10000UL
#define HEAP_BASE          0x41000000UL
#define MAPPED_END         0x100000000UL   /* the identity map covers RAM up to here */

#define PARAM_MAGIC        0x314D52415056544DUL   /* "MTVPARM1" */
#define STATUS_MAGIC       0x3141545356544DUL     /* "MTVSTA1"  */
#define VCPU_MAGIC         0x5550435656544DUL     /* "MTVVCPU"  */

#define MODE_WORKLOAD      0
#define MODE_TRACE         1

#define OP_CONFIG 0
#define OP_STG    1
#define OP_ST2G   2
#define OP_STZG   3
#define OP_LDG    4
#define OP_LOAD   5
#define OP_STORE  6
#define OP_RESET  7
#define CFG_TCF   1
#define CFG_TCMA  2
#define CFG_TCO   4

#define KIND_NONE  0
#define KIND_SYNC  1
#define KIND_ASYNC 2

#define STATE_BOOTING 0
#define STATE_RUNNING 1
#define STATE_DONE    2
#define STATE_ERROR   3

#define BOOT_TAGS_UNCHECKED 0
#define BOOT_TAGS_OK        1
#define BOOT_TAGS_LOST      2

#include <stdint.h>

struct params {                 /* PARAM_HEADER_FMT "<QIIIIQIIIIQQ8sIIQQ", padded to 128 bytes */
    uint64_t magic;
    uint32_t version, mode, nvcpus, flags;
    uint64_t seed;
    uint32_t uaf_ppm, overflow_ppm, wild_ppm, rate;
    uint64_t heap_base, heap_size;
    uint8_t tcf[8];
    uint32_t trace_count, trace_offset;
    uint64_t arena_base, arena_size;
    uint8_t pad[32];
};

struct trace_op {               /* TRACE_OP_FMT "<BBBBBBBxQ" */
    uint8_t op, size, tag, cfg_mask, tcf, tcma, tco, pad;
    uint64_t addr;
};

struct trace_result {           /* RESULT_FMT "<BBBxIQ" */
    uint8_t kind, ldg_valid, ldg_tag, pad;
    uint32_t esr;
    uint64_t far;
};

struct status_header {          /* STATUS_HEADER_FMT "<QIIIIQQQQQ" (64 bytes) */
    uint64_t magic;
    uint32_t version, vcpus_up, mode, state;
    uint64_t ops_done, cntfrq, error_esr, error_elr, error_far;
};

struct vcpu_status {            /* VCPU_FIELDS, all u64 (128 bytes) */
    uint64_t magic, heartbeat, checked, unchecked, sync_faults, async_faults;
    uint64_t last_fault_addr, last_fault_esr, last_fault_info, fault_time, tcf;
    uint64_t boot_tags, boot_tag_checks, cpu_state, mpidr, cntvct;
};

#define FAULT_INFO(kind, store, size, ptr_tag, mem_tag) \
    ((uint64_t)(kind) | ((uint64_t)(store) << 8) | ((uint64_t)(size) << 16) | \
     ((uint64_t)(ptr_tag) << 24) | ((uint64_t)(mem_tag) << 28))

#endif
