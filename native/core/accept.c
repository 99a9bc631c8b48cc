// SPDX-License-Identifier: GPL-2.0
/* Clients accepted: paired with their held SYN's server socket, or given a destination, admitted and
 * connected; convert mode's clients become greetings (Python reads their message); a client whose
 * SYN another worker holds is handed over to it.
 *
 * Hand-over between workers: with N workers the SYN of a client is held by the worker its source port
 * picks (the queue rules split by mimbox.host.netfilter.worker_of_port), and that worker opened the server
 * connection. The kernel's reuseport hash, which user space cannot steer on MPTCP listeners, picks the
 * worker that accept()s; if it is another one and the SYN really is held (the workers' shared set), the
 * client socket goes to the owner over a unix datagram socket (SCM_RIGHTS), which pairs it. */
#include "rooms.h"
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

/* mimbox.host.netfilter.worker_of_port: the worker whose queue gets a SYN from source port sport (host order) */
int core_worker_of_port(int sport, int workers)
{
	return ((sport & 0xFF) * workers) >> 8;
}

static void refuse_accepted(struct core *c, int cfd, const struct refusal *why, const struct flow *f)
{
	refused(c, why, 1, f);		/* counted before the client can see it */
	reset_close(cfd);
}

/* a greeting from caddr now counts against the gate's caps (core_greeting_end gives it back) */
static void greeting_held(struct core *c, const struct in6_addr *caddr)
{
	gate_hold(c, caddr);
	c->greetings++;
}

/* -- convert mode: greetings ---------------------------------------------------------------------------
 * An accepted client whose Convert message Python reads. It costs an fd before its client said
 * anything, so it is admitted like a held SYN: an allowed client under the gate's caps, inside the fd
 * capacity and the connection limit (its admission passes to the connection it becomes). Python ends
 * it with core_greeting_end(), or core_convert_connect() once the message names a destination. */
static void greet(struct core *c, int cfd, const struct flow *f)
{
	unsigned char busy[] = CONVERT_RESOURCE_EXCEEDED;
	struct refusal why;
	struct core_event *e;

	if (admit(c, ADMIT_CLIENT | ADMIT_GATE | ADMIT_FDS | ADMIT_LIMIT, f, &why) == REFUSED) {
		if (why.cause == CAUSE_PENDING_LIMIT && (e = emit(c, EV_ACCEPTED))) {
			/* a cap of the gate (detail: which): Python admits it once the greetings before it in this
			 * batch are read, or resets the oldest silent greeting under that cap to make room
			 * (mimbox.converter.greetings), then core_greeting_admit(); or refuses it */
			e->fd = cfd;
			e->cause = why.cause;
			e->detail = why.detail;
			event_flow(e, f);
			return;
		}
		refused(c, &why, 1, f);
		if (why.cause == CAUSE_CLIENT_NOT_ALLOWED) {
			reset_close(cfd);	/* a client not allowed learns nothing */
			return;
		}
		/* RFC 8803: an Error TLV (Resource Exceeded) says why, then the stream ends. Written here, not
		 * by Python: a crowd beyond the caps is refused at the kernel's pace, so the listener's queue,
		 * which real clients share with it, drains as fast as the crowd fills it. A client accepted at
		 * its TFO SYN (its handshake not complete) is Python's: the answer must wait (client_ready) */
		if (sock_is_mptcp(cfd) && tcp_state(cfd) == TCP_SYN_RECV && (e = emit(c, EV_GIVEBACK))) {
			e->fd = cfd;
			e->cause = why.cause;
			event_flow(e, f);
			return;
		}
		busy[2] = (uint8_t)(c->cfg.convert_header_field >> 8);	/* --convert-compat (rfc8803.HEADER_FIELD) */
		busy[3] = (uint8_t)c->cfg.convert_header_field;
		send(cfd, busy, sizeof(busy), MSG_DONTWAIT | MSG_NOSIGNAL);
		shutdown(cfd, SHUT_WR);
		close(cfd);
		return;
	}
	e = emit(c, EV_ACCEPTED);
	if (!e) {			/* no room to tell Python: the client is reset, never lost silently */
		admission_return(c);
		reset_close(cfd);
		return;
	}
	greeting_held(c, &f->caddr);
	e->fd = cfd;
	event_flow(e, f);
}

/* A greeting from caddr the gate had turned away, admitted now that room may have been made (the
 * greetings before it read, or an older silent one reset by Python): -1 admitted (it is a greeting
 * now, as if greet() had admitted it), else the CAUSE_* that refuses it (*detail; counted if count) */
int core_greeting_admit(struct core *c, const uint8_t *caddr, uint16_t cport, int count, int *detail)
{
	struct flow f = {.caddr = addr_load(caddr), .cport = cport};
	struct refusal why;
	if (admit(c, ADMIT_CLIENT | ADMIT_GATE | ADMIT_FDS | ADMIT_LIMIT, &f, &why) == REFUSED) {
		if (count)
			refused(c, &why, 1, &f);
		*detail = why.detail;
		return why.cause;
	}
	greeting_held(c, &f.caddr);
	return -1;
}

