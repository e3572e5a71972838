/* mtevm-workload: the tagged-heap workload of mtevm's VMs, as a Linux userspace program.
 *
 * The same parameters as backend/hosts/workload.py (WorkloadConfig), read from the kernel command
 * line (mtevm.tcf=sync,async,... per vCPU with the last repeating, mtevm.rate, mtevm.seed,
 * mtevm.uaf, mtevm.overflow, mtevm.wild, mtevm.heap). One process per vCPU, pinned to it with
 * sched_setaffinity, with that vCPU's tag check fault mode: a heap of 64-byte objects in PROT_MTE
 * memory, each with its own tag (neighbours differ), accessed at `rate` checked accesses per
 * second; with the given probabilities an access is a use after free (the object was retagged),
 * an overflow into the next object, or a pointer with a wrong tag. Faults are SIGSEGVs the process
 * handles itself; its own counts go to /run/mtevm/workload for the agent (which also sees every
 * fault through the tracepoint, like any other process's). asymm: 6.1 resolves "sync|async" to the
 * CPU's mte_tcf_preferred, so 'asymm' is written there first. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mte.h"
#include "workload.h"

#define OBJ 64

struct params {
	enum tcf tcf[WL_MAX_CPUS];
	int n_tcf;
	long rate;
	unsigned long long seed;
	double uaf, overflow, wild;
	long heap;
};

static struct wl_cpu *me;
static sigjmp_buf back;
static volatile sig_atomic_t armed;

static void on_segv(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)uc;
	if (si->si_code == SEGV_MTEAERR) {
		me->async++;
		return;
	}
	if (si->si_code == SEGV_MTESERR) {
		me->sync++;
		if (armed) {
			armed = 0;
			siglongjmp(back, 1);
		}
	}
	/* A fault we did not provoke: returning would take it again forever. */
	_exit(3);
}

static void parse_cmdline(struct params *p)
{
	*p = (struct params){ .tcf = { TCF_SYNC }, .n_tcf = 1, .rate = 20000, .seed = 1, .uaf = 0.001,
			      .overflow = 0.001, .wild = 0.0005, .heap = 1 << 20 };
	char buf[4096] = "";
	int fd = open("/proc/cmdline", O_RDONLY);
	if (fd >= 0) {
		ssize_t n = read(fd, buf, sizeof buf - 1);
		buf[n > 0 ? n : 0] = 0;
		close(fd);
	}
	for (char *w = strtok(buf, " \n"); w; w = strtok(NULL, " \n")) {
		if (strncmp(w, "mtevm.", 6))
			continue;
		char *key = w + 6, *val = strchr(key, '=');
		if (!val)
			continue;
		*val++ = 0;
		if (!strcmp(key, "tcf")) {
			p->n_tcf = 0;
			for (char *s = val; *s && p->n_tcf < WL_MAX_CPUS;) {
				size_t n = strcspn(s, ",");
				if (!tcf_parse(s, n, &p->tcf[p->n_tcf]))
					p->n_tcf++;
				s += n + (s[n] == ',');
			}
			if (!p->n_tcf)
				p->tcf[p->n_tcf++] = TCF_SYNC;
		} else if (!strcmp(key, "rate")) p->rate = atol(val);
		else if (!strcmp(key, "seed")) p->seed = strtoull(val, NULL, 0);
		else if (!strcmp(key, "uaf")) p->uaf = atof(val);
		else if (!strcmp(key, "overflow")) p->overflow = atof(val);
		else if (!strcmp(key, "wild")) p->wild = atof(val);
		else if (!strcmp(key, "heap")) p->heap = atol(val);
	}
	if (p->heap < 4096)
		p->heap = 4096;
}

static unsigned long long rng;
static unsigned long long next_rand(void)
{
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return rng * 2685821657736338717ULL;
}

static double uniform(void)
{
	return (double)(next_rand() >> 11) / 9007199254740992.0;
}

static unsigned new_tag(unsigned avoid1, unsigned avoid2)
{
	unsigned t;
	do
		t = 1 + (unsigned)(next_rand() % 15);
	while (t == avoid1 || t == avoid2);
	return t;
}

/* Select a TCF for this vCPU's process: asymm first in the CPU's preferred mode (6.1 resolves
 * "sync|async" through it), then prctl for this (single-threaded) process. */
static int apply_tcf(int cpu, enum tcf t)
{
	if (t == TCF_ASYMM && set_tcf_preferred(cpu, "asymm"))
		fprintf(stderr, "mtevm-workload: cpu %d: cannot select asymm in mte_tcf_preferred: %s\n", cpu,
			strerror(errno));
	if (mte_set_tcf(t)) {
		fprintf(stderr, "mtevm-workload: cpu %d: prctl(%s): %s\n", cpu, tcf_name(t), strerror(errno));
		return -1;
	}
	snprintf(me->tcf, sizeof me->tcf, "%s", tcf_name(t));
	return 0;
}

/* The agent asked for another mode (host message "tcf"). */
static void switch_tcf(int cpu)
{
	enum tcf t;
	char want[sizeof me->want_tcf + 1] = "";
	memcpy(want, me->want_tcf, sizeof me->want_tcf);
	if (tcf_parse(want, strlen(want), &t) == 0)
		apply_tcf(cpu, t);
	me->want_tcf[0] = 0;
}

