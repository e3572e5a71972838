/* mtevm-guest: a bare-metal EL1 program that takes real MTE tag-check faults under QEMU.
 *
 * Workload mode: every vCPU runs a tagged heap (allocate = IRG + STG, free = retag) with injected
 * use-after-free, overflow and wild-pointer accesses at the rates of the parameter block, counts
 * synchronous faults (ESR_EL1.EC 0x25, DFSC 0x11: counted, the access skipped) and asynchronous ones
 * (TFSR_EL1, read and cleared after each access), and publishes its counters in the status block.
 * Trace mode: vCPU 0 executes a list of tag ops/accesses and records per-op results, so the
 * conformance suite can compare QEMU with mtevm's tag-check core. Layouts: abi.h / guest_abi.py.
 */
#include <stdint.h>
#include "abi.h"

#define UART_DR   ((volatile uint32_t *)0x09000000UL)
#define UART_FR   ((volatile uint32_t *)0x09000018UL)

#define PSCI_CPU_ON     0xC4000003UL
#define PSCI_SYSTEM_OFF 0x84000008UL

#define TAG_MASK        (0xFUL << 56)
#define SLOTS_MAX       1024
#define BOOT_CHECK_HZ   10          /* boot-tag verifications per second */

#define SYSREG_READ(name) ({ uint64_t _v; __asm__ volatile("mrs %0, " name : "=r"(_v)); _v; })
#define SYSREG_WRITE(name, v) __asm__ volatile("msr " name ", %0\n isb" : : "r"((uint64_t)(v)) : "memory")
#define TFSR_EL1 "S3_0_C5_C6_0"
/* The code is ARMv8.0 (see the Makefile); the assembler accepts the MTE instructions only after this,
 * and they run only when has_tags says the CPU stores tags. */
#define MTE_ASM ".arch armv8.5-a+memtag\n"

extern void secondary_entry(void);
extern uint32_t entry_el;                      /* 1: PSCI over HVC, 2: over SMC, 3: no PSCI (secure=on) */
extern volatile uint64_t spin_release[MAX_VCPUS];

static const struct params defaults = {
    .magic = PARAM_MAGIC, .version = ABI_VERSION, .mode = MODE_WORKLOAD, .nvcpus = 1, .seed = 1,
    .uaf_ppm = 1000, .overflow_ppm = 1000, .wild_ppm = 500, .rate = 20000,
    .heap_base = HEAP_BASE, .heap_size = 1 << 20, .tcf = {1, 1, 1, 1, 1, 1, 1, 1},
    .arena_base = TRACE_ARENA_BASE, .arena_size = TRACE_ARENA_SIZE,
};

struct slot { uint64_t ptr; uint32_t size; uint32_t live; };

/* Per-vCPU state; TPIDR_EL1 points at it so the exception handler finds its vCPU. */
struct percpu {
    unsigned idx;
    volatile struct vcpu_status *st;
    uint64_t rng;
    uint64_t sync_count, last_far, last_esr;
    uint64_t cur_ptr; unsigned cur_size, cur_store;    /* the access in flight, for fault records */
    struct slot slots[SLOTS_MAX];
};

static struct percpu cpus[MAX_VCPUS];
static const struct params *P;
/* Tags are stored (ID_AA64PFR1_EL1.MTE >= 2). Without them (mte=off, a CPU model without MTE) no MTE
 * instruction or register is used: the workload makes the same accesses, all unchecked. */
static int has_tags;
static volatile struct status_header *const HDR = (volatile struct status_header *)STATUS_ADDR;
static volatile uint32_t uart_lock;

/* ---- small helpers ------------------------------------------------------------------------ */

void *memset(void *d, int c, unsigned long n)
{
    unsigned char *p = d;
    while (n--) *p++ = (unsigned char)c;
    return d;
}

static struct percpu *this_cpu(void) { return (struct percpu *)SYSREG_READ("tpidr_el1"); }
static uint64_t now(void) { uint64_t v; __asm__ volatile("isb\n mrs %0, cntvct_el0" : "=r"(v)); return v; }

