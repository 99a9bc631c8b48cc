// SPDX-License-Identifier: GPL-2.0
/* Relayed connections: a client socket and its server socket in one slot (struct conn), from
 * conn_add() to conn_end() — the one function where a connection ends, whatever ends it.
 *
 *   conn_add()        CONN_CONNECTING (server connect() in progress) or CONN_RELAYING
 *   server_ready()    the connect() finished: CONN_RELAYING, or conn_end(END_CONNECT_FAILED)
 *   conn_ready()      an epoll event on either socket: bytes move (the engine, c->eng)
 *   conn_due()        its timer (timers.c): connect, idle and convert-answer deadlines
 *   conn_end()        CONN_ENDED: both sockets closed (reset unless both sides finished), counted,
 *                     the access log's line; the slot is freed when the batch ends
 *                     (conns_free_ended), so a stale event of this batch never meets a new tenant. */
#include "rooms.h"
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static int conn_slot(struct core *c)
{
	int i;
	if (c->free_head >= 0) {
		i = c->free_head;
		c->free_head = c->conns[i]->next_free;
		return i;
	}
	if (c->nconns == c->cap) {
		int cap = c->cap ? 2 * c->cap : 256;
		struct conn **n = realloc(c->conns, cap * sizeof(*n));
		if (!n)
			return -1;
		c->conns = n;
		c->cap = cap;
	}
	c->conns[c->nconns] = malloc(sizeof(struct conn));
	if (!c->conns[c->nconns])
		return -1;
	return c->nconns++;
}

/* Take over a client and its server socket (connecting: the server has not answered yet); the slot,
 * or -errno (the caller still owns both fds). */
int conn_add(struct core *c, int cfd, int sfd, int connecting, int tried_mptcp, int server_mptcp,
	     const struct flow *f, double t_syn, const char *prefix, uint32_t prefix_len, const char *early,
	     uint32_t early_len)
{
	struct conn *k;
	int i = conn_slot(c), err = -ENOMEM;

	if (i < 0)
		return -ENOMEM;
	k = c->conns[i];
	memset(k, 0, sizeof(*k));
	k->cfd = cfd;
	k->sfd = sfd;
	dir_init(&k->up, cfd, sfd);
	dir_init(&k->down, sfd, cfd);
	k->f = *f;
	k->t_syn = t_syn;
	k->t_accept = k->last = c->now ? c->now : monotonic();
	k->tried_mptcp = tried_mptcp;
	k->server_mptcp = server_mptcp;
	if (prefix_len) {
		k->down.prefix = malloc(prefix_len);
		if (!k->down.prefix)
			goto failed;
		memcpy(k->down.prefix, prefix, prefix_len);
		k->down.prefix_len = prefix_len;
	}
	if (early_len) {
		k->early = malloc(early_len);
		if (!k->early)
			goto failed;
		memcpy(k->early, early, early_len);
		k->early_len = early_len;
	}
	if ((err = c->eng->conn_watch(c, i)) < 0)
		goto failed;
	k->state = connecting ? CONN_CONNECTING : CONN_RELAYING;
	if (!++c->conn_gen)
		c->conn_gen = 1;
	k->gen = c->conn_gen;
	c->active++;
	c->st.accepted++;
	k->client_mptcp = sock_is_mptcp(cfd);
	if (k->client_mptcp && c->cfg.dst_source == DST_PYTHON) {	/* convert mode: accepted at a TFO SYN? */
		k->client_synrecv = 1;
		client_ready(k);
	}
	if (k->client_mptcp)
		c->st.client_mptcp++;
	else
		c->st.client_tcp++;
	if (!connecting) {
		if (server_mptcp)
			c->st.server_mptcp++;
		else
			c->st.server_tcp++;
	}
	c->eng->conn_start(c, i);
	conn_timer(c, i);
	return i;
failed:
	free(k->down.prefix);
	free(k->early);
	k->down.prefix = k->early = NULL;
	k->next_free = c->free_head;
	c->free_head = i;
	return err;
}

/* core_add for Python (addresses as 16 bytes): conn_add */
int core_add(struct core *c, int cfd, int sfd, int connecting, int tried_mptcp, int server_mptcp,
	     const uint8_t *caddr, uint16_t cport, const uint8_t *daddr, uint16_t dport, double t_syn,
	     const char *prefix, uint32_t prefix_len, const char *early, uint32_t early_len)
{
	struct flow f = flow_load(caddr, cport, daddr, dport);
	return conn_add(c, cfd, sfd, connecting, tried_mptcp, server_mptcp, &f, t_syn, prefix, prefix_len, early,
			early_len);
}

