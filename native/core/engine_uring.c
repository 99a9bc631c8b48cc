// SPDX-License-Identifier: GPL-2.0
/* The io_uring engine (config engine "uring"): where bytes move and where the loop waits when the core
 * runs on a ring instead of on epoll alone. What ends a connection, a server's answer and an accepted
 * client are reported up through c->hooks: this room names no room above it.
 *
 *   uring_init()        (uring_ring.c) a ring for this worker, restricted to the operations below
 *   uring_wait()        the loop's wait: submits what the batch prepared, waits for a completion or
 *                       the timeout, hands each completion to its connection; the epoll set (NFQUEUE,
 *                       listeners, held SYNs, Python's fds) is one multishot poll on the ring, and its
 *                       events are read with epoll_wait(0) when it fires
 *   uring_listen()      a listener's multishot accept: each client a completion, handed up (c->hooks)
 *   uring_connecting()  a server connect() in progress: one poll for POLLOUT (then c->hooks->server_ready)
 *   uring_start()       both sides connected: a recv on each direction's source
 *   uring_end()         conn_end (engine conn_stop): what is still in flight on its sockets is cancelled (synchronously:
 *                       no operation outlives the fd it names), the buffers it held go back
 *
 * A direction has at most one recv and one send in flight. A recv takes a provided buffer only when
 * bytes are there (an idle connection holds none); what it read waits in the direction's queue and
 * is sent from that buffer (MSG_WAITALL: the kernel retries a short send itself) while the next recv
 * reads on, up to DIR_QUEUE buffers: that is the back pressure, a slow destination stops its source
 * being read. Convert mode's answer (prefix) and what a synchronous write left (buf) are sent from
 * the direction's own buffer with the new bytes behind them.
 * The pool is shared by every connection of the worker, and connections whose destination does not
 * read hold their buffers until they end: a recv that finds the pool empty (ENOBUFS) does not wait
 * for another connection's buffer (clients that stop reading would stall everybody else). It polls
 * its source and reads into the direction's own buffer instead, as the copy engine does (counted:
 * core_stats.buffer_waits); its next recv tries the pool again.
 *
 * Not here: splice. io_uring always runs splice in a worker thread (it never polls a pipe), and
 * splice from an MPTCP socket is a copy on this kernel anyway; this engine copies, like `copy`.
 * Listeners accept on the ring (multishot); the server's connect() (then a poll for its end), the
 * shutdown()s and close()s stay the system calls the other rooms make (io_uring would run shutdown in
 * a worker thread). */
#include "rooms.h"
#include "uring-t.h"
#include <liburing.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static uint64_t tag(enum uring_op op, int slot, int up, uint32_t gen)
{
	return (uint64_t)op << 60 | (uint64_t)up << 59 | (uint64_t)slot << 32 | gen;
}

static struct io_uring_sqe *sqe_get(struct uring *u)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
	if (!sqe) {		/* the submission queue is full: hand it to the kernel now */
		io_uring_submit(&u->ring);
		sqe = io_uring_get_sqe(&u->ring);
	}
	return sqe;
}

static void buf_put(struct uring *u, unsigned bid)
{
	io_uring_buf_ring_add(u->br, buf_addr(u, bid), u->buf_size, bid, io_uring_buf_ring_mask(u->nbufs), 0);
	io_uring_buf_ring_advance(u->br, 1);
}

/* -- a direction's operations ---------------------------------------------------------------------- */
static int dir_up(struct conn *k, struct dir *d)
{
	return d == &k->up;
}

static int recv_post(struct core *c, int i, struct dir *d)
{
	struct conn *k = c->conns[i];
	struct io_uring_sqe *sqe = sqe_get(c->u);
	if (!sqe)
		return -EBUSY;
	io_uring_prep_recv(sqe, d->src, NULL, c->u->buf_size, 0);
	sqe->flags |= IOSQE_BUFFER_SELECT;
	sqe->buf_group = 0;
	io_uring_sqe_set_data64(sqe, tag(U_RECV, i, dir_up(k, d), k->gen));
	d->recving = 1;
	return 0;
}

