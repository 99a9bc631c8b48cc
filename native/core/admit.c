// SPDX-License-Identifier: GPL-2.0
/* Who may go where, and how many: the one place a client is admitted or refused.
 *
 * admit() runs the checks a path asks for (enum admit_check), in one order: ADMITTED, or REFUSED
 * with the CAUSE_* that refuses the client (its detail and argument) in a struct refusal. The paths:
 *   SYN path (synq.c)        CLIENT | DESTINATION, then the gate (hold, defer, refuse), then FDS | LIMIT
 *   accept path (accept.c)   CLIENT | DESTINATION | FDS | LIMIT (its SYN may not have been judged)
 *   convert mode, accepted   CLIENT | GATE | FDS | LIMIT (a greeting: an fd before the client spoke)
 *   convert mode, message    DESTINATION (the rest was admitted with the greeting)
 * The destination rules are mimbox.converter.safety.Policy's (tests/test_core.py checks they agree); a refusal's
 * detail says which rule, so Python words the log line without deciding again. */
#include "rooms.h"
#include <stdlib.h>

/* -- the workers' shared connection limit: one counter in shared memory ------------------------------- */
int core_admit(int64_t *counter, int64_t limit)
{
	int64_t v = __atomic_load_n(counter, __ATOMIC_RELAXED);
	do {
		if (v >= limit)
			return 0;
	} while (!__atomic_compare_exchange_n(counter, &v, v + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED));
	return 1;
}

void core_unadmit(int64_t *counter)
{
	__atomic_sub_fetch(counter, 1, __ATOMIC_ACQ_REL);
}

/* give back an admission taken by admit(ADMIT_LIMIT) */
void admission_return(struct core *c)
{
	if (c->cfg.admission)
		core_unadmit(c->cfg.admission);
}

/* -- policy ---------------------------------------------------------------------------------------------- */
/* Addresses are 16 bytes (addr.h: IPv4 as ::ffff:a.b.c.d), prefixes their length over those 16 bytes
 * (an IPv4 /24 is /120). Every table grows as it is filled: a table that cannot grow (no memory)
 * answers -ENOMEM and the caller refuses to start, or the own table stays incomplete and every
 * destination is refused (fail closed), never a silent truncation. */
/* an array with room for `need`, doubled as it grows; 0 or -ENOMEM (the array unchanged) */
static int grow(void **p, int *cap, int need, size_t size)
{
	void *q;
	int n = *cap ? *cap : 16;
	if (need <= *cap)
		return 0;
	while (n < need)
		n *= 2;
	q = realloc(*p, (size_t)n * size);
	if (!q)
		return -ENOMEM;
	*p = q;
	*cap = n;
	return 0;
}

void policy_free(struct core *c)
{
	free(c->allow);
	own_free(&c->own);
}

/* enum policy_kind (mimbox.codes.POLICY): a client prefix allowed; one of this host's own destinations (an address, or
 * a shorter local route); this host's own destinations forgotten (Python lists them anew, then says
 * POLICY_OWN_DONE); the allowed clients and rules forgotten (a reload lists them anew). 0 or -errno. */
int core_policy(struct core *c, int kind, const uint8_t *net, int len)
{
	enum policy_kind k = kind;
	struct in6_addr a;
	switch (k) {
	case POLICY_ALLOW_CLIENT:
	case POLICY_OWN:
		break;
	case POLICY_OWN_FORGET:
		own_forget(&c->own);
		return 0;
	case POLICY_OWN_DONE:
		c->own.complete = 1;
		return 0;
	case POLICY_FORGET:
		c->nallow = 0;
		c->nrules = 0;
		return 0;
	default:
		return -EINVAL;		/* (not a kind mimbox.codes declares) */
	}
	if (!net || len < 0 || len > 128)
		return -EINVAL;
	a = addr_load(net);
	if (k == POLICY_ALLOW_CLIENT) {
		if (grow((void **)&c->allow, &c->allow_cap, c->nallow + 1, sizeof(*c->allow)))
			return -ENOMEM;
		c->allow[c->nallow++] = prefix_make(&a, len);
		return 0;
	}
	return own_add(&c->own, &a, len);	/* POLICY_OWN */
}

/* the next destination rule (after those before it): ports lo..hi of net/len allowed or denied */
int core_rule(struct core *c, int allow, const uint8_t *net, int len, int lo, int hi)
{
	struct in6_addr a;
	if (c->nrules == MAX_RULES)
		return -ENOSPC;
	if (len < 0 || len > 128)
		return -EINVAL;
	a = addr_load(net);
	c->rules[c->nrules++] = (struct rule){prefix_make(&a, len), (uint16_t)lo, (uint16_t)hi, allow};
	return 0;
}

