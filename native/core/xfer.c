// SPDX-License-Identifier: GPL-2.0
/* Where bytes move: one direction of a connection at a time (struct dir), from its source socket to
 * its destination, by the engine the configuration names (config engine):
 *   copy     recv() into the core's one buffer, send() out; a short send keeps the rest (buf). recv()/send(),
 *            not read()/write(): the same socket calls without the file layer's position lock and checks
 *            (fdget_pos, rw_verify_area, vfs_read/vfs_write: ~1 us per request, results/profile_converter);
 *   splice   splice() into a pooled pipe and out of it, never through user space;
 *   auto     copy a direction's first splice_after bytes (small exchanges: fewer calls), then splice.
 * A direction whose source sent its FIN passes it on as shutdown(SHUT_WR) once everything before it
 * went out (dir_finish); when both have, the connection ends (conn.c). An error on either socket
 * ends it with resets. Convert mode writes its answer (prefix) in front of the first bytes down. */
#include "rooms.h"
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

/* -- the pipe pool (splice) --------------------------------------------------------------------------- */
static void pipe_give(struct core *c, struct dir *d)
{
	if (c->npool < PIPE_POOL) {
		c->pool[c->npool][0] = d->pipe_r;
		c->pool[c->npool][1] = d->pipe_w;
		c->npool++;
	} else {
		close(d->pipe_r);
		close(d->pipe_w);
	}
	d->pipe_r = d->pipe_w = -1;
}

static int pipe_take(struct core *c, struct dir *d)
{
	int p[2];
	if (c->npool) {
		c->npool--;
		d->pipe_r = c->pool[c->npool][0];
		d->pipe_w = c->pool[c->npool][1];
		return 0;
	}
	if (pipe2(p, O_NONBLOCK | O_CLOEXEC))
		return -1;
	fcntl(p[1], F_SETPIPE_SZ, c->cfg.pipe_size);	/* above pipe-max-size: the default stays */
	d->pipe_r = p[0];
	d->pipe_w = p[1];
	return 0;
}

/* what a direction holds, given back when its connection ends */
void dir_release(struct core *c, struct dir *d)
{
	if (d->pipe_r >= 0) {
		if (d->buffered) {	/* bytes still in it (reset): not reusable */
			close(d->pipe_r);
			close(d->pipe_w);
			d->pipe_r = d->pipe_w = -1;
		} else {
			pipe_give(c, d);
		}
	}
	free(d->buf);
	d->buf = NULL;
	free(d->prefix);
	d->prefix = NULL;
}

/* -- a direction's own buffer: convert mode's answer, what a short write left ---------------------------- */
/* n bytes go behind d's prefix and what it still holds: all copied into its own buffer (buf), from
 * which they are sent; the prefix's bytes are not counted as relayed (prefix_in_buf) */
int dir_own_append(struct dir *d, const char *p, uint32_t n)
{
	uint32_t plen = d->prefix_len, have = plen + d->buffered;
	char *b = malloc(have + n ? have + n : 1);
	if (!b)
		return -ENOMEM;
	memcpy(b, d->prefix, plen);
	if (d->buffered)
		memcpy(b + plen, d->buf + d->off, d->buffered);
	memcpy(b + have, p, n);
	d->prefix_in_buf += plen;
	free(d->buf);
	free(d->prefix);
	d->prefix = NULL;
	d->prefix_len = 0;
	d->buf = b;
	d->off = 0;
	d->buffered = have + n;
	return 0;
}

/* n bytes of d's own buffer went out: counted (not the prefix's), the buffer freed once empty */
void dir_own_sent(struct dir *d, uint32_t n)
{
	d->off += n;
	d->buffered -= n;
	if (n > d->prefix_in_buf) {
		d->bytes += n - d->prefix_in_buf;
		d->prefix_in_buf = 0;
	} else {
		d->prefix_in_buf -= n;
	}
	if (!d->buffered) {
		free(d->buf);
		d->buf = NULL;
		d->off = 0;
	}
}

/* write what d's own buffer holds; 1: all out, 0: still blocked, -errno */
static int flush_buffered(struct dir *d)
{
	ssize_t n = send(d->dst, d->buf + d->off, d->buffered, MSG_NOSIGNAL);
	if (n < 0)
		return errno == EAGAIN ? 0 : -errno;
	dir_own_sent(d, n);
	return !d->buffered;
}

/* write d's prefix with data behind it in one write; what dst does not take stays buffered */
static int write_prefixed(struct dir *d, const char *data, uint32_t n)
{
	int r = dir_own_append(d, data, n);
	if (r == 0)
		r = flush_buffered(d);
	return r < 0 ? r : 0;
}

