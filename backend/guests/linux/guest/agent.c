/* mtevm-agent: the guest side of docs/agent-protocol.md.
 *
 * It sees every tag-check fault of every process in the guest without touching the programs, on
 * the kernel's signal:signal_generate tracepoint (SIGSEGV with si_code 9 = SEGV_MTESERR, sync, or
 * 8 = SEGV_MTEAERR, async): a small BPF program on the raw tracepoint (bpf_count.h) counts them
 * per CPU and per process and keeps the newest faults of each CPU (pid, comm, time, and si_addr:
 * the address and pointer tag of a sync fault); the agent reads its maps once per batch and sends
 * batches to the host over the virtio-serial port org.mtevm.agent.0 at the interval the host asks
 * for. Nothing else runs per fault: no trace event, no kprobe, no text to format. Where the kernel
 * refuses BPF, a hist trigger counts and trace lines (plus a kprobe on do_tag_check_fault for
 * addresses) give the events. Async faults have no address: the CPU only sets TFSR_EL1.TF0. It
 * also runs programs for the host (exec) and powers the guest off.
 *
 * One thread, one poll loop; nothing blocks on the host: while no host is connected the agent
 * keeps counting, and the next faults message carries the totals. */
#define _GNU_SOURCE
#include <dirent.h>
#include <stddef.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bpf_count.h"
#include "json.h"
#include "workload.h"

#define PORT_NAME "org.mtevm.agent.0"
#define TRACING "/sys/kernel/tracing"
#define EXEC_DIR "/tmp/mtevm-exec"
#define AGENT_READY "/run/mtevm/agent-ready"
#define MAX_CPUS 256
#define MAX_EVENTS 1000
#define PROC_SLOTS 8192              /* processes with faults the agent tells apart */
#define MAX_EXECS 16
#define MAX_EXEC_BYTES (32L << 20)
#define OUT_HIGH_WATER (1L << 20)     /* stop reading exec output above this much unsent */
#define MAX_IN_LINE (48L << 20)       /* 32 MiB of ELF in base64, plus the message */
#define TRACE_READ_MS 100             /* without histograms trace_pipe is read this often (2 MB per CPU holds >1 s of faults) */
#define TRACE_BUFFER_KB_ALL "2048"
#define TRACE_BUFFER_KB_SAMPLE "4"   /* per CPU: the newest ~70 signals */
#define TRACE_SAMPLE_BYTES_PER_CPU 8192 /* of trace lines read per batch with histograms (~70 events) */
#define EVENT TRACING "/events/signal/signal_generate"
/* One histogram (one hash-map update per SIGSEGV, in the kernel) gives every exact count: per CPU,
 * per process, in total. Its keys are ints (a comm key would be hashed on every fault). */
#define HIST_KEYS "hist:keys=common_cpu,pid,code:vals=hitcount:size=4096"
#define HIST HIST_KEYS " if sig == 11"
#define HIST_CLEAR HIST_KEYS ":clear if sig == 11"
#define HIST_FOLD_AT 3000             /* entries: fold the counts into the agent's and clear the map */
#define SAMPLE_WINDOW_MS 25           /* with the histogram, events are recorded this long per batch */
/* With BPF: faults per CPU per batch sent as events (the newest; the rest count in 'dropped').
 * Fault addresses on: up to 64; off: a small sample. Each event is JSON to build and send on the
 * vCPUs the guest's programs run on: under TCG a batch of 112 events cost ~2.65 ms of guest time,
 * one of 8 ~1.4 ms (most of that the wakeup itself). */
#define BPF_TAKE_ALL 64
#define BPF_TAKE_SAMPLE 8
#define SEGV_MTEAERR_CODE 8           /* asynchronous tag-check fault */
#define SEGV_MTESERR_CODE 9           /* synchronous tag-check fault */

#ifndef HWCAP2_MTE
#define HWCAP2_MTE (1 << 18)
#endif
#ifndef HWCAP2_MTE3
#define HWCAP2_MTE3 (1 << 22)
#endif

struct event {
	int cpu, pid, code;
	char comm[17];
	uint64_t t_ns;         /* CLOCK_MONOTONIC */
	int has_addr;
	uint64_t far;
};

struct proc {
	int pid;
	char comm[17];         /* "" until known (a sampled event, an exec, /proc/PID/comm) */
	uint64_t sync, async;  /* as last sent */
	uint64_t nsync, nasync; /* being summed from the histogram */
	uint64_t bsync, basync; /* folded in before the histogram was last cleared */
	uint64_t touched;      /* batch number of the last change */
};

struct exec {
	int used;
	struct buf id;         /* the id as JSON text, echoed back */
	pid_t pid;
	int out_fd, err_fd;
	int exited, status;
	char file[256];        /* the copied program, removed at exit ("" for a path exec) */
};

static int port_fd = -1, connected, trace_fd = -1;
static int tracing_ok;                 /* faults are being counted (BPF, histogram or trace lines) */
static struct buf out, in, tracebuf;
static int interval_ms = 250;
static uint64_t seq, batch_no, total_sync, total_async, dropped, dropped_total;
static uint64_t cpu_sync[MAX_CPUS], cpu_async[MAX_CPUS];
static uint64_t base_cpu_sync[MAX_CPUS], base_cpu_async[MAX_CPUS];   /* folded before a clear */
static int n_cpus;
static struct event events[MAX_EVENTS];
static int n_events;
static int faults_changed = 1;
static struct proc procs[PROC_SLOTS];
static int n_procs;
static int kernel_counts;              /* exact counts kept by the kernel (BPF or histogram), else from trace lines */
static int counting_bpf;               /* ... by the BPF program (bpf_count.h), else by the hist trigger */
static struct bpf_count bpfc;
static char counting_note[300];        /* why not BPF, when it is not */
static int paused;                     /* config counting=false: no tracing at all */
static double setup_seconds;           /* how long setting up the tracing took (in hello) */
static uint64_t sent_total;            /* sync + async at the previous faults message */
static struct exec execs[MAX_EXECS];
static char tracing_error[256], fault_addr_why[256];
static int fault_addr_on, fault_addr_available;
static struct { int pid; uint64_t far; int valid; } last_far[MAX_CPUS];
static struct wl_cpu wl_last[WL_MAX_CPUS];
static unsigned exec_counter;

