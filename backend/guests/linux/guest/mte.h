/* MTE from Linux userspace, shared by mtevm's guest programs (workload, mte-faults).
 * Documentation/arch/arm64/memory-tagging-extension.rst: prctl(PR_SET_TAGGED_ADDR_CTRL) picks the
 * tag check fault mode (TCF) and the tags IRG may generate; PROT_MTE maps tagged memory; STG sets
 * a 16-byte granule's allocation tag. si_code SEGV_MTESERR (9) is a synchronous fault,
 * SEGV_MTEAERR (8) an asynchronous one (reported at the next kernel entry). */
#ifndef MTEVM_MTE_H
#define MTEVM_MTE_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <linux/prctl.h>

#ifndef PROT_MTE
#define PROT_MTE 0x20
#endif
#ifndef SEGV_MTEAERR
#define SEGV_MTEAERR 8
#endif
#ifndef SEGV_MTESERR
#define SEGV_MTESERR 9
#endif

#define MTE_GRANULE 16

enum tcf { TCF_NONE, TCF_SYNC, TCF_ASYNC, TCF_ASYMM };

static inline const char *tcf_name(enum tcf t)
{
	static const char *names[] = { "none", "sync", "async", "asymm" };
	return names[t];
}

static inline int tcf_parse(const char *s, size_t n, enum tcf *out)
{
	for (int t = TCF_NONE; t <= TCF_ASYMM; t++)
		if (strlen(tcf_name(t)) == n && !strncmp(s, tcf_name(t), n)) {
			*out = t;
			return 0;
		}
	return -1;
}

/* Tags 1..15 may be generated (tag 0 is left for untagged memory). */
#define MTE_INCLUDE_MASK 0xfffeUL

/* Select the TCF of the calling thread. asymm is "both bits", which the kernel resolves through
 * the CPU's mte_tcf_preferred: 6.1 needs 'asymm' written there first (set_tcf_preferred). */
static inline int mte_set_tcf(enum tcf t)
{
	unsigned long bits = 0;
	if (t == TCF_SYNC)
		bits = PR_MTE_TCF_SYNC;
	else if (t == TCF_ASYNC)
		bits = PR_MTE_TCF_ASYNC;
	else if (t == TCF_ASYMM)
		bits = PR_MTE_TCF_SYNC | PR_MTE_TCF_ASYNC;
	return prctl(PR_SET_TAGGED_ADDR_CTRL, PR_TAGGED_ADDR_ENABLE | bits | (MTE_INCLUDE_MASK << PR_MTE_TAG_SHIFT),
		     0, 0, 0);
}

static inline int set_tcf_preferred(int cpu, const char *mode)
{
	char path[96];
	snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/mte_tcf_preferred", cpu);
	FILE *f = fopen(path, "w");
	if (!f)
		return -1;
	int ok = fputs(mode, f) >= 0;
	return (fclose(f) == 0 && ok) ? 0 : -1;
}

static inline void *mte_with_tag(void *p, unsigned tag)
{
	return (void *)(((uintptr_t)p & ~(0xfUL << 56)) | ((uintptr_t)(tag & 0xf) << 56));
}

static inline unsigned mte_tag_of(const void *p)
{
	return ((uintptr_t)p >> 56) & 0xf;
}

/* Set the allocation tag of every granule of [p, p+len) to p's pointer tag. */
static inline void mte_tag_range(void *p, size_t len)
{
	for (char *g = p; g < (char *)p + len; g += MTE_GRANULE)
		__asm__ volatile("stg %0, [%0]" : : "r"(g) : "memory");
}

#endif