static uint64_t rnd(struct percpu *c)          /* xorshift64*: cheap and good enough for a workload */
{
    c->rng ^= c->rng >> 12; c->rng ^= c->rng << 25; c->rng ^= c->rng >> 27;
    return c->rng * 0x2545F4914F6CDD1DUL;
}

static void uart_puts_locked(const char *s)
{
    for (; *s; s++) {
        while (*UART_FR & (1 << 5)) { }
        *UART_DR = (uint32_t)*s;
    }
}

static void uart_print(const char *a, unsigned long num, const char *b)
{
    char buf[24]; int n = 0;
    do { buf[n++] = (char)('0' + num % 10); num /= 10; } while (num);
    while (__atomic_exchange_n(&uart_lock, 1, __ATOMIC_ACQUIRE)) { }
    uart_puts_locked(a);
    while (n) { char ch[2] = {buf[--n], 0}; uart_puts_locked(ch); }
    uart_puts_locked(b);
    __atomic_store_n(&uart_lock, 0, __ATOMIC_RELEASE);
}

/* PSCI as QEMU's virt provides it: over HVC when the guest entered at EL1, over SMC when it
 * entered at EL2 (virtualization=on). With secure=on QEMU has no PSCI (firmware's job): then the
 * other vCPUs are already running in start.S's spin table and CPU_ON just releases one. */
static uint64_t psci(uint64_t fn, uint64_t a1, uint64_t a2, uint64_t a3)
{
    if (entry_el == 3) {
        if (fn == PSCI_CPU_ON && a1 < MAX_VCPUS) {
            spin_release[a1] = 1;
            __asm__ volatile("dsb sy\n sev" ::: "memory");
            return 0;
        }
        return (uint64_t)-1;                   /* NOT_SUPPORTED: SYSTEM_OFF callers then park */
    }
    register uint64_t x0 __asm__("x0") = fn, x1 __asm__("x1") = a1, x2 __asm__("x2") = a2,
                      x3 __asm__("x3") = a3;
    if (entry_el == 2)
        __asm__ volatile("smc #0" : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3) : : "memory");
    else
        __asm__ volatile("hvc #0" : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3) : : "memory");
    return x0;
}

static void set_tcf(unsigned tcf)              /* SCTLR_EL1.TCF, bits 41:40 */
{
    uint64_t v = SYSREG_READ("sctlr_el1");
    SYSREG_WRITE("sctlr_el1", (v & ~(3UL << 40)) | ((uint64_t)(tcf & 3) << 40));
}

static void set_tcma0(unsigned on)             /* TCR_EL1.TCMA0, bit 57 */
{
    uint64_t v = SYSREG_READ("tcr_el1");
    SYSREG_WRITE("tcr_el1", (v & ~(1UL << 57)) | ((uint64_t)(on & 1) << 57));
}

static void set_tco(unsigned on)               /* PSTATE.TCO */
{
    if (on) __asm__ volatile(MTE_ASM "msr tco, #1" ::: "memory");
    else __asm__ volatile(MTE_ASM "msr tco, #0" ::: "memory");
}

static uint64_t with_tag(uint64_t addr, unsigned tag) { return (addr & ~TAG_MASK) | ((uint64_t)tag << 56); }
static unsigned tag_of(uint64_t ptr) { return (unsigned)(ptr >> 56) & 0xF; }

static void stg(uint64_t p) { __asm__ volatile(MTE_ASM "stg %0, [%0]" : : "r"(p) : "memory"); }
static void st2g(uint64_t p) { __asm__ volatile(MTE_ASM "st2g %0, [%0]" : : "r"(p) : "memory"); }
static void stzg(uint64_t p) { __asm__ volatile(MTE_ASM "stzg %0, [%0]" : : "r"(p) : "memory"); }
static unsigned ldg(uint64_t p)
{
    uint64_t v = p;
    __asm__ volatile(MTE_ASM "ldg %0, [%1]" : "+r"(v) : "r"(p) : "memory");
    return tag_of(v);
}
static uint64_t irg(uint64_t p, uint64_t exclude)
{
    uint64_t v;
    __asm__ volatile(MTE_ASM "irg %0, %1, %2" : "=r"(v) : "r"(p), "r"(exclude));
    return v;
}