/* Python is done with a greeting from caddr: it became a connection (keep_admission:
 * core_convert_connect() follows) or it ended. */
void core_greeting_end(struct core *c, const uint8_t *caddr, int keep_admission)
{
	struct in6_addr a = addr_load(caddr);
	gate_release(c, &a);
	c->greetings--;
	if (!keep_admission)
		admission_return(c);
}

int core_greetings(struct core *c)
{
	return c->greetings;
}

/* Convert mode, the message read: the destination checked, the server connection started, the
 * connection relayed from now on (reply: written to the client in front of the first bytes down;
 * early: the client's bytes after its message, for the server). -1: the core owns cfd now; else
 * the CAUSE_* that refused it (counted, its admission given back, *detail and *err set): cfd is
 * still Python's, to answer with an Error TLV. */
int core_convert_connect(struct core *c, int cfd, const uint8_t *caddr, uint16_t cport, const uint8_t *daddr,
			 uint16_t dport, double t, const char *reply, uint32_t reply_len, const char *early,
			 uint32_t early_len, int *detail, int *err)
{
	struct flow f = flow_load(caddr, cport, daddr, dport);
	struct refusal why;
	int sfd, tried, r;

	if (admit(c, ADMIT_DESTINATION, &f, &why) == ADMITTED) {
		sfd = open_server(c, &f.daddr, dport, &tried);
		if (sfd < 0) {
			why = (struct refusal){.cause = cause_of_errno(-sfd), .err = -sfd};
		} else {
			r = conn_add(c, cfd, sfd, 1, tried, 0, &f, t, reply, reply_len, early, early_len);
			if (r >= 0)
				return -1;
			close(sfd);
			why = (struct refusal){.cause = CAUSE_SERVER_ERROR, .err = -r};
		}
	}
	admission_return(c);
	refused(c, &why, 1, &f);
	*detail = why.detail;
	*err = why.err;
	return why.cause;
}

/* -- accepted clients ------------------------------------------------------------------------------------- */
/* its held SYN's server socket, or its destination, admission and server connection */
static void serve_accepted(struct core *c, int cfd, const struct in6_addr *caddr, uint16_t cport)
{
	struct flow f = {.caddr = *caddr, .cport = cport};
	struct refusal why;
	int i, sfd, tried;

	i = held_find(c, client_key(caddr, cport), caddr, cport);
	if (i >= 0) {
		struct held h = c->held[i];
		if (h.state == HELD_WAITING) {	/* a retransmission the kernel answered before ours was */
			c->st.accept_while_held++;
			reset_close(cfd);
			return;
		}
		epoll_ctl(c->epfd, EPOLL_CTL_DEL, h.sfd, NULL);
		held_end(c, i, HELD_PAIRED, NULL);	/* the connection takes its socket and admission */
		if (conn_add(c, cfd, h.sfd, 0, 0, h.server_mptcp, &h.f, h.t_syn, NULL, 0, NULL, 0) < 0) {
			reset_close(cfd);
			close(h.sfd);
			admission_return(c);
		}
		return;
	}
	switch (destination_of(c, cfd, &f, &why)) {
	case -1:
		return refuse_accepted(c, cfd, &why, &f);
	case 1:
		return greet(c, cfd, &f);		/* convert mode: the message says where */
	}
	if (admit(c, ADMIT_CLIENT | ADMIT_DESTINATION | ADMIT_FDS | ADMIT_LIMIT, &f, &why) == REFUSED)
		return refuse_accepted(c, cfd, &why, &f);	/* (its SYN may not have been judged) */
	sfd = open_server(c, &f.daddr, f.dport, &tried);
	if (sfd < 0) {
		admission_return(c);
		return refuse_accepted(c, cfd, &(struct refusal){.cause = cause_of_errno(-sfd), .err = -sfd}, &f);
	}
	if (conn_add(c, cfd, sfd, 1, tried, 0, &f, c->now, NULL, 0, NULL, 0) < 0) {
		admission_return(c);
		reset_close(cfd);
		close(sfd);
	}
}

/* -- hand-over ---------------------------------------------------------------------------------------------- */
int core_link(struct core *c, int worker, int fd)
{
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)FD_LINK << FD_SHIFT | (uint32_t)fd};
	if (worker < 0 || worker >= MAX_WORKERS)
		return -EINVAL;
	c->links[worker] = fd;
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	return epoll_ctl(c->epfd, EPOLL_CTL_ADD, fd, &ev) ? -errno : 0;
}

