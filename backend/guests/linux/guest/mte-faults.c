/* mte-faults SYNC_N ASYNC_N: take exactly SYNC_N synchronous and ASYNC_N asynchronous tag-check
 * faults, handling SIGSEGV itself, then print what it counted and exit 0 (1 if the kernel did not
 * deliver exactly those signals, 2 on bad usage or no MTE).
 *
 * A test program with a known answer for the agent's fault counting. Sync faults are precise: the
 * handler jumps back past the faulting load. Async faults are only noticed at the next kernel
 * entry and merge until then (10 M bad stores gave 172 signals), so each bad store is followed by
 * one syscall (getppid), which turns it into exactly one SIGSEGV with si_code SEGV_MTEAERR. */
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "mte.h"

#ifndef HWCAP2_MTE
#define HWCAP2_MTE (1 << 18)
#endif

static sigjmp_buf back;
static volatile sig_atomic_t in_sync;
static volatile long got_sync, got_async, got_other;

static void on_segv(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)uc;
	if (si->si_code == SEGV_MTESERR) {
		got_sync++;
		if (in_sync)
			siglongjmp(back, 1);
	} else if (si->si_code == SEGV_MTEAERR) {
		got_async++;
	} else {
		got_other++;
		_exit(3);
	}
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: mte-faults SYNC_N ASYNC_N\n");
		return 2;
	}
	long want_sync = atol(argv[1]), want_async = atol(argv[2]);
	if (!(getauxval(AT_HWCAP2) & HWCAP2_MTE)) {
		fprintf(stderr, "mte-faults: this CPU has no MTE (HWCAP2_MTE not set)\n");
		return 2;
	}
	struct sigaction sa = { .sa_sigaction = on_segv, .sa_flags = SA_SIGINFO };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGSEGV, &sa, NULL);

	char *buf = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_MTE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		perror("mte-faults: mmap(PROT_MTE)");
		return 2;
	}
	char *good = mte_with_tag(buf, 3), *bad = mte_with_tag(buf, 5);
	if (mte_set_tcf(TCF_SYNC)) {
		perror("mte-faults: prctl(PR_SET_TAGGED_ADDR_CTRL)");
		return 2;
	}
	mte_tag_range(good, 64);
	good[0] = 1;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);

	for (volatile long i = 0; i < want_sync; i++) {
		in_sync = 1;
		if (!sigsetjmp(back, 1))
			*(volatile char *)bad;   /* tag 5 on memory tagged 3: a precise fault */
		in_sync = 0;
	}
	in_sync = 0;

	if (want_async > 0 && mte_set_tcf(TCF_ASYNC)) {
		perror("mte-faults: prctl(async)");
		return 2;
	}
	for (long i = 0; i < want_async; i++) {
		*(volatile char *)(bad + 16) = (char)i;  /* noticed at the next kernel entry... */
		getppid();                               /* ...which is this one */
	}
	mte_set_tcf(TCF_NONE);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
	printf("mte-faults: sync %ld/%ld async %ld/%ld in %.3f s (%.0f faults/s)\n", (long)got_sync, want_sync,
	       (long)got_async, want_async, secs, secs > 0 ? (double)(got_sync + got_async) / secs : 0.0);
	return (got_sync == want_sync && got_async == want_async && !got_other) ? 0 : 1;
}
