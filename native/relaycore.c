// SPDX-License-Identifier: GPL-2.0
/* MiMBox's per-connection path in C: accept, connect, relay, close — without the interpreter.
 *
 * The relay (mimbox/relay.py) decides; this core does what every connection does. One core per
 * worker owns the worker's epoll set. core_run() waits on it and, for each event:
 *   - a listener: accept4() every waiting client; where the destination, the policy verdict and
 *     the admission are known here (static, transparent, explicit with the BPF recorder's map; a
 *     remembered "allowed"), open the server connection at once; anything else goes to Python as
 *     an event (held SYNs, hand-over, convert mode, policy not yet decided, a refusal to log);
 *   - a connection: finish its server connect, move bytes (copy through one buffer, splice once a
 *     direction passed splice_after), pass EOFs on as shutdown(SHUT_WR), resets as resets;
 *   - a Python fd (NFQUEUE, stats socket, links, greetings, held SYNs' server sockets): returned.
 * Layouts shared with Python are declared in mimbox/core.py (ctypes) and checked by core_abi().
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <linux/bpf.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/types.h>
#include "dstopt.h"		/* generated from mimbox/dstopt.py: the recorder's map layout */

#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif
#define TCP_IS_MPTCP 43

enum { ENGINE_COPY, ENGINE_SPLICE, ENGINE_AUTO };
enum { DST_PYTHON, DST_STATIC, DST_TRANSPARENT, DST_RECORDER };
enum { EV_FD = 1, EV_ACCEPTED, EV_OPEN, EV_REFUSED, EV_GIVEBACK, EV_ABORTED };
enum { KIND_PY = 0, KIND_LISTEN = 1, KIND_CONN = 2 };
#define KIND_SHIFT 62
#define ERRNO_SLOTS 160
#define WATCH (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)
#define DRAIN (EPOLLRDHUP | EPOLLERR | EPOLLHUP)
#define MAX_EVENTS 256
#define POOL_MAX 1024
#define MEMO_SLOTS 4096		/* policy verdicts "allowed", and servers without MPTCP */

struct core_config {
	int32_t engine, pipe_size, splice_after, dst_source;
	uint32_t static_addr;		/* network order */
	uint16_t static_port, _pad;	/* network order */
	int32_t recorder_fd;		/* the BPF recorder's map, -1: none */
	int32_t server_mptcp, server_rcvbuf, server_sndbuf, fd_capacity;
	int32_t worker, workers, syns_queued, _pad2;
	double server_mptcp_retry, connect_timeout, idle_timeout, prefix_wait;
	int64_t *admission;		/* shared connection count */
	int64_t admission_limit;
	uint64_t *held_slots;		/* the workers' shared set of held SYNs (NULL: none) */
	uint64_t held_mask;
};

struct core_event {
	int32_t kind, fd;
	uint32_t events;
	int32_t err;
	uint32_t caddr, daddr;		/* network order */
	uint16_t cport, dport;		/* network order */
	int32_t sfd;
};

struct core_stats {
	uint64_t accepted, client_mptcp, client_tcp, server_mptcp, server_tcp, closed;
	uint64_t bytes_up, bytes_down, server_connects, server_tcp_remembered;
	double server_connect_us_sum, server_connect_us_max;
	uint64_t active, pipes_pooled, idle_timeouts, connect_timeouts, refused_after_accept;
	uint64_t errors[ERRNO_SLOTS];	/* resets by errno */
	uint64_t accept_errors[ERRNO_SLOTS];
};

struct core_conn_info {
	int32_t cfd, sfd;
	uint32_t caddr, daddr;
	uint16_t cport, dport;
	uint8_t client_mptcp, server_mptcp, connecting, _pad;
	uint64_t bytes_up, bytes_down;
	double t_accept;
};

struct dir {
	int src, dst, pipe_r, pipe_w;
	char *buf;			/* what a short write left (malloc'd), from off */
	uint32_t off, buffered;
	uint8_t eof, done;
	uint64_t bytes;
	char *prefix;			/* convert mode: the answer, written in front of the first bytes */
	uint32_t prefix_len, prefix_in_buf;
};

struct conn {
	uint8_t used, closed, connecting, tried_mptcp, client_mptcp, server_mptcp;
	int cfd, sfd;
	struct dir up, down;
	uint32_t caddr, daddr;
	uint16_t cport, dport;
	double t_syn, t_accept, last;
	char *early;			/* convert mode: client bytes after its message, for the server */
	uint32_t early_len;
	int next_free;
};