/* One checked access of 1, 2, 4, 8 or 16 bytes (16 = LDP/STP of two X registers, one access for
 * MTE). Each is a single instruction, so a sync tag-check fault can be skipped with ELR += 4. */
static void access(struct percpu *c, uint64_t p, unsigned size, unsigned store)
{
    uint64_t a = 0x5a5a5a5a5a5a5a5aUL, b = a;
    c->cur_ptr = p; c->cur_size = size; c->cur_store = store;
    if (store) {
        switch (size) {
        case 1: __asm__ volatile("strb %w0, [%1]" : : "r"(a), "r"(p) : "memory"); break;
        case 2: __asm__ volatile("strh %w0, [%1]" : : "r"(a), "r"(p) : "memory"); break;
        case 4: __asm__ volatile("str %w0, [%1]" : : "r"(a), "r"(p) : "memory"); break;
        case 8: __asm__ volatile("str %0, [%1]" : : "r"(a), "r"(p) : "memory"); break;
        default: __asm__ volatile("stp %0, %1, [%2]" : : "r"(a), "r"(b), "r"(p) : "memory"); break;
        }
    } else {
        switch (size) {
        case 1: __asm__ volatile("ldrb %w0, [%1]" : "=r"(a) : "r"(p) : "memory"); break;
        case 2: __asm__ volatile("ldrh %w0, [%1]" : "=r"(a) : "r"(p) : "memory"); break;
        case 4: __asm__ volatile("ldr %w0, [%1]" : "=r"(a) : "r"(p) : "memory"); break;
        case 8: __asm__ volatile("ldr %0, [%1]" : "=r"(a) : "r"(p) : "memory"); break;
        default: __asm__ volatile("ldp %0, %1, [%2]" : "=&r"(a), "=&r"(b) : "r"(p) : "memory"); break;
        }
    }
}

/* TFSR_EL1.TF0/TF1 after an access: set by an async (or asymmetric store) tag-check fault. Cleared
 * here so every async fault is counted at the access that caused it. */
static unsigned take_tfsr(void)
{
    uint64_t v;
    __asm__ volatile("dsb sy\n isb\n mrs %0, " TFSR_EL1 : "=r"(v) : : "memory");
    if (v & 3) SYSREG_WRITE(TFSR_EL1, 0);
    return (unsigned)(v & 3);
}

/* ---- exceptions (called from start.S with the saved registers) ---------------------------- */

static void fatal(uint64_t esr, uint64_t elr, uint64_t far)
{
    HDR->error_esr = esr; HDR->error_elr = elr; HDR->error_far = far;
    HDR->state = STATE_ERROR;
    uart_print("mtevm-guest: unexpected exception on cpu ", this_cpu()->idx, "\n");
    psci(PSCI_SYSTEM_OFF, 0, 0, 0);
    for (;;) __asm__ volatile("wfi");
}

void exception_sync(uint64_t *regs, uint64_t kind)
{
    (void)regs; (void)kind;
    uint64_t esr = SYSREG_READ("esr_el1"), elr = SYSREG_READ("elr_el1"), far = SYSREG_READ("far_el1");
    if ((esr >> 26) != 0x25 || (esr & 0x3F) != 0x11)   /* not a synchronous tag-check fault */
        fatal(esr, elr, far);
    struct percpu *c = this_cpu();
    volatile struct vcpu_status *st = c->st;
    c->sync_count++; c->last_far = far; c->last_esr = esr;
    st->sync_faults = c->sync_count;
    st->last_fault_addr = far;
    st->last_fault_esr = esr;
    st->last_fault_info = FAULT_INFO(KIND_SYNC, (esr >> 6) & 1, c->cur_size, tag_of(far), ldg(far));
    st->fault_time = now();
    SYSREG_WRITE("elr_el1", elr + 4);                    /* skip the faulting access */
}

void exception_unexpected(uint64_t *regs, uint64_t kind)
{
    (void)regs;
    fatal(SYSREG_READ("esr_el1") | (kind << 32), SYSREG_READ("elr_el1"), SYSREG_READ("far_el1"));
}

/* ---- boot tags: tagged once at boot, verified periodically (and after a migration) -------- */

static unsigned boot_tag(unsigned cpu, unsigned granule) { return (granule * 7 + cpu * 3) % 15 + 1; }

