// SPDX-License-Identifier: GPL-2.0
/* The epoll engine (config engine copy, splice, auto): where bytes move when the loop waits on epoll.
 * Both sockets of a connection sit in the worker's epoll set, edge-triggered; each event moves what
 * is there on one direction (struct dir), from its source socket to its destination:
 *   copy     recv() into the core's one buffer, send() out; a short send keeps the rest (dir.c's own
 *            buffer). recv()/send(), not read()/write(): the same socket calls without the file layer's
 *            position lock and checks (fdget_pos, rw_verify_area, vfs_read/vfs_write: ~1 us per
 *            request, results/profile_converter);
 *   splice   splice() into a pooled pipe and out of it, never through user space;
 *   auto     copy a direction's first splice_after bytes (small exchanges: fewer calls), then splice.
 * A direction whose source sent its FIN passes it on as shutdown(SHUT_WR) once everything before it
 * went out (dir_finish); when both have, the connection ends. An error on either socket ends it with
 * resets. Ends are reported up (c->hooks->conn_end): this room names no room above it.
 * Convert mode writes its answer (prefix) in front of the first bytes down. */
#include "rooms.h"
#include <fcntl.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

/* everything before src's FIN went out: pass the FIN on; the connection ends once both directions have */
static void dir_finish(struct core *c, int i, struct dir *d)
{
	struct conn *k = c->conns[i];
	if (d->state == DIR_DONE)
		return;
	d->state = DIR_DONE;
	if (d->prefix && dir_flush_prefix(d) < 0)
		return c->hooks->conn_end(c, i, END_RESET, EPIPE);
	if (k->up.state == DIR_DONE && k->down.state == DIR_DONE)
		return c->hooks->conn_end(c, i, END_FINISHED, 0);	/* both EOFs read: close() sends this FIN, no RST */
	shutdown(d->dst, SHUT_WR);
}

/* -- moving bytes ----------------------------------------------------------------------------------------- */
/* drain: read until src is empty (else a short read ends the call: with edge-triggered epoll the
 * source's next bytes raise a new edge); rdhup: the source has shut down its sending side, so a short
 * read() — which takes everything queued, up to the buffer — emptied it for good and is its EOF: no
 * read is spent to see the 0 (copy engine only: see xfer_splice) */
static void xfer_copy(struct core *c, int i, struct dir *d, int drain, int rdhup)
{
	struct conn *k = c->conns[i];
	uint32_t size = c->cfg.pipe_size;
	ssize_t n, w;
	int r;

	if (d->buffered) {
		r = dir_own_flush(d);
		if (r < 0)
			return c->hooks->conn_end(c, i, END_RESET, -r);
		if (r == 0)
			return;		/* EPOLLOUT on dst resumes us */
	}
	for (;;) {
		if (d->state == DIR_EOF)
			return dir_finish(c, i, d);
		n = recv(d->src, c->copy_buf, size, 0);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return;	/* EPOLLIN on src resumes us */
			return c->hooks->conn_end(c, i, END_RESET, errno);
		}
		if (n == 0) {
			d->state = DIR_EOF;
			continue;
		}
		k->last = c->now;
		if (d->prefix) {
			r = dir_write_prefixed(d, c->copy_buf, n);
			if (r < 0)
				return c->hooks->conn_end(c, i, END_RESET, -r);
			if (d->buffered)
				return;
		} else {
			w = send(d->dst, c->copy_buf, n, MSG_NOSIGNAL);
			if (w < 0) {
				if (errno != EAGAIN)
					return c->hooks->conn_end(c, i, END_RESET, errno);
				w = 0;
			}
			d->bytes += w;
			if (w < n) {
				if (dir_own_append(d, c->copy_buf + w, n - w) < 0)
					return c->hooks->conn_end(c, i, END_RESET, ENOMEM);
				return;	/* EPOLLOUT on dst resumes us */
			}
		}
		if ((uint32_t)n < size) {
			if (rdhup)
				d->state = DIR_EOF;	/* everything before the FIN is read */
			else if (!drain)
				return;	/* a short read emptied src: its next bytes raise a new edge */
		}
	}
}