/* convert mode: the answer alone, when no byte down came to carry it */
int xfer_flush_prefix(struct dir *d)
{
	return d->prefix ? write_prefixed(d, "", 0) : 0;
}

/* everything before src's FIN went out: pass the FIN on; the connection ends once both directions have */
static void dir_finish(struct core *c, int i, struct dir *d)
{
	struct conn *k = c->conns[i];
	if (d->state == DIR_DONE)
		return;
	d->state = DIR_DONE;
	if (d->prefix && xfer_flush_prefix(d) < 0)
		return conn_end(c, i, END_RESET, EPIPE);
	if (k->up.state == DIR_DONE && k->down.state == DIR_DONE)
		return conn_end(c, i, END_FINISHED, 0);	/* both EOFs read: close() sends this FIN, no RST */
	shutdown(d->dst, SHUT_WR);
}

/* -- the engines ----------------------------------------------------------------------------------------- */
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
		r = flush_buffered(d);
		if (r < 0)
			return conn_end(c, i, END_RESET, -r);
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
			return conn_end(c, i, END_RESET, errno);
		}
		if (n == 0) {
			d->state = DIR_EOF;
			continue;
		}
		k->last = c->now;
		if (d->prefix) {
			r = write_prefixed(d, c->copy_buf, n);
			if (r < 0)
				return conn_end(c, i, END_RESET, -r);
			if (d->buffered)
				return;
		} else {
			w = send(d->dst, c->copy_buf, n, MSG_NOSIGNAL);
			if (w < 0) {
				if (errno != EAGAIN)
					return conn_end(c, i, END_RESET, errno);
				w = 0;
			}
			d->bytes += w;
			if (w < n) {
				if (dir_own_append(d, c->copy_buf + w, n - w) < 0)
					return conn_end(c, i, END_RESET, ENOMEM);
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
		r = xfer_flush_prefix(d);
		if (r < 0)
			return conn_end(c, i, END_RESET, -r);
	}
	if (d->buf) {			/* a short write of the copy engine (or of the prefix) first */
		r = flush_buffered(d);
		if (r < 0)
			return conn_end(c, i, END_RESET, -r);
		if (r == 0)
			return;
	}
	for (;;) {
		if (d->buffered) {
			n = splice(d->pipe_r, NULL, d->dst, NULL, d->buffered, flags);
			if (n < 0) {
				if (errno == EAGAIN)
					return;	/* dst full: EPOLLOUT on dst resumes us */
				return conn_end(c, i, END_RESET, errno);
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
			return conn_end(c, i, END_RESET, errno);
		n = splice(d->src, NULL, d->pipe_w, NULL, c->cfg.pipe_size, flags);
		if (n < 0) {
			if (errno == EAGAIN) {
				pipe_give(c, d);
				return;	/* src empty: EPOLLIN on src resumes us */
			}
			return conn_end(c, i, END_RESET, errno);
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

/* move what is there on direction d, by the configured engine */
void xfer(struct core *c, int i, struct dir *d, int drain, int rdhup)
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

/* -- a client accepted at its TFO SYN ------------------------------------------------------------------
 * Linux 6.18: bytes written to an MPTCP socket accepted at its TFO SYN while its first subflow is still
 * in SYN_RECV are never sent, not even once the client's ACK completes the handshake (the MPTCP level
 * has no established subflow to push them on then, and nothing pushes them later: tested, > 6 s).
 * So nothing is written to such a client until the handshake is complete; its socket reports the
 * moment with an EPOLLOUT edge (conn.c conn_ready), and the sweep checks once a second as well. */
int client_ready(struct conn *k)
{
	if (!k->client_synrecv)
		return 1;
	if (tcp_state(k->cfd) == TCP_SYN_RECV)
		return 0;
	k->client_synrecv = 0;
	return 1;
}

/* move what an epoll event on d's source says is there */
void xfer_event(struct core *c, int i, struct dir *d, uint32_t ev)
{
	struct conn *k = c->conns[i];
	if (d == &k->down && !client_ready(k)) {
		k->down_ev |= ev;	/* the server's bytes wait in its socket */
		return;
	}
	xfer(c, i, d, !!(ev & DRAINED), !!(ev & EPOLLRDHUP));
}

/* the client's handshake is complete: what the server sent meanwhile goes now */
void client_established(struct core *c, int i)
{
	struct conn *k = c->conns[i];
	uint32_t ev = k->down_ev | EPOLLIN;
	if (c->u)
		return uring_client_ready(c, i);
	k->down_ev = 0;
	xfer_event(c, i, &k->down, ev);
}
