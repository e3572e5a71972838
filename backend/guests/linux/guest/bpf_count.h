/* Counting tag-check faults, and recording the newest ones, with a tiny BPF program on the raw
 * signal_generate tracepoint.
 *
 * The cheapest exact count the kernel offers: a raw tracepoint hands the program the
 * tracepoint's arguments (sig, kernel_siginfo *, task, group, result) without building an event
 * record. For each SIGSEGV with si_code 9 (SEGV_MTESERR, sync) or 8 (SEGV_MTEAERR, async) the
 * JIT-compiled program
 *   - bumps this CPU's {sync, async} counters and writes the fault into this CPU's ring of the
 *     newest BPF_RING events {time, si_addr, pid, code} (one per-CPU array value: one lookup in
 *     the program, one read syscall per batch in the agent, no atomics);
 *   - bumps the pid's counters in an array indexed by pid (a lookup the verifier inlines); a pid's
 *     first fault also puts it, with its comm, in a pid -> {comm} hash map, which is how the agent
 *     finds the pids to read, and every faulting process has its name, however short it lived
 *     (events take theirs from there). Pids beyond the array are counted in the hash map itself.
 * Measured in guest instructions per fault (bench_linux_guest's icount run) over a ~6000
 * instruction fault-and-signal round trip: the tracepoint calling a BPF program ~110, reading the
 * siginfo + this CPU's counters ~145, the event ~90 (75 of them the clock), the pid array ~35
 * (a hash map lookup per fault was ~160, a comm per event ~150: hence neither).
 * si_addr is the fault address with the pointer tag in bits 59:56 (arm64's do_tag_check_fault
 * passes FAR_EL1 to force_sig_fault): sync faults get their address with no kprobe. (The hist
 * trigger it replaces built the full event record and updated a tracing map on every SIGSEGV;
 * the trace event + kprobe it replaces formatted text and took a BRK + single-step per fault.)
 * Hand-assembled (no clang/libbpf in the image build); the agent falls back to the hist trigger
 * when the kernel refuses it. The siginfo is read with bpf_probe_read_kernel: si_code at 8,
 * si_addr at 16. */
#ifndef MTEVM_BPF_COUNT_H
#define MTEVM_BPF_COUNT_H

#include <errno.h>
#include <linux/bpf.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BPF_PID_MAX 8192       /* processes with faults told apart at once */
#define BPF_PID_SLOTS 65536    /* the pid array's size at most (24 bytes each) */
#define BPF_RING 128           /* newest faults kept per CPU (a power of two) */

/* One recorded fault, as the program writes it (layout shared with the program below). */
struct bpf_fault_event {
	uint64_t t;            /* CLOCK_MONOTONIC ns (bpf_ktime_get_ns) */
	uint64_t addr;         /* si_addr: FAR_EL1 with the pointer tag in 59:56 (sync); 0 (async) */
	uint32_t pid, code;
};

/* The per-CPU array's one value. */
struct bpf_cpu_value {
	uint64_t count[2];     /* [0] sync, [1] async */
	uint64_t head;         /* faults recorded so far; the newest is ring[(head - 1) % BPF_RING] */
	struct bpf_fault_event ring[BPF_RING];
};

/* The pid map (a hash): every faulting process's comm, and the counts of pids beyond the array. */
struct bpf_pid_value {
	uint64_t count[2];
	char comm[16];
};

/* The pid array, indexed by pid: the counts (an array lookup is a few instructions, a hash
 * lookup ~150); pid is 0 until the pid map has the process. */
struct bpf_pid_slot {
	uint64_t count[2];
	uint32_t pid, pad;
};

struct bpf_count {
	int cpu_map, pid_map, pid_arr, prog, link;
	uint32_t pid_slots;    /* pids below this are counted in the array */
	int ncpus;             /* possible CPUs: the per-CPU array's value count */
	struct bpf_cpu_value *values;   /* ncpus values, read each batch */
	uint64_t *seen;        /* per CPU: head at the previous read */
};

static long sys_bpf(int cmd, union bpf_attr *a)
{
	return syscall(__NR_bpf, cmd, a, sizeof *a);
}

static int bpf_map(uint32_t type, uint32_t key, uint32_t value, uint32_t max)
{
	union bpf_attr a;
	memset(&a, 0, sizeof a);
	a.map_type = type;
	a.key_size = key;
	a.value_size = value;
	a.max_entries = max;
	return (int)sys_bpf(BPF_MAP_CREATE, &a);
}