static double now_mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Write text to a sysfs/tracefs file: replacing (O_TRUNC) or appending (O_APPEND, for triggers). */
static int put_file(const char *path, const char *text, int mode)
{
	int fd = open(path, O_WRONLY | mode | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = write(fd, text, strlen(text));
	int e = errno;
	close(fd);
	errno = e;
	return n == (ssize_t)strlen(text) ? 0 : -1;
}

static int write_file(const char *path, const char *text)
{
	return put_file(path, text, O_TRUNC);
}

static int append_file(const char *path, const char *text)
{
	return put_file(path, text, O_APPEND);
}

static int read_file(const char *path, char *dst, size_t cap)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, dst, cap - 1);
	close(fd);
	if (n < 0)
		return -1;
	dst[n] = 0;
	while (n > 0 && (dst[n - 1] == '\n' || dst[n - 1] == ' '))
		dst[--n] = 0;
	return 0;
}

/* ---- the port ---- */

/* Queue one message (a JSON object without its newline). Dropped while no host is connected:
 * the state it describes is re-sent (hello, cumulative totals) when one connects. */
static void send_msg(struct buf *m)
{
	if (connected) {
		buf_add(&out, m->p, m->len);
		buf_add(&out, "\n", 1);
	}
	m->len = 0;
}

static void find_port(void)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	struct dirent *e;
	if (!d)
		return;
	while ((e = readdir(d))) {
		char path[300], name[128];
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
		if (read_file(path, name, sizeof name) || strcmp(name, PORT_NAME))
			continue;
		snprintf(path, sizeof path, "/dev/%s", e->d_name);
		port_fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
		break;
	}
	closedir(d);
}

static void send_hello(void);

/* The host end is connected unless the port reports a hang-up. */
static void check_connected(void)
{
	if (port_fd < 0) {
		find_port();
		if (port_fd < 0)
			return;
	}
	struct pollfd p = { .fd = port_fd, .events = POLLIN };
	poll(&p, 1, 0);
	int now = !(p.revents & POLLHUP);
	if (now && !connected) {
		connected = 1;
		out.len = in.len = 0;
		faults_changed = 1;
		memset(wl_last, 0, sizeof wl_last);
		send_hello();
	} else if (!now && connected) {
		connected = 0;
		out.len = in.len = 0;
	}
}

static void flush_out(void)
{
	while (connected && out.len) {
		ssize_t n = write(port_fd, out.p, out.len);
		if (n > 0) {
			buf_consume(&out, (size_t)n);
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno != EAGAIN)
			check_connected();
		break;
	}
}

/* ---- facts ---- */

static void send_hello(void)
{
	struct buf m = { 0 };
	struct utsname u;
	uname(&u);
	unsigned long hw2 = getauxval(AT_HWCAP2);
	buf_printf(&m, "{\"type\":\"hello\",\"agent\":1,\"kernel\":");
	buf_json_str(&m, u.release, strlen(u.release));
	buf_printf(&m, ",\"machine\":");
	buf_json_str(&m, u.machine, strlen(u.machine));
	buf_printf(&m, ",\"hwcap2_mte\":%s,\"hwcap2_mte3\":%s,\"cpus\":[", hw2 & HWCAP2_MTE ? "true" : "false",
		   hw2 & HWCAP2_MTE3 ? "true" : "false");
	for (int c = 0; c < n_cpus; c++) {
		char path[96], pref[32] = "";
		snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/mte_tcf_preferred", c);
		int ok = !read_file(path, pref, sizeof pref);
		buf_printf(&m, "%s{\"cpu\":%d,\"mte_tcf_preferred\":", c ? "," : "", c);
		if (ok)
			buf_json_str(&m, pref, strlen(pref));
		else
			buf_printf(&m, "null");
		buf_printf(&m, "}");
	}
	buf_printf(&m, "],\"tracing\":%s,\"paused\":%s,\"tracing_error\":", tracing_ok ? "true" : "false",
		   paused ? "true" : "false");
	if (tracing_ok)
		buf_printf(&m, "null");
	else
		buf_json_str(&m, tracing_error, strlen(tracing_error));
	buf_printf(&m, ",\"fault_address_available\":%s,\"fault_address\":%s,\"fault_address_why\":",
		   fault_addr_available ? "true" : "false", fault_addr_on ? "true" : "false");
	if (fault_addr_on && counting_bpf)
		buf_printf(&m, "\"sync faults: the SIGSEGV's si_addr, read by the BPF program; async faults have no address\"");
	else if (fault_addr_on)
		buf_printf(&m, "\"sync faults: kprobe on do_tag_check_fault; async faults have no address\"");
	else
		buf_json_str(&m, fault_addr_why, strlen(fault_addr_why));
	buf_printf(&m, ",\"counting_note\":");
	if (counting_bpf)
		buf_printf(&m, "null");
	else
		buf_json_str(&m, counting_note, strlen(counting_note));
	buf_printf(&m, ",\"setup_s\":%.3f", setup_seconds);
	buf_printf(&m, ",\"counting\":\"%s\",\"interval_ms\":%d,\"uptime\":%.3f}",
		   counting_bpf ? "bpf" : kernel_counts ? "histogram" : "trace", interval_ms, now_mono());
	send_msg(&m);
	free(m.p);
}

/* ---- tracing ---- */

/* The kprobe that gives sync faults their address. On by default (what a user debugging MTE
 * faults wants to see); the host may turn it off (config fault_address=false): a kprobe is a BRK
 * exception and a single-step on every sync fault, and with addresses on every fault is recorded
 * rather than sampled, which under TCG costs a faulting program a good part of its speed. */
static void setup_fault_address(void)
{
	if (counting_bpf) {   /* the BPF program records si_addr: nothing to set up, nothing per fault */
		fault_addr_available = 1;
		snprintf(fault_addr_why, sizeof fault_addr_why,
			 "turned off by the host ({\"type\":\"config\",\"fault_address\":false}: fewer events are "
			 "sent, without addresses; faults are counted exactly)");
		return;
	}
	/* do_tag_check_fault(far, esr, regs) is reached through the fault_info table for every
	 * tag-check fault; x0 holds FAR_EL1 with the pointer tag in bits 59:56. */
	if (write_file(TRACING "/kprobe_events", "p:mtevm/tagfault do_tag_check_fault far=%x0:x64\n")) {
		snprintf(fault_addr_why, sizeof fault_addr_why,
			 "the kernel refused a kprobe on do_tag_check_fault (%s)", strerror(errno));
		return;
	}
	fault_addr_available = 1;
	snprintf(fault_addr_why, sizeof fault_addr_why,
		 "turned off by the host ({\"type\":\"config\",\"fault_address\":false}: faulting programs run "
		 "faster, faults are counted exactly and sampled without addresses)");
}

