// SPDX-License-Identifier: GPL-2.0
/* Where a SYN is held: the paper's order, server first (§3, Table 1).
 *
 *   NFQUEUE hands a client SYN to on_syn(): its destination (DST_OPT, static, or where it was sent),
 *   admit() (policy), the gate (hold, defer to the kernel, or refuse), admit() (fds, limit), then the
 *   server connect() starts and the SYN waits in the queue (HELD_WAITING);
 *   the server answers (held_ready): the SYN goes on to the kernel, which completes the client's
 *   handshake (HELD_RELEASED); accept() finds the entry (accept.c) and pairs the two sockets;
 *   the server fails, or nothing comes in time (held_due): the SYN is released marked, RST.
 * A refused SYN's verdict carries REFUSE_MARK: the listener's filter rule answers it with RST. */
#include "rooms.h"
#include <fcntl.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/types.h>
#include <linux/netfilter.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

int core_pending(struct core *c)
{
	return c->nheld;
}

/* the held entry of client caddr:cport (key: its client_key), or -1 */
int held_find(struct core *c, uint64_t key, const struct in6_addr *caddr, uint16_t cport)
{
	if (c->held_filter[hash64(key) & (HELD_FILTER - 1)] != key)
		return -1;
	for (int i = 0; i < c->nheld_slots; i++) {
		const struct held *h = &c->held[i];
		if (h->state != HELD_FREE && h->key == key && h->f.cport == cport && addr_eq(&h->f.caddr, caddr))
			return i;
	}
	return -1;
}

/* this worker's filter, and the workers' shared set (accept.c looks there for another's SYN) */
static void held_mark(struct core *c, uint64_t key, int on)
{
	uint64_t *slot = &c->held_filter[hash64(key) & (HELD_FILTER - 1)];
	if (on)
		*slot = key;
	else if (*slot == key)
		*slot = 0;
	if (c->cfg.held_slots) {	/* a one-slot store, no lock */
		uint64_t *sh = &c->cfg.held_slots[hash64(key) & c->cfg.held_mask];
		if (on)
			__atomic_store_n(sh, key, __ATOMIC_RELAXED);
		else if (__atomic_load_n(sh, __ATOMIC_RELAXED) == key)
			__atomic_store_n(sh, 0, __ATOMIC_RELAXED);
	}
}

static void verdict(struct core *c, uint32_t id, int refuse)
{
	if (refuse)
		nfq_set_verdict2(c->qh, id, NF_ACCEPT, REFUSE_MARK, 0, NULL);	/* filter/INPUT answers RST */
	else
		nfq_set_verdict(c->qh, id, NF_ACCEPT, 0, NULL);
}

static void refuse_syn(struct core *c, uint32_t id, const struct refusal *why, const struct flow *f)
{
	verdict(c, id, 1);
	refused(c, why, 0, f);
}

/* end held entry i: paired (HELD_PAIRED), its server socket and admission now belong to a connection;
 * or alone (HELD_DROPPED): a SYN still waiting is refused as `why` says, the socket closed, the
 * admission returned */
void held_end(struct core *c, int i, enum held_end_how how, const struct refusal *why)
{
	struct held *h = &c->held[i];
	if (h->state == HELD_WAITING && why)
		refuse_syn(c, h->id, why, &h->f);
	gate_release(c, &h->f.caddr);
	held_mark(c, h->key, 0);
	if (how == HELD_DROPPED) {
		admission_return(c);
		if (h->sfd >= 0)
			close(h->sfd);
	}
	h->state = HELD_FREE;
	timer_stop(c, i << 1 | TIMER_HELD);
	h->sfd = -1;
	h->next_free = c->held_free;
	c->held_free = i;
	c->nheld--;
}

/* -- its timer (timers.c's wheel) ------------------------------------------------------------------------ */
/* (re)place held entry i on the wheel: the server's deadline while it waits, then the client's handshake */
void held_timer(struct core *c, int i)
{
	struct held *h = &c->held[i];
	double when = h->state == HELD_WAITING ? h->t_syn + c->cfg.connect_timeout :
		      h->state == HELD_RELEASED ? h->ready_at + c->cfg.handshake_timeout : 0;
	timer_set(c, i << 1 | TIMER_HELD, when);
}