#define I(c, d, s, o, i) ((struct bpf_insn){ .code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i) })
#define MOV64_REG(d, s) I(BPF_ALU64 | BPF_MOV | BPF_X, d, s, 0, 0)
#define MOV64_IMM(d, i) I(BPF_ALU64 | BPF_MOV | BPF_K, d, 0, 0, i)
#define ADD64_IMM(d, i) I(BPF_ALU64 | BPF_ADD | BPF_K, d, 0, 0, i)
#define ADD64_REG(d, s) I(BPF_ALU64 | BPF_ADD | BPF_X, d, s, 0, 0)
#define AND64_IMM(d, i) I(BPF_ALU64 | BPF_AND | BPF_K, d, 0, 0, i)
#define MUL64_IMM(d, i) I(BPF_ALU64 | BPF_MUL | BPF_K, d, 0, 0, i)
#define LSH64_IMM(d, i) I(BPF_ALU64 | BPF_LSH | BPF_K, d, 0, 0, i)
#define LDX(sz, d, s, o) I(BPF_LDX | BPF_MEM | (sz), d, s, o, 0)
#define STX(sz, d, s, o) I(BPF_STX | BPF_MEM | (sz), d, s, o, 0)
#define ST(sz, d, o, i) I(BPF_ST | BPF_MEM | (sz), d, 0, o, i)
#define JMP_IMM(op, d, i, o) I(BPF_JMP | (op) | BPF_K, d, 0, o, i)
#define JA(o) I(BPF_JMP | BPF_JA, 0, 0, o, 0)
#define CALL(f) I(BPF_JMP | BPF_CALL, 0, 0, 0, f)
#define EXIT() I(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)
#define ADD_ATOMIC(d, s) I(BPF_STX | BPF_ATOMIC | BPF_DW, d, s, 0, BPF_ADD)
#define LD_MAP(d, fd) I(BPF_LD | BPF_DW | BPF_IMM, d, BPF_PSEUDO_MAP_FD, 0, fd), I(0, 0, 0, 0, 0)

/* A tiny assembler: jumps name a label, resolved when the program is laid out. */
struct bpf_asm {
	struct bpf_insn i;
	int to, at;            /* jump to label `to` (0: none); `at` > 0: this entry only defines a label */
};
#define A(...) { .i = __VA_ARGS__ }
#define AMAP(d, fd) A(I(BPF_LD | BPF_DW | BPF_IMM, d, BPF_PSEUDO_MAP_FD, 0, fd)), A(I(0, 0, 0, 0, 0))
#define JL(op, d, imm, label) { .i = JMP_IMM(op, d, imm, 0), .to = (label) }
#define JAL(label) { .i = JA(0), .to = (label) }
#define LABEL(label) { .at = (label) }

/* Lay out src (n entries) into dst; returns the instruction count. */
static int bpf_assemble(const struct bpf_asm *src, int n, struct bpf_insn *dst)
{
	int pos[16] = { 0 }, pc = 0;
	for (int k = 0; k < n; k++)
		if (src[k].at)
			pos[src[k].at] = pc;
		else
			pc++;
	pc = 0;
	for (int k = 0; k < n; k++) {
		if (src[k].at)
			continue;
		dst[pc] = src[k].i;
		if (src[k].to)
			dst[pc].off = (int16_t)(pos[src[k].to] - pc - 1);
		pc++;
	}
	return pc;
}

/* Attach (1) or detach (0) the loaded program; the counters stay. */
static int bpf_count_attach(struct bpf_count *b, int on)
{
	if (!on) {
		if (b->link >= 0)
			close(b->link);
		b->link = -1;
		return 0;
	}
	if (b->link >= 0)
		return 0;
	union bpf_attr a;
	memset(&a, 0, sizeof a);
	a.raw_tracepoint.name = (uint64_t)(uintptr_t)"signal_generate";
	a.raw_tracepoint.prog_fd = (uint32_t)b->prog;
	b->link = (int)sys_bpf(BPF_RAW_TRACEPOINT_OPEN, &a);
	return b->link < 0 ? -1 : 0;
}

/* Load and attach, with pids below max_slots (and pid_max) counted in the pid array; 0, or -1
 * with the reason in err. */
