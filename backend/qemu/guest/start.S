/* Entry, MMU/MTE set-up and exception vectors of the mtevm guest (EL1, every vCPU).
 *
 * vCPU 0 enters at _start (QEMU -kernel with an ELF starts it at EL1 on `-M virt,mte=on`); the others
 * are started by vCPU 0 with PSCI CPU_ON at secondary_entry, x0 = their index. Each vCPU turns on the
 * MMU with one identity map (0-1 GiB Device-nGnRnE for the UART, 1-4 GiB RAM as Normal Tagged, MAIR
 * attribute 0xF0), TBI0 and SCTLR_EL1.ATA, then calls cpu_main(index) in guest.c with tag checking
 * still off (TCF 0); guest.c sets TCF per vCPU.
 *
 * Without stored tags (ID_AA64PFR1_EL1.MTE < 2: a CPU model without MTE, or `mte=off`, which QEMU
 * reports as MTE 1 or 0) the MTE registers (GCR_EL1, TFSR_EL1, RGSR_EL1) do not exist and the
 * Normal Tagged attribute is reserved: RAM is mapped Normal write-back, ATA stays 0 and those
 * registers are never touched. Everything here is ARMv8.0 so every aarch64 CPU model runs it.
 */
#define STACK_SIZE  0x4000

#define MAIR_VALUE  0xFFF000            /* attr0 Device-nGnRnE, attr1 Normal Tagged (0xF0), attr2 Normal WB */
#define MAIR_NO_TAGS 0xFFFF00           /* the same with attr1 Normal WB: no MTE tag storage */
/* T0SZ=32 (4 GiB, walk starts at level 1), IRGN0/ORGN0 write-back, SH0 inner, TG0 4K, EPD1, IPS 32-bit, TBI0 */
#define TCR_VALUE   ((32) | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (1 << 37))
/* RES1 bits | M | C | I; ATA (bit 43) is added when tags exist; TCF (41:40) stays 0 until guest.c chooses it */
#define SCTLR_VALUE (0x30D00800 | (1 << 0) | (1 << 2) | (1 << 12))

    .section .text.boot, "ax"
    .global _start
_start:
    /* -kernel ELF enters at EL1 on plain virt, at EL2 with virtualization=on and at EL3 with
     * secure=on; every vCPU that enters here first drops to (non-secure) EL1. x19 = entry EL. */
    mrs     x19, CurrentEL
    lsr     x19, x19, #2
    adr     x20, at_el1                 /* where the drop to EL1 returns */
    cmp     x19, #3
    b.eq    from_el3
    cmp     x19, #2
    b.eq    from_el2
at_el1:
    mrs     x1, mpidr_el1
    and     x1, x1, #0xff
    cbnz    x1, spin_table              /* started at reset (secure=on: no PSCI): wait for vCPU 0 */
    ldr     x1, =entry_el
    str     w19, [x1]
    /* zero .bss before anything uses it (the stacks live there) */
    ldr     x1, =__bss_start
    ldr     x2, =__bss_end
1:  cmp     x1, x2
    b.hs    2f
    str     xzr, [x1], #8
    b       1b
2:  mov     x0, #0
    b       common_entry

from_el3:
    ldr     x1, =((1 << 26) | (1 << 10) | (1 << 0))   /* SCR_EL3: ATA, RW (AArch64 below), NS */
    msr     scr_el3, x1
    mrs     x1, id_aa64pfr0_el1         /* EL2 implemented too (secure=on,virtualization=on)? */
    ubfx    x1, x1, #8, #4
    cbz     x1, 5f
    ldr     x1, =((1 << 56) | (1 << 31))
    msr     hcr_el2, x1                 /* then EL1 must be AArch64 and may use tags (as below) */
    mov     x1, #3
    msr     cnthctl_el2, x1
    msr     cntvoff_el2, xzr
5:  mov     x1, #0x3c5                  /* EL1h, DAIF masked */
    msr     spsr_el3, x1
    msr     elr_el3, x20
    eret

from_el2:
    ldr     x1, =((1 << 56) | (1 << 31))  /* HCR_EL2: ATA (tags at EL1), RW (EL1 is AArch64) */
    msr     hcr_el2, x1
    mov     x1, #3                      /* CNTHCTL_EL2: EL1 may use the physical counter/timer */
    msr     cnthctl_el2, x1
    msr     cntvoff_el2, xzr
    mov     x1, #0x3c5
    msr     spsr_el2, x1
    msr     elr_el2, x20
    eret