static void boot_tags_store(unsigned cpu)
{
    if (!has_tags) return;
    uint64_t base = BOOT_TAG_ADDR + cpu * BOOT_TAG_SIZE;
    for (unsigned g = 0; g < BOOT_TAG_SIZE / 16; g++)
        stg(with_tag(base + g * 16, boot_tag(cpu, g)));
}

static void boot_tags_verify(struct percpu *c)
{
    if (!has_tags) return;                              /* boot_tags stays UNCHECKED */
    uint64_t base = BOOT_TAG_ADDR + c->idx * BOOT_TAG_SIZE;
    unsigned ok = 1;
    for (unsigned g = 0; g < BOOT_TAG_SIZE / 16; g++)
        if (ldg(base + g * 16) != boot_tag(c->idx, g)) ok = 0;
    if (c->st->boot_tags != BOOT_TAGS_LOST)             /* a lost tag stays reported */
        c->st->boot_tags = ok ? BOOT_TAGS_OK : BOOT_TAGS_LOST;
    c->st->boot_tag_checks++;
}

/* ---- workload mode ------------------------------------------------------------------------ */

struct heap { uint64_t base; uint64_t slot_size; unsigned nslots; unsigned max_granules; };

static void tag_range(uint64_t ptr, uint64_t size)
{
    if (!has_tags) return;
    for (uint64_t off = 0; off < size; off += 16) stg(ptr + off);
}

static void heap_alloc(struct percpu *c, struct heap *h, struct slot *s, unsigned i)
{
    uint64_t base = h->base + (uint64_t)i * h->slot_size;
    unsigned granules = 1 + (unsigned)(rnd(c) % h->max_granules);
    /* exclude tag 0 (GCR) and the granule's current tag, so stale pointers into this slot fault */
    s->ptr = has_tags ? irg(base, 1UL << ldg(base)) : base;
    s->size = granules * 16;
    s->live = 1;
    tag_range(s->ptr, s->size);
}

static void heap_free(struct slot *s)
{
    if (has_tags)                                 /* free = retag to a new tag */
        tag_range(irg(s->ptr, (1UL << tag_of(s->ptr)) | 1), s->size);
    s->live = 0;
}

static void note_async(struct percpu *c, uint64_t ptr, unsigned size, unsigned store, uint64_t *async)
{
    volatile struct vcpu_status *st = c->st;
    (*async)++;
    st->async_faults = *async;
    st->last_fault_addr = ptr & ~(0xFUL << 60);
    st->last_fault_esr = 0;
    st->last_fault_info = FAULT_INFO(KIND_ASYNC, store, size, tag_of(ptr), ldg(ptr));
    st->fault_time = now();
}

/* One workload access: mostly valid, else a bug of the configured kind. Returns 1 if it accessed. */
static int heap_step(struct percpu *c, struct heap *h, uint64_t *async)
{
    unsigned i = (unsigned)(rnd(c) % h->nslots);
    struct slot *s = &c->slots[i];
    if (!s->live) { heap_alloc(c, h, s, i); return 0; }
    uint64_t r = rnd(c);
    uint64_t dice = r % 1000000, ptr;
    unsigned size = 8, store = (unsigned)(r >> 40) & 1;
    if (dice < P->uaf_ppm) {                                   /* use after free */
        ptr = s->ptr + ((r >> 20) % (s->size / 8)) * 8;
        heap_free(s);
    } else if (dice < (uint64_t)P->uaf_ppm + P->overflow_ppm) { /* runs past the object's end */
        ptr = s->ptr + s->size;                                 /* the slot's untagged slack */
    } else if (dice < (uint64_t)P->uaf_ppm + P->overflow_ppm + P->wild_ppm) {
        ptr = with_tag(h->base + ((r >> 20) % (h->nslots * h->slot_size / 8)) * 8, (unsigned)(r >> 60));
    } else {
        static const unsigned sizes[8] = {1, 2, 4, 8, 8, 8, 16, 16};
        size = sizes[(r >> 41) & 7];
        ptr = s->ptr + ((r >> 20) % (s->size / size)) * size;
        if ((r >> 50) % 64 == 0) { access(c, ptr, size, store); heap_free(s); goto done; }
    }
    access(c, ptr, size, store);
done:
    if (has_tags && take_tfsr()) note_async(c, ptr, size, store, async);
    return 1;
}