static int bpf_count_setup(struct bpf_count *b, uint32_t max_slots, char *err, size_t errlen)
{
	memset(b, 0, sizeof *b);
	b->cpu_map = b->pid_map = b->pid_arr = b->prog = b->link = -1;
	char possible[64] = "";
	FILE *f = fopen("/sys/devices/system/cpu/possible", "r");
	int lo = 0, hi = 0;
	if (f) {
		if (fgets(possible, sizeof possible, f) && sscanf(possible, "%d-%d", &lo, &hi) < 2)
			hi = lo;
		fclose(f);
	}
	b->ncpus = hi + 1;
	b->values = calloc((size_t)b->ncpus, sizeof *b->values);
	b->seen = calloc((size_t)b->ncpus, sizeof *b->seen);
	if (!b->values || !b->seen) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	b->cpu_map = bpf_map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, sizeof(struct bpf_cpu_value), 1);
	b->pid_map = bpf_map(BPF_MAP_TYPE_HASH, 4, sizeof(struct bpf_pid_value), BPF_PID_MAX);
	/* Every pid the kernel hands out, up to BPF_PID_SLOTS (pid_max is 32768 on a small machine) */
	long pid_max = 0;
	f = fopen("/proc/sys/kernel/pid_max", "r");
	if (f) {
		if (fscanf(f, "%ld", &pid_max) != 1)
			pid_max = 0;
		fclose(f);
	}
	b->pid_slots = pid_max > 0 && pid_max < max_slots ? (uint32_t)pid_max : max_slots;
	b->pid_arr = bpf_map(BPF_MAP_TYPE_ARRAY, 4, sizeof(struct bpf_pid_slot), b->pid_slots);
	if (b->cpu_map < 0 || b->pid_map < 0 || b->pid_arr < 0) {
		snprintf(err, errlen, "bpf map: %s", strerror(errno));
		return -1;
	}
	/* Stack: -4 key 0, -8 pid, -40..-17 the siginfo's start (si_code at -32, si_addr at -24),
	 * -48 the ring's next head, -80..-49 a new pid entry. R6 ctx then the event slot, R7 si_code,
	 * R8 counter index, R9 this CPU's value. */
	enum { R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 };
	enum { OUT = 1, PID, LOOKUP, HAVE, HASH, COUNT, NEW, REGISTERED, HASH_AGAIN };
	const int ev = (int)offsetof(struct bpf_cpu_value, ring), head = (int)offsetof(struct bpf_cpu_value, head);
	const struct bpf_asm src[] = {
		A(MOV64_REG(R6, R1)),                       /* ctx: u64 args[] */
		A(LDX(BPF_DW, R2, R6, 0)),                  /* sig */
		JL(BPF_JNE, R2, 11, OUT),
		A(LDX(BPF_DW, R3, R6, 8)),                  /* struct kernel_siginfo *info */
		JL(BPF_JLE, R3, 1, OUT),                    /* SEND_SIG_NOINFO / SEND_SIG_PRIV */
		A(MOV64_REG(R1, R10)),
		A(ADD64_IMM(R1, -40)),
		A(MOV64_IMM(R2, 24)),
		A(CALL(BPF_FUNC_probe_read_kernel)),        /* signo, errno, code, pad, addr (zeroes if it fails) */
		A(LDX(BPF_W, R7, R10, -32)),                /* si_code */
		A(MOV64_IMM(R8, 0)),                        /* index 0: sync */
		{ .i = JMP_IMM(BPF_JEQ, R7, 9, 2) },
		JL(BPF_JNE, R7, 8, OUT),                    /* not a tag-check fault */
		A(MOV64_IMM(R8, 1)),                        /* index 1: async */
		A(ST(BPF_W, R10, -4, 0)),
		AMAP(R1, b->cpu_map),
		A(MOV64_REG(R2, R10)),
		A(ADD64_IMM(R2, -4)),
		A(CALL(BPF_FUNC_map_lookup_elem)),
		A(MOV64_REG(R9, R0)),
		JL(BPF_JEQ, R0, 0, PID),
		A(MOV64_REG(R1, R8)),
		A(LSH64_IMM(R1, 3)),
		A(ADD64_REG(R1, R9)),
		A(LDX(BPF_DW, R2, R1, 0)),
		A(ADD64_IMM(R2, 1)),
		A(STX(BPF_DW, R1, R2, 0)),                  /* this CPU's counter += 1 (per CPU: no atomic) */
		A(LDX(BPF_DW, R6, R9, head)),
		A(MOV64_REG(R1, R6)),
		A(ADD64_IMM(R1, 1)),
		A(STX(BPF_DW, R10, R1, -48)),               /* head + 1, stored once the slot is written */
		A(AND64_IMM(R6, BPF_RING - 1)),
		A(MUL64_IMM(R6, (int)sizeof(struct bpf_fault_event))),
		A(ADD64_REG(R6, R9)),                       /* + ev: the slot */
		A(CALL(BPF_FUNC_ktime_get_ns)),
		A(STX(BPF_DW, R6, R0, ev + (int)offsetof(struct bpf_fault_event, t))),
		A(LDX(BPF_DW, R1, R10, -24)),
		A(STX(BPF_DW, R6, R1, ev + (int)offsetof(struct bpf_fault_event, addr))),
		A(STX(BPF_W, R6, R7, ev + (int)offsetof(struct bpf_fault_event, code))),
		A(CALL(BPF_FUNC_get_current_pid_tgid)),     /* the faulting thread: signal_generate runs in it */
		A(STX(BPF_W, R6, R0, ev + (int)offsetof(struct bpf_fault_event, pid))),
		A(STX(BPF_W, R10, R0, -8)),                 /* key: pid (the low 32 bits) */
		A(LDX(BPF_DW, R1, R10, -48)),
		A(STX(BPF_DW, R9, R1, head)),
		JAL(LOOKUP),
		LABEL(PID),
		A(CALL(BPF_FUNC_get_current_pid_tgid)),
		A(STX(BPF_W, R10, R0, -8)),
		LABEL(LOOKUP),
		A(LDX(BPF_W, R7, R10, -8)),                 /* pid */
		A(MOV64_IMM(R9, 0)),                        /* no array slot (yet) */
		JL(BPF_JGE, R7, (int)b->pid_slots, HASH),   /* beyond the array: counted in the hash map */
		AMAP(R1, b->pid_arr),
		A(MOV64_REG(R2, R10)),
		A(ADD64_IMM(R2, -8)),
		A(CALL(BPF_FUNC_map_lookup_elem)),          /* an array: inlined by the verifier */
		JL(BPF_JEQ, R0, 0, OUT),
		A(MOV64_REG(R9, R0)),
		A(LDX(BPF_W, R1, R9, (int)offsetof(struct bpf_pid_slot, pid))),
		JL(BPF_JEQ, R1, 0, NEW),                    /* this pid's first fault */
		LABEL(COUNT),
		A(LSH64_IMM(R8, 3)),
		A(ADD64_REG(R9, R8)),
		A(MOV64_IMM(R1, 1)),
		A(ADD_ATOMIC(R9, R1)),                      /* this pid's counter += 1 */
		JAL(OUT),
		LABEL(HASH),
		AMAP(R1, b->pid_map),
		A(MOV64_REG(R2, R10)),
		A(ADD64_IMM(R2, -8)),
		A(CALL(BPF_FUNC_map_lookup_elem)),
		JL(BPF_JEQ, R0, 0, NEW),
		LABEL(HAVE),                                /* the hash map's counters */
		A(MOV64_REG(R9, R0)),
		JAL(COUNT),
		LABEL(NEW),                                 /* a new pid map entry: {0, 0, comm} */
		A(ST(BPF_DW, R10, -80, 0)),
		A(ST(BPF_DW, R10, -72, 0)),
		A(MOV64_REG(R1, R10)),
		A(ADD64_IMM(R1, -64)),
		A(MOV64_IMM(R2, 16)),
		A(CALL(BPF_FUNC_get_current_comm)),
		AMAP(R1, b->pid_map),
		A(MOV64_REG(R2, R10)),
		A(ADD64_IMM(R2, -8)),
		A(MOV64_REG(R3, R10)),
		A(ADD64_IMM(R3, -80)),
		A(MOV64_IMM(R4, BPF_NOEXIST)),
		A(CALL(BPF_FUNC_map_update_elem)),
		JL(BPF_JEQ, R9, 0, HASH_AGAIN),             /* counted in the hash map */
		JL(BPF_JEQ, R0, 0, REGISTERED),
		JL(BPF_JNE, R0, -EEXIST, OUT),              /* the map is full: this pid goes uncounted */
		LABEL(REGISTERED),
		A(STX(BPF_W, R9, R7, (int)offsetof(struct bpf_pid_slot, pid))),
		JAL(COUNT),
		LABEL(HASH_AGAIN),
		AMAP(R1, b->pid_map),
		A(MOV64_REG(R2, R10)),
		A(ADD64_IMM(R2, -8)),
		A(CALL(BPF_FUNC_map_lookup_elem)),
		JL(BPF_JNE, R0, 0, HAVE),                   /* (not there: the map is full) */
		LABEL(OUT),
		A(MOV64_IMM(R0, 0)),
		A(EXIT()),
	};
	struct bpf_insn prog[sizeof src / sizeof *src];
	static char log[16384];
	union bpf_attr a;
	memset(&a, 0, sizeof a);
	a.prog_type = BPF_PROG_TYPE_RAW_TRACEPOINT;
	a.insns = (uint64_t)(uintptr_t)prog;
	a.insn_cnt = (uint32_t)bpf_assemble(src, (int)(sizeof src / sizeof *src), prog);
	a.license = (uint64_t)(uintptr_t)"GPL";
	a.log_buf = (uint64_t)(uintptr_t)log;
	a.log_size = sizeof log;
	a.log_level = 1;
	b->prog = (int)sys_bpf(BPF_PROG_LOAD, &a);
	if (b->prog < 0) {
		char *last = log + strlen(log);
		while (last > log && (last[-1] == '\n'))
			*--last = 0;
		char *line = strrchr(log, '\n');
		snprintf(err, errlen, "bpf program refused: %s (%s)", strerror(errno), line ? line + 1 : log);
		return -1;
	}
	if (bpf_count_attach(b, 1)) {
		snprintf(err, errlen, "bpf raw tracepoint signal_generate: %s", strerror(errno));
		return -1;
	}
	return 0;
}

