// SPDX-License-Identifier: GPL-2.0
/* This host's own destinations, never a destination: what the kernel's local routing table routes to
 * this host (RTN_LOCAL routes of table 255, both families) -- every address, however many, and
 * AnyIP's `ip route add local PREFIX` (an address on lo makes its whole prefix local, too).
 *
 * core_own_refresh() reads the table with a netlink dump on a route socket Python opened without
 * CAP_NET_ADMIN in force (a SYN-holding worker keeps the capability; rtnetlink asks the opener's too,
 * so nothing sent on it changes anything), at start and whenever the watch (mimbox.converter.safety.AddressWatch)
 * says an address or a local route changed. Held as one hash set per prefix length in use (a lookup
 * costs a probe per length, not per route), grown as needed; while a listing is incomplete (begun,
 * or failed) every destination is refused (admit.c), never a silent truncation. */
#include "rooms.h"
#include <stdlib.h>
#include <sys/socket.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>

static uint32_t own_hash(const struct in6_addr *a)
{
	uint64_t h[2];
	addr_halves(a, h);
	return (uint32_t)mix64(h[0] ^ mix64(h[1]));
}

static struct in6_addr masked(const struct in6_addr *a, int len)
{
	struct prefix p = prefix_make(a, len);
	struct in6_addr m;
	memcpy(&m, p.net, 16);
	return m;
}

/* 1 added, 0 there already */
static int set_put(struct own_set *t, const struct in6_addr *a)
{
	uint32_t mask = t->nslots - 1, i = own_hash(a) & mask;
	for (;; i = (i + 1) & mask) {
		if (addr_eq(&t->slots[i], a))
			return 0;
		if (IN6_IS_ADDR_UNSPECIFIED(&t->slots[i])) {
			t->slots[i] = *a;
			t->n++;
			return 1;
		}
	}
}

static int set_has(const struct own_set *t, const struct in6_addr *a)
{
	uint32_t mask, i;
	if (IN6_IS_ADDR_UNSPECIFIED(a))
		return t->has_zero;
	if (!t->nslots)
		return 0;
	mask = t->nslots - 1;
	for (i = own_hash(a) & mask; !IN6_IS_ADDR_UNSPECIFIED(&t->slots[i]); i = (i + 1) & mask)
		if (addr_eq(&t->slots[i], a))
			return 1;
	return 0;
}

/* room for one more (at most half full), the entries moved over; 0 or -ENOMEM (the set unchanged) */
static int set_grow(struct own_set *t)
{
	struct own_set bigger = {.nslots = t->nslots ? 2 * t->nslots : 64, .has_zero = t->has_zero};
	if (2 * (t->n + 1) <= t->nslots)
		return 0;
	bigger.slots = calloc(bigger.nslots, sizeof(*bigger.slots));
	if (!bigger.slots)
		return -ENOMEM;
	for (int i = 0; i < t->nslots; i++)
		if (!IN6_IS_ADDR_UNSPECIFIED(&t->slots[i]))
			set_put(&bigger, &t->slots[i]);
	free(t->slots);
	*t = bigger;
	return 0;
}

/* net/len is one of this host's own destinations (len 128: one address); 0 or -ENOMEM */
int own_add(struct own_table *t, const struct in6_addr *a, int len)
{
	struct own_set *s = &t->by_len[len];
	struct in6_addr m = masked(a, len);
	int added;
	if (IN6_IS_ADDR_UNSPECIFIED(&m)) {
		added = !s->has_zero;
		s->has_zero = 1;
	} else {
		if (set_grow(s))
			return -ENOMEM;
		added = set_put(s, &m);
	}
	if (!added)
		return 0;
	if (s->n + s->has_zero == 1)
		t->lens[t->nlens++] = (uint8_t)len;
	if (len == 128)
		t->naddrs++;
	else
		t->nnets++;
	return 0;
}

/* whether a is one of this host's own destinations: one probe per prefix length in use */
int own_has(const struct own_table *t, const struct in6_addr *a)
{
	for (int i = 0; i < t->nlens; i++) {
		int len = t->lens[i];
		struct in6_addr m = len == 128 ? *a : masked(a, len);
		if (set_has(&t->by_len[len], &m))
			return 1;
	}
	return 0;
}