static uint64_t wfxt_supported(void)          /* ID_AA64ISAR2_EL1.WFxT >= 2: WFIT sleeps until a time */
{
    return (SYSREG_READ("S3_0_C0_C6_2") & 0xF) >= 2;
}

static void sleep_until(uint64_t deadline, int wfit)
{
    while (now() < deadline) {
        if (wfit) {
            register uint64_t x0 __asm__("x0") = deadline;
            __asm__ volatile(".inst 0xd5031020" : : "r"(x0) : "memory");   /* wfit x0 */
        }
    }
}

static void run_workload(struct percpu *c)
{
    volatile struct vcpu_status *st = c->st;
    unsigned tcf = P->tcf[c->idx] & 3;
    struct heap h;
    h.base = P->heap_base + (uint64_t)c->idx * P->heap_size;
    h.nslots = (unsigned)(P->heap_size / 256 < SLOTS_MAX ? P->heap_size / 256 : SLOTS_MAX);
    h.slot_size = (P->heap_size / h.nslots) & ~15UL;
    h.max_granules = (unsigned)((h.slot_size - 16) / 16 < 16 ? (h.slot_size - 16) / 16 : 16);
    for (unsigned i = 0; i < h.nslots; i++)           /* slot heads start at tag 0 (slack stays 0) */
        tag_range(h.base + i * h.slot_size, (h.max_granules + 1) * 16);
    st->tcf = tcf;
    if (has_tags) set_tcf(tcf);
    else tcf = 0;                                      /* nothing is checked: count accesses as unchecked */
    const uint64_t freq = HDR->cntfrq;
    /* about 100 batches a second when paced (each ends with a status update and a sleep) */
    const unsigned batch = P->rate == 0 || P->rate >= 25600 ? 256 : (P->rate >= 100 ? P->rate / 100 : 1);
    const int wfit = wfxt_supported();
    uint64_t checked = 0, async = 0, start = now(), next_check = start;
    /* the pacing deadline advances by batch/rate seconds per batch, carrying the remainder, so it
     * never overflows (checked * freq would after a few hours at high rates) */
    const uint64_t step = P->rate ? (uint64_t)batch * freq / P->rate : 0;
    const uint64_t step_rem = P->rate ? (uint64_t)batch * freq % P->rate : 0;
    uint64_t deadline = start, carry = 0;
    for (;;) {
        for (unsigned n = 0; n < batch; ) n += heap_step(c, &h, &async);
        checked += batch;
        if (tcf) st->checked = checked; else st->unchecked = checked;
        uint64_t t = now();
        st->cntvct = t;
        st->heartbeat++;
        if (t >= next_check) { boot_tags_verify(c); next_check = t + freq / BOOT_CHECK_HZ; }
        if (P->rate) {
            deadline += step;
            carry += step_rem;
            if (carry >= P->rate) { deadline++; carry -= P->rate; }
            if (t > deadline + freq) deadline = t;   /* paused (e.g. migrating): no catch-up burst */
            sleep_until(deadline, wfit);
        }
    }
}

/* ---- trace mode (vCPU 0 only) ------------------------------------------------------------- */

static void trace_reset(void)
{
    for (uint64_t a = P->arena_base; a < P->arena_base + P->arena_size; a += 32) st2g(a);
    set_tcf(1); set_tcma0(0); set_tco(0);
    SYSREG_WRITE(TFSR_EL1, 0);
}