struct memo { uint64_t key; double until; };

struct core {
	struct core_config cfg;
	struct core_stats st;
	int epfd;
	struct conn **conns;
	int nconns, cap, free_head, active;
	int *dead;			/* closed during this batch: freed when it ends */
	int ndead, dead_cap;
	char *copy_buf;
	int pool[POOL_MAX][2];
	int npool;
	double now;
	struct core_event *out;
	int nout, maxout;
	struct memo allowed[MEMO_SLOTS];	/* policy: (client, destination) known to be allowed */
	struct memo tcp_only[MEMO_SLOTS];	/* servers that answered without MPTCP, until */
	uint64_t claimed[1 << 16];		/* clients whose connection Python serves (held SYNs) */
};

static double monotonic(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t hash64(uint64_t k)
{
	return (k * 0x9E3779B97F4A7C15ull) >> 32;
}

static uint64_t client_key(uint32_t addr, uint16_t port)	/* as mimbox.synpath.HeldSet.key */
{
	return ((uint64_t)ntohl(addr) << 16 | ntohs(port)) + 1;
}

static struct core_event *emit(struct core *c, int kind)
{
	struct core_event *e;
	if (c->nout >= c->maxout)
		return NULL;
	e = &c->out[c->nout++];
	memset(e, 0, sizeof(*e));
	e->kind = kind;
	e->fd = e->sfd = -1;
	return e;
}

static void count_errno(struct core *c, int err)
{
	c->st.errors[err > 0 && err < ERRNO_SLOTS ? err : 0]++;
}

/* -- admission: one counter shared by the workers ------------------------------------------------- */
int core_admit(int64_t *counter, int64_t limit)
{
	int64_t v = __atomic_load_n(counter, __ATOMIC_RELAXED);
	do {
		if (v >= limit)
			return 0;
	} while (!__atomic_compare_exchange_n(counter, &v, v + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED));
	return 1;
}

void core_unadmit(int64_t *counter)
{
	__atomic_sub_fetch(counter, 1, __ATOMIC_ACQ_REL);
}

/* -- memories ------------------------------------------------------------------------------------------ */
static struct memo *memo_slot(struct memo *m, uint64_t key)
{
	return &m[hash64(key) & (MEMO_SLOTS - 1)];
}

static uint64_t policy_key(uint32_t caddr, uint32_t daddr, uint16_t dport)
{
	return ((uint64_t)caddr << 32 | daddr) ^ ((uint64_t)dport << 17) ^ 1;
}

void core_allow(struct core *c, uint32_t caddr, uint32_t daddr, uint16_t dport)
{
	struct memo *m = memo_slot(c->allowed, policy_key(caddr, daddr, dport));
	m->key = policy_key(caddr, daddr, dport);
}

static int allowed(struct core *c, uint32_t caddr, uint32_t daddr, uint16_t dport)
{
	return memo_slot(c->allowed, policy_key(caddr, daddr, dport))->key == policy_key(caddr, daddr, dport);
}

static uint64_t server_key(uint32_t daddr, uint16_t dport)
{
	return ((uint64_t)daddr << 16 | dport) + 1;
}

int core_tcp_only(struct core *c, uint32_t daddr, uint16_t dport)
{
	struct memo *m = memo_slot(c->tcp_only, server_key(daddr, dport));
	if (m->key != server_key(daddr, dport))
		return 0;
	if (monotonic() < m->until)
		return 1;
	m->key = 0;
	return 0;
}

void core_learn(struct core *c, uint32_t daddr, uint16_t dport, int mptcp_works)
{
	struct memo *m = memo_slot(c->tcp_only, server_key(daddr, dport));
	if (mptcp_works || c->cfg.server_mptcp_retry <= 0) {
		if (m->key == server_key(daddr, dport))
			m->key = 0;
		return;
	}
	m->key = server_key(daddr, dport);
	m->until = monotonic() + c->cfg.server_mptcp_retry;
}

void core_claim(struct core *c, uint32_t addr, uint16_t port, int on)
{
	uint64_t k = client_key(addr, port), *s = &c->claimed[hash64(k) & 0xFFFF];
	if (on)
		*s = k;
	else if (*s == k)
		*s = 0;
}

/* -- set-up --------------------------------------------------------------------------------------------- */
struct core *core_new(const struct core_config *cfg)
{
	struct core *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	c->cfg = *cfg;
	c->free_head = -1;
	c->epfd = epoll_create1(EPOLL_CLOEXEC);
	c->copy_buf = malloc(cfg->pipe_size);
	if (c->epfd < 0 || !c->copy_buf) {
		if (c->epfd >= 0)
			close(c->epfd);
		free(c->copy_buf);
		free(c);
		return NULL;
	}
	return c;
}

int core_watch(struct core *c, int fd, uint32_t events, int listener)
{
	struct epoll_event ev = {.events = events, .data.u64 = (uint64_t)(listener ? KIND_LISTEN : KIND_PY) << KIND_SHIFT | (uint32_t)fd};
	if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, fd, &ev) == 0)
		return 0;
	if (errno == EEXIST && epoll_ctl(c->epfd, EPOLL_CTL_MOD, fd, &ev) == 0)
		return 0;
	return -errno;
}

