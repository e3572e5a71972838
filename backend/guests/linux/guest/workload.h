/* The tagged-heap workload's counters, shared with the agent through a small file in /run:
 * one record per vCPU, written by that vCPU's workload process (MAP_SHARED), read by the agent
 * at each batch and sent as the protocol's "workload" message. The agent writes want_tcf to
 * change a vCPU's tag check fault mode while the workload runs. */
#ifndef MTEVM_WORKLOAD_H
#define MTEVM_WORKLOAD_H

#include <stdint.h>

#define WL_FILE "/run/mtevm/workload"
#define WL_MAX_CPUS 64

struct wl_cpu {
	int32_t cpu;         /* -1: slot unused */
	int32_t pid;
	char tcf[8];         /* none, sync, async, asymm */
	uint64_t checked;    /* tag-checked accesses made */
	uint64_t sync;       /* SIGSEGV with SEGV_MTESERR received */
	uint64_t async;      /* SIGSEGV with SEGV_MTEAERR received */
	char want_tcf[8];    /* set by the agent (host message "tcf"): the process switches to it */
};

#endif
