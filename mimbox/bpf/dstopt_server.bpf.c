// SPDX-License-Identifier: GPL-2.0
/* MiMBox converter side of explicit redirection: record each client SYN's DST_OPT.
 *
 * tc ingress on the converter's interfaces (direct action, always TC_ACT_UNSPEC: the next filter,
 * e.g. another listener's recorder, still sees the packet).
 * For a TCP SYN (IPv4, or IPv6 whose next header is TCP) to the listener's port that carries a
 * DST_OPT of either form, it stores (client address, client port) -> (server address, server port,
 * time) in an LRU map, addresses as 16 bytes (IPv4 as ::ffff:a.b.c.d, native/core/addr.h). The converter reads (and deletes) the
 * entry when it accept()s the connection, so a SYN it did not hold still tells it where to go, and
 * the SYN never visits user space. The first DST_OPT wins: a SYN from a (client address, port)
 * recorded less than DSTOPT_RECORD_TTL_NS ago that names another destination (a forged SYN trying to
 * send its victim elsewhere) keeps the record as it is, is marked DSTOPT_REFUSE_MARK (the listener's
 * filter/INPUT rule answers it with RST) and counted in mimbox_conflicts. A SYN that names the same
 * destination makes the record as young as itself.
 * Layout and constants: mimbox/wire/dstopt.py (generated dstopt.h).
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "dstopt.h"

#define MAX_OPTS 40		/* TCP options are at most 40 bytes */

/* [0]: the listener's TCP port, network order */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} mimbox_port SEC(".maps");

/* [0]: SYNs refused for a conflicting DST_OPT */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} mimbox_conflicts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, DSTOPT_RECORD_ENTRIES);
	__type(key, struct dstopt_record_key);
	__type(value, struct dstopt_record_value);
} mimbox_syn_dst SEC(".maps");

/* The option list, copied out of the packet, and where the walk is. */
struct scan {
	__u8 opts[MAX_OPTS];
	__u32 len;
	__u32 i;
	__s32 found;		/* offset of the DST_OPT in opts, or -1 */
	__u32 error;		/* the list is not one the converter's parser accepts */
};

/* One step of the option walk (bpf_loop: the verifier checks this once, not 40 unrolled paths).
 * The same decisions as the converter's parser (native/core/synopt.c core_parse_syn, mimbox/wire/dstopt.py
 * parse_options; tests/test_dstopt.py runs this program on their corpus): the whole list is walked,
 * and a SYN yields a destination only if its list is well formed and holds exactly one valid
 * DST_OPT and no other option of kind DSTOPT_KIND with another ExID. */
static long scan_step(__u32 n, void *ctx)
{
	struct scan *s = ctx;
	__u32 i = s->i;
	__u8 kind, len;
	__s32 exid;

	if (i >= s->len || i >= MAX_OPTS)
		return 1;
	kind = s->opts[i];
	if (kind == 0)
		return 1;
	if (kind == 1) {
		s->i = i + 1;
		return 0;
	}
	if (i + 1 >= s->len || i + 1 >= MAX_OPTS) {
		s->error = 1;		/* truncated */
		return 1;
	}
	len = s->opts[i + 1];
	if (len < 2 || i + len > s->len) {
		s->error = 1;		/* bad length */
		return 1;
	}
	if (kind == DSTOPT_KIND) {
		exid = -1;
		if (len >= 4 && i + 3 < MAX_OPTS)
			exid = (s->opts[i + 2] << 8) | s->opts[i + 3];
		if ((exid >= 0 && exid != DSTOPT_EXID) || s->found >= 0 || (len != DSTOPT_LEN && len != DSTOPT_LEN6) ||
		    exid != DSTOPT_EXID)
			s->error = 1;	/* another experiment, a second DST_OPT, a bad length */
		else
			s->found = i;
	}
	s->i = i + len;
	return 0;
}

static int same_destination(const struct dstopt_record_value *a, const struct dstopt_record_value *b)
{
	__u32 i, diff = a->port ^ b->port;
	for (i = 0; i < 16; i++)
		diff |= a->addr[i] ^ b->addr[i];
	return !diff;
}

static const __u8 v4_mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/* an IPv6 source in ::/96 (unspecified, loopback, IPv4-compatible) or ::ffff:0:0/96 (IPv4-mapped) */
static int source6_embeds_v4(const __u8 *a)
{
	__u32 i, high = 0;
	for (i = 0; i < 10; i++)
		high |= a[i];
	return !high && ((!a[10] && !a[11]) || (a[10] == 0xff && a[11] == 0xff));
}