int core_unwatch(struct core *c, int fd)
{
	return epoll_ctl(c->epfd, EPOLL_CTL_DEL, fd, NULL) == 0 ? 0 : -errno;
}

int core_abi(int which)
{
	switch (which) {
	case 0: return sizeof(struct core_config);
	case 1: return sizeof(struct core_event);
	case 2: return sizeof(struct core_stats);
	case 3: return sizeof(struct core_conn_info);
	}
	return -1;
}

const struct core_stats *core_stats(struct core *c)
{
	c->st.active = c->active;
	c->st.pipes_pooled = c->npool;
	return &c->st;
}

/* -- connections ---------------------------------------------------------------------------------------- */
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

static void dir_init(struct dir *d, int src, int dst)
{
	memset(d, 0, sizeof(*d));
	d->src = src;
	d->dst = dst;
	d->pipe_r = d->pipe_w = -1;
}

static void reset_close(int fd)
{
	struct linger l = {1, 0};
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
	close(fd);
}

static void pipe_give(struct core *c, struct dir *d)
{
	if (c->npool < POOL_MAX) {
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

static void dir_release(struct core *c, struct dir *d)
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

/* close both sockets (reset: abortive), count, free the slot when this batch ends;
 * keep_client: convert mode hands the client back to Python for its Error TLV */
static void conn_close(struct core *c, int i, int reset, int keep_client)
{
	struct conn *k = c->conns[i];
	if (k->closed)
		return;
	k->closed = 1;
	c->active--;
	if (c->cfg.admission)
		core_unadmit(c->cfg.admission);
	c->st.closed++;
	c->st.bytes_up += k->up.bytes;
	c->st.bytes_down += k->down.bytes;
	if (keep_client)
		epoll_ctl(c->epfd, EPOLL_CTL_DEL, k->cfd, NULL);
	else if (reset)
		reset_close(k->cfd);
	else
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
		if (!n) {		/* the slot leaks rather than being reused too early */
			return;
		}
		c->dead = n;
		c->dead_cap = cap;
	}
	c->dead[c->ndead++] = i;
}

static void conn_event(struct core *c, struct conn *k, int kind, int err)
{
	struct core_event *e = emit(c, kind);
	if (!e)
		return;
	e->err = err;
	e->caddr = k->caddr;
	e->cport = k->cport;
	e->daddr = k->daddr;
	e->dport = k->dport;
}

static void conn_abort(struct core *c, int i, int err)
{
	struct conn *k = c->conns[i];
	if (k->closed)
		return;
	count_errno(c, err);
	conn_event(c, k, EV_ABORTED, err);
	conn_close(c, i, 1, 0);
}

/* write d's prefix with data behind it in one write; what dst does not take stays buffered */
static int write_prefixed(struct dir *d, const char *data, uint32_t n)
{
	uint32_t plen = d->prefix_len, total = plen + n;
	char *out = malloc(total);
	ssize_t w;
	if (!out)
		return -ENOMEM;
	memcpy(out, d->prefix, plen);
	memcpy(out + plen, data, n);
	free(d->prefix);
	d->prefix = NULL;
	d->prefix_len = 0;
	w = write(d->dst, out, total);
	if (w < 0) {
		if (errno != EAGAIN) {
			int err = errno;
			free(out);
			return -err;
		}
		w = 0;
	}
	d->bytes += (uint32_t)w > plen ? w - plen : 0;
	if ((uint32_t)w < total) {
		d->prefix_in_buf = (uint32_t)w < plen ? plen - w : 0;
		d->buf = out;
		d->off = w;
		d->buffered = total - w;
	} else {
		free(out);
	}
	return 0;
}

static void finish(struct core *c, int i, struct dir *d);

/* write what a short write left; 1: all out, 0: still blocked, -errno */
static int flush_buffered(struct dir *d)
{
	ssize_t n = write(d->dst, d->buf + d->off, d->buffered);
	if (n < 0)
		return errno == EAGAIN ? 0 : -errno;
	d->off += n;
	d->buffered -= n;
	if ((uint32_t)n > d->prefix_in_buf) {
		d->bytes += n - d->prefix_in_buf;
		d->prefix_in_buf = 0;
	} else {
		d->prefix_in_buf -= n;
	}
	if (d->buffered)
		return 0;
	free(d->buf);
	d->buf = NULL;
	return 1;
}

static void pump_copy(struct core *c, int i, struct dir *d, int drain)
{
	struct conn *k = c->conns[i];
	uint32_t size = c->cfg.pipe_size;
	ssize_t n, w;
	int r;

	if (d->buffered) {
		r = flush_buffered(d);
		if (r < 0)
			return conn_abort(c, i, -r);
		if (r == 0)
			return;		/* EPOLLOUT on dst resumes us */
	}
	for (;;) {
		if (d->eof)
			return finish(c, i, d);
		n = read(d->src, c->copy_buf, size);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return;	/* EPOLLIN on src resumes us */
			return conn_abort(c, i, errno);
		}
		if (n == 0) {
			d->eof = 1;
			continue;
		}
		k->last = c->now;
		if (d->prefix) {
			r = write_prefixed(d, c->copy_buf, n);
			if (r < 0)
				return conn_abort(c, i, -r);
			if (d->buffered)
				return;
		} else {
			w = write(d->dst, c->copy_buf, n);
			if (w < 0) {
				if (errno != EAGAIN)
					return conn_abort(c, i, errno);
				w = 0;
			}
			d->bytes += w;
			if (w < n) {
				d->buf = malloc(n - w);
				if (!d->buf)
					return conn_abort(c, i, ENOMEM);
				memcpy(d->buf, c->copy_buf + w, n - w);
				d->off = 0;
				d->buffered = n - w;
				return;	/* EPOLLOUT on dst resumes us */
			}
		}
		if ((uint32_t)n < size && !drain)
			return;		/* a short read emptied src: its next bytes raise a new edge */
	}
}

