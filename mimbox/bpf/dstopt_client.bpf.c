// SPDX-License-Identifier: GPL-2.0
/* MiMBox client side of explicit redirection (the paper's DST_OPT, §2.1).
 *
 * cgroup/connect4: a TCP connect() by a process of the client's cgroup to any destination that is
 *   not the converter (nor loopback) is sent to the converter instead; the original destination is
 *   kept in the socket's local storage. For an MPTCP socket this hook runs on its first TCP
 *   subflow, and again on each MP_JOIN subflow the kernel opens later (a subflow inherits the
 *   connection's cgroup): those are left alone, told apart by the task connecting: a join is
 *   opened by a kernel worker, not by a process of the client's cgroup. (Redirecting a join to
 *   the converter's first address breaks it behind a load balancer: see ClusterTopo.)
 * sockops: for sockets carrying such storage, ask for header-option callbacks and write DST_OPT
 *   (layout in mimbox/dstopt.py, constants in the generated dstopt.h) into the SYN only; once
 *   established, the callbacks are switched off again.
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
	__u32 conv_addr;	/* network order */
	__u32 conv_port;	/* network order, low 16 bits (as bpf_sock_addr.user_port) */
	__u64 cgroup_id;	/* the client's cgroup (v2 id): only its tasks' connects are redirected */
};

struct orig_dst {
	__u32 addr;		/* network order */
	__u32 port;		/* network order, low 16 bits */
};

struct dst_opt {
	__u8 kind;
	__u8 len;
	__u16 exid;
	__u32 addr;
	__u16 port;
} __attribute__((packed));

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mimbox_cfg);
} mimbox_cfg SEC(".maps");

/* Destinations never redirected besides the converter itself (e.g. its other addresses). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u8);
} mimbox_skip SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct orig_dst);
} mimbox_orig SEC(".maps");

SEC("cgroup/connect4")
int mimbox_connect4(struct bpf_sock_addr *ctx)
{
	__u32 key = 0, dst = ctx->user_ip4;
	struct mimbox_cfg *cfg;
	struct orig_dst *o;
	struct bpf_sock *sk;

	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 1;
	cfg = bpf_map_lookup_elem(&mimbox_cfg, &key);
	if (!cfg || !cfg->conv_addr || dst == cfg->conv_addr)
		return 1;
	if (cfg->cgroup_id && bpf_get_current_cgroup_id() != cfg->cgroup_id)
		return 1;	/* an MP_JOIN opened by the kernel's path manager */
	if ((bpf_ntohl(dst) >> 24) == 127 || bpf_map_lookup_elem(&mimbox_skip, &dst))
		return 1;
	sk = ctx->sk;
	if (!sk)
		return 1;
	o = bpf_sk_storage_get(&mimbox_orig, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o)
		return 1;	/* no storage: leave the connection untouched rather than lose its destination */
	o->addr = dst;
	o->port = ctx->user_port;
	ctx->user_ip4 = cfg->conv_addr;
	ctx->user_port = cfg->conv_port;
	return 1;
}

SEC("sockops")
int mimbox_sockops(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct orig_dst *o;
	struct dst_opt opt;

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
		if (skops->skb_tcp_flags & TCPHDR_SYN)
			bpf_reserve_hdr_opt(skops, DSTOPT_LEN, 0);
		break;
	case BPF_SOCK_OPS_WRITE_HDR_OPT_CB:
		if (!(skops->skb_tcp_flags & TCPHDR_SYN))
			break;
		o = bpf_sk_storage_get(&mimbox_orig, sk, 0, 0);
		if (!o)
			break;
		opt.kind = DSTOPT_KIND;
		opt.len = DSTOPT_LEN;
		opt.exid = bpf_htons(DSTOPT_EXID);
		opt.addr = o->addr;
		opt.port = (__u16)o->port;
		bpf_store_hdr_opt(skops, &opt, sizeof(opt), 0);
		break;
	}
	return 1;
}

char _license[] SEC("license") = "GPL";