/* the server connection of connection i finished its connect() (ev: the server socket's event) */
void server_ready(struct core *c, int i, uint32_t ev)
{
	struct conn *k = c->conns[i];
	int err = connect_result(k->sfd, ev);
	if (err < 0)
		return;			/* not yet */
	if (err)
		return conn_end(c, i, END_CONNECT_FAILED, err);
	k->state = CONN_RELAYING;
	k->last = c->now;
	conn_timer(c, i);		/* from the connect deadline to the idle one */
	k->server_mptcp = server_answered(c, k->sfd, k->t_syn, k->tried_mptcp, k->server_mptcp, &k->f.daddr, k->f.dport);
	if (k->server_mptcp)
		c->st.server_mptcp++;
	else
		c->st.server_tcp++;
	if (k->down.prefix)			/* convert mode: the answer carries the SYN-ACK's options */
		synack_options(c, k->sfd, &k->f.daddr, k->f.dport, &k->down.prefix, &k->down.prefix_len);
	if (k->early_len) {
		ssize_t w = send(k->sfd, k->early, k->early_len, MSG_NOSIGNAL);
		if (w != (ssize_t)k->early_len)	/* a fresh socket takes them: short is a failure */
			return conn_end(c, i, END_RESET, w < 0 ? errno : EMSGSIZE);
		k->up.bytes += w;
		free(k->early);
		k->early = NULL;
		k->early_len = 0;
	}
	c->eng->server_connected(c, i, ev);
}

/* an epoll event on a connection's socket (data: slot << 1 | is_client) */
void conn_ready(struct core *c, uint64_t data, uint32_t ev)
{
	int i = (uint32_t)data >> 1, is_client = data & 1;
	struct conn *k = c->conns[i];

	switch (k->state) {
	case CONN_FREE:
	case CONN_ENDED:
		return;
	case CONN_CONNECTING:
		if (is_client)
			k->client_ev |= ev;	/* its bytes wait in its socket until the server is there */
		else
			server_ready(c, i, ev);
		return;
	case CONN_RELAYING:
		return c->eng->conn_event(c, i, is_client, ev);
	}
}

static void conn_event(struct core *c, struct conn *k, int kind, int err)
{
	struct core_event *e = emit(c, kind);
	if (!e)
		return;
	e->err = err;
	event_flow(e, &k->f);
}

/* the access log's line for connection k (Python writes it): one in access_log_every */
static void access_log(struct core *c, struct conn *k, int reset)
{
	struct core_event *e;
	if (c->cfg.access_log_every <= 0 || c->st.closed % c->cfg.access_log_every)
		return;
	e = emit(c, EV_CLOSED);
	if (!e) {
		c->st.access_log_dropped++;
		return;
	}
	e->err = k->end_err ? k->end_err : (reset ? ECONNABORTED : 0);
	event_flow(e, &k->f);
	e->bytes_up = k->up.bytes;
	e->bytes_down = k->down.bytes;
	e->duration = c->now - k->t_accept;
}

/* Where a connection ends: `how` says why (enum conn_end_how), err the errno behind it. */
void conn_end(struct core *c, int i, enum conn_end_how how, int err)
{
	struct conn *k = c->conns[i];
	int reset = how != END_FINISHED, keep_client = 0;
	struct core_event *e;

	if (k->state == CONN_ENDED || k->state == CONN_FREE)
		return;
	switch (how) {
	case END_FINISHED:
		break;
	case END_RESET:
		c->st.errors[errno_slot(err)]++;
		conn_event(c, k, EV_ABORTED, err);
		break;
	case END_IDLE:
		err = ETIME;
		c->st.idle_timeouts++;
		conn_event(c, k, EV_ABORTED, err);
		break;
	case END_CONNECT_FAILED: {
		struct refusal why = {.cause = cause_of_errno(err), .err = err};
		refused(c, &why, 1, &k->f);
		if (k->down.prefix && (e = emit(c, EV_GIVEBACK))) {	/* convert mode: Python writes the Error TLV */
			e->fd = k->cfd;
			e->cause = why.cause;
			keep_client = 1;
			reset = 0;
		}
		break;
	}
	case END_SHUTDOWN:
		err = ESHUTDOWN;
		break;
	}
	k->state = CONN_ENDED;
	timer_stop(c, i << 1 | TIMER_CONN);
	k->end_err = err;
	c->active--;
	admission_return(c);
	c->st.closed++;
	count_duration(c, c->now - k->t_accept);
	access_log(c, k, reset);
	c->st.bytes_up += k->up.bytes;
	c->st.bytes_down += k->down.bytes;
	c->eng->conn_stop(c, k, keep_client);
	if (!keep_client && reset)	/* (a client kept is Python's now) */
		reset_close(k->cfd);
	else if (!keep_client)
		close(k->cfd);
	if (reset)
		reset_close(k->sfd);
	else
		close(k->sfd);
	dir_release(c, &k->up);
	dir_release(c, &k->down);
	free(k->early);
	k->early = NULL;
	if (c->ndead == c->dead_cap) {
		int cap = c->dead_cap ? 2 * c->dead_cap : 64;
		int *n = realloc(c->dead, cap * sizeof(*n));
		if (!n)			/* the slot leaks rather than being reused too early */
			return;
		c->dead = n;
		c->dead_cap = cap;
	}
	c->dead[c->ndead++] = i;
}