static int flush_prefix(struct dir *d)
{
	return d->prefix ? write_prefixed(d, "", 0) : 0;
}

static void pump_splice(struct core *c, int i, struct dir *d, int drain)
{
	struct conn *k = c->conns[i];
	unsigned flags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK;
	int short_read = 0, r;
	ssize_t n;

	if (d->prefix) {
		r = flush_prefix(d);
		if (r < 0)
			return conn_abort(c, i, -r);
	}
	if (d->buf) {			/* a short write of the copy engine (or of the prefix) first */
		r = flush_buffered(d);
		if (r < 0)
			return conn_abort(c, i, -r);
		if (r == 0)
			return;
	}
	for (;;) {
		if (d->buffered) {
			n = splice(d->pipe_r, NULL, d->dst, NULL, d->buffered, flags);
			if (n < 0) {
				if (errno == EAGAIN)
					return;	/* dst full: EPOLLOUT on dst resumes us */
				return conn_abort(c, i, errno);
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
		if (d->eof)
			return finish(c, i, d);
		if (d->pipe_r < 0 && pipe_take(c, d))
			return conn_abort(c, i, errno);
		n = splice(d->src, NULL, d->pipe_w, NULL, c->cfg.pipe_size, flags);
		if (n < 0) {
			if (errno == EAGAIN) {
				pipe_give(c, d);
				return;	/* src empty: EPOLLIN on src resumes us */
			}
			return conn_abort(c, i, errno);
		}
		if (n == 0) {
			d->eof = 1;
		} else {
			d->buffered = n;
			short_read = n < c->cfg.pipe_size;
			k->last = c->now;
		}
	}
}

static void pump(struct core *c, int i, struct dir *d, int drain)
{
	switch (c->cfg.engine) {
	case ENGINE_COPY:
		return pump_copy(c, i, d, drain);
	case ENGINE_SPLICE:
		return pump_splice(c, i, d, drain);
	}
	if (d->pipe_r >= 0 || (d->bytes >= (uint64_t)c->cfg.splice_after && !d->buf))
		return pump_splice(c, i, d, drain);
	pump_copy(c, i, d, drain);
}

static void finish(struct core *c, int i, struct dir *d)
{
	struct conn *k = c->conns[i];
	if (d->done)
		return;
	d->done = 1;
	if (d->prefix && flush_prefix(d) < 0)
		return conn_abort(c, i, EPIPE);
	if (k->up.done && k->down.done)
		return conn_close(c, i, 0, 0);	/* both EOFs read: close() sends this FIN, no RST */
	shutdown(d->dst, SHUT_WR);
}

static int sock_is_mptcp(int fd)
{
	int v = 0;
	socklen_t len = sizeof(v);
	return getsockopt(fd, IPPROTO_TCP, TCP_IS_MPTCP, &v, &len) == 0 && v == 1;
}

/* Take over a client and its server socket (connecting: the server has not answered yet). */
int core_add(struct core *c, int cfd, int sfd, int connecting, int tried_mptcp, int server_mptcp,
	     uint32_t caddr, uint16_t cport, uint32_t daddr, uint16_t dport, double t_syn,
	     const char *prefix, uint32_t prefix_len, const char *early, uint32_t early_len)
{
	struct epoll_event ev = {.events = WATCH};
	struct conn *k;
	int i = conn_slot(c);

	if (i < 0)
		return -ENOMEM;
	k = c->conns[i];
	memset(k, 0, sizeof(*k));
	k->used = 1;
	k->cfd = cfd;
	k->sfd = sfd;
	dir_init(&k->up, cfd, sfd);
	dir_init(&k->down, sfd, cfd);
	k->caddr = caddr;
	k->cport = cport;
	k->daddr = daddr;
	k->dport = dport;
	k->t_syn = t_syn;
	k->t_accept = k->last = c->now ? c->now : monotonic();
	k->connecting = connecting;
	k->tried_mptcp = tried_mptcp;
	k->server_mptcp = server_mptcp;
	if (prefix_len) {
		k->down.prefix = malloc(prefix_len);
		memcpy(k->down.prefix, prefix, prefix_len);
		k->down.prefix_len = prefix_len;
	}
	if (early_len) {
		k->early = malloc(early_len);
		memcpy(k->early, early, early_len);
		k->early_len = early_len;
	}
	c->active++;
	c->st.accepted++;
	k->client_mptcp = sock_is_mptcp(cfd);
	if (k->client_mptcp)
		c->st.client_mptcp++;
	else
		c->st.client_tcp++;
	ev.data.u64 = (uint64_t)KIND_CONN << KIND_SHIFT | (uint64_t)i << 1 | 1;
	epoll_ctl(c->epfd, EPOLL_CTL_ADD, cfd, &ev);
	ev.data.u64 = (uint64_t)KIND_CONN << KIND_SHIFT | (uint64_t)i << 1;
	if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, sfd, &ev) && errno == EEXIST)
		epoll_ctl(c->epfd, EPOLL_CTL_MOD, sfd, &ev);	/* a held SYN's socket Python watched */
	if (!connecting) {
		if (server_mptcp)
			c->st.server_mptcp++;
		else
			c->st.server_tcp++;
		/* registered late (edge-triggered): move what is there already */
		pump(c, i, &k->down, 1);
		if (!k->closed)
			pump(c, i, &k->up, 1);
	}
	return i;
}