static int client_allowed(struct core *c, const struct in6_addr *caddr)
{
	for (int i = 0; i < c->nallow; i++)
		if (prefix_has(&c->allow[i], caddr))
			return 1;
	return 0;
}

/* -1: daddr:dport allowed; else CAUSE_DESTINATION_DENIED and *detail: DENIED_PORT0, DENIED_OWN or the
 * index of the rule that denies it */
static int destination_refusal(struct core *c, const struct in6_addr *daddr, uint16_t dport, int *detail)
{
	uint16_t p = ntohs(dport);
	if (!p) {
		*detail = DENIED_PORT0;
		return CAUSE_DESTINATION_DENIED;
	}
	if (!c->own.complete || own_has(&c->own, daddr)) {
		*detail = c->own.complete ? DENIED_OWN : DENIED_OWN_UNKNOWN;
		return CAUSE_DESTINATION_DENIED;
	}
	for (int i = 0; i < c->nrules; i++) {
		const struct rule *r = &c->rules[i];
		if (prefix_has(&r->p, daddr) && p >= r->lo && p <= r->hi) {
			*detail = i;
			return r->allow ? -1 : CAUSE_DESTINATION_DENIED;
		}
	}
	return -1;
}

/* -1: client -> daddr:dport allowed; else the CAUSE_* that refuses it, its detail in *detail */
int core_refusal(struct core *c, const uint8_t *caddr, const uint8_t *daddr, uint16_t dport, int *detail)
{
	struct flow f = flow_load(caddr, 0, daddr, dport);
	struct refusal why;
	int denied = admit(c, ADMIT_CLIENT | ADMIT_DESTINATION, &f, &why) == REFUSED;
	*detail = denied ? why.detail : 0;
	return denied ? why.cause : -1;
}

/* -- the gate: held SYNs and greetings per client /24 (IPv4) or /64 (IPv6), and per address ----------- */
/* open addressing; key + 1 (0: never used); a count back at 0 is a reusable tombstone. Each table has
 * at least four slots per gated item (gate_size), so a free slot is always found. */
static struct gate_count *gate_slot(struct gate_count *t, int slots, uint64_t key, int create)
{
	uint32_t mask = slots - 1, i = hash64(key + 1) & mask;
	struct gate_count *reuse = NULL;
	for (int n = 0; n < slots; n++, i = (i + 1) & mask) {
		struct gate_count *g = &t[i];
		if (g->prefix == key + 1 && g->n > 0)
			return g;
		if (g->n <= 0 && !reuse)
			reuse = g;
		if (!g->prefix)
			break;		/* never used: the key is not further on */
	}
	if (!create || !reuse)
		return NULL;
	reuse->prefix = key + 1;
	reuse->n = 0;
	return reuse;
}

/* the gate's tables for pending_limit items (made at start, grown by a reload that raises it); the
 * counts move over. 0, or -ENOMEM with the old tables kept */
int gate_size(struct core *c, int pending_limit)
{
	int slots;
	struct gate_count *t[2];
	for (slots = 64; slots < 4 * pending_limit; slots *= 2)
		;
	if (slots <= c->gate_slots)
		return 0;
	t[0] = calloc(slots, sizeof(*t[0]));
	t[1] = calloc(slots, sizeof(*t[1]));
	if (!t[0] || !t[1]) {
		free(t[0]);
		free(t[1]);
		return -ENOMEM;
	}
	for (int k = 0; k < 2; k++) {
		struct gate_count *old = k ? c->gate_addr : c->gate;
		for (int i = 0; i < c->gate_slots; i++)
			if (old[i].n > 0)
				gate_slot(t[k], slots, old[i].prefix - 1, 1)->n = old[i].n;
		free(old);
	}
	c->gate = t[0];
	c->gate_addr = t[1];
	c->gate_slots = slots;
	return 0;
}

/* GATE_OPEN, or which cap a newcomer from caddr meets (GATE_*, mimbox/codes.py): pending_limit in
 * all, pending_per_prefix from its /24 or /64, pending_per_address from its address */
int gate_open(struct core *c, const struct in6_addr *caddr)
{
	struct gate_count *p = gate_slot(c->gate, c->gate_slots, gate_prefix(caddr), 0);
	struct gate_count *a = gate_slot(c->gate_addr, c->gate_slots, gate_address(caddr), 0);
	if (a && a->n >= c->cfg.pending_per_address)
		return GATE_ADDRESS_FULL;
	if (p && p->n >= c->cfg.pending_per_prefix)
		return GATE_PREFIX_FULL;
	if (c->gated >= c->cfg.pending_limit)
		return GATE_FULL;
	return GATE_OPEN;
}

