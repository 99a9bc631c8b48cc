// SPDX-License-Identifier: GPL-2.0
/* The one place a server socket is made and connected (as nginx's ngx_event_connect.c): MPTCP first
 * unless this server was seen answering without it (the memo), the server side's options, sockets
 * made ahead while the loop is idle (spares), and what a finished connect() says. */
#include "rooms.h"
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/bpf.h>
#include <linux/types.h>
#include "synack.h"		/* generated from mimbox/host/synack.py: the SYN-ACK options map */

void reset_close(int fd)
{
	struct linger l = {1, 0};
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
	close(fd);
}

int sock_is_mptcp(int fd)
{
	int v = 0;
	socklen_t len = sizeof(v);
	return getsockopt(fd, IPPROTO_TCP, TCP_IS_MPTCP, &v, &len) == 0 && v == 1;
}

int tcp_state(int fd)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);
	return getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) == 0 ? ti.tcpi_state : -1;
}

/* the refusal cause (CAUSE_*) of a failed server connect's errno */
int cause_of_errno(int err)
{
	switch (err) {
	case ECONNREFUSED:
		return CAUSE_SERVER_REFUSED;
	case ENETUNREACH: case EHOSTUNREACH: case EHOSTDOWN: case ENETDOWN:
		return CAUSE_SERVER_UNREACHABLE;
	case ETIMEDOUT:
		return CAUSE_SERVER_TIMEOUT;
	}
	return CAUSE_SERVER_ERROR;
}

int core_cause_of_errno(int err)
{
	return cause_of_errno(err);
}

/* -- the memo: servers that answered an MPTCP SYN without MPTCP get TCP for server_mptcp_retry s ------ */
static struct memo *memo_slot(struct core *c, const struct in6_addr *daddr, uint16_t dport)
{
	return &c->tcp_only[server_hash(daddr, dport) & (MEMO_SLOTS - 1)];
}

static int memo_is(const struct memo *m, const struct in6_addr *daddr, uint16_t dport)
{
	return m->port == dport && addr_eq(&m->addr, daddr);
}

static int tcp_only(struct core *c, const struct in6_addr *daddr, uint16_t dport)
{
	struct memo *m = memo_slot(c, daddr, dport);
	if (!memo_is(m, daddr, dport))
		return 0;
	if (monotonic() < m->until)
		return 1;
	m->port = 0;
	return 0;
}

static void learn(struct core *c, const struct in6_addr *daddr, uint16_t dport, int mptcp_works)
{
	struct memo *m = memo_slot(c, daddr, dport);
	if (mptcp_works || c->cfg.server_mptcp_retry <= 0) {
		if (memo_is(m, daddr, dport))
			m->port = 0;
		return;
	}
	*m = (struct memo){*daddr, dport, monotonic() + c->cfg.server_mptcp_retry};
}

/* A non-blocking server socket of one family (0: IPv4, 1: IPv6) and kind (1: MPTCP, 0: TCP) with the
 * server side's options: fd or -errno */
static int server_socket(struct core *c, int v6, int mptcp)
{
	int one = 1, fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
				 mptcp ? IPPROTO_MPTCP : 0);
	if (fd < 0)
		return -errno;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (c->cfg.server_rcvbuf)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &c->cfg.server_rcvbuf, sizeof(int));
	if (c->cfg.server_sndbuf)
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &c->cfg.server_sndbuf, sizeof(int));
	if (c->cfg.nsources)		/* bind_source(): the port is picked at connect() */
		setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
	return fd;
}

/* -- spares ------------------------------------------------------------------------------------------------
 * Server sockets made while the loop has nothing to do, so that a held SYN's connect() is the only
 * system call between its arrival and its server SYN (socket() and the setsockopts cost about a fifth
 * of Table 1's SYN delay here). Under load the loop is never idle, the spares run out and sockets are
 * made on demand as before: the same calls, moved out of the SYN's way, never added. A family and kind
 * is made ahead once it was needed (a converter with only IPv4 servers makes no IPv6 spares). */
static int spare_target(struct core *c)
{
	return c->cfg.spare_sockets < SPARE_MAX ? c->cfg.spare_sockets : SPARE_MAX;
}

int spare_missing(struct core *c)
{
	int t = spare_target(c);
	if (t <= 0 || c->now < c->spare_retry_at)
		return 0;
	for (int v6 = 0; v6 < 2; v6++)
		for (int kind = 0; kind < 2; kind++)
			if (c->spare_wanted[v6][kind] && c->nspare[v6][kind] < t)
				return 1;
	return 0;
}

void spare_refill(struct core *c)
{
	for (int v6 = 0; v6 < 2; v6++)
		for (int kind = 0; kind < 2; kind++)
			while (c->spare_wanted[v6][kind] && c->nspare[v6][kind] < spare_target(c)) {
				int fd = server_socket(c, v6, kind);
				if (fd < 0) {		/* out of fds or memory: try again in a second */
					c->spare_retry_at = c->now + 1.0;
					return;
				}
				c->spare[v6][kind][c->nspare[v6][kind]++] = fd;
				c->st.spare_made++;
			}
}

static int spare_take(struct core *c, int v6, int mptcp)
{
	c->spare_wanted[v6][mptcp] = 1;
	if (c->nspare[v6][mptcp] > 0) {
		c->st.spare_used++;
		return c->spare[v6][mptcp][--c->nspare[v6][mptcp]];
	}
	return server_socket(c, v6, mptcp);
}