static void run_trace(struct percpu *c)
{
    if (!has_tags) fatal(0xBAD10000UL, 0, 0);          /* trace mode needs tags (mte=on, an MTE CPU) */
    const struct trace_op *ops = (const struct trace_op *)(PARAM_ADDR + P->trace_offset);
    volatile struct trace_result *res = (volatile struct trace_result *)RESULTS_ADDR;
    trace_reset();
    for (uint32_t i = 0; i < P->trace_count; i++) {
        const struct trace_op *op = &ops[i];
        volatile struct trace_result *r = &res[i];
        uint64_t before = c->sync_count;
        r->kind = KIND_NONE; r->ldg_valid = 0; r->ldg_tag = 0; r->esr = 0; r->far = 0;
        switch (op->op) {
        case OP_RESET: trace_reset(); break;
        case OP_CONFIG:
            if (op->cfg_mask & CFG_TCF) set_tcf(op->tcf);
            if (op->cfg_mask & CFG_TCMA) set_tcma0(op->tcma);
            if (op->cfg_mask & CFG_TCO) set_tco(op->tco);
            break;
        case OP_STG: stg(with_tag(op->addr, op->tag)); break;
        case OP_ST2G: st2g(with_tag(op->addr, op->tag)); break;
        case OP_STZG: stzg(with_tag(op->addr, op->tag)); break;
        case OP_LDG: r->ldg_tag = (uint8_t)ldg(op->addr); r->ldg_valid = 1; break;
        case OP_LOAD: case OP_STORE: access(c, op->addr, op->size, op->op == OP_STORE); break;
        default: fatal(0xBAD00000UL | op->op, i, op->addr);
        }
        unsigned tfsr = take_tfsr();
        if (c->sync_count != before) { r->kind = KIND_SYNC; r->esr = (uint32_t)c->last_esr; r->far = c->last_far; }
        else if (tfsr) { r->kind = KIND_ASYNC; r->far = op->addr; }
        HDR->ops_done = i + 1;
    }
    set_tco(0); set_tcf(0);
}

/* ---- entry -------------------------------------------------------------------------------- */

void cpu_main(unsigned idx)
{
    struct percpu *c = &cpus[idx];
    volatile struct vcpu_status *st = (volatile struct vcpu_status *)(STATUS_ADDR + sizeof(struct status_header)) + idx;
    SYSREG_WRITE("tpidr_el1", (uint64_t)c);
    c->idx = idx;
    c->st = st;
    if (idx == 0) {
        const struct params *given = (const struct params *)PARAM_ADDR;
        P = (given->magic == PARAM_MAGIC && given->version == ABI_VERSION) ? given : &defaults;
        HDR->vcpus_up = 0; HDR->ops_done = 0; HDR->state = STATE_BOOTING;
        HDR->mode = P->mode; HDR->version = ABI_VERSION;
        HDR->cntfrq = SYSREG_READ("cntfrq_el0");
        HDR->magic = STATUS_MAGIC;
    }
    c->rng = (P->seed ^ (0x9E3779B97F4A7C15UL * (idx + 1))) | 1;
    has_tags = ((SYSREG_READ("S3_0_C0_C4_1") >> 8) & 0xF) >= 2;   /* ID_AA64PFR1_EL1.MTE */
    if (has_tags)
        SYSREG_WRITE("S3_0_C1_C0_5", (c->rng & 0xFFFF) << 8);   /* RGSR_EL1.SEED: IRG's sequence */
    for (unsigned k = 0; k < sizeof(*st) / 8; k++) ((volatile uint64_t *)st)[k] = 0;
    st->mpidr = SYSREG_READ("mpidr_el1");
    st->cpu_state = STATE_RUNNING;
    boot_tags_store(idx);
    boot_tags_verify(c);
    st->magic = VCPU_MAGIC;
    __atomic_add_fetch(&HDR->vcpus_up, 1, __ATOMIC_SEQ_CST);
    uart_print("mtevm-guest: cpu ", idx, " up\n");
    if (idx == 0) {
        unsigned n = P->mode == MODE_WORKLOAD ? (P->nvcpus <= MAX_VCPUS ? P->nvcpus : MAX_VCPUS) : 1;
        for (unsigned i = 1; i < n; i++)
            if (psci(PSCI_CPU_ON, i, (uint64_t)secondary_entry, i) != 0)
                uart_print("mtevm-guest: PSCI CPU_ON failed for cpu ", i, "\n");
        HDR->state = STATE_RUNNING;
        if (P->mode == MODE_TRACE) {
            run_trace(c);
            HDR->state = STATE_DONE;
            uart_print("mtevm-guest: trace done, ops ", P->trace_count, "\n");
            psci(PSCI_SYSTEM_OFF, 0, 0, 0);
            for (;;) __asm__ volatile("wfi");
        }
    }
    run_workload(c);
}
