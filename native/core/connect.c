// SPDX-License-Identifier: GPL-2.0
/* The one place a server socket is made and connected (as nginx's ngx_event_connect.c): MPTCP first
 * unless this server was seen answering without it (the memo), the server side's options, sockets
 * made ahead while the loop is idle (spares), and what a finished connect() says. */
#include "rooms.h"
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

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

/* the refusal cause of a failed server connect (mimbox.synpath.Cause.of_errno) */
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

/* -- the memo: servers that answered an MPTCP SYN without MPTCP get TCP for server_mptcp_retry s ------ */
static struct memo *memo_slot(struct core *c, uint64_t key)
{
	return &c->tcp_only[hash64(key) & (MEMO_SLOTS - 1)];
}

static uint64_t server_key(uint32_t daddr, uint16_t dport)
{
	return ((uint64_t)daddr << 16 | dport) + 1;
}

static int tcp_only(struct core *c, uint32_t daddr, uint16_t dport)
{
	struct memo *m = memo_slot(c, server_key(daddr, dport));
	if (m->key != server_key(daddr, dport))
		return 0;
	if (monotonic() < m->until)
		return 1;
	m->key = 0;
	return 0;
}

static void learn(struct core *c, uint32_t daddr, uint16_t dport, int mptcp_works)
{
	struct memo *m = memo_slot(c, server_key(daddr, dport));
	if (mptcp_works || c->cfg.server_mptcp_retry <= 0) {
		if (m->key == server_key(daddr, dport))
			m->key = 0;
		return;
	}
	m->key = server_key(daddr, dport);
	m->until = monotonic() + c->cfg.server_mptcp_retry;
}

/* A non-blocking server socket of one kind (1: MPTCP, 0: TCP) with the server side's options: fd or -errno */
static int server_socket(struct core *c, int mptcp)
{
	int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, mptcp ? IPPROTO_MPTCP : 0);
	if (fd < 0)
		return -errno;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (c->cfg.server_rcvbuf)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &c->cfg.server_rcvbuf, sizeof(int));
	if (c->cfg.server_sndbuf)
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &c->cfg.server_sndbuf, sizeof(int));
	return fd;
}

/* -- spares ------------------------------------------------------------------------------------------------
 * Server sockets made while the loop has nothing to do, so that a held SYN's connect() is the only
 * system call between its arrival and its server SYN (socket() and the setsockopts cost about a fifth
 * of Table 1's SYN delay here). Under load the loop is never idle, the spares run out and sockets are
 * made on demand as before: the same calls, moved out of the SYN's way, never added. */
static int spare_target(struct core *c)
{
	return c->cfg.spare_sockets < SPARE_MAX ? c->cfg.spare_sockets : SPARE_MAX;
}

int spare_missing(struct core *c)
{
	int t = spare_target(c);
	return t > 0 && c->now >= c->spare_retry_at &&
	       ((c->spare_wanted[0] && c->nspare[0] < t) || (c->spare_wanted[1] && c->nspare[1] < t));
}

void spare_refill(struct core *c)
{
	for (int kind = 0; kind < 2; kind++)
		while (c->spare_wanted[kind] && c->nspare[kind] < spare_target(c)) {
			int fd = server_socket(c, kind);
			if (fd < 0) {			/* out of fds or memory: try again in a second */
				c->spare_retry_at = c->now + 1.0;
				return;
			}
			c->spare[kind][c->nspare[kind]++] = fd;
			c->st.spare_made++;
		}
}

static int spare_take(struct core *c, int mptcp)
{
	c->spare_wanted[mptcp] = 1;
	if (c->nspare[mptcp] > 0) {
		c->st.spare_used++;
		return c->spare[mptcp][--c->nspare[mptcp]];
	}
	return server_socket(c, mptcp);
}

/* A non-blocking socket connecting to daddr:dport (MPTCP unless the server was seen without it):
 * its fd, or -errno. Every server connection is opened here (held SYNs, accepted clients, convert mode). */
int core_open_server(struct core *c, uint32_t daddr, uint16_t dport, int *tried_mptcp)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = daddr, .sin_port = dport};
	int fd = -1, err;
	*tried_mptcp = 0;
	if (c->cfg.server_mptcp) {
		if (tcp_only(c, daddr, dport)) {
			c->st.server_tcp_remembered++;
		} else {
			fd = spare_take(c, 1);
			*tried_mptcp = fd >= 0;
		}
	}
	if (fd < 0)
		fd = spare_take(c, 0);
	if (fd < 0)
		return fd;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) && errno != EINPROGRESS) {
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
		    uint32_t daddr, uint16_t dport)
{
	count_connect_time(c, (c->now - t_syn) * 1e6);
	if (tried_mptcp) {
		server_mptcp = sock_is_mptcp(sfd);
		learn(c, daddr, dport, server_mptcp);
	}
	return server_mptcp;
}