SEC("tc")
int mimbox_record_dstopt(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct dstopt_record_key k = {};
	struct dstopt_record_value v = {};
	struct scan s = {.found = -1};
	struct ethhdr *eth = data;
	struct tcphdr *tcp;
	__u32 zero = 0, *port, off, nonzero, i;
	struct dstopt_record_value *old;
	__s32 f;
	__u8 *o;

	if ((void *)(eth + 1) > end)
		return TC_ACT_UNSPEC;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || ip->ihl < 5)
			return TC_ACT_UNSPEC;
		__builtin_memcpy(k.saddr, v4_mapped, 12);
		__builtin_memcpy(k.saddr + 12, &ip->saddr, 4);
		if (!k.saddr[12] || k.saddr[12] == 127 || k.saddr[12] >= 224)
			return TC_ACT_UNSPEC;	/* no real client's source (addr.h addr_source_bad) */
		tcp = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP)
			return TC_ACT_UNSPEC;	/* extension headers: the converter's accept() judges it */
		__builtin_memcpy(k.saddr, &ip6->saddr, 16);
		if (k.saddr[0] == 0xff || source6_embeds_v4(k.saddr))
			return TC_ACT_UNSPEC;	/* multicast, ::/96, ::ffff:0:0/96: no real client's source */
		tcp = (void *)(ip6 + 1);
	} else {
		return TC_ACT_UNSPEC;
	}
	if ((void *)(tcp + 1) > end || !tcp->syn || tcp->ack)
		return TC_ACT_UNSPEC;
	port = bpf_map_lookup_elem(&mimbox_port, &zero);
	if (!port || tcp->dest != (__u16)*port || tcp->doff <= 5)
		return TC_ACT_UNSPEC;
	s.len = tcp->doff * 4 - sizeof(*tcp);
	if (s.len == 0 || s.len > MAX_OPTS)
		return TC_ACT_UNSPEC;
	off = (void *)(tcp + 1) - data;
	if (bpf_skb_load_bytes(skb, off, s.opts, s.len))
		return TC_ACT_UNSPEC;
	bpf_loop(MAX_OPTS, scan_step, &s, 0);
	f = s.found;
	if (s.error || f < 0 || f > MAX_OPTS - DSTOPT_LEN)
		return TC_ACT_UNSPEC;
	o = s.opts + f;
	if (((o[DSTOPT_OFF_EXID] << 8) | o[DSTOPT_OFF_EXID + 1]) != DSTOPT_EXID)
		return TC_ACT_UNSPEC;
	k.sport = tcp->source;
	if (o[1] == DSTOPT_LEN) {
		__builtin_memcpy(v.addr, v4_mapped, 12);
		__builtin_memcpy(v.addr + 12, o + DSTOPT_OFF_ADDR, 4);
		__builtin_memcpy(&v.port, o + DSTOPT_OFF_PORT, 2);
	} else {
		if (f > MAX_OPTS - DSTOPT_LEN6)
			return TC_ACT_UNSPEC;
		__builtin_memcpy(v.addr, o + DSTOPT_OFF_ADDR, 16);
		__builtin_memcpy(&v.port, o + DSTOPT_OFF_PORT6, 2);
	}
	/* :: and ::ffff:0.0.0.0 (0.0.0.0): the parser refuses these too */
	nonzero = 0;
	for (i = 0; i < 16; i++)
		if (i != 10 && i != 11)
			nonzero |= v.addr[i];
	if ((!nonzero && ((v.addr[10] == 0 && v.addr[11] == 0) || (v.addr[10] == 0xff && v.addr[11] == 0xff))) ||
	    !v.port)
		return TC_ACT_UNSPEC;
	v.t_ns = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&mimbox_syn_dst, &k, &v, BPF_NOEXIST) == 0)
		return TC_ACT_UNSPEC;
	old = bpf_map_lookup_elem(&mimbox_syn_dst, &k);
	if (!old)			/* taken since: record this one */
		bpf_map_update_elem(&mimbox_syn_dst, &k, &v, BPF_NOEXIST);
	else if (v.t_ns - old->t_ns > DSTOPT_RECORD_TTL_NS)
		bpf_map_update_elem(&mimbox_syn_dst, &k, &v, BPF_EXIST);	/* a stale record */
	else if (!same_destination(old, &v)) {
		__u64 *n = bpf_map_lookup_elem(&mimbox_conflicts, &zero);
		if (n)
			__sync_fetch_and_add(n, 1);
		skb->mark = DSTOPT_REFUSE_MARK;
	} else {
		/* a retransmission, or the client's port reused for the same destination (a held SYN's
		 * record is never popped): the record is as young as this SYN. Kept at the first SYN's
		 * time, a SYN sent just before the record turned 30 s old was refused at accept as stale */
		old->t_ns = v.t_ns;
	}
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "GPL";
