// SPDX-License-Identifier: GPL-2.0
/* MiMBox client side of explicit redirection (the paper's DST_OPT, §2.1).
 *
 * cgroup/connect4, cgroup/connect6: a TCP connect() by a process of the client's cgroup to any
 *   destination that is not the converter (nor loopback, nor one to skip) is sent to the converter
 *   instead (its IPv4 address for an IPv4 socket, its IPv6 one -- or ::ffff: its IPv4 one -- for an
 *   IPv6 socket); the original destination is kept in the socket's local storage. An IPv4 socket
 *   cannot reach a converter that has only an IPv6 address: its connect() fails (EPERM) rather than
 *   bypass the converter. For an MPTCP socket these hooks run on its first TCP subflow, and again on
 *   each MP_JOIN subflow the kernel opens later (a subflow inherits the connection's cgroup): those
 *   are left alone, told apart by the task connecting: a join is opened by a kernel worker, not by a
 *   process of the client's cgroup. (Redirecting a join to the converter's first address breaks it
 *   behind a load balancer: see ClusterTopo.)
 * sockops: for sockets carrying such storage, ask for header-option callbacks and write DST_OPT
 *   (layout in mimbox/wire/dstopt.py, constants in the generated dstopt.h: 10 bytes for an IPv4 or
 *   IPv4-mapped destination, 22 for an IPv6 one) into the SYN only; once established, the callbacks
 *   are switched off again. SYNs whose option room was too small for DST_OPT (bpf_reserve_hdr_opt:
 *   ENOSPC; the kernel sends them without it) are counted in mimbox_nofit: with timestamps an MPTCP
 *   SYN has 16 bytes left, too few for the IPv6 form (mimbox/wire/dstopt.py, results/dstopt_room).
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "dstopt.h"

#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define TCPHDR_SYN 0x02

struct mimbox_cfg {
	__u32 conv_addr;	/* IPv4, network order; 0: the converter has no IPv4 address */
	__u32 conv_port;	/* network order, low 16 bits (as bpf_sock_addr.user_port) */
	__u64 cgroup_id;	/* the client's cgroup (v2 id): only its tasks' connects are redirected */
	__u32 conv_addr6[4];	/* for IPv6 sockets: the converter's IPv6 address, or ::ffff: its IPv4 one */
};

struct orig_dst {
	__u32 addr[4];		/* network order; an IPv4 destination as ::ffff:a.b.c.d */
	__u32 port;		/* network order, low 16 bits */
	__u32 len;		/* DSTOPT_LEN (IPv4 form) or DSTOPT_LEN6 */
};

struct dst_opt {
	__u8 kind;
	__u8 len;
	__u16 exid;
	__u32 addr;
	__u16 port;
} __attribute__((packed));

struct dst_opt6 {
	__u8 kind;
	__u8 len;
	__u16 exid;
	__u32 addr[4];
	__u16 port;
} __attribute__((packed));

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mimbox_cfg);
} mimbox_cfg SEC(".maps");

/* Destinations never redirected besides the converter itself (e.g. its other addresses): 16 bytes,
 * IPv4 as ::ffff:a.b.c.d. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32[4]);
	__type(value, __u8);
} mimbox_skip SEC(".maps");

/* [0]: SYNs sent without DST_OPT because it did not fit */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} mimbox_nofit SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct orig_dst);
} mimbox_orig SEC(".maps");

/* Whether a connect() by this task to dst (16 bytes) goes through the converter. */
static int redirect_wanted(struct mimbox_cfg *cfg, __u32 dst[4])
{
	int mapped = !dst[0] && !dst[1] && dst[2] == bpf_htonl(0xffff);
	if (cfg->cgroup_id && bpf_get_current_cgroup_id() != cfg->cgroup_id)
		return 0;	/* an MP_JOIN opened by the kernel's path manager */
	if (mapped && (bpf_ntohl(dst[3]) >> 24) == 127)
		return 0;
	if (!dst[0] && !dst[1] && !dst[2] && dst[3] == bpf_htonl(1))
		return 0;	/* ::1 */
	if (mapped && dst[3] == cfg->conv_addr)
		return 0;
	if (dst[0] == cfg->conv_addr6[0] && dst[1] == cfg->conv_addr6[1] && dst[2] == cfg->conv_addr6[2] &&
	    dst[3] == cfg->conv_addr6[3])
		return 0;
	return !bpf_map_lookup_elem(&mimbox_skip, dst);
}

