// SPDX-License-Identifier: GPL-2.0
/* Where an accepted client goes when no held SYN says it (its SYN was deferred to the kernel):
 *   static        the configured server;
 *   transparent   the address the client sent to, which TPROXY kept as the socket's own;
 *   explicit      its SYN's DST_OPT, which on_syn() remembered here, or the BPF recorder's map
 *                 (mimbox/host/synrecord.py) when the SYN never visited NFQUEUE;
 *   convert       the client's first bytes say it: Python reads them (accept.c greet()). */
#include "rooms.h"
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/bpf.h>
#include <linux/types.h>
#include "dstopt.h"		/* generated from mimbox/wire/dstopt.py: the recorder's map */

/* The table of remembered destinations: open addressing over DEST_PROBES slots from the key's hash,
 * so two clients whose keys share a slot both keep theirs (it was direct-mapped: the second SYN
 * overwrote the first's destination, whose client was then refused with "no destination" when no
 * recorder entry was there either). An entry expires after 2 x handshake_timeout. */
#define DEST_PROBES 16

static struct destination *dest_slot(struct core *c, uint64_t key, int k)
{
	return &c->dests[(hash64(key) + k) & (DESTINATIONS - 1)];
}

static int dest_live(struct core *c, const struct destination *d)
{
	return d->key && c->now - d->t <= 2 * c->cfg.handshake_timeout;
}

static int dest_is(const struct destination *d, uint64_t key, const struct flow *f)
{
	return d->key == key && d->f.cport == f->cport && addr_eq(&d->f.caddr, &f->caddr);
}

/* 0: remembered (or the same one again); -1: a recent SYN from this (address, port) asked for another
 * destination: the first wins, this SYN is refused (a forged SYN must not redirect its victim) */
int dest_remember(struct core *c, uint64_t key, const struct flow *f)
{
	struct destination *free_slot = NULL, *oldest = NULL;
	for (int k = 0; k < DEST_PROBES; k++) {
		struct destination *d = dest_slot(c, key, k);
		if (dest_live(c, d) && dest_is(d, key, f)) {
			if (!addr_eq(&d->f.daddr, &f->daddr) || d->f.dport != f->dport)
				return -1;
			return 0;	/* a retransmission: the first SYN's time stays */
		}
		if (!dest_live(c, d) && !free_slot)
			free_slot = d;
		if (!oldest || d->t < oldest->t)
			oldest = d;
	}
	if (!free_slot) {		/* DEST_PROBES live entries around this key: the oldest gives way */
		free_slot = oldest;
		c->st.dest_evictions++;
	}
	*free_slot = (struct destination){key, *f, c->now};
	return 0;
}

static int dest_take(struct core *c, uint64_t key, struct flow *f)
{
	for (int k = 0; k < DEST_PROBES; k++) {
		struct destination *d = dest_slot(c, key, k);
		if (!dest_is(d, key, f))
			continue;
		d->key = 0;
		if (c->now - d->t > 2 * c->cfg.handshake_timeout)
			return 0;
		f->daddr = d->f.daddr;
		f->dport = d->f.dport;
		return 1;
	}
	return 0;
}

/* the BPF recorder's destination for the client (its map is keyed by the 16-byte address and port) */
static int recorder_pop(struct core *c, struct flow *f)
{
	struct dstopt_record_key key = {.sport = f->cport};
	struct dstopt_record_value val;
	union bpf_attr attr;
	memcpy(key.saddr, &f->caddr, 16);
	memset(&attr, 0, sizeof(attr));
	attr.map_fd = c->cfg.recorder_fd;
	attr.key = (uintptr_t)&key;
	attr.value = (uintptr_t)&val;
	if (syscall(__NR_bpf, BPF_MAP_LOOKUP_AND_DELETE_ELEM, &attr, sizeof(attr)))
		return 0;
	/* c->now was read when this batch began: a SYN recorded since is younger than that (signed) */
	if ((int64_t)((uint64_t)(c->now * 1e9) - val.t_ns) > (int64_t)DSTOPT_RECORD_TTL_NS)
		return 0;		/* stale: that SYN never became a connection */
	f->daddr = addr_load(val.addr);
	f->dport = val.port;
	return 1;
}

/* f's destination for the accepted client cfd: 0 found, 1 convert mode (Python reads it), -1 none
 * (why says so) */
int destination_of(struct core *c, int cfd, struct flow *f, struct refusal *why)
{
	*why = (struct refusal){.cause = CAUSE_NO_DESTINATION};
	switch (c->cfg.dst_source) {
	case DST_STATIC:
		f->daddr = addr_load(c->cfg.static_addr);
		f->dport = c->cfg.static_port;
		return 0;
	case DST_TRANSPARENT: {
		struct sockaddr_storage me;
		socklen_t len = sizeof(me);
		if (getsockname(cfd, (struct sockaddr *)&me, &len)) {
			why->err = errno;
			return -1;
		}
		if (addr_from_sockaddr(&me, &f->daddr, &f->dport)) {
			why->err = EAFNOSUPPORT;
			return -1;
		}
		return 0;
	}
	case DST_EXPLICIT:
		if (!dest_take(c, client_key(&f->caddr, f->cport), f) &&
		    (c->cfg.recorder_fd < 0 || !recorder_pop(c, f)))
			return -1;
		if (addr_is_zero(&f->daddr) || !f->dport) {
			*why = (struct refusal){.cause = CAUSE_BAD_OPTION, .detail = !f->dport ? SYN_PORT0 : SYN_ADDR0};
			return -1;
		}
		return 0;
	}
	return 1;
}
