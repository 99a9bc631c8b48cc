// SPDX-License-Identifier: GPL-2.0
/* What one direction of a connection holds (struct dir), whichever engine moves its bytes: the pooled
 * pipe (splice), its own buffer (convert mode's answer in front of the first bytes, what a short write
 * left), all given back when the connection ends (dir_release). And when a client accepted at its TFO
 * SYN may be written to (client_ready). Nothing here moves a byte of its own accord: the engines
 * (engine_epoll.c, engine_uring.c) call it. */
#include "rooms.h"
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

void dir_init(struct dir *d, int src, int dst)
{
	memset(d, 0, sizeof(*d));
	d->src = src;
	d->dst = dst;
	d->pipe_r = d->pipe_w = -1;
}

/* -- the pipe pool (splice) --------------------------------------------------------------------------- */
void pipe_give(struct core *c, struct dir *d)
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

int pipe_take(struct core *c, struct dir *d)
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
int dir_own_flush(struct dir *d)
{
	ssize_t n = send(d->dst, d->buf + d->off, d->buffered, MSG_NOSIGNAL);
	if (n < 0)
		return errno == EAGAIN ? 0 : -errno;
	dir_own_sent(d, n);
	return !d->buffered;
}

/* write d's prefix with data behind it in one write; what dst does not take stays buffered */
int dir_write_prefixed(struct dir *d, const char *data, uint32_t n)
{
	int r = dir_own_append(d, data, n);
	if (r == 0)
		r = dir_own_flush(d);
	return r < 0 ? r : 0;
}

/* convert mode: the answer alone, when no byte down came to carry it */
int dir_flush_prefix(struct dir *d)
{
	return d->prefix ? dir_write_prefixed(d, "", 0) : 0;
}

/* -- a client accepted at its TFO SYN ------------------------------------------------------------------
 * Linux 6.18: bytes written to an MPTCP socket accepted at its TFO SYN while its first subflow is still
 * in SYN_RECV are never sent, not even once the client's ACK completes the handshake (the MPTCP level
 * has no established subflow to push them on then, and nothing pushes them later: tested, > 6 s).
 * So nothing is written to such a client until the handshake is complete; its socket reports the
 * moment with an EPOLLOUT edge (the engines), and its timer checks once a second as well (conn.c). */
int client_ready(struct conn *k)
{
	if (!k->client_synrecv)
		return 1;
	if (tcp_state(k->cfd) == TCP_SYN_RECV)
		return 0;
	k->client_synrecv = 0;
	return 1;
}