/* whether another worker holds this client's SYN (then it has its server socket) */
static int held_elsewhere(struct core *c, const struct in6_addr *addr, uint16_t port)
{
	const struct core_config *g = &c->cfg;
	uint64_t k;
	int owner;
	if (g->workers <= 1 || !g->syns_queued)
		return 0;
	owner = core_worker_of_port(ntohs(port), g->workers);
	if (owner == g->worker)
		return 0;
	if (!g->held_slots)
		return 1;
	k = client_key(addr, port);
	return __atomic_load_n(&g->held_slots[hash64(k) & g->held_mask], __ATOMIC_RELAXED) == k;
}

static void hand_over(struct core *c, int cfd, int owner)
{
	char byte = 'c', cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = {&byte, 1};
	struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf)};
	struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &cfd, sizeof(int));
	if (owner >= MAX_WORKERS || c->links[owner] < 0 || sendmsg(c->links[owner], &m, MSG_DONTWAIT) < 0) {
		c->st.handover_errors[owner < MAX_WORKERS && c->links[owner] >= 0 ? errno_slot(errno) : 0]++;
		reset_close(cfd);
		return;
	}
	c->st.handed_over++;
	close(cfd);		/* the owner has its own reference now */
}

/* clients another worker handed over */
void link_ready(struct core *c, int fd)
{
	for (int n = 0; n < 64; n++) {
		char byte, cbuf[CMSG_SPACE(16 * sizeof(int))];
		struct iovec iov = {&byte, 1};
		struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf)};
		if (recvmsg(fd, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC) <= 0)
			return;
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm)) {
			if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
				continue;
			for (unsigned k = 0; k < (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int); k++) {
				int cfd;
				struct sockaddr_storage peer;
				socklen_t len = sizeof(peer);
				struct in6_addr a;
				uint16_t port;
				memcpy(&cfd, CMSG_DATA(cm) + k * sizeof(int), sizeof(int));
				if (getpeername(cfd, (struct sockaddr *)&peer, &len) || addr_from_sockaddr(&peer, &a, &port))
					reset_close(cfd);	/* the client went away on the way here */
				else
					serve_accepted(c, cfd, &a, port);
			}
		}
	}
}

/* -- the listeners ------------------------------------------------------------------------------------------ */
/* Out of fds (EMFILE/ENFILE): a level-triggered listener would report the same waiting client at
 * once, forever (a spin at a full core). Every listener leaves the engine for ACCEPT_PAUSE (as
 * nginx disables accept events); its clients wait in the kernel's backlog meanwhile. */
static void accept_pause(struct core *c)
{
	if (c->accept_paused_until > 0)
		return;
	for (int j = 0; j < c->nlisteners; j++)
		c->eng->unlisten(c, c->listeners[j]);
	c->accept_paused_until = c->now + ACCEPT_PAUSE;
	c->st.accept_pauses++;
}

void accept_resume(struct core *c)
{
	for (int j = 0; j < c->nlisteners; j++) {
		int r = c->eng->listen(c, c->listeners[j]);
		if (r < 0)
			c->st.errors[errno_slot(-r)]++;
	}
	c->accept_paused_until = 0;
}

/* accept() failed with err: counted; out of fds or memory, the listeners rest (accept_pause) */
void accept_failed(struct core *c, int err)
{
	if (err != EAGAIN && err != EINTR)
		c->st.accept_errors[errno_slot(err)]++;
	if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM)
		accept_pause(c);
}

/* whether the accepted socket's own address is loopback (a loopback client is real only there) */
static int accepted_on_loopback(int fd)
{
	struct sockaddr_storage me;
	socklen_t len = sizeof(me);
	struct in6_addr a;
	uint16_t port;
	return !getsockname(fd, (struct sockaddr *)&me, &len) && !addr_from_sockaddr(&me, &a, &port) &&
	       addr_is_loopback(&a);
}

/* a client accepted from peer: handed over to the worker that holds its SYN, or served here */
void accept_one(struct core *c, int fd, const struct sockaddr_storage *peer)
{
	struct in6_addr a;
	uint16_t port;
	if (addr_from_sockaddr(peer, &a, &port)) {	/* an IPv4 or IPv6 client, nothing else */
		reset_close(fd);
		return;
	}
	if (addr_source_bad(&a, 0, addr_is_loopback(&a) && accepted_on_loopback(fd))) {
		struct flow f = {.caddr = a, .cport = port};
		return refuse_accepted(c, fd, &(struct refusal){.cause = CAUSE_BAD_SOURCE}, &f);
	}
	if (held_elsewhere(c, &a, port))
		hand_over(c, fd, core_worker_of_port(ntohs(port), c->cfg.workers));
	else
		serve_accepted(c, fd, &a, port);
}

void accept_all(struct core *c, int lfd)
{
	struct sockaddr_storage peer;
	socklen_t len;
	int fd, n;
	/* bounded, so that one busy listener does not starve the connections; level-triggered */
	for (n = 0; n < 64 && c->nout < c->maxout; n++) {
		len = sizeof(peer);
		fd = accept4(lfd, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			return accept_failed(c, errno);
		accept_one(c, fd, &peer);
	}
}