static void server_counted(struct core *c, struct conn *k)
{
	double us = (c->now - k->t_syn) * 1e6;
	c->st.server_connects++;
	c->st.server_connect_us_sum += us;
	if (us > c->st.server_connect_us_max)
		c->st.server_connect_us_max = us;
	if (k->tried_mptcp) {
		k->server_mptcp = sock_is_mptcp(k->sfd);
		core_learn(c, k->daddr, k->dport, k->server_mptcp);
	}
	if (k->server_mptcp)
		c->st.server_mptcp++;
	else
		c->st.server_tcp++;
}

/* the server connection of an accepted client failed: RST to the client (convert mode: Python
 * answers with the Error TLV, the client socket goes back to it) */
static void connect_failed(struct core *c, int i, int err, int timeout)
{
	struct conn *k = c->conns[i];
	struct core_event *e;
	c->st.refused_after_accept++;
	if (timeout)
		c->st.connect_timeouts++;
	if (k->down.prefix) {
		e = emit(c, EV_GIVEBACK);
		if (e) {
			e->fd = k->cfd;
			e->err = err;
			e->caddr = k->caddr;
			e->cport = k->cport;
			e->daddr = k->daddr;
			e->dport = k->dport;
			conn_close(c, i, 0, 1);
			return;
		}
	}
	conn_event(c, k, EV_REFUSED, err);
	conn_close(c, i, 1, 0);
}