static void set_fault_address(int on)
{
	if (!fault_addr_available || on == fault_addr_on)
		return;
	if (paused || counting_bpf) {   /* BPF: only what is sent changes; paused: applied on resume */
		fault_addr_on = on;
		return;
	}
	/* With addresses on, every fault is recorded (no sampling window): the user asked for detail.
	 * Off: recording stops now; the next batch opens the next sampling window. */
	write_file(TRACING "/tracing_on", on || !kernel_counts ? "1" : "0");
	if (write_file(TRACING "/events/mtevm/tagfault/enable", on ? "1" : "0")) {
		snprintf(fault_addr_why, sizeof fault_addr_why, "cannot enable the tagfault kprobe (%s)", strerror(errno));
		return;
	}
	fault_addr_on = on;
}

/* The value of KEY=VALUE on the kernel command line, or "" */
static void cmdline_value(const char *key, char *out, size_t cap)
{
	char line[4096];
	out[0] = 0;
	if (read_file("/proc/cmdline", line, sizeof line))
		return;
	size_t kl = strlen(key);
	for (char *w = strtok(line, " \n"); w; w = strtok(NULL, " \n"))
		if (!strncmp(w, key, kl) && w[kl] == '=')
			snprintf(out, cap, "%s", w + kl + 1);
}