static int send_post(struct core *c, int i, struct dir *d, enum uring_op op, const char *p, uint32_t n)
{
	struct conn *k = c->conns[i];
	struct io_uring_sqe *sqe = sqe_get(c->u);
	if (!sqe)
		return -EBUSY;
	io_uring_prep_send(sqe, d->dst, p, n, MSG_NOSIGNAL | MSG_WAITALL);
	io_uring_sqe_set_data64(sqe, tag(op, i, dir_up(k, d), k->gen));
	d->sending = op;
	return 0;
}

static int poll_post(struct core *c, int i, int fd, enum uring_op op)
{
	struct conn *k = c->conns[i];
	struct io_uring_sqe *sqe = sqe_get(c->u);
	if (!sqe)
		return -EBUSY;
	io_uring_prep_poll_add(sqe, fd, POLLOUT);
	io_uring_sqe_set_data64(sqe, tag(op, i, 0, k->gen));
	k->polling++;
	return 0;
}

/* the pool is empty: wait for d's source to have bytes, then read them into d's own buffer */
static int recv_own_post(struct core *c, int i, struct dir *d)
{
	struct conn *k = c->conns[i];
	struct io_uring_sqe *sqe = sqe_get(c->u);
	if (!sqe)
		return -EBUSY;
	io_uring_prep_poll_add(sqe, d->src, POLLIN | POLLRDHUP);
	io_uring_sqe_set_data64(sqe, tag(U_RECV_OWN, i, dir_up(k, d), k->gen));
	d->recving = 1;
	return 0;
}

/* everything before src's FIN went out: pass the FIN on; the connection ends once both directions have */
static void dir_done(struct core *c, int i, struct dir *d)
{
	struct conn *k = c->conns[i];
	d->state = DIR_DONE;
	if (k->up.state == DIR_DONE && k->down.state == DIR_DONE)
		return c->hooks->conn_end(c, i, END_FINISHED, 0);
	shutdown(d->dst, SHUT_WR);
}

/* Post what d can do now, each side at most once: a send (its own buffer first, then the oldest
 * buffer read), and a recv while it holds fewer than DIR_QUEUE buffers; the FIN once all went out.
 * Its own buffer is never appended to while a send of it is in flight: no recv then. */
static void dir_pump(struct core *c, int i, struct dir *d)
{
	int r = 0;
	if (!d->sending) {
		if (d->buffered)
			r = send_post(c, i, d, U_SEND_OWN, d->buf + d->off, d->buffered);
		else if (d->qn)
			r = send_post(c, i, d, U_SEND, buf_addr(c->u, d->qbid[d->qhead]) + d->qoff,
				      d->qlen[d->qhead] - d->qoff);
		else if (d->state == DIR_EOF && !d->recving)
			return dir_done(c, i, d);
	}
	if (!r && !d->recving && d->state == DIR_OPEN && d->qn < DIR_QUEUE && d->sending != U_SEND_OWN)
		r = recv_post(c, i, d);
	if (r < 0)
		c->hooks->conn_end(c, i, END_RESET, -r);
}

static void recv_done(struct core *c, int i, struct dir *d, const struct io_uring_cqe *cqe)
{
	struct conn *k = c->conns[i];
	unsigned bid = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
	int r;

	if (cqe->res <= 0 && (cqe->flags & IORING_CQE_F_BUFFER))
		buf_put(c->u, bid);	/* (a buffer picked for a recv that got no byte goes back) */
	if (cqe->res == -ENOBUFS) {	/* every buffer is held: not a reason to wait for one */
		c->st.buffer_waits++;
		if (d->qn)	/* its own queue's sends give one back, then it reads on (bytes in order) */
			return;
		if ((r = recv_own_post(c, i, d)) < 0)
			c->hooks->conn_end(c, i, END_RESET, -r);
		return;
	}
	if (cqe->res < 0)
		return c->hooks->conn_end(c, i, END_RESET, -cqe->res);
	if (cqe->res == 0) {
		d->state = DIR_EOF;
		return dir_pump(c, i, d);
	}
	k->last = c->now;
	if (d->prefix || d->buffered) {	/* (nothing queued then: see dir_pump) */
		r = dir_own_append(d, buf_addr(c->u, bid), cqe->res);
		buf_put(c->u, bid);
		if (r < 0)
			return c->hooks->conn_end(c, i, END_RESET, -r);
		return dir_pump(c, i, d);
	}
	d->qbid[(d->qhead + d->qn) % DIR_QUEUE] = bid;
	d->qlen[(d->qhead + d->qn) % DIR_QUEUE] = cqe->res;
	d->qn++;
	dir_pump(c, i, d);
}