/* held entry i's timer is due: judged on what is true now (ended, or set again) */
void held_due(struct core *c, int i)
{
	struct held *h = &c->held[i];
	if (h->state == HELD_WAITING && c->now - h->t_syn > c->cfg.connect_timeout) {
		c->st.held_connect_timeouts++;
		return held_end(c, i, HELD_DROPPED, &(struct refusal){.cause = CAUSE_SERVER_TIMEOUT, .err = ETIMEDOUT});
	}
	if (h->state == HELD_RELEASED && c->now - h->ready_at > c->cfg.handshake_timeout) {
		c->st.handshake_timeouts++;	/* the client never completed its handshake */
		return held_end(c, i, HELD_DROPPED, &(struct refusal){.cause = CAUSE_HANDSHAKE_TIMEOUT});
	}
	held_timer(c, i);
}


/* hold the SYN: its server connect() starts now */
static void hold(struct core *c, uint32_t id, uint64_t key, const struct flow *f)
{
	struct epoll_event ev = {.events = WATCH_CONN};
	int i = c->held_free, tried, sfd = open_server(c, &f->daddr, f->dport, &tried);
	if (sfd < 0) {
		admission_return(c);
		return refuse_syn(c, id, &(struct refusal){.cause = cause_of_errno(-sfd), .err = -sfd}, f);
	}
	c->held_gen = (c->held_gen + 1) & GEN_MASK;
	ev.data.u64 = (uint64_t)FD_HELD << FD_SHIFT | (uint64_t)c->held_gen << GEN_SHIFT | (uint32_t)i;
	if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, sfd, &ev)) {
		int err = errno;
		close(sfd);
		admission_return(c);
		return refuse_syn(c, id, &(struct refusal){.cause = CAUSE_SERVER_ERROR, .err = err}, f);
	}
	c->held_free = c->held[i].next_free;
	c->nheld++;
	c->held[i] = (struct held){.state = HELD_WAITING, .tried_mptcp = tried, .gen = c->held_gen, .id = id,
				   .f = *f, .key = key, .sfd = sfd, .t_syn = c->now};
	held_timer(c, i);
	gate_hold(c, &f->caddr);
	held_mark(c, key, 1);
	c->st.held++;
}

static void on_syn(struct core *c, uint32_t id, const uint8_t *pkt, int len)
{
	struct syn_info s;
	struct refusal why;
	struct flow f;
	uint64_t key;
	int i;

	if (core_parse_syn(pkt, len, &s))
		return verdict(c, id, 0);	/* not a TCP SYN we parse: the kernel's business (its accept() is
						 * judged in accept.c all the same) */
	f = flow_load(s.saddr, s.sport, s.daddr, s.dport);
	if (s.bad_source) {		/* forged: nobody to answer, nothing to hold or count against a prefix */
		nfq_set_verdict(c->qh, id, NF_DROP, 0, NULL);
		return refused(c, &(struct refusal){.cause = CAUSE_BAD_SOURCE}, 0, &f);
	}
	if (s.mp_join)
		return verdict(c, id, 0);	/* a new subflow: the kernel's business */
	c->st.syns++;
	key = client_key(&f.caddr, f.cport);
	i = held_find(c, key, &f.caddr, f.cport);
	if (i >= 0) {		/* a retransmission: dropped while the first is held, else the kernel's */
		if (c->held[i].state == HELD_WAITING)
			nfq_set_verdict(c->qh, id, NF_DROP, 0, NULL);
		else
			verdict(c, id, 0);
		return;
	}
	if (c->cfg.explicit_opt) {
		if (!s.has_dst) {
			memset(&f.daddr, 0, 16);
			f.dport = 0;
			return refuse_syn(c, id, &(struct refusal){.cause = CAUSE_BAD_OPTION, .detail = s.error,
								   .arg = s.arg}, &f);
		}
		f.daddr = addr_load(s.dst_addr);
		f.dport = s.dst_port;
	} else if (c->cfg.dst_source == DST_STATIC) {
		f.daddr = addr_load(c->cfg.static_addr);
		f.dport = c->cfg.static_port;
	}
	if (admit(c, ADMIT_CLIENT | ADMIT_DESTINATION, &f, &why) == REFUSED)
		return refuse_syn(c, id, &why, &f);
	switch (syn_gate(c, &f.caddr)) {
	case SYN_DEFER:		/* the kernel answers (SYN cookies past its backlog); connect after accept */
		if (c->cfg.explicit_opt && dest_remember(c, key, &f))
			return refuse_syn(c, id, &(struct refusal){.cause = CAUSE_CONFLICTING_DESTINATION}, &f);
		c->st.deferred++;
		return verdict(c, id, 0);
	case SYN_REFUSE:
		return refuse_syn(c, id, &(struct refusal){.cause = CAUSE_PENDING_LIMIT, .arg = c->gated}, &f);
	}
	if (c->held_free < 0)		/* every held slot in use (pending_limit raised by a reload) */
		return refuse_syn(c, id, &(struct refusal){.cause = CAUSE_FD_LIMIT, .arg = c->cfg.fd_capacity}, &f);
	if (admit(c, ADMIT_FDS | ADMIT_LIMIT, &f, &why) == REFUSED)
		return refuse_syn(c, id, &why, &f);
	hold(c, id, key, &f);
}