static void setup_tracing(void)
{
	const char *ev = EVENT;
	if (access(ev, F_OK)) {
		snprintf(tracing_error, sizeof tracing_error, "%s: %s (is tracefs mounted?)", ev, strerror(errno));
		return;
	}
	write_file(TRACING "/tracing_on", "0");
	write_file(TRACING "/events/signal/signal_generate/enable", "0");
	write_file(TRACING "/trace_clock", "mono");   /* so event times are CLOCK_MONOTONIC */
	write_file(TRACING "/events/mtevm/tagfault/enable", "0");
	write_file(TRACING "/kprobe_events", "");    /* a previous agent's probe */
	/* Exact counts kept in the kernel: by a small BPF program on the raw tracepoint (the
	 * cheapest), else by a hist trigger (one left by a previous agent is kept, EEXIST: its counts
	 * go on), else (no CONFIG_HIST_TRIGGERS either) every trace line is read and counted. */
	/* mtevm.counting=histogram|trace on the kernel command line forces a fallback (tests);
	 * bpf-pid-hash: BPF, with every pid counted the way pids beyond its pid array are (tests). */
	char forced[32] = "";
	cmdline_value("mtevm.counting", forced, sizeof forced);
	int pid_hash = !strcmp(forced, "bpf-pid-hash");
	if (pid_hash)
		forced[0] = 0;
	bpfc.cpu_map = bpfc.pid_map = bpfc.pid_arr = bpfc.prog = bpfc.link = -1;
	if (forced[0])
		snprintf(counting_note, sizeof counting_note, "mtevm.counting=%s on the kernel command line", forced);
	if (!forced[0] && bpf_count_setup(&bpfc, pid_hash ? 1 : BPF_PID_SLOTS, counting_note, sizeof counting_note) == 0) {
		counting_bpf = kernel_counts = tracing_ok = 1;
		append_file(EVENT "/trigger", "!" HIST);    /* a previous agent's histogram */
		/* The program counts, records the newest faults and their si_addr: the trace event
		 * and the ring buffer stay off (tracing_on back to its default for anyone else). */
		write_file(TRACING "/tracing_on", "1");
		setup_fault_address();
		set_fault_address(1);
		return;
	} else {
		for (int *fd = &bpfc.cpu_map; fd <= &bpfc.link; fd++)
			if (*fd >= 0)
				close(*fd);
		if (strcmp(forced, "trace")) {
			fprintf(stderr, "mtevm-agent: %s: counting with a hist trigger\n", counting_note);
			kernel_counts = append_file(EVENT "/trigger", HIST) == 0 || errno == EEXIST;
		} else {
			append_file(EVENT "/trigger", "!" HIST);
		}
	}
	/* With it, the ring buffer only feeds a sample of recent events (what a fault looked like),
	 * recorded during a short window after each batch into a small buffer: recording, formatting
	 * and reading every fault would cost a faulting program a large part of its speed under TCG.
	 * The window opens and closes with tracing_on (a flag of the ring buffer), not the event's
	 * 'enable': enabling an event registers its tracepoint, which patches kernel text, and under
	 * TCG every patch throws away translated code of the hot signal path. */
	write_file(TRACING "/buffer_size_kb", kernel_counts ? TRACE_BUFFER_KB_SAMPLE : TRACE_BUFFER_KB_ALL);
	if (write_file(EVENT "/filter", "sig == 11") || write_file(EVENT "/enable", "1")) {
		snprintf(tracing_error, sizeof tracing_error, "cannot enable signal:signal_generate: %s", strerror(errno));
		return;
	}
	setup_fault_address();
	set_fault_address(1);
	write_file(TRACING "/trace", "");             /* start from an empty buffer */
	write_file(TRACING "/tracing_on", "1");
	trace_fd = open(TRACING "/trace_pipe", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	if (trace_fd < 0)
		snprintf(tracing_error, sizeof tracing_error, "cannot open trace_pipe: %s", strerror(errno));
	tracing_ok = trace_fd >= 0;
}

/* The entry of a pid, created on first sight; NULL when the table is full (then the process
 * still counts in the totals and per-CPU figures). */
static struct proc *proc_for(int pid)
{
	unsigned h = (unsigned)pid * 2654435761u;
	for (unsigned i = 0; i < PROC_SLOTS; i++) {
		struct proc *p = &procs[(h + i) % PROC_SLOTS];
		if (p->pid == pid)
			return p;
		if (!p->pid) {
			if (n_procs >= PROC_SLOTS / 2)
				return NULL;
			n_procs++;
			p->pid = pid;
			return p;
		}
	}
	return NULL;
}

/* Learn a process's name (from a sampled event or an exec); the first one known wins. */
static void learn_comm(int pid, const char *comm)
{
	struct proc *p = proc_for(pid);
	if (p && !p->comm[0])
		snprintf(p->comm, sizeof p->comm, "%s", comm);
}

/* The CPU, pid (of the task that ran) and timestamp in a trace line's prefix:
 *   "  mte-faults-123     [001] d..1.   42.123456: signal_generate: sig=11 ..." */
static int parse_prefix(const char *line, const char *event, int *cpu, int *pid, double *t)
{
	const char *p = event;
	while (p > line && p[-1] == ' ')
		p--;
	/* back over "42.123456:" */
	const char *ts = p;
	while (ts > line && ts[-1] != ' ')
		ts--;
	*t = strtod(ts, NULL);
	const char *lb = strstr(line, "] ");
	while (lb && lb < ts) {   /* the last "[NNN] " before the timestamp */
		const char *q = lb;
		while (q > line && q[-1] >= '0' && q[-1] <= '9')
			q--;
		if (q > line && q[-1] == '[') {
			*cpu = atoi(q);
			const char *d = q - 1;
			while (d > line && d[-1] == ' ')
				d--;
			const char *e = d;
			while (e > line && e[-1] >= '0' && e[-1] <= '9')
				e--;
			*pid = atoi(e);
			return 0;
		}
		lb = strstr(lb + 1, "] ");
	}
	return -1;
}

static void handle_trace_line(char *line)
{
	char *ev = strstr(line, ": signal_generate: ");
	int cpu = 0, pid = 0;
	double t = 0;
	if (!ev) {
		char *kp = strstr(line, ": tagfault: ");
		char *far = kp ? strstr(kp, "far=") : NULL;
		if (far && !parse_prefix(line, kp, &cpu, &pid, &t) && cpu >= 0 && cpu < MAX_CPUS) {
			last_far[cpu].pid = pid;
			last_far[cpu].far = strtoull(far + 4, NULL, 0);
			last_far[cpu].valid = 1;
		}
		return;
	}
	if (parse_prefix(line, ev, &cpu, &pid, &t) || cpu < 0 || cpu >= MAX_CPUS)
		return;
	char *code_s = strstr(ev, " code="), *comm_s = strstr(ev, " comm="), *pid_s = NULL;
	if (!code_s || !comm_s)
		return;
	for (char *q = comm_s; (q = strstr(q + 1, " pid=")); )
		pid_s = q;     /* the last one: a comm may contain " pid=" */
	if (!pid_s)
		return;
	int code = atoi(code_s + 6);
	if (code != SEGV_MTESERR_CODE && code != SEGV_MTEAERR_CODE)
		return;
	int target = atoi(pid_s + 5);
	char comm[17];
	size_t cl = (size_t)(pid_s - (comm_s + 6));
	if (cl > 16)
		cl = 16;
	memcpy(comm, comm_s + 6, cl);
	comm[cl] = 0;

	if (cpu >= n_cpus)
		n_cpus = cpu + 1;
	learn_comm(target, comm);
	if (!kernel_counts) {
		struct proc *p = proc_for(target);
		if (p) {
			p->touched = batch_no + 1;
			if (code == SEGV_MTESERR_CODE)
				p->sync++;
			else
				p->async++;
		}
		if (code == SEGV_MTESERR_CODE)
			total_sync++, cpu_sync[cpu]++;
		else
			total_async++, cpu_async[cpu]++;
		faults_changed = 1;
	}
	if (n_events < MAX_EVENTS) {
		struct event *e = &events[n_events++];
		e->cpu = cpu;
		e->pid = target;
		e->code = code;
		memcpy(e->comm, comm, cl + 1);
		e->t_ns = t > 0 ? (uint64_t)(t * 1e9 + 0.5) : 0;
		e->has_addr = 0;
		if (code == SEGV_MTESERR_CODE && last_far[cpu].valid && last_far[cpu].pid == pid) {
			e->has_addr = 1;
			e->far = last_far[cpu].far;
		}
	} else if (!kernel_counts) {
		dropped++;
	}
	last_far[cpu].valid = 0;
}

static void read_trace(void)
{
	char chunk[65536];
	/* With histograms the lines are only a sample: take about what the small buffers held at
	 * this moment and stop, or the agent would keep reading as long as a program keeps faulting. */
	long budget = kernel_counts ? (long)n_cpus * TRACE_SAMPLE_BYTES_PER_CPU : -1;
	while (budget != 0) {
		size_t want = budget > 0 && budget < (long)sizeof chunk ? (size_t)budget : sizeof chunk;
		ssize_t n = read(trace_fd, chunk, want);
		if (budget > 0)
			budget -= n > 0 ? n : budget;
		if (n <= 0)
			break;
		buf_add(&tracebuf, chunk, (size_t)n);
		char *start = tracebuf.p, *nl;
		while ((nl = memchr(start, '\n', tracebuf.len - (size_t)(start - tracebuf.p)))) {
			*nl = 0;
			handle_trace_line(start);
			start = nl + 1;
		}
		buf_consume(&tracebuf, (size_t)(start - tracebuf.p));
	}
}

/* ---- batches ---- */

/* New cumulative per-CPU counts; the totals follow. */
static void set_cpu_counts(const uint64_t *cs, const uint64_t *ca)
{
	uint64_t ts = 0, ta = 0;
	for (int c = 0; c < MAX_CPUS; c++) {
		cpu_sync[c] = cs[c];
		cpu_async[c] = ca[c];
		ts += cs[c];
		ta += ca[c];
		if ((cs[c] || ca[c]) && c >= n_cpus)
			n_cpus = c + 1;
	}
	if (ts != total_sync || ta != total_async)
		faults_changed = 1;
	total_sync = ts;
	total_async = ta;
}

/* One pid's counts from the BPF map; a process that has ended is folded in and its entry
 * deleted (returns 1), so the map only holds live processes. */
static int bpf_pid_seen(int pid, const struct bpf_pid_value *v)
{
	struct proc *p = proc_for(pid);
	if (!p)
		return 0;
	if (v->comm[0])   /* the kernel's comm at the first fault: better than a guess from an exec */
		snprintf(p->comm, sizeof p->comm, "%s", v->comm);
	uint64_t ns = p->bsync + v->count[0], na = p->basync + v->count[1];
	if (ns != p->sync || na != p->async) {
		p->sync = ns;
		p->async = na;
		p->touched = batch_no + 1;
	}
	char path[32];
	snprintf(path, sizeof path, "/proc/%d", pid);
	if (access(path, F_OK) == 0)
		return 0;
	p->bsync = p->sync;
	p->basync = p->async;
	return 1;
}

static const char *comm_of(struct proc *p);

/* One of the newest faults the BPF program recorded: an event (with its address when the host
 * wants addresses). */
static void bpf_event(int cpu, const struct bpf_fault_event *f)
{
	if (n_events >= MAX_EVENTS || cpu >= MAX_CPUS)
		return;
	struct event *e = &events[n_events++];
	e->cpu = cpu;
	e->pid = (int)f->pid;
	e->code = (int)f->code;
	e->comm[0] = 0;        /* from the pid map, once it is read */
	e->t_ns = f->t;
	e->has_addr = fault_addr_on && f->code == SEGV_MTESERR_CODE && f->addr;
	e->far = f->addr;
}

static void read_bpf(void)
{
	uint64_t cs[MAX_CPUS], ca[MAX_CPUS];
	int first = n_events;
	if (bpf_count_read(&bpfc, cs, ca, MAX_CPUS, fault_addr_on ? BPF_TAKE_ALL : BPF_TAKE_SAMPLE, bpf_event) == 0)
		set_cpu_counts(cs, ca);
	bpf_count_pids(&bpfc, bpf_pid_seen);
	for (int i = first; i < n_events; i++) {
		struct proc *p = proc_for(events[i].pid);
		if (p)
			snprintf(events[i].comm, sizeof events[i].comm, "%s", comm_of(p));
	}
}

/* Counts from the histogram: lines like
 *   { common_cpu:          1, pid:        108, code:          9 } hitcount:         10 */
static void read_hist(void)
{
	static struct buf h;
	int fd = open(EVENT "/hist", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	h.len = 0;
	char chunk[65536];
	ssize_t n;
	while ((n = read(fd, chunk, sizeof chunk)) > 0)
		buf_add(&h, chunk, (size_t)n);
	close(fd);
	if (!h.len)
		return;
	uint64_t cs[MAX_CPUS], ca[MAX_CPUS];
	memcpy(cs, base_cpu_sync, sizeof cs);
	memcpy(ca, base_cpu_async, sizeof ca);
	for (int i = 0; i < PROC_SLOTS; i++) {
		procs[i].nsync = procs[i].bsync;
		procs[i].nasync = procs[i].basync;
	}
	int entries = 0;
	for (char *line = h.p, *nl; line && *line; line = nl ? nl + 1 : NULL) {
		nl = strchr(line, '\n');
		if (nl)
			*nl = 0;
		int cpu, pid, code;
		unsigned long long count;
		if (sscanf(line, " Entries: %d", &entries) == 1)
			continue;
		if (sscanf(line, "{ common_cpu: %d, pid: %d, code: %d } hitcount: %llu", &cpu, &pid, &code, &count) != 4)
			continue;
		if ((code != SEGV_MTESERR_CODE && code != SEGV_MTEAERR_CODE) || cpu < 0 || cpu >= MAX_CPUS)
			continue;
		if (cpu >= n_cpus)
			n_cpus = cpu + 1;
		(code == SEGV_MTESERR_CODE ? cs : ca)[cpu] += count;
		struct proc *p = proc_for(pid);
		if (p)
			*(code == SEGV_MTESERR_CODE ? &p->nsync : &p->nasync) += count;
	}
	for (int i = 0; i < PROC_SLOTS; i++) {
		struct proc *p = &procs[i];
		if (p->pid && (p->nsync != p->sync || p->nasync != p->async)) {
			p->sync = p->nsync;
			p->async = p->nasync;
			p->touched = batch_no + 1;
		}
	}
	set_cpu_counts(cs, ca);
	/* The map has a fixed size (a key is a CPU, pid and code): before it fills up, keep the
	 * counts here and start it afresh. Faults between the read above and the clear are lost:
	 * a few, once per ~1000 faulting processes. */
	if (entries >= HIST_FOLD_AT && append_file(EVENT "/trigger", HIST_CLEAR) == 0) {
		memcpy(base_cpu_sync, cpu_sync, sizeof base_cpu_sync);
		memcpy(base_cpu_async, cpu_async, sizeof base_cpu_async);
		for (int i = 0; i < PROC_SLOTS; i++) {
			procs[i].bsync = procs[i].sync;
			procs[i].basync = procs[i].async;
		}
	}
}

/* A process's name for the host: learnt from an event or an exec, else /proc/PID/comm if it
 * still runs, else "" (a short-lived process none of whose faults was sampled). */
static const char *comm_of(struct proc *p)
{
	if (!p->comm[0]) {
		char path[64];
		snprintf(path, sizeof path, "/proc/%d/comm", p->pid);
		if (read_file(path, p->comm, sizeof p->comm))
			p->comm[0] = 0;
	}
	return p->comm;
}

static void send_faults(void)
{
	if (counting_bpf)
		read_bpf();
	else if (kernel_counts)
		read_hist();
	if (!faults_changed || !connected)
		return;
	struct buf m = { 0 };
	if (kernel_counts) {   /* faults the sample of events does not show */
		uint64_t delta = total_sync + total_async - sent_total;
		dropped = delta > (uint64_t)n_events ? delta - (uint64_t)n_events : 0;
	}
	sent_total = total_sync + total_async;
	dropped_total += dropped;
	buf_printf(&m, "{\"type\":\"faults\",\"seq\":%llu,\"totals\":{\"sync\":%llu,\"async\":%llu},\"events\":[",
		   (unsigned long long)++seq, (unsigned long long)total_sync, (unsigned long long)total_async);
	for (int i = 0; i < n_events; i++) {
		struct event *e = &events[i];
		buf_printf(&m, "%s{\"cpu\":%d,\"pid\":%d,\"comm\":", i ? "," : "", e->cpu, e->pid);
		buf_json_str(&m, e->comm, strlen(e->comm));
		/* integer arithmetic: printing a double is slow under TCG, and this runs per event */
		buf_printf(&m, ",\"code\":%d,\"t\":%llu.%06llu", e->code, (unsigned long long)(e->t_ns / 1000000000u),
			   (unsigned long long)(e->t_ns % 1000000000u / 1000u));
		if (e->has_addr)
			buf_printf(&m, ",\"addr\":%llu,\"ptr_tag\":%u",
				   (unsigned long long)(e->far & ((1ULL << 56) - 1)), (unsigned)((e->far >> 56) & 0xf));
		buf_printf(&m, "}");
	}
	/* Cumulative counts, so a host that missed events (over 1000 a batch, or while it was away)
	 * still has exact per-vCPU and per-process figures. */
	buf_printf(&m, "],\"dropped\":%llu,\"dropped_total\":%llu,\"cpus\":[", (unsigned long long)dropped,
		   (unsigned long long)dropped_total);
	for (int c = 0; c < n_cpus; c++)
		buf_printf(&m, "%s{\"cpu\":%d,\"sync\":%llu,\"async\":%llu}", c ? "," : "", c,
			   (unsigned long long)cpu_sync[c], (unsigned long long)cpu_async[c]);
	buf_printf(&m, "],\"processes\":[");
	int first = 1;
	for (int i = 0; i < PROC_SLOTS; i++) {
		struct proc *p = &procs[i];
		if (!p->pid || p->touched <= batch_no)
			continue;
		buf_printf(&m, "%s{\"pid\":%d,\"comm\":", first ? "" : ",", p->pid);
		const char *comm = comm_of(p);
		buf_json_str(&m, comm, strlen(comm));
		buf_printf(&m, ",\"sync\":%llu,\"async\":%llu}", (unsigned long long)p->sync, (unsigned long long)p->async);
		first = 0;
	}
	buf_printf(&m, "],\"uptime\":%.3f}", now_mono());
	send_msg(&m);
	free(m.p);
	n_events = 0;
	dropped = 0;
	faults_changed = 0;
	batch_no++;
}

static void send_workload(void)
{
	struct wl_cpu w[WL_MAX_CPUS];
	int fd = open(WL_FILE, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	ssize_t n = pread(fd, w, sizeof w, 0);
	close(fd);
	if (n < (ssize_t)sizeof(struct wl_cpu) || !connected)
		return;
	int count = (int)(n / (ssize_t)sizeof(struct wl_cpu));
	if (!memcmp(w, wl_last, (size_t)count * sizeof *w))
		return;
	memcpy(wl_last, w, (size_t)count * sizeof *w);
	struct buf m = { 0 };
	buf_printf(&m, "{\"type\":\"workload\",\"cpus\":[");
	int first = 1;
	for (int i = 0; i < count; i++) {
		if (w[i].cpu < 0 || !w[i].pid)
			continue;
		w[i].tcf[sizeof w[i].tcf - 1] = 0;
		buf_printf(&m, "%s{\"cpu\":%d,\"tcf\":", first ? "" : ",", w[i].cpu);
		buf_json_str(&m, w[i].tcf, strlen(w[i].tcf));
		buf_printf(&m, ",\"checked\":%llu,\"sync\":%llu,\"async\":%llu,\"pid\":%d}",
			   (unsigned long long)w[i].checked, (unsigned long long)w[i].sync,
			   (unsigned long long)w[i].async, w[i].pid);
		first = 0;
	}
	buf_printf(&m, "]}");
	send_msg(&m);
	free(m.p);
}

/* ---- exec ---- */

static void send_error(struct buf *id, const char *fmt, ...)
{
	char text[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(text, sizeof text, fmt, ap);
	va_end(ap);
	struct buf m = { 0 };
	buf_printf(&m, "{\"type\":\"error\",\"id\":%s,\"message\":", id && id->len ? id->p : "null");
	buf_json_str(&m, text, strlen(text));
	buf_printf(&m, "}");
	send_msg(&m);
	free(m.p);
}

static int mkdirs(const char *path)
{
	char tmp[256];
	snprintf(tmp, sizeof tmp, "%s", path);
	for (char *p = tmp + 1; *p; p++)
		if (*p == '/') {
			*p = 0;
			mkdir(tmp, 0700);
			*p = '/';
		}
	return mkdir(tmp, 0700) && errno != EEXIST ? -1 : 0;
}

static void start_exec(struct jobj *o)
{
	struct jfield *idf = json_get(o, "id");
	struct buf id = { 0 };
	if (idf && idf->type == J_STR)
		buf_json_str(&id, idf->str, idf->len);
	else if (idf && idf->type == J_NUM)
		buf_add(&id, idf->raw, idf->raw_len);
	else
		buf_add(&id, "null", 4);

	struct exec *x = NULL;
	for (int i = 0; i < MAX_EXECS; i++)
		if (!execs[i].used) {
			x = &execs[i];
			break;
		}
	if (!x) {
		send_error(&id, "too many programs running (%d)", MAX_EXECS);
		free(id.p);
		return;
	}
	const char *path = json_str(o, "path"), *name = json_str(o, "name"), *cwd = json_str(o, "cwd");
	struct jfield *data = json_get(o, "data"), *args = json_get(o, "args");
	char file[256] = "", dir[200];
	if (data && data->type == J_STR) {
		if (!name || !*name || strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, "..")) {
			send_error(&id, "exec: 'name' must be a plain file name");
			free(id.p);
			return;
		}
		long n = base64_decode(data->str, data->len);
		if (n < 0) {
			send_error(&id, "exec: 'data' is not base64");
			free(id.p);
			return;
		}
		if (n > MAX_EXEC_BYTES) {
			send_error(&id, "exec: program is %ld bytes, more than %ld", n, MAX_EXEC_BYTES);
			free(id.p);
			return;
		}
		snprintf(dir, sizeof dir, EXEC_DIR "/%u", ++exec_counter);
		snprintf(file, sizeof file, "%s/%s", dir, name);
		int fd = -1;
		if (mkdirs(dir) == 0)
			fd = open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0755);
		if (fd < 0 || write(fd, data->str, (size_t)n) != n) {
			send_error(&id, "exec: cannot write %s: %s", file, strerror(errno));
			if (fd >= 0)
				close(fd);
			free(id.p);
			return;
		}
		close(fd);
		path = file;
	} else if (!path) {
		send_error(&id, "exec: give 'data' and 'name', or 'path'");
		free(id.p);
		return;
	} else if (access(path, X_OK)) {
		send_error(&id, "exec: %s: %s", path, strerror(errno));
		free(id.p);
		return;
	}
	const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
	char *argv[JSON_MAX_ITEMS + 2];
	int argc = 0;
	argv[argc++] = (char *)base;
	if (args && args->type == J_ARR)
		for (int i = 0; i < args->n_items && argc < JSON_MAX_ITEMS + 1; i++)
			argv[argc++] = args->items[i];
	argv[argc] = NULL;

	int po[2], pe[2];
	if (pipe2(po, O_CLOEXEC) || pipe2(pe, O_CLOEXEC)) {
		send_error(&id, "exec: pipe: %s", strerror(errno));
		free(id.p);
		return;
	}
	pid_t pid = fork();
	if (pid == 0) {
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		signal(SIGPIPE, SIG_DFL);
		setsid();
		int nul = open("/dev/null", O_RDONLY);
		dup2(nul, 0);
		dup2(po[1], 1);
		dup2(pe[1], 2);
		if (cwd && chdir(cwd))
			dprintf(2, "mtevm-agent: cannot enter %s: %s\n", cwd, strerror(errno));
		else if (!cwd && file[0])
			(void)chdir(dir);
		execv(path, argv);
		dprintf(2, "mtevm-agent: cannot run %s: %s\n", path, strerror(errno));
		_exit(127);
	}
	close(po[1]);
	close(pe[1]);
	if (pid < 0) {
		close(po[0]);
		close(pe[0]);
		send_error(&id, "exec: fork: %s", strerror(errno));
		free(id.p);
		return;
	}
	fcntl(po[0], F_SETFL, O_NONBLOCK);
	fcntl(pe[0], F_SETFL, O_NONBLOCK);
	char comm[16];
	snprintf(comm, sizeof comm, "%s", base);   /* the kernel's comm: the file name, 15 bytes */
	learn_comm(pid, comm);
	memset(x, 0, sizeof *x);
	x->used = 1;
	x->id = id;
	x->pid = pid;
	x->out_fd = po[0];
	x->err_fd = pe[0];
	snprintf(x->file, sizeof x->file, "%s", file);
	struct buf m = { 0 };
	buf_printf(&m, "{\"type\":\"exec-started\",\"id\":%s,\"pid\":%d}", x->id.p, pid);
	send_msg(&m);
	free(m.p);
}

static void finish_exec_if_done(struct exec *x)
{
	if (!x->used || !x->exited || x->out_fd >= 0 || x->err_fd >= 0)
		return;
	/* Faults the program took are in the trace buffer already: count them before saying it ended,
	 * so a host that reads counts at exec-exit sees them all. */
	if (trace_fd >= 0)
		read_trace();
	send_faults();
	struct buf m = { 0 };
	if (WIFSIGNALED(x->status))
		buf_printf(&m, "{\"type\":\"exec-exit\",\"id\":%s,\"pid\":%d,\"status\":%d,\"signal\":%d}", x->id.p, x->pid,
			   128 + WTERMSIG(x->status), WTERMSIG(x->status));
	else
		buf_printf(&m, "{\"type\":\"exec-exit\",\"id\":%s,\"pid\":%d,\"status\":%d,\"signal\":null}", x->id.p,
			   x->pid, WEXITSTATUS(x->status));
	send_msg(&m);
	free(m.p);
	if (x->file[0]) {
		unlink(x->file);
		char *slash = strrchr(x->file, '/');
		*slash = 0;
		rmdir(x->file);
	}
	free(x->id.p);
	memset(x, 0, sizeof *x);
}

static void pump_exec_fd(struct exec *x, int *fd, const char *stream)
{
	unsigned char chunk[16384];
	ssize_t n = read(*fd, chunk, sizeof chunk);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) {
		close(*fd);
		*fd = -1;
		finish_exec_if_done(x);
		return;
	}
	struct buf m = { 0 };
	buf_printf(&m, "{\"type\":\"exec-output\",\"id\":%s,\"stream\":\"%s\",\"data\":\"", x->id.p, stream);
	buf_base64(&m, chunk, (size_t)n);
	buf_printf(&m, "\"}");
	send_msg(&m);
	free(m.p);
}

static void reap(void)
{
	int st;
	pid_t pid;
	while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
		for (int i = 0; i < MAX_EXECS; i++)
			if (execs[i].used && execs[i].pid == pid) {
				execs[i].exited = 1;
				execs[i].status = st;
				finish_exec_if_done(&execs[i]);
			}
}

/* ---- pausing ---- */

/* {"type":"config","counting":false}: the guest runs with no tracing at all (the BPF program
 * detached: the tracepoint has nothing attached; counts and state kept), e.g. to time a program
 * at full speed; true resumes. Only with BPF counting: a histogram would lose its counts. */
static void set_counting(int on)
{
	if (!counting_bpf || on == !paused)
		return;
	paused = !on;
	bpf_count_attach(&bpfc, on);
}

/* ---- the workload's TCF ---- */

/* {"type":"tcf","cpu":N|null,"tcf":"sync"}: the workload process of that vCPU (all: null)
 * switches its tag check fault mode; the next "workload" message shows it. */
static void set_workload_tcf(struct jobj *o)
{
	struct jfield *idf = json_get(o, "id"), *cpuf = json_get(o, "cpu");
	struct buf id = { 0 };
	if (idf && idf->type == J_STR)
		buf_json_str(&id, idf->str, idf->len);
	else if (idf && idf->type == J_NUM)
		buf_add(&id, idf->raw, idf->raw_len);
	const char *mode = json_str(o, "tcf");
	static const char *modes[] = { "none", "sync", "async", "asymm" };
	int ok = 0;
	for (unsigned i = 0; mode && i < sizeof modes / sizeof *modes; i++)
		ok |= !strcmp(mode, modes[i]);
	int fd = -1;
	if (!ok)
		send_error(&id, "tcf: %s is not one of none, sync, async, asymm", mode ? mode : "(missing)");
	else if ((fd = open(WL_FILE, O_RDWR | O_CLOEXEC)) < 0)
		send_error(&id, "tcf: no workload is running in this guest (kernel command line mtevm.workload=1 starts it)");
	else {
		struct wl_cpu w[WL_MAX_CPUS];
		ssize_t n = pread(fd, w, sizeof w, 0);
		int count = n > 0 ? (int)(n / (ssize_t)sizeof *w) : 0, hit = 0;
		int only = cpuf && cpuf->type == J_NUM ? (int)cpuf->num : -1;
		for (int i = 0; i < count; i++) {
			if (w[i].cpu < 0 || !w[i].pid || (only >= 0 && w[i].cpu != only))
				continue;
			char want[sizeof w[i].want_tcf] = "";
			snprintf(want, sizeof want, "%s", mode);
			(void)!pwrite(fd, want, sizeof want, (off_t)((size_t)i * sizeof *w + offsetof(struct wl_cpu, want_tcf)));
			hit++;
		}
		if (!hit)
			send_error(&id, "tcf: the workload has no process on cpu %d", only);
		close(fd);
	}
	free(id.p);
}

/* ---- power ---- */

static void power(int cmd, const char *reason)
{
	struct buf m = { 0 };
	buf_printf(&m, "{\"type\":\"bye\",\"reason\":\"%s\"}", reason);
	send_msg(&m);
	free(m.p);
	double until = now_mono() + 1.0;
	while (connected && out.len && now_mono() < until) {
		struct pollfd p = { .fd = port_fd, .events = POLLOUT };
		poll(&p, 1, 50);
		flush_out();
	}
	sync();
	reboot(cmd);
}

static void handle_message(char *line)
{
	struct jobj o;
	if (json_parse(line, &o))
		return;   /* not ours: ignore (forward compatible) */
	const char *type = json_str(&o, "type");
	if (!type)
		return;
	if (!strcmp(type, "hello")) {
		faults_changed = 1;
		memset(wl_last, 0, sizeof wl_last);
		send_hello();
	} else if (!strcmp(type, "config")) {
		struct jfield *f = json_get(&o, "interval_ms");
		if (f && f->type == J_NUM) {
			int ms = (int)f->num;
			interval_ms = ms < 10 ? 10 : ms > 60000 ? 60000 : ms;
		}
		f = json_get(&o, "fault_address");
		if (f && f->type == J_BOOL)
			set_fault_address((int)f->num);
		f = json_get(&o, "counting");
		if (f && f->type == J_BOOL)
			set_counting((int)f->num);
	} else if (!strcmp(type, "tcf")) {
		set_workload_tcf(&o);
	} else if (!strcmp(type, "exec")) {
		start_exec(&o);
	} else if (!strcmp(type, "poweroff")) {
		power(RB_POWER_OFF, "poweroff");
	} else if (!strcmp(type, "reboot")) {
		power(RB_AUTOBOOT, "reboot");
	}
}

static void read_port(void)
{
	char chunk[65536];
	for (;;) {
		ssize_t n = read(port_fd, chunk, sizeof chunk);
		if (n == 0) {      /* the host end closed */
			check_connected();
			return;
		}
		if (n < 0)
			return;
		size_t old = in.len;
		buf_add(&in, chunk, (size_t)n);
		char *nl;
		size_t from = old;
		while ((nl = memchr(in.p + from, '\n', in.len - from))) {
			*nl = 0;
			size_t used = (size_t)(nl - in.p) + 1;
			handle_message(in.p);
			if (!connected)
				return;
			buf_consume(&in, used);
			from = 0;
		}
		if (in.len > MAX_IN_LINE) {
			in.len = 0;
			send_error(NULL, "message longer than %ld bytes dropped", MAX_IN_LINE);
		}
	}
}

static void arm_once(int tfd, int ms)
{
	struct itimerspec it = { 0 };
	it.it_value.tv_sec = ms / 1000;
	it.it_value.tv_nsec = (ms % 1000) * 1000000L;
	timerfd_settime(tfd, 0, &it, NULL);
}

static void arm_timer(int tfd, int ms)
{
	struct itimerspec it = { 0 };
	it.it_interval.tv_sec = ms / 1000;
	it.it_interval.tv_nsec = (ms % 1000) * 1000000L;
	it.it_value = it.it_interval;
	timerfd_settime(tfd, 0, &it, NULL);
}

int main(void)
{
	signal(SIGPIPE, SIG_IGN);
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	int sfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
	int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	n_cpus = (int)sysconf(_SC_NPROCESSORS_CONF);
	if (n_cpus < 1 || n_cpus > MAX_CPUS)
		n_cpus = n_cpus < 1 ? 1 : MAX_CPUS;
	mkdir(EXEC_DIR, 0700);
	double t0 = now_mono();
	setup_tracing();
	setup_seconds = now_mono() - t0;
	if (!tracing_ok)
		fprintf(stderr, "mtevm-agent: no fault counting: %s\n", tracing_error);
	/* Counting is set up: /init starts the workload after this, so none of its faults is missed. */
	close(open(AGENT_READY, O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
	for (int tries = 0; port_fd < 0 && tries < 200; tries++) {
		find_port();
		if (port_fd < 0)
			usleep(50000);
	}
	if (port_fd < 0)
		fprintf(stderr, "mtevm-agent: no virtio-serial port named %s yet; still looking\n", PORT_NAME);
	check_connected();
	int armed_ms = interval_ms;
	arm_timer(tfd, interval_ms);
	/* Trace lines only: read trace_pipe every TRACE_READ_MS. Histogram: end each sampling window. BPF: neither. */
	int trace_tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	if (kernel_counts && !counting_bpf)
		arm_once(trace_tfd, SAMPLE_WINDOW_MS);
	else
		arm_timer(trace_tfd, TRACE_READ_MS);

	for (;;) {
		struct pollfd p[4 + 2 * MAX_EXECS];
		struct exec *owner[4 + 2 * MAX_EXECS];
		/* p[0] batch timer, p[1] SIGCHLD, p[2] trace read timer, then the port and exec pipes */
		int n = 0;
		p[n++] = (struct pollfd){ .fd = tfd, .events = POLLIN };
		p[n++] = (struct pollfd){ .fd = sfd, .events = POLLIN };
		int port_i = -1;
		/* trace_pipe is read on timers, not polled: a wake-up per fault would cost the faulting
		 * program far more (under TCG the agent's vCPU competes for the host's CPUs). */
		p[n++] = (struct pollfd){ .fd = trace_tfd, .events = POLLIN };
		if (connected) {
			port_i = n;
			p[n++] = (struct pollfd){ .fd = port_fd, .events = POLLIN | (out.len ? POLLOUT : 0) };
		}
		int first_exec = n;
		if ((long)out.len < OUT_HIGH_WATER)
			for (int i = 0; i < MAX_EXECS; i++) {
				if (!execs[i].used)
					continue;
				if (execs[i].out_fd >= 0) {
					owner[n] = &execs[i];
					p[n++] = (struct pollfd){ .fd = execs[i].out_fd, .events = POLLIN };
				}
				if (execs[i].err_fd >= 0) {
					owner[n] = &execs[i];
					p[n++] = (struct pollfd){ .fd = execs[i].err_fd, .events = POLLIN };
				}
			}
		/* Disconnected: look for the host every 100 ms (the port reports a hang-up constantly). */
		if (poll(p, (nfds_t)n, connected ? -1 : 100) < 0 && errno != EINTR)
			break;
		if (p[1].revents) {
			struct signalfd_siginfo si;
			while (read(sfd, &si, sizeof si) == sizeof si)
				;
			reap();
		}
		if (p[2].revents) {
			uint64_t ticks;
			(void)!read(trace_tfd, &ticks, sizeof ticks);
			if (kernel_counts && !fault_addr_on)
				write_file(TRACING "/tracing_on", "0");     /* the sampling window ends */
			else if (trace_fd >= 0)
				read_trace();
		}
		if (port_i >= 0 && p[port_i].revents & POLLHUP)
			check_connected();
		else if (port_i >= 0 && p[port_i].revents & POLLIN)
			read_port();
		for (int i = first_exec; i < n; i++) {
			if (!p[i].revents)
				continue;
			struct exec *x = owner[i];
			if (x->out_fd == p[i].fd)
				pump_exec_fd(x, &x->out_fd, "stdout");
			else if (x->err_fd == p[i].fd)
				pump_exec_fd(x, &x->err_fd, "stderr");
		}
		if (p[0].revents) {
			uint64_t ticks;
			(void)!read(tfd, &ticks, sizeof ticks);
			if (!connected)
				check_connected();
			if (trace_fd >= 0)
				read_trace();
			send_faults();
			send_workload();
			if (kernel_counts && trace_fd >= 0 && !paused) {   /* histogram: the next sampling window (all the time with addresses) */
				write_file(TRACING "/tracing_on", "1");
				if (!fault_addr_on)
					arm_once(trace_tfd, SAMPLE_WINDOW_MS);
			}
			if (armed_ms != interval_ms) {
				armed_ms = interval_ms;
				arm_timer(tfd, interval_ms);
			}
		} else if (!connected) {
			check_connected();
		}
		flush_out();
	}
	return 1;
}