static int bpf_lookup(int map, const void *key, void *value)
{
	union bpf_attr a;
	memset(&a, 0, sizeof a);
	a.map_fd = (uint32_t)map;
	a.key = (uint64_t)(uintptr_t)key;
	a.value = (uint64_t)(uintptr_t)value;
	return (int)sys_bpf(BPF_MAP_LOOKUP_ELEM, &a);
}

/* One read of every CPU's value: the counters cs/ca[cpu] (sync/async, for cpu < max) and, through
 * fn, up to `take` of each CPU's newest faults since the previous read (oldest first). Slots are
 * written while they are copied, so at most BPF_RING - 16 are taken: a slot that far back is only
 * overwritten if the CPU takes 16 more faults during the copy. */
static int bpf_count_read(struct bpf_count *b, uint64_t *cs, uint64_t *ca, int max, int take,
			  void (*fn)(int cpu, const struct bpf_fault_event *e))
{
	uint32_t key = 0;
	if (bpf_lookup(b->cpu_map, &key, b->values))
		return -1;
	if (take > BPF_RING - 16)
		take = BPF_RING - 16;
	for (int c = 0; c < max; c++) {
		cs[c] = c < b->ncpus ? b->values[c].count[0] : 0;
		ca[c] = c < b->ncpus ? b->values[c].count[1] : 0;
	}
	for (int c = 0; c < b->ncpus; c++) {
		uint64_t head = b->values[c].head, n = head - b->seen[c];
		b->seen[c] = head;
		for (uint64_t k = n < (uint64_t)take ? n : (uint64_t)take; k > 0; k--)
			fn(c, &b->values[c].ring[(head - k) % BPF_RING]);
	}
	return 0;
}