/* a held SYN's server connection answered (or failed) */
void held_ready(struct core *c, uint64_t data, uint32_t ev)
{
	int i = (int)(uint32_t)data, err;
	struct held *h = &c->held[i];
	if (h->state != HELD_WAITING || h->gen != ((data >> GEN_SHIFT) & GEN_MASK))
		return;			/* released (waiting for accept()), or a stale event of an ended entry */
	err = connect_result(h->sfd, ev);
	if (err < 0)
		return;
	if (err) {
		c->st.server_errors[errno_slot(err)]++;
		return held_end(c, i, HELD_DROPPED, &(struct refusal){.cause = cause_of_errno(err), .err = err});
	}
	h->server_mptcp = server_answered(c, h->sfd, h->t_syn, h->tried_mptcp, 0, &h->f.daddr, h->f.dport);
	h->state = HELD_RELEASED;
	h->ready_at = c->now;
	held_timer(c, i);		/* from the server's deadline to the client's handshake */
	verdict(c, h->id, 0);		/* the kernel now answers the client's SYN */
}

int queue_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa, void *data)
{
	struct core *c = data;
	struct nfqnl_msg_packet_hdr *h = nfq_get_msg_packet_hdr(nfa);
	unsigned char *pkt;
	int len;
	(void)qh;
	(void)msg;
	if (!h)
		return 0;
	if ((nfq_get_nfmark(nfa) & REFUSE_MASK) == REFUSE_MARK) {	/* the BPF recorder refused it */
		nfq_set_verdict(c->qh, ntohl(h->packet_id), NF_ACCEPT, 0, NULL);	/* mark kept: RST */
		return 0;
	}
	len = nfq_get_payload(nfa, &pkt);
	on_syn(c, ntohl(h->packet_id), pkt, len < 0 ? 0 : len);
	return 0;
}

/* Hold this worker's share of client SYNs (queue `num`); 0 or -errno. */
int core_queue(struct core *c, int num)
{
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)FD_QUEUE << FD_SHIFT};
	c->nfq = nfq_open();
	if (!c->nfq)
		return -errno ? -errno : -EIO;
	c->qh = nfq_create_queue(c->nfq, num, queue_packet, c);
	if (!c->qh || nfq_set_mode(c->qh, NFQNL_COPY_PACKET, 120) < 0) {
		int err = errno ? errno : EIO;
		if (c->qh)
			nfq_destroy_queue(c->qh);
		nfq_close(c->nfq);
		c->nfq = NULL;
		c->qh = NULL;
		return -err;
	}
	nfq_set_queue_maxlen(c->qh, 65536);
	c->qfd = nfq_fd(c->nfq);
	fcntl(c->qfd, F_SETFL, fcntl(c->qfd, F_GETFL) | O_NONBLOCK);
	c->qbuf = malloc(65536);
	if (!c->qbuf)
		return -ENOMEM;		/* core_free() closes the queue */
	if (c->qfd >= 0 && epoll_ctl(c->epfd, EPOLL_CTL_ADD, c->qfd, &ev))
		return -errno;
	return 0;
}

void queue_ready(struct core *c)
{
	for (int n = 0; n < 256; n++) {
		ssize_t r = recv(c->qfd, c->qbuf, 65536, MSG_DONTWAIT);
		if (r <= 0)
			return;		/* EAGAIN; ENOBUFS: the kernel dropped some (they are retransmitted) */
		nfq_handle_packet(c->nfq, c->qbuf, r);
	}
}