static void server_ready(struct core *c, int i, uint32_t ev)
{
	struct conn *k = c->conns[i];
	int err = 0;
	socklen_t len = sizeof(err);
	if ((ev & (EPOLLERR | EPOLLHUP)) || !(ev & EPOLLOUT)) {
		getsockopt(k->sfd, SOL_SOCKET, SO_ERROR, &err, &len);
		if (!err && !(ev & EPOLLOUT))
			return;		/* not yet */
	}
	if (err)
		return connect_failed(c, i, err, 0);
	k->connecting = 0;
	k->last = c->now;
	server_counted(c, k);
	if (k->early_len) {
		ssize_t w = write(k->sfd, k->early, k->early_len);
		if (w != (ssize_t)k->early_len)	/* a fresh socket takes them: short is a failure */
			return conn_abort(c, i, w < 0 ? errno : EMSGSIZE);
		k->up.bytes += w;
		free(k->early);
		k->early = NULL;
		k->early_len = 0;
	}
	pump(c, i, &k->up, 1);		/* what the client sent meanwhile */
	if ((ev & EPOLLIN) && !k->closed)
		pump(c, i, &k->down, 1);
}

static void conn_ready(struct core *c, uint64_t data, uint32_t ev)
{
	int i = (data & 0xFFFFFFFFull) >> 1, is_client = data & 1;
	struct conn *k = c->conns[i];
	struct dir *in, *out;

	if (k->closed)
		return;
	if (k->connecting) {
		if (!is_client)
			server_ready(c, i, ev);
		return;			/* client bytes wait in its socket until the server is there */
	}
	in = is_client ? &k->up : &k->down;
	out = is_client ? &k->down : &k->up;
	if (ev & ~EPOLLOUT)
		pump(c, i, in, ev & DRAIN);
	if ((ev & EPOLLOUT) && out->buffered && !k->closed)
		pump(c, i, out, 1);	/* its destination has room again */
}

/* -- accept --------------------------------------------------------------------------------------------- */
static int held_elsewhere(struct core *c, uint32_t addr, uint16_t port)
{
	const struct core_config *g = &c->cfg;
	uint64_t k;
	int owner;
	if (g->workers <= 1 || !g->syns_queued)
		return 0;
	owner = ((ntohs(port) & 0xFF) * g->workers) >> 8;	/* mimbox.netfilter.worker_of_port */
	if (owner == g->worker)
		return 0;
	if (!g->held_slots)
		return 1;
	k = client_key(addr, port);
	return __atomic_load_n(&g->held_slots[hash64(k) & g->held_mask], __ATOMIC_RELAXED) == k;
}

static int recorder_pop(struct core *c, uint32_t addr, uint16_t port, uint32_t *daddr, uint16_t *dport)
{
	struct dstopt_record_key key = {.saddr = addr, .sport = port};
	struct dstopt_record_value val;
	union bpf_attr attr;
	memset(&attr, 0, sizeof(attr));
	attr.map_fd = c->cfg.recorder_fd;
	attr.key = (uintptr_t)&key;
	attr.value = (uintptr_t)&val;
	if (syscall(__NR_bpf, BPF_MAP_LOOKUP_AND_DELETE_ELEM, &attr, sizeof(attr)))
		return 0;
	*daddr = val.addr;
	*dport = val.port;
	return 1;
}