/* Visit each faulting pid's counts and comm (from the pid map, plus its array slot); the callback
 * returns 1 to forget the pid (a process that ended): its map entry is deleted first, then its
 * slot cleared, so a new process with the same pid registers afresh. */
static void bpf_count_pids(struct bpf_count *b, int (*fn)(int pid, const struct bpf_pid_value *v))
{
	uint32_t key, next, dead[256];
	int n_dead = 0, first = 1;
	for (;;) {
		union bpf_attr a;
		memset(&a, 0, sizeof a);
		a.map_fd = (uint32_t)b->pid_map;
		a.key = first ? 0 : (uint64_t)(uintptr_t)&key;
		a.next_key = (uint64_t)(uintptr_t)&next;
		if (sys_bpf(BPF_MAP_GET_NEXT_KEY, &a))
			break;
		first = 0;
		key = next;
		struct bpf_pid_value v;
		struct bpf_pid_slot slot;
		if (bpf_lookup(b->pid_map, &key, &v))
			continue;
		if (key < b->pid_slots && bpf_lookup(b->pid_arr, &key, &slot) == 0) {
			v.count[0] += slot.count[0];
			v.count[1] += slot.count[1];
		}
		v.comm[15] = 0;
		if (fn((int)key, &v) && n_dead < 256)
			dead[n_dead++] = key;
	}
	for (int i = 0; i < n_dead; i++) {
		union bpf_attr a;
		memset(&a, 0, sizeof a);
		a.map_fd = (uint32_t)b->pid_map;
		a.key = (uint64_t)(uintptr_t)&dead[i];
		sys_bpf(BPF_MAP_DELETE_ELEM, &a);
		if (dead[i] < b->pid_slots) {
			struct bpf_pid_slot zero = { 0 };
			a.map_fd = (uint32_t)b->pid_arr;
			a.value = (uint64_t)(uintptr_t)&zero;
			a.flags = BPF_ANY;
			sys_bpf(BPF_MAP_UPDATE_ELEM, &a);
		}
	}
}

#endif