static void xfer_splice(struct core *c, int i, struct dir *d, int drain)
{
	struct conn *k = c->conns[i];
	unsigned flags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK;
	int short_read = 0, r;
	ssize_t n;

	if (d->prefix) {
		r = dir_flush_prefix(d);
		if (r < 0)
			return c->hooks->conn_end(c, i, END_RESET, -r);
	}
	if (d->buf) {			/* a short write of the copy engine (or of the prefix) first */
		r = dir_own_flush(d);
		if (r < 0)
			return c->hooks->conn_end(c, i, END_RESET, -r);
		if (r == 0)
			return;
	}
	for (;;) {
		if (d->buffered) {
			n = splice(d->pipe_r, NULL, d->dst, NULL, d->buffered, flags);
			if (n < 0) {
				if (errno == EAGAIN)
					return;	/* dst full: EPOLLOUT on dst resumes us */
				return c->hooks->conn_end(c, i, END_RESET, errno);
			}
			d->buffered -= n;
			d->bytes += n;
			if (d->buffered)
				continue;
			if (short_read && !drain) {
				pipe_give(c, d);
				return;
			}
		}
		if (d->state == DIR_EOF)
			return dir_finish(c, i, d);
		if (d->pipe_r < 0 && pipe_take(c, d))
			return c->hooks->conn_end(c, i, END_RESET, errno);
		n = splice(d->src, NULL, d->pipe_w, NULL, c->cfg.pipe_size, flags);
		if (n < 0) {
			if (errno == EAGAIN) {
				pipe_give(c, d);
				return;	/* src empty: EPOLLIN on src resumes us */
			}
			return c->hooks->conn_end(c, i, END_RESET, errno);
		}
		if (n == 0) {
			d->state = DIR_EOF;
		} else {
			d->buffered = n;
			/* short here does not mean drained: the pipe's slots (one per skb fragment)
			 * may fill before its bytes do, so no EOF is inferred from rdhup (Fig. 5's 1 MB
			 * downloads lost their tails when it was) */
			short_read = n < c->cfg.pipe_size;
			k->last = c->now;
		}
	}
}

/* move what is there on direction d: copy, splice, or (auto) copy first */
static void xfer(struct core *c, int i, struct dir *d, int drain, int rdhup)
{
	switch (c->cfg.engine) {
	case ENGINE_COPY:
		return xfer_copy(c, i, d, drain, rdhup);
	case ENGINE_SPLICE:
		return xfer_splice(c, i, d, drain);
	}
	if (d->pipe_r >= 0 || (d->bytes >= (uint64_t)c->cfg.splice_after && !d->buf))
		return xfer_splice(c, i, d, drain);
	xfer_copy(c, i, d, drain, rdhup);
}

/* move what an epoll event on d's source says is there */
static void xfer_event(struct core *c, int i, struct dir *d, uint32_t ev)
{
	struct conn *k = c->conns[i];
	if (d == &k->down && !client_ready(k)) {
		k->down_ev |= ev;	/* the server's bytes wait in its socket */
		return;
	}
	xfer(c, i, d, !!(ev & DRAINED), !!(ev & EPOLLRDHUP));
}

/* -- the engine's operations (struct engine) ------------------------------------------------------------- */
static int epoll_wait_events(struct core *c, struct epoll_event *evs, int room, int wait_ms, int *work)
{
	int n = epoll_wait(c->epfd, evs, room, wait_ms);
	*work = n > 0 ? n : 0;
	return n;
}

static int epoll_listen(struct core *c, int lfd)
{
	struct epoll_event ev = {.events = EPOLLIN,	/* level-triggered: accept_all takes a batch */
				 .data.u64 = (uint64_t)FD_LISTENER << FD_SHIFT | (uint32_t)lfd};
	if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, lfd, &ev) == 0)
		return 0;
	if (errno == EEXIST && epoll_ctl(c->epfd, EPOLL_CTL_MOD, lfd, &ev) == 0)
		return 0;
	return -errno;
}

static int epoll_unlisten(struct core *c, int lfd)
{
	return epoll_ctl(c->epfd, EPOLL_CTL_DEL, lfd, NULL) == 0 ? 0 : -errno;
}

/* -- when the client's socket is watched for room ----------------------------------------------------------
 * An MPTCP socket raises an EPOLLOUT edge at every DATA_ACK that frees room in it (mptcp_write_space), not only
 * after it was full as TCP does: watched for EPOLLOUT all the time, the client's socket woke the worker once
 * more for every send to a phone (strace, 1,000 keep-alives: 3.7 epoll_wait each, nginx's stream proxy 2.0).
 * So it is watched for EPOLLOUT only while it must be: from accept until its first edge that finds nothing
 * waiting (a TFO client's handshake completes with one), and again whenever bytes down wait for room in it.
 * The server's (TCP) socket keeps EPOLLOUT: it tells a connect's end, and TCP raises no edge otherwise. */