void own_forget(struct own_table *t)
{
	for (int i = 0; i < t->nlens; i++) {
		struct own_set *s = &t->by_len[t->lens[i]];
		if (s->nslots)
			memset(s->slots, 0, s->nslots * sizeof(*s->slots));
		s->n = 0;
		s->has_zero = 0;
	}
	t->nlens = t->naddrs = t->nnets = 0;
	t->complete = 0;
}

void own_free(struct own_table *t)
{
	for (int len = 0; len <= 128; len++)
		free(t->by_len[len].slots);
}

/* one RTM_NEWROUTE of the dump: 1 taken (an RTN_LOCAL or RTN_ANYCAST route of the local table), 0 not
 * ours, -errno */
static int own_route(struct own_table *t, const struct nlmsghdr *h)
{
	const struct rtmsg *r = NLMSG_DATA(h);
	struct in6_addr a = {0};
	uint32_t table;
	int len, alen = r->rtm_family == AF_INET ? 4 : 16;
	if (h->nlmsg_len < NLMSG_LENGTH(sizeof(*r)) || (r->rtm_family != AF_INET && r->rtm_family != AF_INET6) ||
	    (r->rtm_type != RTN_LOCAL && r->rtm_type != RTN_ANYCAST))
		return 0;	/* (anycast: IPv6's subnet-router addresses a forwarding host answers itself) */
	table = r->rtm_table;
	if (r->rtm_family == AF_INET)
		a.s6_addr16[5] = 0xFFFF;	/* ::ffff:0.0.0.0 until RTA_DST says (addr.h) */
	len = RTM_PAYLOAD(h);
	for (const struct rtattr *at = RTM_RTA(r); RTA_OK(at, len); at = RTA_NEXT(at, len)) {
		if (at->rta_type == RTA_TABLE && RTA_PAYLOAD(at) >= 4)
			memcpy(&table, RTA_DATA(at), 4);
		else if (at->rta_type == RTA_DST && (int)RTA_PAYLOAD(at) == alen)
			memcpy(alen == 4 ? &a.s6_addr[12] : a.s6_addr, RTA_DATA(at), alen);
	}
	if (table != RT_TABLE_LOCAL || r->rtm_dst_len > alen * 8)
		return 0;
	return own_add(t, &a, r->rtm_dst_len + (alen == 4 ? 96 : 0)) ? -ENOMEM : 1;
}

/* This host's own destinations, listed anew from the kernel (nlfd: a NETLINK_ROUTE socket of the
 * caller's, used for nothing else). The count listed, or -errno (the table stays incomplete: every
 * destination refused until a later listing succeeds). */
int core_own_refresh(struct core *c, int nlfd)
{
	struct {
		struct nlmsghdr h;
		struct rtmsg r;
	} req = {.h = {.nlmsg_len = sizeof(req), .nlmsg_type = RTM_GETROUTE, .nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP,
		       .nlmsg_seq = ++c->own_seq},
		 .r = {.rtm_family = AF_UNSPEC, .rtm_table = RT_TABLE_LOCAL}};
	static char buf[1 << 16] __attribute__((aligned(NLMSG_ALIGNTO)));
	int n = 0, done = 0;
	own_forget(&c->own);
	if (send(nlfd, &req, sizeof(req), 0) < 0)
		return -errno;
	while (!done) {
		ssize_t got = recv(nlfd, buf, sizeof(buf), 0);
		int len = (int)got;
		if (got < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
			int r;
			if (h->nlmsg_seq != c->own_seq)
				continue;	/* an answer to an earlier request that was cut short */
			if (h->nlmsg_type == NLMSG_DONE) {
				done = 1;
				break;
			}
			if (h->nlmsg_type == NLMSG_ERROR) {
				const struct nlmsgerr *e = NLMSG_DATA(h);
				return e->error ? e->error : -EPROTO;
			}
			if (h->nlmsg_type != RTM_NEWROUTE)
				continue;
			r = own_route(&c->own, h);
			if (r < 0)
				return r;
			n += r;
		}
	}
	c->own.complete = 1;
	return n;
}

/* counts of the table: [0] addresses, [1] shorter local routes (for the log line) */
int core_own_count(struct core *c, int which)
{
	return which ? c->own.nnets : c->own.naddrs;
}
