// SPDX-License-Identifier: GPL-2.0
/* Convert mode: the TCP options of each server's SYN-ACK, for RFC 8803's Extended TCP Header TLV.
 *
 * sockops on the converter's cgroup, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB (no callback flag needed):
 * the skb is the SYN-ACK that completed an active open; its option bytes go into an LRU map keyed by
 * (server address, local port, server port), for connections in the converter's network namespace
 * only (cfg.netns, a netns cookie). The core takes them (lookup and delete) when its server connection
 * is established and writes them into its answer to the client (native/core/conn.c); a key never
 * taken (another program's connection in the same cgroup) ages out of the LRU. Layout: mimbox/host/synack.py.
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "synack.h"		/* generated from mimbox/host/synack.py */

#define AF_INET 2
#define AF_INET6 10
#define MAX_OPTS SYNACK_MAX_OPTS

struct synack_cfg {
	__u64 netns;		/* the converter's netns cookie; 0: any */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct synack_cfg);
} mimbox_synack_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SYNACK_ENTRIES);
	__type(key, struct synack_key);
	__type(value, struct synack_value);
} mimbox_synack SEC(".maps");

SEC("sockops")
int mimbox_synack_opts(struct bpf_sock_ops *skops)
{
	struct synack_key k = {};
	struct synack_value v = {};
	struct synack_cfg *cfg;
	__u32 zero = 0, i, len;
	void *data, *end;
	struct tcphdr *th;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	cfg = bpf_map_lookup_elem(&mimbox_synack_cfg, &zero);
	if (!cfg || (cfg->netns && bpf_get_netns_cookie(skops) != cfg->netns))
		return 1;
	data = (void *)(long)skops->skb_data;
	end = (void *)(long)skops->skb_data_end;
	th = data;
	if ((void *)(th + 1) > end)
		return 1;
	len = th->doff * 4;
	len = len > sizeof(*th) ? len - sizeof(*th) : 0;
	if (len > MAX_OPTS)
		len = MAX_OPTS;
	for (i = 0; i < MAX_OPTS; i++) {
		__u8 *p = (__u8 *)(th + 1) + i;
		if (i >= len || (void *)(p + 1) > end)
			break;
		v.opts[i] = *p;
	}
	v.len = i;
	if (skops->family == AF_INET) {
		k.raddr[10] = k.raddr[11] = 0xff;
		__builtin_memcpy(k.raddr + 12, &skops->remote_ip4, 4);
	} else if (skops->family == AF_INET6) {
		__u32 a[4];	/* one 4-byte read each: the context allows no wider access */
		a[0] = *(volatile __u32 *)&skops->remote_ip6[0];
		a[1] = *(volatile __u32 *)&skops->remote_ip6[1];
		a[2] = *(volatile __u32 *)&skops->remote_ip6[2];
		a[3] = *(volatile __u32 *)&skops->remote_ip6[3];
		__builtin_memcpy(k.raddr, a, 16);
	} else {
		return 1;
	}
	k.lport = bpf_htons((__u16)skops->local_port);
	k.rport = (__u16)(skops->remote_port >> 16);
	bpf_map_update_elem(&mimbox_synack, &k, &v, BPF_ANY);
	return 1;
}

char _license[] SEC("license") = "GPL";