static void run_cpu(int cpu, enum tcf tcf, const struct params *p)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof set, &set))
		fprintf(stderr, "mtevm-workload: cannot pin to cpu %d: %s\n", cpu, strerror(errno));
	struct sigaction sa = { .sa_sigaction = on_segv, .sa_flags = SA_SIGINFO | SA_NODEFER };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGSEGV, &sa, NULL);
	if (apply_tcf(cpu, tcf))
		_exit(2);
	long n_obj = p->heap / OBJ;
	char *heap = mmap(NULL, (size_t)p->heap, PROT_READ | PROT_WRITE | PROT_MTE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *tags = malloc((size_t)n_obj);
	if (heap == MAP_FAILED || !tags) {
		fprintf(stderr, "mtevm-workload: cpu %d: no tagged heap of %ld bytes: %s\n", cpu, p->heap, strerror(errno));
		_exit(2);
	}
	rng = p->seed * 0x9e3779b97f4a7c15ULL + (unsigned long long)cpu + 1;
	for (long i = 0; i < n_obj; i++) {
		tags[i] = (unsigned char)new_tag(i ? tags[i - 1] : 0, 0);
		mte_tag_range(mte_with_tag(heap + i * OBJ, tags[i]), OBJ);
	}
	struct timespec t0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	unsigned long long checked = 0;
	for (;;) {
		long i = (long)(next_rand() % (unsigned long long)n_obj);
		char *obj = heap + i * OBJ;
		char *ptr = mte_with_tag(obj, tags[i]);
		double r = uniform();
		int bad = 1;
		if (r < p->uaf) {
			/* free + reallocate: the object gets a new tag; the old pointer is stale */
			unsigned t = new_tag(i ? tags[i - 1] : 0, i + 1 < n_obj ? tags[i + 1] : 0);
			while (t == tags[i])
				t = new_tag(i ? tags[i - 1] : 0, i + 1 < n_obj ? tags[i + 1] : 0);
			tags[i] = (unsigned char)t;
			mte_tag_range(mte_with_tag(obj, t), OBJ);
		} else if (r < p->uaf + p->overflow) {
			/* one past the end: the neighbour, whose tag differs */
			if (i + 1 < n_obj)
				ptr += OBJ;
			else
				ptr = mte_with_tag(obj - OBJ, tags[i]);
		} else if (r < p->uaf + p->overflow + p->wild) {
			ptr = mte_with_tag(obj, new_tag(tags[i], 0));
		} else {
			bad = 0;
		}
		int store = (int)(next_rand() & 1);
		if (bad) {
			armed = 1;
			if (!sigsetjmp(back, 0)) {
				if (store)
					*(volatile char *)ptr = (char)checked;
				else
					(void)*(volatile char *)ptr;
			}
			armed = 0;
		} else if (store) {
			*(volatile char *)ptr = (char)checked;
		} else {
			(void)*(volatile char *)ptr;
		}
		checked++;
		if ((checked & 63) == 0) {
			me->checked = checked;
			if (me->want_tcf[0] && strncmp(me->want_tcf, me->tcf, sizeof me->tcf))
				switch_tcf(cpu);
			if (p->rate > 0) {
				/* sleep until this many accesses are due at `rate` per second */
				long long due_ns = (long long)(checked * 1000000000ULL / (unsigned long long)p->rate);
				struct timespec until = { t0.tv_sec + due_ns / 1000000000LL, t0.tv_nsec + due_ns % 1000000000LL };
				if (until.tv_nsec >= 1000000000L)
					until.tv_sec++, until.tv_nsec -= 1000000000L;
				clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL);
			} else {
				getppid();   /* a kernel entry: async faults are reported here at the latest */
			}
		}
	}
}

int main(void)
{
	struct params p;
	parse_cmdline(&p);
	int n_cpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
	if (n_cpus > WL_MAX_CPUS)
		n_cpus = WL_MAX_CPUS;
	mkdir("/run/mtevm", 0755);
	int fd = open(WL_FILE, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || ftruncate(fd, sizeof(struct wl_cpu) * WL_MAX_CPUS)) {
		perror("mtevm-workload: " WL_FILE);
		return 1;
	}
	struct wl_cpu *w = mmap(NULL, sizeof(struct wl_cpu) * WL_MAX_CPUS, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (w == MAP_FAILED) {
		perror("mtevm-workload: mmap");
		return 1;
	}
	for (int c = 0; c < WL_MAX_CPUS; c++)
		w[c].cpu = -1;
	pid_t pids[WL_MAX_CPUS];
	for (int c = 0; c < n_cpus; c++) {
		enum tcf t = p.tcf[c < p.n_tcf ? c : p.n_tcf - 1];
		snprintf(w[c].tcf, sizeof w[c].tcf, "%s", tcf_name(t));
		w[c].checked = w[c].sync = w[c].async = 0;
		pids[c] = fork();
		if (pids[c] == 0) {
			me = &w[c];
			me->pid = getpid();
			me->cpu = c;
			run_cpu(c, t, &p);
			_exit(0);
		}
	}
	printf("mtevm-workload: %d vCPU process(es), rate %ld/s, seed %llu\n", n_cpus, p.rate, p.seed);
	fflush(stdout);
	int st;
	pid_t dead;
	while ((dead = wait(&st)) > 0)
		for (int c = 0; c < n_cpus; c++)
			if (pids[c] == dead) {
				fprintf(stderr, "mtevm-workload: cpu %d process %d ended (status %d)\n", c, dead, st);
				w[c].pid = 0;
			}
	return 0;
}