/* --source-address: the next of the server side's source addresses of this family (v6: 1), in turn,
 * bound with IP_BIND_ADDRESS_NO_PORT (set by server_socket): the kernel picks the local port at connect() by the whole
 * four-tuple, so each source address has its own ports towards one server (as HAProxy's `source` and
 * nginx's `proxy_bind`; one address holds at most ip_local_port_range's ports towards static mode's
 * upstream). 0 (none of this family: the route's address), or -errno */
static int bind_source(struct core *c, int fd, int v6)
{
	const struct core_config *g = &c->cfg;
	for (int k = 0; k < g->nsources; k++) {
		unsigned i = (c->next_source + k) % (unsigned)g->nsources;
		struct in6_addr a;
		struct sockaddr_storage sa;
		memcpy(&a, g->source_addrs + 16 * i, 16);
		if (addr_is_v4(&a) != !v6)
			continue;
		c->next_source = i + 1;
		if (bind(fd, (struct sockaddr *)&sa, addr_to_sockaddr(&a, 0, &sa)))
			return -errno;
		return 0;
	}
	return 0;
}

/* A non-blocking socket of daddr's family connecting to daddr:dport (MPTCP unless the server was seen
 * without it), from the next source address if there are any: its fd, or -errno. Every server
 * connection is opened here (held SYNs, accepted clients, convert mode). */
int open_server(struct core *c, const struct in6_addr *daddr, uint16_t dport, int *tried_mptcp)
{
	struct sockaddr_storage sa;
	socklen_t salen = addr_to_sockaddr(daddr, dport, &sa);
	int fd = -1, err, v6 = !addr_is_v4(daddr);
	*tried_mptcp = 0;
	if (c->cfg.server_mptcp) {
		if (tcp_only(c, daddr, dport)) {
			c->st.server_tcp_remembered++;
		} else {
			fd = spare_take(c, v6, 1);
			*tried_mptcp = fd >= 0;
		}
	}
	if (fd < 0)
		fd = spare_take(c, v6, 0);
	if (fd < 0)
		return fd;
	if ((err = bind_source(c, fd, v6)) < 0) {
		close(fd);
		return err;
	}
	if (connect(fd, (struct sockaddr *)&sa, salen) && errno != EINPROGRESS) {
		err = errno;
		close(fd);
		return -err;
	}
	return fd;
}

/* a connect() in progress on fd, after epoll event ev: -1 not yet, 0 connected, else its errno */
int connect_result(int fd, uint32_t ev)
{
	int err = 0;
	socklen_t len = sizeof(err);
	if ((ev & (EPOLLERR | EPOLLHUP)) || !(ev & EPOLLOUT)) {
		getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
		if (!err && !(ev & EPOLLOUT))
			return -1;
	}
	return err;
}

/* a server answered the connection started at t_syn: time it; remember one that answered an MPTCP
 * SYN without MPTCP; returns whether the connection runs MPTCP */
int server_answered(struct core *c, int sfd, double t_syn, int tried_mptcp, int server_mptcp,
		    const struct in6_addr *daddr, uint16_t dport)
{
	count_connect_time(c, (c->now - t_syn) * 1e6);
	if (tried_mptcp) {
		server_mptcp = sock_is_mptcp(sfd);
		learn(c, daddr, dport, server_mptcp);
	}
	return server_mptcp;
}

/* Convert mode: the options of the server's SYN-ACK (recorded by mimbox/bpf/synack_opts.bpf.c, keyed
 * by server, local port and server port) into the answer Python wrote with an empty Extended TCP
 * Header TLV (RFC 8803 4.2.3): *prefix is header (4 bytes) + that TLV (type, length in words, 2 zero
 * bytes). Without a record (no BPF, or an entry aged out) the TLV stays empty, as before. */
void synack_options(struct core *c, int sfd, const struct in6_addr *daddr, uint16_t dport, char **prefix,
		    uint32_t *prefix_len)
{
	struct synack_key key;
	struct synack_value val;
	struct sockaddr_storage me;
	socklen_t len = sizeof(me);
	struct in6_addr local;
	union bpf_attr attr;
	uint32_t n;
	char *p;

	if (c->cfg.synack_fd <= 0 || *prefix_len != 8 || (uint8_t)(*prefix)[4] != TLV_EXTENDED_TCP_HEADER)
		return;
	if (getsockname(sfd, (struct sockaddr *)&me, &len) || addr_from_sockaddr(&me, &local, &key.lport))
		return;
	memcpy(key.raddr, daddr, 16);
	key.rport = dport;
	memset(&attr, 0, sizeof(attr));
	attr.map_fd = c->cfg.synack_fd;
	attr.key = (uintptr_t)&key;
	attr.value = (uintptr_t)&val;
	if (syscall(__NR_bpf, BPF_MAP_LOOKUP_AND_DELETE_ELEM, &attr, sizeof(attr)) || !val.len ||
	    val.len > SYNACK_MAX_OPTS)
		return;
	n = (val.len + 3) & ~3u;		/* whole words (a SYN-ACK's options are; EOL pads otherwise) */
	p = realloc(*prefix, 8 + n);
	if (!p)
		return;
	memcpy(p + 8, val.opts, val.len);
	memset(p + 8 + val.len, 0, n - val.len);
	p[1] = (char)((8 + n) / 4);		/* the message's length in words */
	p[5] = (char)((4 + n) / 4);		/* the TLV's */
	*prefix = p;
	*prefix_len = 8 + n;
	c->st.synack_options++;
}