static void client_out_watch(struct core *c, int i, int on)
{
	struct conn *k = c->conns[i];
	struct epoll_event ev = {.events = on ? WATCH_CONN : WATCH_CONN & ~EPOLLOUT,
				 .data.u64 = (uint64_t)FD_CONN << FD_SHIFT | (uint64_t)i << 1 | 1};
	if (k->client_out == on || k->state == CONN_ENDED || k->cfd < 0)
		return;
	/* (EPOLL_CTL_MOD looks at the socket again: room that came meanwhile raises its edge now) */
	if (epoll_ctl(c->epfd, EPOLL_CTL_MOD, k->cfd, &ev) == 0)
		k->client_out = (uint8_t)on;
}

/* after bytes went down: watch the client for room while some wait for it */
static void client_out_follow(struct core *c, int i)
{
	struct conn *k = c->conns[i];
	if (!k->client_out && (k->down.buffered || k->down.prefix))
		client_out_watch(c, i, 1);
}

/* both sockets of connection i into the epoll set (data: slot << 1 | is_client) */
static int epoll_conn_watch(struct core *c, int i)
{
	struct conn *k = c->conns[i];
	struct epoll_event ev = {.events = WATCH_CONN, .data.u64 = (uint64_t)FD_CONN << FD_SHIFT | (uint64_t)i << 1 | 1};
	int err;
	if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, k->cfd, &ev))
		return -errno;
	k->client_out = 1;
	ev.data.u64 = (uint64_t)FD_CONN << FD_SHIFT | (uint64_t)i << 1;
	if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, k->sfd, &ev) &&
	    (errno != EEXIST || epoll_ctl(c->epfd, EPOLL_CTL_MOD, k->sfd, &ev))) {	/* a socket Python watched */
		err = -errno;
		epoll_ctl(c->epfd, EPOLL_CTL_DEL, k->cfd, NULL);
		return err;
	}
	return 0;
}

/* what is there already: EPOLL_CTL_ADD reported it as an event (edge-triggered too) */
static void epoll_conn_start(struct core *c, int i)
{
}

/* the client's handshake is complete: what the server sent meanwhile goes now */
static void epoll_client_established(struct core *c, int i)
{
	struct conn *k = c->conns[i];
	uint32_t ev = k->down_ev | EPOLLIN;
	k->down_ev = 0;
	xfer_event(c, i, &k->down, ev);
	client_out_follow(c, i);
}

/* an epoll event on a relayed connection's socket */
static void epoll_conn_event(struct core *c, int i, int is_client, uint32_t ev)
{
	struct conn *k = c->conns[i];
	struct dir *in = is_client ? &k->up : &k->down, *out = is_client ? &k->down : &k->up;
	if (is_client && k->client_synrecv && (ev & EPOLLOUT) && client_ready(k))
		epoll_client_established(c, i);
	if ((ev & ~EPOLLOUT) && k->state != CONN_ENDED)
		xfer_event(c, i, in, ev);
	if ((ev & EPOLLOUT) && out->buffered && k->state != CONN_ENDED)
		xfer(c, i, out, 1, 0);	/* its destination has room again */
	if (is_client && (ev & EPOLLOUT) && !k->client_synrecv && !k->down.buffered && !k->down.prefix)
		client_out_watch(c, i, 0);	/* room nothing waits for: no more edges until some does */
	else
		client_out_follow(c, i);
}

/* the server answered (ev: its socket's event): what the client sent meanwhile goes, its events were kept */
static void epoll_server_connected(struct core *c, int i, uint32_t ev)
{
	struct conn *k = c->conns[i];
	if (k->client_ev & ~EPOLLOUT)
		xfer_event(c, i, &k->up, k->client_ev);
	k->client_ev = 0;
	if ((ev & ~EPOLLOUT) && k->state != CONN_ENDED)
		xfer_event(c, i, &k->down, ev);
	client_out_follow(c, i);
}

/* conn_end: the sockets leave the epoll set as they close; a client kept for Python leaves it now */
static void epoll_conn_stop(struct core *c, struct conn *k, int keep_client)
{
	if (keep_client)
		epoll_ctl(c->epfd, EPOLL_CTL_DEL, k->cfd, NULL);
}

static int epoll_init(struct core *c)
{
	return 0;
}

static void epoll_free(struct core *c)
{
}

const struct engine engine_epoll = {
	.name = "epoll",
	.init = epoll_init,
	.free = epoll_free,
	.wait = epoll_wait_events,
	.listen = epoll_listen,
	.unlisten = epoll_unlisten,
	.conn_watch = epoll_conn_watch,
	.conn_start = epoll_conn_start,
	.conn_event = epoll_conn_event,
	.server_connected = epoll_server_connected,
	.client_established = epoll_client_established,
	.conn_stop = epoll_conn_stop,
};