static void send_done(struct core *c, int i, struct dir *d, enum uring_op op, int res)
{
	if (res < 0)
		return c->hooks->conn_end(c, i, END_RESET, -res);
	if (op == U_SEND_OWN) {
		dir_own_sent(d, res);
		return dir_pump(c, i, d);
	}
	d->bytes += res;
	d->qoff += res;
	if (d->qoff == d->qlen[d->qhead]) {	/* (short despite MSG_WAITALL, e.g. a signal: the rest next) */
		buf_put(c->u, d->qbid[d->qhead]);
		d->qhead = (d->qhead + 1) % DIR_QUEUE;
		d->qn--;
		d->qoff = 0;
	}
	dir_pump(c, i, d);
}

/* d's source is readable and the pool was empty: what it has goes into d's own buffer, sent from there */
static void recv_own_done(struct core *c, int i, struct dir *d, int res)
{
	struct conn *k = c->conns[i];
	ssize_t n;
	int r;

	if (res < 0)
		return c->hooks->conn_end(c, i, END_RESET, -res);
	n = recv(d->src, c->copy_buf, c->u->buf_size, MSG_DONTWAIT);	/* (the core's one buffer) */
	if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
		return c->hooks->conn_end(c, i, END_RESET, errno);
	if (n == 0)
		d->state = DIR_EOF;
	if (n > 0) {
		k->last = c->now;
		if ((r = dir_own_append(d, c->copy_buf, (uint32_t)n)) < 0)
			return c->hooks->conn_end(c, i, END_RESET, -r);
	}
	dir_pump(c, i, d);
}

/* -- a connection's steps ------------------------------------------------------------------------------ */
static void uring_connecting(struct core *c, int i)
{
	if (poll_post(c, i, c->conns[i]->sfd, U_CONNECT) < 0)
		c->hooks->conn_end(c, i, END_CONNECT_FAILED, EBUSY);
}

/* the down direction, once the client can be written to (a TFO client's handshake complete) */
static void uring_client_ready(struct core *c, int i)
{
	struct conn *k = c->conns[i];
	if (k->state == CONN_RELAYING)
		dir_pump(c, i, &k->down);
}

static void uring_start(struct core *c, int i)
{
	struct conn *k = c->conns[i];
	dir_pump(c, i, &k->up);
	if (k->state != CONN_RELAYING)
		return;
	if (client_ready(k))
		dir_pump(c, i, &k->down);
	else if (poll_post(c, i, k->cfd, U_CLIENT_OUT) < 0)	/* (the sweep checks once a second too) */
		c->hooks->conn_end(c, i, END_RESET, EBUSY);
}

static void cancel_fd(struct uring *u, int fd)
{
	struct io_uring_sync_cancel_reg reg = {.fd = fd, .flags = IORING_ASYNC_CANCEL_FD | IORING_ASYNC_CANCEL_ALL,
					       .timeout = {.tv_sec = 1}};
	io_uring_register_sync_cancel(&u->ring, &reg);
}

/* what d holds goes back */
static void dir_drop(struct uring *u, struct dir *d)
{
	for (; d->qn; d->qn--, d->qhead = (d->qhead + 1) % DIR_QUEUE)
		buf_put(u, d->qbid[d->qhead]);
	d->recving = d->sending = 0;
}