static int open_server(struct core *c, uint32_t daddr, uint16_t dport, int *tried_mptcp)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = daddr, .sin_port = dport};
	int one = 1, fd = -1, err;
	*tried_mptcp = 0;
	if (c->cfg.server_mptcp) {
		if (core_tcp_only(c, daddr, dport)) {
			c->st.server_tcp_remembered++;
		} else {
			fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_MPTCP);
			*tried_mptcp = fd >= 0;
		}
	}
	if (fd < 0)
		fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (c->cfg.server_rcvbuf)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &c->cfg.server_rcvbuf, sizeof(int));
	if (c->cfg.server_sndbuf)
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &c->cfg.server_sndbuf, sizeof(int));
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) && errno != EINPROGRESS) {
		err = errno;
		close(fd);
		return -err;
	}
	return fd;
}

static void to_python(struct core *c, int kind, int fd, uint32_t caddr, uint16_t cport, uint32_t daddr, uint16_t dport)
{
	struct core_event *e = emit(c, kind);
	if (!e) {			/* no room to tell Python: the client is reset, never lost silently */
		reset_close(fd);
		return;
	}
	e->fd = fd;
	e->caddr = caddr;
	e->cport = cport;
	e->daddr = daddr;
	e->dport = dport;
}

static void accepted(struct core *c, int cfd, struct sockaddr_in *peer)
{
	uint32_t caddr = peer->sin_addr.s_addr, daddr = 0;
	uint16_t cport = peer->sin_port, dport = 0;
	uint64_t key = client_key(caddr, cport);
	int sfd, tried;

	if (c->claimed[hash64(key) & 0xFFFF] == key || held_elsewhere(c, caddr, cport))
		return to_python(c, EV_ACCEPTED, cfd, caddr, cport, 0, 0);
	switch (c->cfg.dst_source) {
	case DST_STATIC:
		daddr = c->cfg.static_addr;
		dport = c->cfg.static_port;
		break;
	case DST_TRANSPARENT: {
		struct sockaddr_in me;
		socklen_t len = sizeof(me);
		if (getsockname(cfd, (struct sockaddr *)&me, &len))
			return to_python(c, EV_ACCEPTED, cfd, caddr, cport, 0, 0);
		daddr = me.sin_addr.s_addr;
		dport = me.sin_port;
		break;
	}
	case DST_RECORDER:
		if (!recorder_pop(c, caddr, cport, &daddr, &dport))
			return to_python(c, EV_ACCEPTED, cfd, caddr, cport, 0, 0);
		break;
	default:
		return to_python(c, EV_ACCEPTED, cfd, caddr, cport, 0, 0);
	}
	if (!daddr || !dport || !allowed(c, caddr, daddr, dport) || c->active >= c->cfg.fd_capacity)
		return to_python(c, EV_OPEN, cfd, caddr, cport, daddr, dport);
	if (c->cfg.admission && !core_admit(c->cfg.admission, c->cfg.admission_limit))
		return to_python(c, EV_OPEN, cfd, caddr, cport, daddr, dport);	/* Python refuses, and says so */
	sfd = open_server(c, daddr, dport, &tried);
	if (sfd < 0) {
		struct core_event *e;
		if (c->cfg.admission)
			core_unadmit(c->cfg.admission);
		e = emit(c, EV_REFUSED);
		if (e) {
			e->err = -sfd;
			e->caddr = caddr;
			e->cport = cport;
			e->daddr = daddr;
			e->dport = dport;
		}
		c->st.refused_after_accept++;
		reset_close(cfd);
		return;
	}
	if (core_add(c, cfd, sfd, 1, tried, 0, caddr, cport, daddr, dport, c->now, NULL, 0, NULL, 0) < 0) {
		if (c->cfg.admission)
			core_unadmit(c->cfg.admission);
		reset_close(cfd);
		close(sfd);
	}
}

static void accept_all(struct core *c, int lfd)
{
	struct sockaddr_in peer;
	socklen_t len;
	int fd, n;
	/* bounded, so that one busy listener does not starve the connections; level-triggered */
	for (n = 0; n < 64 && c->nout < c->maxout; n++) {
		len = sizeof(peer);
		fd = accept4(lfd, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno != EAGAIN && errno != EINTR)
				c->st.accept_errors[errno < ERRNO_SLOTS ? errno : 0]++;
			return;
		}
		if (peer.sin_family != AF_INET) {
			to_python(c, EV_ACCEPTED, fd, 0, 0, 0, 0);
			continue;
		}
		accepted(c, fd, &peer);
	}
}

/* -- the loop ------------------------------------------------------------------------------------------- */
static void free_dead(struct core *c)
{
	for (int j = 0; j < c->ndead; j++) {
		struct conn *k = c->conns[c->dead[j]];
		k->used = 0;
		k->next_free = c->free_head;
		c->free_head = c->dead[j];
	}
	c->ndead = 0;
}