/* the batch is over: the slots of the connections that ended in it are free again */
void conns_free_ended(struct core *c)
{
	for (int j = 0; j < c->ndead; j++) {
		struct conn *k = c->conns[c->dead[j]];
		k->state = CONN_FREE;
		k->next_free = c->free_head;
		c->free_head = c->dead[j];
	}
	c->ndead = 0;
}

/* -- its timer (timers.c's wheel) ------------------------------------------------------------------------ */
static double earliest(double a, double b)
{
	return a <= 0 ? b : b <= 0 ? a : a < b ? a : b;
}

/* connection k's next deadline (0: none), from its state now */
static double conn_deadline(struct core *c, struct conn *k)
{
	double when = 0;
	if (k->state == CONN_CONNECTING)
		return k->t_accept + c->cfg.connect_timeout;
	if (k->state != CONN_RELAYING)
		return 0;
	if (c->cfg.idle_timeout > 0)
		when = k->last + c->cfg.idle_timeout;
	if (k->client_synrecv)
		when = earliest(when, c->now + 1);	/* looked at each second until its handshake is seen */
	else if (k->down.prefix && !k->up.bytes)
		when = earliest(when, k->last + c->cfg.prefix_wait);
	return when;
}

/* (re)place connection i on the wheel at its next deadline */
void conn_timer(struct core *c, int i)
{
	timer_set(c, i << 1 | TIMER_CONN, conn_deadline(c, c->conns[i]));
}

/* connection i's timer is due: judged on what is true now (ended, or set again at its next deadline) */
void conn_due(struct core *c, int i)
{
	struct conn *k = c->conns[i];
	switch (k->state) {
	case CONN_FREE:
	case CONN_ENDED:
		return;
	case CONN_CONNECTING:
		if (c->now - k->t_accept > c->cfg.connect_timeout) {
			c->st.connect_timeouts++;
			return conn_end(c, i, END_CONNECT_FAILED, ETIMEDOUT);
		}
		break;
	case CONN_RELAYING:
		if (c->cfg.idle_timeout > 0 && c->now - k->last > c->cfg.idle_timeout)
			return conn_end(c, i, END_IDLE, ETIME);
		if (k->client_synrecv) {
			if (client_ready(k))	/* (its EPOLLOUT edge should have said so) */
				c->eng->client_established(c, i);
		} else if (k->down.prefix && !k->up.bytes && c->now - k->last > c->cfg.prefix_wait &&
			   dir_flush_prefix(&k->down) < 0)
			return conn_end(c, i, END_RESET, EPIPE);
		break;
	}
	if (k->state == CONN_CONNECTING || k->state == CONN_RELAYING)
		conn_timer(c, i);
}

int core_list(struct core *c, struct core_conn_info *out, int max)
{
	int n = 0;
	for (int i = 0; i < c->nconns && n < max; i++) {
		struct conn *k = c->conns[i];
		if (k->state != CONN_CONNECTING && k->state != CONN_RELAYING)
			continue;
		out[n] = (struct core_conn_info){.cfd = k->cfd, .sfd = k->sfd, .cport = k->f.cport, .dport = k->f.dport,
						 .client_mptcp = k->client_mptcp, .server_mptcp = k->server_mptcp,
						 .connecting = k->state == CONN_CONNECTING, .bytes_up = k->up.bytes,
						 .bytes_down = k->down.bytes, .t_accept = k->t_accept};
		memcpy(out[n].caddr, &k->f.caddr, 16);
		memcpy(out[n++].daddr, &k->f.daddr, 16);
	}
	return n;
}

int core_active(struct core *c)
{
	return c->active;
}