void gate_hold(struct core *c, const struct in6_addr *caddr)
{
	struct gate_count *p = gate_slot(c->gate, c->gate_slots, gate_prefix(caddr), 1);
	struct gate_count *a = gate_slot(c->gate_addr, c->gate_slots, gate_address(caddr), 1);
	c->gated++;
	p->n++;		/* (gate_size: never NULL) */
	a->n++;
}

void gate_release(struct core *c, const struct in6_addr *caddr)
{
	struct gate_count *p = gate_slot(c->gate, c->gate_slots, gate_prefix(caddr), 0);
	struct gate_count *a = gate_slot(c->gate_addr, c->gate_slots, gate_address(caddr), 0);
	c->gated--;
	if (p)
		p->n--;
	if (a)
		a->n--;
}

/* SYN_HOLD, SYN_DEFER or SYN_REFUSE for a SYN from caddr (docs/running.md "SYN path") */
int syn_gate(struct core *c, const struct in6_addr *caddr)
{
	if (c->cfg.syn_path == SYN_PATH_ACCEPT)
		return SYN_DEFER;
	if (gate_open(c, caddr) == GATE_OPEN)
		return SYN_HOLD;
	return c->cfg.syn_path == SYN_PATH_HOLD ? SYN_REFUSE : SYN_DEFER;
}

int core_gate(struct core *c, const uint8_t *caddr)
{
	struct in6_addr a = addr_load(caddr);
	return syn_gate(c, &a);
}

/* for tests: a SYN from caddr held (on) or released */
void core_gate_hold(struct core *c, const uint8_t *caddr, int on)
{
	struct in6_addr a = addr_load(caddr);
	if (on)
		gate_hold(c, &a);
	else
		gate_release(c, &a);
}

/* -- admit ------------------------------------------------------------------------------------------------- */
/* Run the checks a path asks for (enum admit_check), in one order: ADMITTED, or REFUSED with why filled
 * in (a CAUSE_*, its detail and argument). ADMIT_LIMIT takes a place under the shared limit when it
 * admits: admission_return() gives it back. */
enum admission admit(struct core *c, unsigned checks, const struct flow *f, struct refusal *why)
{
	*why = (struct refusal){.cause = -1};
	if ((checks & ADMIT_CLIENT) && !client_allowed(c, &f->caddr)) {
		why->cause = CAUSE_CLIENT_NOT_ALLOWED;
		return REFUSED;
	}
	if ((checks & ADMIT_DESTINATION) &&
	    (why->cause = destination_refusal(c, &f->daddr, f->dport, &why->detail)) >= 0)
		return REFUSED;
	why->detail = 0;
	if ((checks & ADMIT_GATE) && (why->detail = gate_open(c, &f->caddr)) != GATE_OPEN) {
		why->arg = c->gated;
		why->cause = CAUSE_PENDING_LIMIT;	/* detail: which cap (GATE_*) */
		return REFUSED;
	}
	if ((checks & ADMIT_FDS) && c->active + c->nheld + c->greetings >= c->cfg.fd_capacity) {
		why->arg = c->cfg.fd_capacity;
		why->cause = CAUSE_FD_LIMIT;
		return REFUSED;
	}
	if ((checks & ADMIT_LIMIT) && c->cfg.admission &&
	    (why->arg = (int)__atomic_load_n(&c->cfg.admission[1], __ATOMIC_RELAXED))) {
		why->cause = CAUSE_MEMORY_PRESSURE;	/* pages held (mimbox.host.resources.MemoryPressure) */
		return REFUSED;
	}
	if ((checks & ADMIT_LIMIT) && c->cfg.admission && !core_admit(c->cfg.admission, c->cfg.admission_limit)) {
		why->arg = (int)c->cfg.admission_limit;
		why->cause = CAUSE_CONNECTION_LIMIT;
		return REFUSED;
	}
	why->cause = -1;
	return ADMITTED;
}

/* -- refusals: counted here, logged by Python (EV_REFUSED) --------------------------------------------- */
void refused(struct core *c, const struct refusal *why, int after_accept, const struct flow *f)
{
	struct core_event *e;
	c->st.refused[why->cause]++;
	if (after_accept)
		c->st.refused_after_accept++;
	e = emit(c, EV_REFUSED);
	if (!e)
		return;
	e->cause = why->cause;
	e->detail = why->detail;
	e->arg = why->arg;
	e->err = why->err;
	e->after_accept = after_accept;
	event_flow(e, f);
}