static struct orig_dst *remember(struct bpf_sock_addr *ctx, __u32 dst[4])
{
	struct orig_dst *o;
	int mapped = !dst[0] && !dst[1] && dst[2] == bpf_htonl(0xffff);
	if (!ctx->sk)
		return 0;
	o = bpf_sk_storage_get(&mimbox_orig, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o)
		return 0;	/* no storage: leave the connection untouched rather than lose its destination */
	o->addr[0] = dst[0];
	o->addr[1] = dst[1];
	o->addr[2] = dst[2];
	o->addr[3] = dst[3];
	o->port = ctx->user_port;
	o->len = mapped ? DSTOPT_LEN : DSTOPT_LEN6;
	return o;
}

/* The converter's config when a connect() of ctx to dst (16 bytes) goes through it, else NULL. */
static struct mimbox_cfg *redirecting(struct bpf_sock_addr *ctx, __u32 dst[4])
{
	__u32 key = 0;
	struct mimbox_cfg *cfg;

	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 0;
	cfg = bpf_map_lookup_elem(&mimbox_cfg, &key);
	if (!cfg || !cfg->conv_port || !redirect_wanted(cfg, dst))
		return 0;
	return cfg;
}

SEC("cgroup/connect4")
int mimbox_connect4(struct bpf_sock_addr *ctx)
{
	__u32 dst[4] = {0, 0, bpf_htonl(0xffff), ctx->user_ip4};
	struct mimbox_cfg *cfg = redirecting(ctx, dst);

	if (!cfg)
		return 1;
	if (!cfg->conv_addr)
		return 0;	/* the converter has no IPv4 address: EPERM, never around it */
	if (!remember(ctx, dst))
		return 1;
	ctx->user_ip4 = cfg->conv_addr;
	ctx->user_port = cfg->conv_port;
	return 1;
}

SEC("cgroup/connect6")
int mimbox_connect6(struct bpf_sock_addr *ctx)
{
	__u32 dst[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
	struct mimbox_cfg *cfg = redirecting(ctx, dst);

	if (!cfg || !remember(ctx, dst))
		return 1;
	ctx->user_ip6[0] = cfg->conv_addr6[0];
	ctx->user_ip6[1] = cfg->conv_addr6[1];
	ctx->user_ip6[2] = cfg->conv_addr6[2];
	ctx->user_ip6[3] = cfg->conv_addr6[3];
	ctx->user_port = cfg->conv_port;
	return 1;
}

static void count(void *map, __u32 i)
{
	__u64 *n = bpf_map_lookup_elem(map, &i);
	if (n)
		__sync_fetch_and_add(n, 1);
}

SEC("sockops")
int mimbox_sockops(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct orig_dst *o;
	struct dst_opt opt;
	struct dst_opt6 opt6;

	if (!sk)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		if (bpf_sk_storage_get(&mimbox_orig, sk, 0, 0))
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
						  BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		/* no SYN will follow: stop the per-packet header-option callbacks (on veth a peer's
		 * packets are processed in the sender's system call, so they would cost the converter) */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		if (!(skops->skb_tcp_flags & TCPHDR_SYN))
			break;
		o = bpf_sk_storage_get(&mimbox_orig, sk, 0, 0);
		if (!o)
			break;
		if (bpf_reserve_hdr_opt(skops, o->len, 0))
			count(&mimbox_nofit, 0);	/* ENOSPC: this SYN goes without (refused there) */
		break;
	case BPF_SOCK_OPS_WRITE_HDR_OPT_CB:
		if (!(skops->skb_tcp_flags & TCPHDR_SYN))
			break;
		o = bpf_sk_storage_get(&mimbox_orig, sk, 0, 0);
		if (!o)
			break;
		if (o->len == DSTOPT_LEN) {
			opt.kind = DSTOPT_KIND;
			opt.len = DSTOPT_LEN;
			opt.exid = bpf_htons(DSTOPT_EXID);
			opt.addr = o->addr[3];
			opt.port = (__u16)o->port;
			bpf_store_hdr_opt(skops, &opt, sizeof(opt), 0);
		} else {
			opt6.kind = DSTOPT_KIND;
			opt6.len = DSTOPT_LEN6;
			opt6.exid = bpf_htons(DSTOPT_EXID);
			__builtin_memcpy(opt6.addr, o->addr, 16);
			opt6.port = (__u16)o->port;
			bpf_store_hdr_opt(skops, &opt6, sizeof(opt6), 0);
		}
		break;
	}
	return 1;
}

char _license[] SEC("license") = "GPL";