spin_table:                             /* x1 = this vCPU's index; vCPU 0 sets spin_release[x1] */
    ldr     x2, =spin_release
    add     x2, x2, x1, lsl #3
3:  ldr     x3, [x2]
    cbnz    x3, 4f
    wfe
    b       3b
4:  mov     x0, x1
    b       secondary_entry

    .global secondary_entry
secondary_entry:                        /* x0 = vCPU index (PSCI CPU_ON context id) */
    mrs     x1, CurrentEL               /* PSCI over SMC (virtualization=on) starts us at EL2 */
    cmp     x1, #(2 << 2)
    b.ne    common_entry
    adr     x20, common_entry
    b       from_el2
common_entry:
    msr     daifset, #0xf
    ldr     x1, =stacks
    add     x2, x0, #1
    mov     x3, #STACK_SIZE
    madd    x1, x2, x3, x1
    mov     sp, x1
    ldr     x1, =vectors
    msr     vbar_el1, x1
    mov     x1, #(3 << 20)              /* CPACR_EL1.FPEN: no traps for FP/SIMD */
    msr     cpacr_el1, x1
    mrs     x9, S3_0_C0_C4_1            /* ID_AA64PFR1_EL1 */
    ubfx    x9, x9, #8, #4              /* .MTE: 2 or more = tags are stored (FEAT_MTE2) */
    cmp     x9, #2
    cset    x9, hs                      /* x9 = 1: Normal Tagged RAM and the MTE registers exist */
    ldr     x1, =MAIR_NO_TAGS
    ldr     x2, =MAIR_VALUE
    cmp     x9, #0
    csel    x1, x2, x1, ne
    msr     mair_el1, x1
    ldr     x1, =TCR_VALUE
    msr     tcr_el1, x1
    ldr     x1, =page_table
    msr     ttbr0_el1, x1
    cbz     x9, 6f
    mov     x1, #1                      /* GCR_EL1.Exclude = {0}: IRG never returns tag 0 */
    msr     S3_0_C1_C0_6, x1            /* GCR_EL1 */
    msr     S3_0_C5_C6_0, xzr           /* TFSR_EL1 */
6:  isb
    tlbi    vmalle1
    dsb     nsh
    isb
    ldr     x1, =SCTLR_VALUE
    cbz     x9, 7f
    orr     x1, x1, #(1 << 43)          /* SCTLR_EL1.ATA: EL1 may use allocation tags */
7:  msr     sctlr_el1, x1
    isb
    bl      cpu_main
park:
    wfi
    b       park

/* ---- exception vectors: a sync exception at EL1 (SPx) is the expected one (tag-check fault) ---- */
.macro SAVE_AND_CALL handler, kind
    sub     sp, sp, #256
    stp     x0, x1, [sp, #0]
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x29, x30, [sp, #160]
    mov     x0, sp
    mov     x1, #\kind
    bl      \handler
    ldp     x0, x1, [sp, #0]
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x29, x30, [sp, #160]
    add     sp, sp, #256
    eret
.endm

    .section .text.vectors, "ax"
    .balign 2048
vectors:
    .irp    k, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
    .balign 128
    .if     \k == 4
    b       el1_sync
    .else
    b       el1_other_\k
    .endif
    .endr

el1_sync:
    SAVE_AND_CALL exception_sync, 4
    .irp    k, 0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
el1_other_\k:
    SAVE_AND_CALL exception_unexpected, \k
    .endr

/* ---- the identity map: one level-1 table, 1 GiB blocks ---- */
    .section .data.pt, "aw"
    .balign 4096
page_table:
    .quad   0x00000000 | (1 << 10) | (0 << 2) | (3 << 53) | 1      /* 0-1 GiB: Device-nGnRnE, XN */
    .quad   0x40000000 | (1 << 10) | (1 << 2) | (3 << 8) | 1       /* 1-4 GiB: RAM, Normal Tagged */
    .quad   0x80000000 | (1 << 10) | (1 << 2) | (3 << 8) | 1
    .quad   0xC0000000 | (1 << 10) | (1 << 2) | (3 << 8) | 1

    .section .data, "aw"
    .balign 8
    .global entry_el, spin_release
entry_el:                               /* the EL -kernel entered at: 1, 2 or 3 (see psci() in guest.c) */
    .word   1, 0
spin_release:                           /* not in .bss: vCPU 0 zeroes .bss while others already spin */
    .quad   0, 0, 0, 0, 0, 0, 0, 0

    .section .bss.stacks, "aw", %nobits
    .balign 16
stacks:
    .space  STACK_SIZE * 8
