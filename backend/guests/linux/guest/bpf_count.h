/* Counting tag-check faults with a tiny BPF program on the raw signal_generate tracepoint.
 *
 * The cheapest exact count the kernel offers: a raw tracepoint hands the program the
 * tracepoint's arguments (sig, kernel_siginfo *, task, group, result) without building an event
 * record, and the JIT-compiled program only bumps two counters: a per-CPU array {sync, async}
 * and a hash map pid -> {sync, async}. (The hist trigger it replaces builds the full event record
 * and updates a tracing map on every SIGSEGV: ~15% of a faulting program's speed under TCG.)
 * Hand-assembled (no clang/libbpf in the image build); the agent falls back to the hist trigger
 * when the kernel refuses it. si_code is read with bpf_probe_read_kernel at offsetof(si_code) = 8. */
#ifndef MTEVM_BPF_COUNT_H
#define MTEVM_BPF_COUNT_H

#include <errno.h>
#include <linux/bpf.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BPF_PID_MAX 8192

struct bpf_count {
	int cpu_map, pid_map, prog, link;
	int ncpus;             /* possible CPUs: the per-CPU array's value count */
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

/* Load and attach; 0, or -1 with the reason in err. */
static int bpf_count_setup(struct bpf_count *b, char *err, size_t errlen)
{
	memset(b, 0, sizeof *b);
	b->cpu_map = b->pid_map = b->prog = b->link = -1;
	char possible[64] = "";
	FILE *f = fopen("/sys/devices/system/cpu/possible", "r");
	int lo = 0, hi = 0;
	if (f) {
		if (fgets(possible, sizeof possible, f) && sscanf(possible, "%d-%d", &lo, &hi) < 2)
			hi = lo;
		fclose(f);
	}
	b->ncpus = hi + 1;
	b->cpu_map = bpf_map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 2);           /* [0] sync, [1] async */
	b->pid_map = bpf_map(BPF_MAP_TYPE_HASH, 4, 16, BPF_PID_MAX);        /* pid -> {sync, async} */
	if (b->cpu_map < 0 || b->pid_map < 0) {
		snprintf(err, errlen, "bpf map: %s", strerror(errno));
		return -1;
	}
	enum { R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 };
	struct bpf_insn prog[] = {
		MOV64_REG(R6, R1),                       /* ctx: u64 args[] */
		LDX(BPF_DW, R2, R6, 0),                  /* sig */
		JMP_IMM(BPF_JNE, R2, 11, 49),            /* -> out */
		LDX(BPF_DW, R3, R6, 8),                  /* struct kernel_siginfo *info */
		JMP_IMM(BPF_JLE, R3, 1, 47),             /* SEND_SIG_NOINFO / SEND_SIG_PRIV -> out */
		ADD64_IMM(R3, 8),                        /* &info->si_code */
		MOV64_REG(R1, R10),
		ADD64_IMM(R1, -8),
		MOV64_IMM(R2, 4),
		CALL(BPF_FUNC_probe_read_kernel),
		LDX(BPF_W, R7, R10, -8),                 /* si_code */
		MOV64_IMM(R8, 0),                        /* index 0: sync */
		JMP_IMM(BPF_JEQ, R7, 9, 2),
		JMP_IMM(BPF_JNE, R7, 8, 38),             /* not a tag-check fault -> out */
		MOV64_IMM(R8, 1),                        /* index 1: async */
		STX(BPF_W, R10, R8, -12),
		LD_MAP(R1, b->cpu_map),
		MOV64_REG(R2, R10),
		ADD64_IMM(R2, -12),
		CALL(BPF_FUNC_map_lookup_elem),
		JMP_IMM(BPF_JEQ, R0, 0, 2),
		MOV64_IMM(R1, 1),
		ADD_ATOMIC(R0, R1),                      /* this CPU's counter += 1 */
		CALL(BPF_FUNC_get_current_pid_tgid),     /* the faulting thread: signal_generate runs in it */
		STX(BPF_W, R10, R0, -16),                /* key: pid (the low 32 bits) */
		LD_MAP(R1, b->pid_map),
		MOV64_REG(R2, R10),
		ADD64_IMM(R2, -16),
		CALL(BPF_FUNC_map_lookup_elem),
		JMP_IMM(BPF_JNE, R0, 0, 16),             /* -> have */
		ST(BPF_DW, R10, -32, 0),
		ST(BPF_DW, R10, -24, 0),
		LD_MAP(R1, b->pid_map),
		MOV64_REG(R2, R10),
		ADD64_IMM(R2, -16),
		MOV64_REG(R3, R10),
		ADD64_IMM(R3, -32),
		MOV64_IMM(R4, BPF_NOEXIST),
		CALL(BPF_FUNC_map_update_elem),
		LD_MAP(R1, b->pid_map),
		MOV64_REG(R2, R10),
		ADD64_IMM(R2, -16),
		CALL(BPF_FUNC_map_lookup_elem),
		JMP_IMM(BPF_JEQ, R0, 0, 4),              /* map full -> out */
		/* have: */
		LSH64_IMM(R8, 3),
		ADD64_REG(R0, R8),
		MOV64_IMM(R1, 1),
		ADD_ATOMIC(R0, R1),                      /* this pid's counter += 1 */
		/* out: */
		MOV64_IMM(R0, 0),
		EXIT(),
	};
	static char log[16384];
	union bpf_attr a;
	memset(&a, 0, sizeof a);
	a.prog_type = BPF_PROG_TYPE_RAW_TRACEPOINT;
	a.insns = (uint64_t)(uintptr_t)prog;
	a.insn_cnt = sizeof prog / sizeof *prog;
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

/* The per-CPU counters: cs/ca[cpu] (sync/async), for cpu < max. */
static int bpf_count_cpus(struct bpf_count *b, uint64_t *cs, uint64_t *ca, int max)
{
	uint64_t v[2][1024];
	if (b->ncpus > 1024)
		return -1;
	for (uint32_t k = 0; k < 2; k++) {
		union bpf_attr a;
		memset(&a, 0, sizeof a);
		a.map_fd = (uint32_t)b->cpu_map;
		a.key = (uint64_t)(uintptr_t)&k;
		a.value = (uint64_t)(uintptr_t)v[k];
		if (sys_bpf(BPF_MAP_LOOKUP_ELEM, &a))
			return -1;
	}
	for (int c = 0; c < max; c++) {
		cs[c] = c < b->ncpus ? v[0][c] : 0;
		ca[c] = c < b->ncpus ? v[1][c] : 0;
	}
	return 0;
}

/* Visit each pid's counters; the callback returns 1 to delete the entry (a process that ended). */
static void bpf_count_pids(struct bpf_count *b, int (*fn)(int pid, uint64_t sync, uint64_t async))
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
		uint64_t v[2];
		memset(&a, 0, sizeof a);
		a.map_fd = (uint32_t)b->pid_map;
		a.key = (uint64_t)(uintptr_t)&key;
		a.value = (uint64_t)(uintptr_t)v;
		if (sys_bpf(BPF_MAP_LOOKUP_ELEM, &a))
			continue;
		if (fn((int)key, v[0], v[1]) && n_dead < 256)
			dead[n_dead++] = key;
	}
	for (int i = 0; i < n_dead; i++) {
		union bpf_attr a;
		memset(&a, 0, sizeof a);
		a.map_fd = (uint32_t)b->pid_map;
		a.key = (uint64_t)(uintptr_t)&dead[i];
		sys_bpf(BPF_MAP_DELETE_ELEM, &a);
	}
}

#endif