/* Wait up to timeout_ms, handle what is the core's, return how many events are Python's (in out),
 * or -errno (EINTR: a signal, Python's handler runs now). Returns early once Python has events. */
int core_run(struct core *c, int timeout_ms, struct core_event *out, int maxout)
{
	struct epoll_event evs[MAX_EVENTS];
	double deadline = monotonic() + timeout_ms / 1000.0;
	int n;

	c->out = out;
	c->maxout = maxout;
	c->nout = 0;
	for (;;) {
		n = epoll_wait(c->epfd, evs, c->maxout - c->nout < MAX_EVENTS ? c->maxout - c->nout : MAX_EVENTS,
			       timeout_ms);
		if (n < 0)
			return c->nout ? c->nout : -errno;
		c->now = monotonic();
		for (int j = 0; j < n; j++) {
			uint64_t data = evs[j].data.u64;
			switch (data >> KIND_SHIFT) {
			case KIND_CONN:
				conn_ready(c, data, evs[j].events);
				break;
			case KIND_LISTEN:
				accept_all(c, (int)(uint32_t)data);
				break;
			default: {
				struct core_event *e = emit(c, EV_FD);
				if (e) {
					e->fd = (int)(uint32_t)data;
					e->events = evs[j].events;
				}
			}
			}
		}
		free_dead(c);
		if (c->nout || n == 0 || c->now >= deadline || c->maxout - c->nout < 8)
			return c->nout;
		timeout_ms = (int)((deadline - c->now) * 1000) + 1;
	}
}

/* Once a second: connect timeouts, convert answers waiting alone, idle connections. */
int core_sweep(struct core *c, struct core_event *out, int maxout)
{
	c->out = out;
	c->maxout = maxout;
	c->nout = 0;
	c->now = monotonic();
	for (int i = 0; i < c->nconns && c->nout < maxout; i++) {
		struct conn *k = c->conns[i];
		if (!k->used || k->closed)
			continue;
		if (k->connecting) {
			if (c->now - k->t_accept > c->cfg.connect_timeout)
				connect_failed(c, i, ETIMEDOUT, 1);
		} else if (c->cfg.idle_timeout > 0 && c->now - k->last > c->cfg.idle_timeout) {
			c->st.idle_timeouts++;
			conn_event(c, k, EV_ABORTED, ETIME);
			conn_close(c, i, 1, 0);
		} else if (k->down.prefix && !k->up.bytes && c->now - k->last > c->cfg.prefix_wait) {
			if (flush_prefix(&k->down) < 0)
				conn_abort(c, i, EPIPE);
		}
	}
	free_dead(c);
	return c->nout;
}

/* Abort every connection (the converter stops): returns how many. */
int core_abort_all(struct core *c)
{
	int n = 0;
	for (int i = 0; i < c->nconns; i++) {
		struct conn *k = c->conns[i];
		if (k->used && !k->closed) {
			conn_close(c, i, 1, 0);
			n++;
		}
	}
	free_dead(c);
	return n;
}

int core_list(struct core *c, struct core_conn_info *out, int max)
{
	int n = 0;
	for (int i = 0; i < c->nconns && n < max; i++) {
		struct conn *k = c->conns[i];
		if (!k->used || k->closed)
			continue;
		out[n] = (struct core_conn_info){.cfd = k->cfd, .sfd = k->sfd, .caddr = k->caddr, .daddr = k->daddr,
						 .cport = k->cport, .dport = k->dport, .client_mptcp = k->client_mptcp,
						 .server_mptcp = k->server_mptcp, .connecting = k->connecting,
						 .bytes_up = k->up.bytes, .bytes_down = k->down.bytes, .t_accept = k->t_accept};
		n++;
	}
	return n;
}

int core_active(struct core *c)
{
	return c->active;
}

void core_free(struct core *c)
{
	if (!c)
		return;
	core_abort_all(c);
	for (int i = 0; i < c->nconns; i++)
		free(c->conns[i]);
	free(c->conns);
	free(c->dead);
	for (int j = 0; j < c->npool; j++) {
		close(c->pool[j][0]);
		close(c->pool[j][1]);
	}
	close(c->epfd);
	free(c->copy_buf);
	free(c);
}