/* conn_end, before it closes k's sockets (a client kept for Python: the ring never watched it) */
static void uring_end(struct core *c, struct conn *k, int keep_client)
{
	struct uring *u = c->u;
	if ((k->up.recving || k->up.sending || k->down.recving || k->down.sending || k->polling) &&
	    ring_enable(u) == 0) {
		io_uring_submit(&u->ring);	/* what is prepared names these fds: it runs (and is cancelled) first */
		cancel_fd(u, k->cfd);
		cancel_fd(u, k->sfd);
	}
	dir_drop(u, &k->up);		/* (after the cancellations: no send reads them any more) */
	dir_drop(u, &k->down);
	k->polling = 0;
	k->gen = 0;		/* completions still to come are stale */
}

/* -- listeners ------------------------------------------------------------------------------------------------
 * One multishot accept per listener: each client is a completion carrying its fd (no epoll wake-up,
 * no accept() that finds the queue empty); its address costs a getpeername(). */
static int uring_listen(struct core *c, int lfd)
{
	struct io_uring_sqe *sqe = sqe_get(c->u);
	if (!sqe)
		return -EBUSY;
	io_uring_prep_multishot_accept(sqe, lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	io_uring_sqe_set_data64(sqe, tag(U_ACCEPT, lfd, 0, 0));
	return 0;
}

/* the listener leaves (or rests: accept_pause): its accept is cancelled; clients it already
 * accepted are completions still to come, and are served */
static int uring_unlisten(struct core *c, int lfd)
{
	if (ring_enable(c->u) == 0) {
		io_uring_submit(&c->u->ring);
		cancel_fd(c->u, lfd);
	}
	return 0;
}

static int listening(struct core *c, int lfd)
{
	for (int j = 0; j < c->nlisteners; j++)
		if (c->listeners[j] == lfd)
			return 1;
	return 0;
}

static void accepted(struct core *c, int lfd, const struct io_uring_cqe *cqe)
{
	struct sockaddr_storage peer;
	socklen_t len = sizeof(peer);
	if (cqe->res >= 0) {
		if (getpeername(cqe->res, (struct sockaddr *)&peer, &len))
			reset_close(cqe->res);	/* the client went away already */
		else
			c->hooks->accepted(c, cqe->res, &peer);
	} else if (cqe->res != -ECANCELED) {
		c->hooks->accept_failed(c, -cqe->res);
	}
	/* the multishot ended (an error, or the kernel's own reasons): again, unless the listener left
	 * or rests (accept_resume posts it then) */
	if (!(cqe->flags & IORING_CQE_F_MORE) && cqe->res != -ECANCELED && listening(c, lfd) &&
	    !(c->accept_paused_until > 0))
		uring_listen(c, lfd);
}

static void complete(struct core *c, const struct io_uring_cqe *cqe)
{
	struct uring *u = c->u;
	uint64_t t = io_uring_cqe_get_data64(cqe);
	enum uring_op op = t >> 60;
	int i = (int)(t >> 32 & 0x7FFFFFF), up = t >> 59 & 1;
	struct conn *k;
	struct dir *d;

	if (op == U_EPOLL) {
		u->epoll_ready = 1;
		if (!(cqe->flags & IORING_CQE_F_MORE))
			u->epoll_armed = 0;
		return;
	}
	if (op == U_ACCEPT)
		return accepted(c, i, cqe);
	k = i < c->nconns ? c->conns[i] : NULL;
	if (!k || k->gen != (uint32_t)t || !(uint32_t)t || (k->state != CONN_CONNECTING && k->state != CONN_RELAYING)) {
		if (cqe->flags & IORING_CQE_F_BUFFER)	/* a stale recv that got bytes: its buffer goes back */
			buf_put(u, cqe->flags >> IORING_CQE_BUFFER_SHIFT);
		return;
	}
	d = up ? &k->up : &k->down;
	switch (op) {
	case U_RECV:
		d->recving = 0;
		return recv_done(c, i, d, cqe);
	case U_RECV_OWN:
		d->recving = 0;
		return recv_own_done(c, i, d, cqe->res);
	case U_SEND:
	case U_SEND_OWN:
		d->sending = 0;
		return send_done(c, i, d, op, cqe->res);
	case U_CONNECT:
		k->polling--;
		if (cqe->res < 0)
			return c->hooks->conn_end(c, i, END_CONNECT_FAILED, -cqe->res);
		return c->hooks->server_ready(c, i, (uint32_t)cqe->res);
	case U_CLIENT_OUT:
		k->polling--;
		if (client_ready(k))
			uring_client_ready(c, i);
		return;		/* else the sweep looks again */
	case U_EPOLL:		/* (handled above) */
	case U_ACCEPT:
		return;
	}
}

/* -- the loop's wait -------------------------------------------------------------------------------------- */
static void epoll_arm(struct core *c)
{
	struct io_uring_sqe *sqe = sqe_get(c->u);
	if (!sqe)
		return;
	io_uring_prep_poll_multishot(sqe, c->epfd, POLLIN);
	io_uring_sqe_set_data64(sqe, tag(U_EPOLL, 0, 0, 0));
	c->u->epoll_armed = 1;
}

/* Submit, wait up to wait_ms (0: not at all, < 0: no limit) for a completion, handle every completion;
 * then the epoll set's events, if it has any (up to room, into evs). Returns how many epoll events, or
 * -1 with errno (EINTR: a signal). *work: epoll events and completions handled. */
static int uring_wait(struct core *c, struct epoll_event *evs, int room, int wait_ms, int *work)
{
	struct uring *u = c->u;
	struct io_uring_cqe *cqe;
	unsigned head, seen = 0;
	int r, n = 0;

	u->done = 0;
	if ((r = ring_enable(u)) < 0) {
		errno = -r;
		return -1;
	}
	if (!u->epoll_armed)
		epoll_arm(c);
	if (u->epoll_ready || io_uring_cq_ready(&u->ring))
		wait_ms = 0;
	if (wait_ms == 0) {
		r = io_uring_submit_and_get_events(&u->ring);
	} else {
		struct __kernel_timespec ts = {.tv_sec = wait_ms / 1000, .tv_nsec = (wait_ms % 1000) * 1000000L};
		r = io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, wait_ms > 0 ? &ts : NULL, NULL);
	}
	if (r < 0 && r != -ETIME && r != -EBUSY) {
		errno = -r;
		return -1;
	}
	for (;;) {		/* completions may prepare operations that complete at once: to a bound */
		io_uring_for_each_cqe(&u->ring, head, cqe) {
			if (c->maxout - c->nout < 8)
				break;	/* Python's events of this batch are nearly full: the rest next time */
			complete(c, cqe);
			seen++;
		}
		io_uring_cq_advance(&u->ring, seen);
		u->done += seen;
		if (!seen || u->done > 4 * MAX_EVENTS || !io_uring_sq_ready(&u->ring) || c->maxout - c->nout < 8)
			break;
		seen = 0;
		io_uring_submit_and_get_events(&u->ring);
	}
	if (u->epoll_ready) {
		n = epoll_wait(c->epfd, evs, room, 0);
		if (n < 0)
			return -1;
		u->epoll_ready = n > 0;	/* (level-triggered fds left ready raise no new wake-up: look again) */
	}
	*work = n + u->done;
	return n;
}

/* -- the engine's operations (struct engine) ------------------------------------------------------------- */
static int uring_conn_watch(struct core *c, int i)
{
	return 0;		/* (its sockets are watched on the ring, by the operations uring_conn_start posts) */
}

static void uring_conn_start(struct core *c, int i)
{
	if (c->conns[i]->state == CONN_CONNECTING)
		uring_connecting(c, i);
	else
		uring_start(c, i);
}

static void uring_conn_event(struct core *c, int i, int is_client, uint32_t ev)
{
	/* (never called: a connection's sockets are not in the epoll set) */
}

static void uring_server_connected(struct core *c, int i, uint32_t ev)
{
	uring_start(c, i);
}

const struct engine engine_uring = {
	.name = "uring",
	.init = uring_init,
	.free = uring_free,
	.wait = uring_wait,
	.listen = uring_listen,
	.unlisten = uring_unlisten,
	.conn_watch = uring_conn_watch,
	.conn_start = uring_conn_start,
	.conn_event = uring_conn_event,
	.server_connected = uring_server_connected,
	.client_established = uring_client_ready,
	.conn_stop = uring_end,
};
