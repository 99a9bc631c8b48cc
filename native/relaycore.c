// SPDX-License-Identifier: GPL-2.0
/* MiMBox's per-connection path in C: SYN, accept, connect, relay, close — without the interpreter.
 *
 * The relay (mimbox/relay.py) configures; this core does what every connection does. One core per
 * worker owns the worker's epoll set. core_run() waits on it and, for each event:
 *   - its NFQUEUE: hold each client SYN while the server is connected (the paper's order), or let
 *     the kernel answer it (past the gate's caps), or refuse it (a marked verdict: RST);
 *   - a listener: accept4() every waiting client; pair it with its held SYN's server socket, or
 *     find its destination (static, transparent, DST_OPT seen in its SYN, the BPF recorder's map),
 *     check the policy and the admission, and open the server connection; hand-over and convert
 *     mode go to Python as events, refusals too (for the log; the core counts them);
 *   - a connection: finish its server connect, move bytes (copy through one buffer, splice once a
 *     direction passed splice_after), pass EOFs on as shutdown(SHUT_WR), resets as resets;
 *   - a Python fd (NFQUEUE, stats socket, links, greetings, held SYNs' server sockets): returned.
 * Layouts shared with Python are declared in mimbox/core.py (ctypes) and checked by core_abi().
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <linux/bpf.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/types.h>
#include <linux/netfilter.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include "dstopt.h"		/* generated from mimbox/dstopt.py: DST_OPT and the recorder's map */
#include "relaycore.h"		/* generated from mimbox/core.py: causes, events, sources, engines */

#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif
#define TCP_IS_MPTCP 43

enum { KIND_PY = 0, KIND_LISTEN = 1, KIND_CONN = 2, KIND_QUEUE = 3, KIND_PENDING = 4, KIND_LINK = 5 };
#define MAX_WORKERS 256
#define KIND_SHIFT 60
#define PENDING_HELD 1
#define PENDING_RELEASED 2
#define DESTINATIONS (1 << 16)	/* explicit mode: DST_OPTs of SYNs the kernel answered */
#define MAX_PREFIXES 256
#define MAX_RULES 256
#define MAX_LISTENERS 64
#define ACCEPT_PAUSE 0.1	/* seconds a listener rests after accept() ran out of fds (EMFILE/ENFILE) */
#define GEN_SHIFT 32		/* a held SYN's epoll data: kind | generation << 32 | slot */
#define ERRNO_SLOTS 160
#define WATCH (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)
#define DRAIN (EPOLLRDHUP | EPOLLERR | EPOLLHUP)
#define MAX_EVENTS 256
#define MEMO_SLOTS 4096		/* servers without MPTCP */

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
	int32_t syn_path, pending_limit, pending_per_prefix, explicit_opt;	/* explicit_opt: DST_OPT decides */
	double handshake_timeout;
	int32_t spare_sockets;		/* server sockets made ahead, per kind (TCP, MPTCP); 0: none */
	int32_t busy_poll_us;		/* poll without sleeping this long after the last event; 0: never */
	int32_t access_log_every;	/* EV_CLOSED for one connection in this many (0: none) */
	int32_t _pad3;
};

struct core_event {
	int32_t kind, fd;
	uint32_t events;
	int32_t err;
	uint32_t caddr, daddr;		/* network order */
	uint16_t cport, dport;		/* network order */
	int32_t cause, detail;		/* EV_REFUSED: CAUSE_*, and SYN_* for a bad option */
	int32_t arg, after_accept;
	uint64_t bytes_up, bytes_down;	/* EV_CLOSED: what the connection carried, */
	double duration;		/* for how long (s); err: why it ended (0: both sides finished) */
};

struct core_stats {
	uint64_t accepted, client_mptcp, client_tcp, server_mptcp, server_tcp, closed;
	uint64_t bytes_up, bytes_down, server_connects, server_tcp_remembered;
	double server_connect_us_sum, server_connect_us_max;
	uint64_t active, pipes_pooled, idle_timeouts, connect_timeouts;
	uint64_t errors[ERRNO_SLOTS];	/* resets by errno */
	uint64_t accept_errors[ERRNO_SLOTS];
	uint64_t syns, deferred, held, handshake_timeouts, held_connect_timeouts, accept_while_held;
	uint64_t handed_over, handover_errors[ERRNO_SLOTS];
	uint64_t refused[CAUSE_COUNT];
	uint64_t server_errors[ERRNO_SLOTS];	/* a held SYN's server connection failed */
	uint64_t spare_used, spare_made, busy_polls, spares;
	uint64_t accept_pauses, refused_after_accept, access_log_dropped;
	uint64_t connect_hist[CONNECT_BUCKET_COUNT + 1];	/* server connect times by bucket (last: above all) */
	uint64_t duration_hist[DURATION_BUCKET_COUNT + 1];	/* connection durations by bucket */
	double duration_sum;		/* seconds, all closed connections */
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
	uint32_t client_ev;		/* the client's epoll events while the server connection was made */
	int32_t end_err;		/* why it ends: 0 both sides finished, else an errno (ETIME: idle) */
	uint8_t client_synrecv;		/* an MPTCP client accepted at its TFO SYN, its handshake not yet
					 * complete: nothing is written to it until it is (see client_ready) */
	uint32_t down_ev;		/* the server's events meanwhile */
	int next_free;
};

struct memo { uint64_t key; double until; };

struct syn_info {
	uint32_t saddr, daddr;		/* network order */
	uint16_t sport, dport;
	uint32_t dst_addr;		/* DST_OPT, network order */
	uint16_t dst_port;
	int32_t has_dst, error, arg, mp_join, mp_capable;
};

struct pending {			/* a held SYN and its server connection */
	uint8_t state, tried_mptcp, server_mptcp;
	uint32_t gen;			/* bumped at each use of the slot: a stale event does not match */
	uint32_t id, caddr, daddr;
	uint16_t cport, dport;
	uint64_t key;
	int sfd, next_free;
	double t_syn, ready_at;
};

struct destination { uint64_t key; uint32_t daddr; uint16_t dport; double t; };
struct prefix { uint32_t net, mask; };	/* host order */
struct rule { uint32_t net, mask; uint16_t lo, hi; int32_t allow; };	/* host order; first match decides */
struct gate_count { uint32_t prefix; int32_t n; };

struct core {
	struct core_config cfg;
	struct core_stats st;
	int epfd;
	struct conn **conns;
	int nconns, cap, free_head, active;
	int *dead;			/* closed during this batch: freed when it ends */
	int ndead, dead_cap;
	char *copy_buf;
	int pool[PIPE_POOL][2];
	int npool;
	double now;
	struct core_event *out;
	int nout, maxout;
	struct memo tcp_only[MEMO_SLOTS];	/* servers that answered without MPTCP, until */
	uint64_t claimed[1 << 16];		/* clients with a pending entry (a fast filter) */
	struct pending *pending;
	int npending_slots, pending_free, npending, held_now;
	struct gate_count *gate;		/* held SYNs per client /24 (open addressing) */
	int gate_slots;
	struct destination *dests;
	struct prefix allow[MAX_PREFIXES];
	struct rule rules[MAX_RULES];		/* destinations, in order (mimbox.safety.Policy) */
	uint32_t own[MAX_PREFIXES];		/* this host's addresses (refreshed by Python on netlink news) */
	int nallow, nrules, nown;
	int greetings;				/* convert mode: accepted clients whose message Python awaits */
	uint32_t pending_gen;
	int listeners[MAX_LISTENERS], nlisteners;
	double accept_paused_until;		/* EMFILE/ENFILE: listeners out of the epoll set until then */
	struct nfq_handle *nfq;
	struct nfq_q_handle *qh;
	int qfd;
	char *qbuf;
	pid_t keeper;
	int spare[2][SPARE_MAX];		/* made-ahead server sockets: [0] TCP, [1] MPTCP */
	int nspare[2], spare_wanted[2];		/* a kind is made ahead once it was needed */
	double last_event;			/* busy polling: when the loop last had work */
	double spare_retry_at;			/* making spares failed: not before then */
	int links[MAX_WORKERS];			/* worker -> a unix datagram socket to it, -1: none */
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
	e->fd = -1;
	return e;
}

static int cause_of_errno(int err)	/* mimbox.synpath.Cause.of_errno */
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

static void refused(struct core *c, int cause, int detail, int arg, int err, int after_accept,
		    uint32_t caddr, uint16_t cport, uint32_t daddr, uint16_t dport);

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

/* -- set-up --------------------------------------------------------------------------------------------- */
struct core *core_new(const struct core_config *cfg)
{
	struct core *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	c->cfg = *cfg;
	c->free_head = -1;
	c->pending_free = -1;
	c->qfd = -1;
	for (int w = 0; w < MAX_WORKERS; w++)
		c->links[w] = -1;
	c->epfd = epoll_create1(EPOLL_CLOEXEC);
	c->copy_buf = malloc(cfg->pipe_size);
	c->npending_slots = cfg->pending_limit > 0 ? cfg->pending_limit : 1;
	c->pending = calloc(c->npending_slots, sizeof(*c->pending));
	for (c->gate_slots = 64; c->gate_slots < 4 * c->npending_slots; c->gate_slots *= 2)
		;
	c->gate = calloc(c->gate_slots, sizeof(*c->gate));
	c->dests = calloc(DESTINATIONS, sizeof(*c->dests));
	if (c->epfd < 0 || !c->copy_buf || !c->pending || !c->gate || !c->dests) {
		if (c->epfd >= 0)
			close(c->epfd);
		free(c->copy_buf);
		free(c->pending);
		free(c->gate);
		free(c->dests);
		free(c);
		return NULL;
	}
	for (int i = 0; i < c->npending_slots; i++) {
		c->pending[i].next_free = c->pending_free;
		c->pending_free = i;
	}
	return c;
}

int core_watch(struct core *c, int fd, uint32_t events, int listener)
{
	struct epoll_event ev = {.events = events, .data.u64 = (uint64_t)(listener ? KIND_LISTEN : KIND_PY) << KIND_SHIFT | (uint32_t)fd};
	if (listener) {
		if (c->nlisteners == MAX_LISTENERS)
			return -ENOSPC;
		c->listeners[c->nlisteners++] = fd;
	}
	if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, fd, &ev) == 0)
		return 0;
	if (errno == EEXIST && epoll_ctl(c->epfd, EPOLL_CTL_MOD, fd, &ev) == 0)
		return 0;
	return -errno;
}

int core_unwatch(struct core *c, int fd)
{
	for (int j = 0; j < c->nlisteners; j++)
		if (c->listeners[j] == fd)
			c->listeners[j] = c->listeners[--c->nlisteners];
	return epoll_ctl(c->epfd, EPOLL_CTL_DEL, fd, NULL) == 0 ? 0 : -errno;
}

/* SIGHUP: what may change in a running core (mimbox.configfile.RELOADABLE); new connections and
 * SYNs get it, established connections carry on */
void core_reconfigure(struct core *c, const struct core_config *n)
{
	c->cfg.server_mptcp_retry = n->server_mptcp_retry;
	c->cfg.connect_timeout = n->connect_timeout;
	c->cfg.idle_timeout = n->idle_timeout;
	c->cfg.handshake_timeout = n->handshake_timeout;
	c->cfg.admission_limit = n->admission_limit;
	c->cfg.pending_limit = n->pending_limit;
	c->cfg.pending_per_prefix = n->pending_per_prefix;
	c->cfg.access_log_every = n->access_log_every;
}

int core_abi(int which)
{
	switch (which) {
	case 0: return sizeof(struct core_config);
	case 1: return sizeof(struct core_event);
	case 2: return sizeof(struct core_stats);
	case 3: return sizeof(struct core_conn_info);
	case 4: return sizeof(struct syn_info);
	}
	return -1;
}

/* the offset of field k (mimbox.core's order) of shared struct `which`, -1 past the last: Python
 * checks every field, not only the sizes (two same-sized fields swapped would pass a size check) */
int core_abi_offset(int which, int k)
{
	static const size_t o0[] = ABI_OFFSETS_0, o1[] = ABI_OFFSETS_1, o2[] = ABI_OFFSETS_2, o3[] = ABI_OFFSETS_3,
			    o4[] = ABI_OFFSETS_4;
	static const size_t *all[] = {o0, o1, o2, o3, o4};
	static const int n[] = {sizeof(o0) / sizeof(*o0), sizeof(o1) / sizeof(*o1), sizeof(o2) / sizeof(*o2),
				sizeof(o3) / sizeof(*o3), sizeof(o4) / sizeof(*o4)};
	if (which < 0 || which > 4 || k < 0 || k >= n[which])
		return -1;
	return (int)all[which][k];
}

/* the name of field k of shared struct `which` as this library was built with (NULL past the last) */
const char *core_abi_field(int which, int k)
{
	static const char *n0[] = ABI_NAMES_0, *n1[] = ABI_NAMES_1, *n2[] = ABI_NAMES_2, *n3[] = ABI_NAMES_3,
			  *n4[] = ABI_NAMES_4;
	static const char **all[] = {n0, n1, n2, n3, n4};
	if (core_abi_offset(which, k) < 0)
		return NULL;
	return all[which][k];
}

const struct core_stats *core_stats(struct core *c)
{
	c->st.active = c->active;
	c->st.pipes_pooled = c->npool;
	c->st.spares = c->nspare[0] + c->nspare[1];
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

/* the histogram bucket of v: the first upper bound it does not exceed, or n (above all) */
static int bucket(const double *bounds, int n, double v)
{
	int i = 0;
	while (i < n && v > bounds[i])
		i++;
	return i;
}

static const double CONNECT_BUCKETS_US[] = CONNECT_BUCKETS_US_INIT;
static const double DURATION_BUCKETS_S[] = DURATION_BUCKETS_S_INIT;

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
	c->st.duration_hist[bucket(DURATION_BUCKETS_S, DURATION_BUCKET_COUNT, c->now - k->t_accept)]++;
	c->st.duration_sum += c->now - k->t_accept;
	if (c->cfg.access_log_every > 0 && c->st.closed % c->cfg.access_log_every == 0) {
		struct core_event *e = emit(c, EV_CLOSED);	/* the access log's line (Python writes it) */
		if (e) {
			e->err = k->end_err ? k->end_err : (reset ? ECONNABORTED : 0);
			e->caddr = k->caddr;
			e->cport = k->cport;
			e->daddr = k->daddr;
			e->dport = k->dport;
			e->bytes_up = k->up.bytes;
			e->bytes_down = k->down.bytes;
			e->duration = c->now - k->t_accept;
		} else {
			c->st.access_log_dropped++;
		}
	}
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
	k->end_err = err;
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

/* drain: read until src is empty (else a short read ends the call: with edge-triggered epoll the
 * source's next bytes raise a new edge); rdhup: the source has shut down its sending side, so a short
 * read() — which takes everything queued, up to the buffer — emptied it for good and is its EOF: no
 * read is spent to see the 0 (copy engine only: see pump_splice) */
static void pump_copy(struct core *c, int i, struct dir *d, int drain, int rdhup)
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
		if ((uint32_t)n < size) {
			if (rdhup)
				d->eof = 1;	/* everything before the FIN is read */
			else if (!drain)
				return;	/* a short read emptied src: its next bytes raise a new edge */
		}
	}
}

static int flush_prefix(struct dir *d)
{
	return d->prefix ? write_prefixed(d, "", 0) : 0;
}

static void pump_splice(struct core *c, int i, struct dir *d, int drain, int rdhup __attribute__((unused)))
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
			/* short here does not mean drained: the pipe's slots (one per skb fragment)
			 * may fill before its bytes do, so no EOF is inferred from rdhup (Fig. 5's 1 MB
			 * downloads lost their tails when it was) */
			short_read = n < c->cfg.pipe_size;
			k->last = c->now;
		}
	}
}

static void pump(struct core *c, int i, struct dir *d, int drain, int rdhup)
{
	switch (c->cfg.engine) {
	case ENGINE_COPY:
		return pump_copy(c, i, d, drain, rdhup);
	case ENGINE_SPLICE:
		return pump_splice(c, i, d, drain, rdhup);
	}
	if (d->pipe_r >= 0 || (d->bytes >= (uint64_t)c->cfg.splice_after && !d->buf))
		return pump_splice(c, i, d, drain, rdhup);
	pump_copy(c, i, d, drain, rdhup);
}

/* Linux 6.18: bytes written to an MPTCP socket accepted at its TFO SYN while its first subflow is still
 * in SYN_RECV are never sent, not even once the client's ACK completes the handshake (the MPTCP level
 * has no established subflow to push them on then, and nothing pushes them later: tested, > 6 s).
 * So nothing is written to such a client until the handshake is complete; its socket reports the
 * moment with an EPOLLOUT edge (conn_ready), and the sweep checks once a second as well. */
static int tcp_state(int fd)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);
	return getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) == 0 ? ti.tcpi_state : -1;
}

static int client_ready(struct conn *k)
{
	if (!k->client_synrecv)
		return 1;
	if (tcp_state(k->cfd) == TCP_SYN_RECV)
		return 0;
	k->client_synrecv = 0;
	return 1;
}

/* move what an epoll event on d's source says is there */
static void pump_event(struct core *c, int i, struct dir *d, uint32_t ev)
{
	struct conn *k = c->conns[i];
	if (d == &k->down && !client_ready(k)) {
		k->down_ev |= ev;	/* the server's bytes wait in its socket */
		return;
	}
	pump(c, i, d, !!(ev & DRAIN), !!(ev & EPOLLRDHUP));
}

/* the client's handshake is complete: what the server sent meanwhile goes now */
static void client_established(struct core *c, int i)
{
	struct conn *k = c->conns[i];
	uint32_t ev = k->down_ev | EPOLLIN;
	k->down_ev = 0;
	pump_event(c, i, &k->down, ev);
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
	int i = conn_slot(c), err = -ENOMEM;

	if (i < 0)
		return -ENOMEM;
	k = c->conns[i];
	memset(k, 0, sizeof(*k));
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
	ev.data.u64 = (uint64_t)KIND_CONN << KIND_SHIFT | (uint64_t)i << 1 | 1;
	if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, cfd, &ev)) {
		err = -errno;
		goto failed;
	}
	ev.data.u64 = (uint64_t)KIND_CONN << KIND_SHIFT | (uint64_t)i << 1;
	if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, sfd, &ev) &&
	    (errno != EEXIST || epoll_ctl(c->epfd, EPOLL_CTL_MOD, sfd, &ev))) {	/* a held SYN's socket Python watched */
		err = -errno;
		epoll_ctl(c->epfd, EPOLL_CTL_DEL, cfd, NULL);
		goto failed;
	}
	k->used = 1;
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
		/* what is there already: EPOLL_CTL_ADD reported it as an event (edge-triggered too) */
	}
	return i;
failed:				/* the caller still owns both fds (it resets the client) */
	free(k->down.prefix);
	free(k->early);
	k->down.prefix = k->early = NULL;
	k->next_free = c->free_head;
	c->free_head = i;
	return err;
}

/* a connect() in progress on fd, after epoll event ev: -1 not yet, 0 connected, else its errno */
static int connect_result(int fd, uint32_t ev)
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
 * SYN without MPTCP (core_learn); returns whether the connection runs MPTCP */
static int server_answered(struct core *c, int sfd, double t_syn, int tried_mptcp, int server_mptcp,
			   uint32_t daddr, uint16_t dport)
{
	double us = (c->now - t_syn) * 1e6;
	c->st.connect_hist[bucket(CONNECT_BUCKETS_US, CONNECT_BUCKET_COUNT, us)]++;
	c->st.server_connects++;
	c->st.server_connect_us_sum += us;
	if (us > c->st.server_connect_us_max)
		c->st.server_connect_us_max = us;
	if (tried_mptcp) {
		server_mptcp = sock_is_mptcp(sfd);
		core_learn(c, daddr, dport, server_mptcp);
	}
	return server_mptcp;
}

static void server_counted(struct core *c, struct conn *k)
{
	k->server_mptcp = server_answered(c, k->sfd, k->t_syn, k->tried_mptcp, k->server_mptcp, k->daddr, k->dport);
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
	if (timeout)
		c->st.connect_timeouts++;
	refused(c, cause_of_errno(err), 0, 0, err, 1, k->caddr, k->cport, k->daddr, k->dport);
	k->end_err = err;
	if (k->down.prefix && (e = emit(c, EV_GIVEBACK))) {
		e->fd = k->cfd;
		e->cause = cause_of_errno(err);
		conn_close(c, i, 0, 1);
		return;
	}
	conn_close(c, i, 1, 0);
}

static void server_ready(struct core *c, int i, uint32_t ev)
{
	struct conn *k = c->conns[i];
	int err = connect_result(k->sfd, ev);
	if (err < 0)
		return;			/* not yet */
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
	if (k->client_ev & ~EPOLLOUT)		/* what the client sent meanwhile: its events were kept */
		pump_event(c, i, &k->up, k->client_ev);
	k->client_ev = 0;
	if ((ev & ~EPOLLOUT) && !k->closed)
		pump_event(c, i, &k->down, ev);
}

static void conn_ready(struct core *c, uint64_t data, uint32_t ev)
{
	int i = (uint32_t)data >> 1, is_client = data & 1;
	struct conn *k = c->conns[i];
	struct dir *in, *out;

	if (k->closed)
		return;
	if (k->connecting) {
		if (is_client)
			k->client_ev |= ev;	/* its bytes wait in its socket until the server is there */
		else
			server_ready(c, i, ev);
		return;
	}
	in = is_client ? &k->up : &k->down;
	out = is_client ? &k->down : &k->up;
	if (is_client && k->client_synrecv && (ev & EPOLLOUT) && client_ready(k))
		client_established(c, i);
	if (k->closed)
		return;
	if (ev & ~EPOLLOUT)
		pump_event(c, i, in, ev);
	if ((ev & EPOLLOUT) && out->buffered && !k->closed)
		pump(c, i, out, 1, 0);	/* its destination has room again */
}

/* -- policy (mimbox.safety.Policy decides the same; tests/test_core.py checks they agree) ------------ */
/* kind 0: an allowed client prefix; 2: one of this host's addresses; 3: forget this host's addresses
 * (before Python lists them anew); 4: forget the allowed clients and destination rules (a reload
 * lists them anew); 0 or -ENOSPC */
int core_policy(struct core *c, int kind, uint32_t net, uint32_t mask)	/* host order */
{
	if (kind == 3) {
		c->nown = 0;
		return 0;
	}
	if (kind == 4) {
		c->nallow = 0;
		c->nrules = 0;
		return 0;
	}
	if (kind == 0 && c->nallow < MAX_PREFIXES)
		c->allow[c->nallow++] = (struct prefix){net & mask, mask};
	else if (kind == 2 && c->nown < MAX_PREFIXES)
		c->own[c->nown++] = net;
	else
		return -ENOSPC;
	return 0;
}

/* the next destination rule (after those before it): ports lo..hi of net/mask allowed or denied */
int core_rule(struct core *c, int allow, uint32_t net, uint32_t mask, int lo, int hi)	/* host order */
{
	if (c->nrules == MAX_RULES)
		return -ENOSPC;
	c->rules[c->nrules++] = (struct rule){net & mask, mask, (uint16_t)lo, (uint16_t)hi, allow};
	return 0;
}

static int client_refusal(struct core *c, uint32_t caddr)
{
	uint32_t cl = ntohl(caddr);
	for (int i = 0; i < c->nallow; i++)
		if ((cl & c->allow[i].mask) == c->allow[i].net)
			return -1;
	return CAUSE_CLIENT_NOT_ALLOWED;
}

/* -1: allowed; else the CAUSE_* that refuses client -> daddr:dport (network order) */
int core_refusal(struct core *c, uint32_t caddr, uint32_t daddr, uint16_t dport)
{
	uint32_t d = ntohl(daddr);
	uint16_t p = ntohs(dport);
	if (client_refusal(c, caddr) >= 0)
		return CAUSE_CLIENT_NOT_ALLOWED;
	if (!p)
		return CAUSE_DESTINATION_DENIED;
	for (int i = 0; i < c->nown; i++)
		if (d == c->own[i])
			return CAUSE_DESTINATION_DENIED;
	for (int i = 0; i < c->nrules; i++) {
		const struct rule *r = &c->rules[i];
		if ((d & r->mask) == r->net && p >= r->lo && p <= r->hi)
			return r->allow ? -1 : CAUSE_DESTINATION_DENIED;
	}
	return -1;
}

/* -- the SYN gate (README "SYN path"): hold while under both caps ------------------------------------ */
/* open addressing; key = prefix + 1 (0: never used); a count back at 0 is a reusable tombstone */
static struct gate_count *gate_slot(struct core *c, uint32_t prefix, int create)
{
	uint32_t mask = c->gate_slots - 1, i = hash64(prefix + 1) & mask;
	struct gate_count *reuse = NULL;
	for (int n = 0; n < c->gate_slots; n++, i = (i + 1) & mask) {
		struct gate_count *g = &c->gate[i];
		if (g->prefix == prefix + 1 && g->n > 0)
			return g;
		if (g->n <= 0 && !reuse)
			reuse = g;
		if (!g->prefix)
			break;		/* never used: the prefix is not further on */
	}
	if (!create || !reuse)
		return NULL;
	reuse->prefix = prefix + 1;
	reuse->n = 0;
	return reuse;
}

/* SYN_HOLD, SYN_DEFER or SYN_REFUSE for a SYN from caddr (network order) */
int core_gate(struct core *c, uint32_t caddr)
{
	struct gate_count *g;
	if (c->cfg.syn_path == SYN_PATH_ACCEPT)
		return SYN_DEFER;
	g = gate_slot(c, ntohl(caddr) & 0xFFFFFF00, 0);
	if (c->held_now < c->cfg.pending_limit && (!g || g->n < c->cfg.pending_per_prefix))
		return SYN_HOLD;
	return c->cfg.syn_path == SYN_PATH_HOLD ? SYN_REFUSE : SYN_DEFER;
}

static void gate_hold(struct core *c, uint32_t caddr)
{
	struct gate_count *g = gate_slot(c, ntohl(caddr) & 0xFFFFFF00, 1);
	c->held_now++;
	if (g)
		g->n++;
}

static void gate_release(struct core *c, uint32_t caddr)
{
	struct gate_count *g = gate_slot(c, ntohl(caddr) & 0xFFFFFF00, 0);
	c->held_now--;
	if (g)
		g->n--;
}

/* for tests: a SYN from caddr held (on) or released */
void core_gate_hold(struct core *c, uint32_t caddr, int on)
{
	if (on)
		gate_hold(c, caddr);
	else
		gate_release(c, caddr);
}

/* -- where deferred explicit-mode clients asked to go (their SYN's DST_OPT), looked up at accept() --- */
/* 0: remembered (or the same one again); -1: a recent SYN from this (address, port) asked for another
 * destination: the first wins, this SYN is refused (a forged SYN must not redirect its victim) */
static int dest_remember(struct core *c, uint64_t key, uint32_t daddr, uint16_t dport)
{
	struct destination *d = &c->dests[hash64(key) & (DESTINATIONS - 1)];
	if (d->key == key && c->now - d->t <= 2 * c->cfg.handshake_timeout) {
		if (d->daddr != daddr || d->dport != dport)
			return -1;
		return 0;		/* a retransmission: the first SYN's time stays */
	}
	*d = (struct destination){key, daddr, dport, c->now};
	return 0;
}

static int dest_take(struct core *c, uint64_t key, uint32_t *daddr, uint16_t *dport)
{
	struct destination *d = &c->dests[hash64(key) & (DESTINATIONS - 1)];
	if (d->key != key)
		return 0;
	d->key = 0;
	if (c->now - d->t > 2 * c->cfg.handshake_timeout)
		return 0;
	*daddr = d->daddr;
	*dport = d->dport;
	return 1;
}

/* -- refusals: counted here, logged by Python (EV_REFUSED) ---------------------------------------------- */
static void refused(struct core *c, int cause, int detail, int arg, int err, int after_accept,
		    uint32_t caddr, uint16_t cport, uint32_t daddr, uint16_t dport)
{
	struct core_event *e;
	c->st.refused[cause]++;
	e = emit(c, EV_REFUSED);
	if (!e)
		return;
	e->cause = cause;
	e->detail = detail;
	e->arg = arg;
	e->err = err;
	e->after_accept = after_accept;
	e->caddr = caddr;
	e->cport = cport;
	e->daddr = daddr;
	e->dport = dport;
}

/* -- SYNs: mimbox/dstopt.py parse_options, the same decisions (tests/test_core.py compares) ---------- */

/* 0: an IPv4 TCP SYN (options parsed, never fails on them), -1: not one */
int core_parse_syn(const uint8_t *p, int len, struct syn_info *s)
{
	int ihl, doff, i, n;
	const uint8_t *t, *o;
	memset(s, 0, sizeof(*s));
	if (len < 20 || p[0] >> 4 != 4)
		return -1;
	ihl = (p[0] & 0x0F) * 4;
	if (p[9] != IPPROTO_TCP || len < ihl + 20)
		return -1;
	t = p + ihl;
	doff = (t[12] >> 4) * 4;
	if (doff < 20 || len - ihl < doff)
		return -1;
	memcpy(&s->saddr, p + 12, 4);
	memcpy(&s->daddr, p + 16, 4);
	memcpy(&s->sport, t, 2);
	memcpy(&s->dport, t + 2, 2);
	o = t + 20;
	n = doff - 20;
	for (i = 0; i < n;) {
		int kind = o[i], olen;
		if (kind == 0)
			break;
		if (kind == 1) {
			i++;
			continue;
		}
		if (i + 1 >= n) {
			if (!s->error)
				s->error = SYN_TRUNCATED;
			break;
		}
		olen = o[i + 1];
		if (olen < 2 || i + olen > n) {
			if (!s->error) {
				s->error = SYN_BAD_LENGTH;
				s->arg = kind << 8 | olen;
			}
			break;
		}
		if (kind == DSTOPT_KIND) {
			int exid = olen >= 4 ? (o[i + 2] << 8 | o[i + 3]) : -1;
			if (exid >= 0 && exid != DSTOPT_EXID) {
				if (!s->error) {
					s->error = SYN_UNKNOWN_EXID;
					s->arg = exid;
				}
			} else if (s->has_dst) {
				s->error = SYN_MORE_THAN_ONE;
			} else if (olen != DSTOPT_LEN) {
				s->error = SYN_DSTOPT_LENGTH;
				s->arg = olen;
			} else if (exid != DSTOPT_EXID) {
				s->error = SYN_UNKNOWN_EXID;
				s->arg = exid;
			} else {
				uint16_t port;
				uint32_t addr;
				memcpy(&addr, o + i + DSTOPT_OFF_ADDR, 4);
				memcpy(&port, o + i + DSTOPT_OFF_PORT, 2);
				if (!port)
					s->error = SYN_PORT0;
				else if (!addr)
					s->error = SYN_ADDR0;
				else {
					s->has_dst = 1;
					s->dst_addr = addr;
					s->dst_port = port;
				}
			}
		} else if (kind == 30 && olen >= 3) {	/* MPTCP */
			int sub = o[i + 2] >> 4;
			s->mp_capable |= sub == 0;
			s->mp_join |= sub == 1;
		}
		i += olen;
	}
	if (s->error)
		s->has_dst = 0;
	else if (!s->has_dst)
		s->error = SYN_NO_DSTOPT;
	return 0;
}

/* -- held SYNs ------------------------------------------------------------------------------------------ */
static int pending_find(struct core *c, uint64_t key)
{
	if (c->claimed[hash64(key) & 0xFFFF] != key)
		return -1;
	for (int i = 0; i < c->npending_slots; i++)
		if (c->pending[i].state && c->pending[i].key == key)
			return i;
	return -1;
}

static void held_mark(struct core *c, uint64_t key, int on)
{
	uint64_t *slot = &c->claimed[hash64(key) & 0xFFFF];
	if (on)
		*slot = key;
	else if (*slot == key)
		*slot = 0;
	if (c->cfg.held_slots) {	/* the workers' shared set: a one-slot store, no lock */
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

/* end a pending entry; a SYN still held is refused with `cause`; paired: its server socket and
 * its admission now belong to a connection */
static void pending_end(struct core *c, int i, int cause, int err, int paired)
{
	struct pending *p = &c->pending[i];
	if (p->state == PENDING_HELD) {
		verdict(c, p->id, 1);
		refused(c, cause, 0, 0, err, 0, p->caddr, p->cport, p->daddr, p->dport);
	}
	gate_release(c, p->caddr);
	held_mark(c, p->key, 0);
	if (c->cfg.admission && !paired)
		core_unadmit(c->cfg.admission);
	if (p->sfd >= 0 && !paired)
		close(p->sfd);
	p->state = 0;
	p->sfd = -1;
	p->next_free = c->pending_free;
	c->pending_free = i;
	c->npending--;
}

int core_open_server(struct core *c, uint32_t daddr, uint16_t dport, int *tried_mptcp);

static void on_syn(struct core *c, uint32_t id, const uint8_t *pkt, int len)
{
	struct syn_info s;
	uint32_t daddr;
	uint16_t dport;
	uint64_t key;
	int i, cause, sfd, tried;

	if (core_parse_syn(pkt, len, &s) || s.mp_join) {
		verdict(c, id, 0);	/* not an IPv4 TCP SYN, or a new subflow: the kernel's business */
		return;
	}
	c->st.syns++;
	key = client_key(s.saddr, s.sport);
	i = pending_find(c, key);
	if (i >= 0) {		/* a retransmission: dropped while the first is held, else the kernel's */
		if (c->pending[i].state == PENDING_HELD)
			nfq_set_verdict(c->qh, id, NF_DROP, 0, NULL);
		else
			verdict(c, id, 0);
		return;
	}
	if (c->cfg.explicit_opt) {
		if (!s.has_dst) {
			verdict(c, id, 1);
			return refused(c, CAUSE_BAD_OPTION, s.error, s.arg, 0, 0, s.saddr, s.sport, 0, 0);
		}
		daddr = s.dst_addr;
		dport = s.dst_port;
	} else if (c->cfg.dst_source == DST_STATIC) {
		daddr = c->cfg.static_addr;
		dport = c->cfg.static_port;
	} else {
		daddr = s.daddr;
		dport = s.dport;
	}
	cause = core_refusal(c, s.saddr, daddr, dport);
	if (cause >= 0) {
		verdict(c, id, 1);
		return refused(c, cause, 0, 0, 0, 0, s.saddr, s.sport, daddr, dport);
	}
	switch (core_gate(c, s.saddr)) {
	case SYN_DEFER:		/* the kernel answers (SYN cookies past its backlog); connect after accept */
		if (c->cfg.explicit_opt && dest_remember(c, key, daddr, dport)) {
			verdict(c, id, 1);
			return refused(c, CAUSE_CONFLICTING_DESTINATION, 0, 0, 0, 0, s.saddr, s.sport, daddr, dport);
		}
		c->st.deferred++;
		verdict(c, id, 0);
		return;
	case SYN_REFUSE:
		verdict(c, id, 1);
		return refused(c, CAUSE_PENDING_LIMIT, 0, c->held_now, 0, 0, s.saddr, s.sport, daddr, dport);
	}
	if (c->pending_free < 0 || c->active + c->npending >= c->cfg.fd_capacity) {
		verdict(c, id, 1);
		return refused(c, CAUSE_FD_LIMIT, 0, c->cfg.fd_capacity, 0, 0, s.saddr, s.sport, daddr, dport);
	}
	if (c->cfg.admission && !core_admit(c->cfg.admission, c->cfg.admission_limit)) {
		verdict(c, id, 1);
		return refused(c, CAUSE_CONNECTION_LIMIT, 0, c->cfg.admission_limit, 0, 0, s.saddr, s.sport, daddr, dport);
	}
	sfd = core_open_server(c, daddr, dport, &tried);
	if (sfd < 0) {
		if (c->cfg.admission)
			core_unadmit(c->cfg.admission);
		verdict(c, id, 1);
		return refused(c, cause_of_errno(-sfd), 0, 0, -sfd, 0, s.saddr, s.sport, daddr, dport);
	}
	i = c->pending_free;
	c->pending_gen = (c->pending_gen + 1) & 0xFFFFFFF;
	struct epoll_event ev = {.events = WATCH, .data.u64 = (uint64_t)KIND_PENDING << KIND_SHIFT |
				 (uint64_t)c->pending_gen << GEN_SHIFT | (uint32_t)i};
	if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, sfd, &ev)) {
		int err = errno;
		close(sfd);
		if (c->cfg.admission)
			core_unadmit(c->cfg.admission);
		verdict(c, id, 1);
		return refused(c, CAUSE_SERVER_ERROR, 0, 0, err, 0, s.saddr, s.sport, daddr, dport);
	}
	c->pending_free = c->pending[i].next_free;
	c->npending++;
	c->pending[i] = (struct pending){.state = PENDING_HELD, .tried_mptcp = tried, .gen = c->pending_gen, .id = id,
					 .caddr = s.saddr, .daddr = daddr, .cport = s.sport, .dport = dport, .key = key,
					 .sfd = sfd, .t_syn = c->now};
	gate_hold(c, s.saddr);
	held_mark(c, key, 1);
	c->st.held++;
}

/* a held SYN's server connection answered (or failed) */
static void pending_ready(struct core *c, uint64_t data, uint32_t ev)
{
	int i = (int)(uint32_t)data;
	struct pending *p = &c->pending[i];
	int err;
	if (p->state != PENDING_HELD || p->gen != ((data >> GEN_SHIFT) & 0xFFFFFFF))
		return;			/* released (waiting for accept()), or a stale event of an ended entry */
	err = connect_result(p->sfd, ev);
	if (err < 0)
		return;
	if (err) {
		c->st.server_errors[err < ERRNO_SLOTS ? err : 0]++;
		return pending_end(c, i, cause_of_errno(err), err, 0);
	}
	p->server_mptcp = server_answered(c, p->sfd, p->t_syn, p->tried_mptcp, 0, p->daddr, p->dport);
	p->state = PENDING_RELEASED;
	p->ready_at = c->now;
	verdict(c, p->id, 0);		/* the kernel now answers the client's SYN */
}

static int queue_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa, void *data)
{
	struct core *c = data;
	struct nfqnl_msg_packet_hdr *h = nfq_get_msg_packet_hdr(nfa);
	unsigned char *pkt;
	int len;
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
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)KIND_QUEUE << KIND_SHIFT};
	if (c->qfd >= 0 && epoll_ctl(c->epfd, EPOLL_CTL_ADD, c->qfd, &ev))
		return -errno;
	return 0;
}

static void queue_ready(struct core *c)
{
	for (int n = 0; n < 256; n++) {
		ssize_t r = recv(c->qfd, c->qbuf, 65536, MSG_DONTWAIT);
		if (r <= 0)
			return;		/* EAGAIN; ENOBUFS: the kernel dropped some (they are retransmitted) */
		nfq_handle_packet(c->nfq, c->qbuf, r);
	}
}

/* -- accept --------------------------------------------------------------------------------------------- */
/* mimbox.netfilter.worker_of_port: the worker whose queue gets a SYN from source port sport (host order) */
int core_worker_of_port(int sport, int workers)
{
	return ((sport & 0xFF) * workers) >> 8;
}

static int held_elsewhere(struct core *c, uint32_t addr, uint16_t port)
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
	/* c->now was read when this batch began: a SYN recorded since is younger than that (signed) */
	if ((int64_t)((uint64_t)(c->now * 1e9) - val.t_ns) > (int64_t)DSTOPT_RECORD_TTL_NS)
		return 0;		/* stale: that SYN never became a connection */
	*daddr = val.addr;
	*dport = val.port;
	return 1;
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

/* Spare server sockets, made while the loop has nothing to do, so that a held SYN's connect() is the
 * only system call between its arrival and its server SYN (socket() and the setsockopts cost about a
 * fifth of Table 1's SYN delay here). Under load the loop is never idle, the spares run out and
 * sockets are made on demand as before: the same calls, moved out of the SYN's way, never added. */
static int spare_target(struct core *c)
{
	return c->cfg.spare_sockets < SPARE_MAX ? c->cfg.spare_sockets : SPARE_MAX;
}

static int spare_missing(struct core *c)
{
	int t = spare_target(c);
	return t > 0 && c->now >= c->spare_retry_at &&
	       ((c->spare_wanted[0] && c->nspare[0] < t) || (c->spare_wanted[1] && c->nspare[1] < t));
}

static void spare_refill(struct core *c)
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
 * its fd, or -errno. Python's convert mode opens its server connections through it too. */
int core_open_server(struct core *c, uint32_t daddr, uint16_t dport, int *tried_mptcp)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = daddr, .sin_port = dport};
	int fd = -1, err;
	*tried_mptcp = 0;
	if (c->cfg.server_mptcp) {
		if (core_tcp_only(c, daddr, dport)) {
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

static void refuse_accepted(struct core *c, int cfd, int cause, int detail, int arg, int err,
			    uint32_t caddr, uint16_t cport, uint32_t daddr, uint16_t dport);

/* Convert mode: an accepted client whose Convert message Python reads (a greeting). It costs an fd
 * before its client said anything, so it is counted and capped like a held SYN: an allowed client,
 * at most pending_per_prefix from one /24 and pending_limit in all per worker, inside the fd
 * capacity and the connection limit (its admission passes to the connection it becomes). Python
 * ends it with core_greeting_end(). */
static void greet(struct core *c, int cfd, uint32_t caddr, uint16_t cport)
{
	struct gate_count *g = gate_slot(c, ntohl(caddr) & 0xFFFFFF00, 0);
	struct core_event *e;
	int cause = client_refusal(c, caddr), arg = 0;
	if (cause < 0 && (c->held_now >= c->cfg.pending_limit || (g && g->n >= c->cfg.pending_per_prefix))) {
		cause = CAUSE_PENDING_LIMIT;
		arg = c->held_now;
	} else if (cause < 0 && c->active + c->npending + c->greetings >= c->cfg.fd_capacity) {
		cause = CAUSE_FD_LIMIT;
		arg = c->cfg.fd_capacity;
	} else if (cause < 0 && c->cfg.admission && !core_admit(c->cfg.admission, c->cfg.admission_limit)) {
		cause = CAUSE_CONNECTION_LIMIT;
		arg = c->cfg.admission_limit;
	}
	if (cause >= 0) {
		static const unsigned char busy[] = CONVERT_RESOURCE_EXCEEDED;
		c->st.refused_after_accept++;
		refused(c, cause, 0, arg, 0, 1, caddr, cport, 0, 0);
		if (cause == CAUSE_CLIENT_NOT_ALLOWED) {
			reset_close(cfd);	/* a client not allowed learns nothing */
			return;
		}
		/* RFC 8803: an Error TLV (Resource Exceeded) says why, then the stream ends. Written here, not
		 * by Python: a crowd beyond the caps is refused at the kernel's pace, so the listener's queue,
		 * which real clients share with it, drains as fast as the crowd fills it. A client accepted at
		 * its TFO SYN (its handshake not complete) is Python's: the answer must wait (client_ready) */
		if (sock_is_mptcp(cfd) && tcp_state(cfd) == TCP_SYN_RECV && (e = emit(c, EV_GIVEBACK))) {
			e->fd = cfd;
			e->cause = cause;
			e->caddr = caddr;
			e->cport = cport;
			return;
		}
		send(cfd, busy, sizeof(busy), MSG_DONTWAIT | MSG_NOSIGNAL);
		shutdown(cfd, SHUT_WR);
		close(cfd);
		return;
	}
	e = emit(c, EV_ACCEPTED);
	if (!e) {			/* no room to tell Python: the client is reset, never lost silently */
		if (c->cfg.admission)
			core_unadmit(c->cfg.admission);
		reset_close(cfd);
		return;
	}
	gate_hold(c, caddr);
	c->greetings++;
	e->fd = cfd;
	e->caddr = caddr;
	e->cport = cport;
}

/* Python is done with a greeting from caddr: it became a connection (keep_admission: core_add()
 * follows, or Python refused it and gives the admission back itself) or it ended. */
void core_greeting_end(struct core *c, uint32_t caddr, int keep_admission)
{
	gate_release(c, caddr);
	c->greetings--;
	if (!keep_admission && c->cfg.admission)
		core_unadmit(c->cfg.admission);
}

int core_greetings(struct core *c)
{
	return c->greetings;
}

static void refuse_accepted(struct core *c, int cfd, int cause, int detail, int arg, int err,
			    uint32_t caddr, uint16_t cport, uint32_t daddr, uint16_t dport)
{
	c->st.refused_after_accept++;
	refused(c, cause, detail, arg, err, 1, caddr, cport, daddr, dport);	/* counted before the client can see it */
	reset_close(cfd);
}

/* A client socket: its held SYN's server socket, or its destination, policy, admission, server. */
static void serve_accepted(struct core *c, int cfd, uint32_t caddr, uint16_t cport)
{
	uint32_t daddr = 0;
	uint16_t dport = 0;
	uint64_t key = client_key(caddr, cport);
	int i, sfd, tried, cause;

	i = pending_find(c, key);
	if (i >= 0) {
		struct pending p = c->pending[i];
		if (p.state == PENDING_HELD) {	/* a retransmission the kernel answered before ours was */
			c->st.accept_while_held++;
			reset_close(cfd);
			return;
		}
		epoll_ctl(c->epfd, EPOLL_CTL_DEL, p.sfd, NULL);
		pending_end(c, i, 0, 0, 1);	/* the connection takes its socket and admission */
		if (core_add(c, cfd, p.sfd, 0, 0, p.server_mptcp, caddr, cport, p.daddr, p.dport, p.t_syn,
			     NULL, 0, NULL, 0) < 0) {
			reset_close(cfd);
			close(p.sfd);
			if (c->cfg.admission)
				core_unadmit(c->cfg.admission);
		}
		return;
	}
	switch (c->cfg.dst_source) {
	case DST_STATIC:
		daddr = c->cfg.static_addr;
		dport = c->cfg.static_port;
		break;
	case DST_TRANSPARENT: {
		struct sockaddr_in me;
		socklen_t len = sizeof(me);
		if (getsockname(cfd, (struct sockaddr *)&me, &len))
			return refuse_accepted(c, cfd, CAUSE_NO_DESTINATION, 0, 0, errno, caddr, cport, 0, 0);
		daddr = me.sin_addr.s_addr;
		dport = me.sin_port;
		break;
	}
	case DST_EXPLICIT:
		if (!dest_take(c, key, &daddr, &dport) &&
		    (c->cfg.recorder_fd < 0 || !recorder_pop(c, caddr, cport, &daddr, &dport)))
			return refuse_accepted(c, cfd, CAUSE_NO_DESTINATION, 0, 0, 0, caddr, cport, 0, 0);
		if (!daddr || !dport)
			return refuse_accepted(c, cfd, CAUSE_BAD_OPTION, !dport ? SYN_PORT0 : SYN_ADDR0, 0, 0,
					       caddr, cport, daddr, dport);
		break;
	default:
		return greet(c, cfd, caddr, cport);		/* convert mode: the message says where */
	}
	cause = core_refusal(c, caddr, daddr, dport);	/* its SYN may not have been judged */
	if (cause >= 0)
		return refuse_accepted(c, cfd, cause, 0, 0, 0, caddr, cport, daddr, dport);
	if (c->active + c->npending >= c->cfg.fd_capacity)
		return refuse_accepted(c, cfd, CAUSE_FD_LIMIT, 0, c->cfg.fd_capacity, 0, caddr, cport, daddr, dport);
	if (c->cfg.admission && !core_admit(c->cfg.admission, c->cfg.admission_limit))
		return refuse_accepted(c, cfd, CAUSE_CONNECTION_LIMIT, 0, c->cfg.admission_limit, 0, caddr, cport,
				       daddr, dport);
	sfd = core_open_server(c, daddr, dport, &tried);
	if (sfd < 0) {
		if (c->cfg.admission)
			core_unadmit(c->cfg.admission);
		return refuse_accepted(c, cfd, cause_of_errno(-sfd), 0, 0, -sfd, caddr, cport, daddr, dport);
	}
	if (core_add(c, cfd, sfd, 1, tried, 0, caddr, cport, daddr, dport, c->now, NULL, 0, NULL, 0) < 0) {
		if (c->cfg.admission)
			core_unadmit(c->cfg.admission);
		reset_close(cfd);
		close(sfd);
	}
}

/* -- hand-over between workers ----------------------------------------------------------------------------
 * With N workers the SYN of a client is held by the worker its source port picks (the queue rules split
 * by mimbox.netfilter.worker_of_port), and that worker opened the server connection. The kernel's
 * reuseport hash, which user space cannot steer on MPTCP listeners, picks the worker that accept()s;
 * if it is another one and the SYN really is held (the workers' shared set), the client socket goes
 * to the owner over a unix datagram socket (SCM_RIGHTS), which pairs it. */
int core_link(struct core *c, int worker, int fd)
{
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)KIND_LINK << KIND_SHIFT | (uint32_t)fd};
	if (worker < 0 || worker >= MAX_WORKERS)
		return -EINVAL;
	c->links[worker] = fd;
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	return epoll_ctl(c->epfd, EPOLL_CTL_ADD, fd, &ev) ? -errno : 0;
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
		c->st.handover_errors[owner < MAX_WORKERS && c->links[owner] >= 0 && errno < ERRNO_SLOTS ? errno : 0]++;
		reset_close(cfd);
		return;
	}
	c->st.handed_over++;
	close(cfd);		/* the owner has its own reference now */
}

static void link_ready(struct core *c, int fd)
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
				struct sockaddr_in peer;
				socklen_t len = sizeof(peer);
				memcpy(&cfd, CMSG_DATA(cm) + k * sizeof(int), sizeof(int));
				if (getpeername(cfd, (struct sockaddr *)&peer, &len) || peer.sin_family != AF_INET)
					reset_close(cfd);	/* the client went away on the way here */
				else
					serve_accepted(c, cfd, peer.sin_addr.s_addr, peer.sin_port);
			}
		}
	}
}

static void accepted(struct core *c, int cfd, struct sockaddr_in *peer)
{
	if (held_elsewhere(c, peer->sin_addr.s_addr, peer->sin_port))
		return hand_over(c, cfd, core_worker_of_port(ntohs(peer->sin_port), c->cfg.workers));
	serve_accepted(c, cfd, peer->sin_addr.s_addr, peer->sin_port);
}

/* Out of fds (EMFILE/ENFILE): a level-triggered listener would report the same waiting client at
 * once, forever (a spin at a full core). Every listener leaves the epoll set for ACCEPT_PAUSE (as
 * nginx disables accept events); its clients wait in the kernel's backlog meanwhile. */
static void accept_pause(struct core *c)
{
	if (c->accept_paused_until > 0)
		return;
	for (int j = 0; j < c->nlisteners; j++)
		epoll_ctl(c->epfd, EPOLL_CTL_DEL, c->listeners[j], NULL);
	c->accept_paused_until = c->now + ACCEPT_PAUSE;
	c->st.accept_pauses++;
}

static void accept_resume(struct core *c)
{
	for (int j = 0; j < c->nlisteners; j++) {
		struct epoll_event ev = {.events = EPOLLIN,
					 .data.u64 = (uint64_t)KIND_LISTEN << KIND_SHIFT | (uint32_t)c->listeners[j]};
		if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, c->listeners[j], &ev) && errno != EEXIST)
			c->st.errors[errno < ERRNO_SLOTS ? errno : 0]++;
	}
	c->accept_paused_until = 0;
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
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
				accept_pause(c);
			return;
		}
		if (peer.sin_family != AF_INET) {	/* this converter serves IPv4 clients */
			reset_close(fd);
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

static int busy_polling(struct core *c)
{
	return c->cfg.busy_poll_us > 0 && (c->now - c->last_event) * 1e6 < c->cfg.busy_poll_us;
}

/* Wait up to timeout_ms, handle what is the core's, return how many events are Python's (in out),
 * or -errno (EINTR: a signal, Python's handler runs now). Returns early once Python has events.
 * Before sleeping it makes the spare server sockets that are missing (only when nothing waits), and
 * with busy_poll_us it polls instead of sleeping for that long after the last event: on a VM a
 * sleeping core's wake-up costs more than the converter's work (README, Table 1). */
int core_run(struct core *c, int timeout_ms, struct core_event *out, int maxout)
{
	struct epoll_event evs[MAX_EVENTS];
	double deadline;
	int n, wait, room;

	c->now = monotonic();
	deadline = c->now + timeout_ms / 1000.0;
	c->out = out;
	c->maxout = maxout;
	c->nout = 0;
	for (;;) {
		int polling = timeout_ms && busy_polling(c);
		if (c->accept_paused_until > 0 && c->now >= c->accept_paused_until)
			accept_resume(c);
		wait = timeout_ms && (polling || spare_missing(c)) ? 0 : timeout_ms;
		if (c->accept_paused_until > 0 && wait > (int)((c->accept_paused_until - c->now) * 1000) + 1)
			wait = (int)((c->accept_paused_until - c->now) * 1000) + 1;
		room = c->maxout - c->nout < MAX_EVENTS ? c->maxout - c->nout : MAX_EVENTS;
		n = epoll_wait(c->epfd, evs, room, wait);
		if (n < 0)
			return c->nout ? c->nout : -errno;
		c->now = monotonic();
		if (n == 0 && wait != timeout_ms) {	/* nothing waits: make spares, poll on or sleep */
			if (c->now >= deadline)
				return c->nout;
			if (spare_missing(c))
				spare_refill(c);
			timeout_ms = (int)((deadline - c->now) * 1000) + 1;
			continue;
		}
		if (n) {
			c->last_event = c->now;
			c->st.busy_polls += polling;
		}
		for (int j = 0; j < n; j++) {
			uint64_t data = evs[j].data.u64;
			switch (data >> KIND_SHIFT) {
			case KIND_CONN:
				conn_ready(c, data, evs[j].events);
				break;
			case KIND_LISTEN:
				accept_all(c, (int)(uint32_t)data);
				break;
			case KIND_QUEUE:
				queue_ready(c);
				break;
			case KIND_PENDING:
				pending_ready(c, data, evs[j].events);
				break;
			case KIND_LINK:
				link_ready(c, (int)(uint32_t)data);
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
	for (int i = 0; i < c->npending_slots && c->nout < maxout; i++) {
		struct pending *p = &c->pending[i];
		if (p->state == PENDING_HELD && c->now - p->t_syn > c->cfg.connect_timeout) {
			c->st.held_connect_timeouts++;
			pending_end(c, i, CAUSE_SERVER_TIMEOUT, ETIMEDOUT, 0);
		} else if (p->state == PENDING_RELEASED && c->now - p->ready_at > c->cfg.handshake_timeout) {
			c->st.handshake_timeouts++;	/* the client never completed its handshake */
			pending_end(c, i, CAUSE_HANDSHAKE_TIMEOUT, 0, 0);
		}
	}
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
			k->end_err = ETIME;
			conn_close(c, i, 1, 0);
		} else if (k->client_synrecv) {
			if (client_ready(k))	/* (its EPOLLOUT edge should have said so already) */
				client_established(c, i);
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
	for (int i = 0; i < c->npending_slots; i++)
		if (c->pending[i].state)
			pending_end(c, i, CAUSE_SHUTTING_DOWN, 0, 0);
	for (int i = 0; i < c->nconns; i++) {
		struct conn *k = c->conns[i];
		if (k->used && !k->closed) {
			k->end_err = ESHUTDOWN;
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

int core_pending(struct core *c)
{
	return c->npending;
}

void core_keeper_release(struct core *c);

void core_free(struct core *c)
{
	if (!c)
		return;
	core_abort_all(c);
	core_keeper_release(c);
	for (int i = 0; i < c->nconns; i++)
		free(c->conns[i]);
	free(c->conns);
	free(c->dead);
	for (int j = 0; j < c->npool; j++) {
		close(c->pool[j][0]);
		close(c->pool[j][1]);
	}
	for (int kind = 0; kind < 2; kind++)
		while (c->nspare[kind] > 0)
			close(c->spare[kind][--c->nspare[kind]]);
	if (c->qh)
		nfq_destroy_queue(c->qh);
	if (c->nfq)
		nfq_close(c->nfq);
	free(c->qbuf);
	close(c->epfd);
	free(c->copy_buf);
	free(c->pending);
	free(c->gate);
	free(c->dests);
	free(c);
}

/* -- the keeper: a crash resets the connections instead of ending them cleanly ---------------------------
 * When a process dies the kernel closes its sockets gracefully: a client whose converter crashed mid-
 * download sees a shorter stream ending like a complete one. The keeper shares this process's file
 * table (clone CLONE_FILES, no shared memory), so the sockets outlive a crash; told by PDEATHSIG that
 * its parent died without releasing it, it resets every connected TCP/MPTCP socket in the table (RST,
 * MPTCP: on every subflow) and exits. A graceful stop releases it first (core_keeper_release).
 * It runs only this C code after clone: no interpreter, no allocation. */
static volatile sig_atomic_t keeper_signal;

static void keeper_on_signal(int sig)
{
	keeper_signal = sig;
}

static void keeper_reset_all(void)
{
	char buf[4096];
	int dir = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	long n;
	if (dir < 0)
		return;
	while ((n = syscall(SYS_getdents64, dir, buf, sizeof(buf))) > 0) {
		for (long off = 0; off < n;) {
			struct { uint64_t ino; int64_t off; unsigned short reclen; unsigned char type; char name[]; } *d =
				(void *)(buf + off);
			int fd = 0, v = 0;
			socklen_t len = sizeof(v);
			struct sockaddr_in peer;
			socklen_t plen = sizeof(peer);
			off += d->reclen;
			for (const char *p = d->name; *p >= '0' && *p <= '9'; p++)
				fd = fd * 10 + (*p - '0');
			if (d->name[0] < '0' || d->name[0] > '9' || fd == dir)
				continue;
			if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &len) || v != SOCK_STREAM)
				continue;
			len = sizeof(v);
			if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &v, &len) || v)
				continue;	/* a listener: its queue is reset when the keeper exits */
			if (getpeername(fd, (struct sockaddr *)&peer, &plen) || peer.sin_family != AF_INET)
				continue;
			reset_close(fd);
		}
	}
	close(dir);
}

#define KEEPER_NAME "mimbox-keeper"

/* 0 in the parent (the keeper's pid is kept), -errno; the child never returns */
int core_keeper(struct core *c)
{
	pid_t parent = getpid();
	sigset_t all, old;
	long pid;

	sigfillset(&all);
	sigprocmask(SIG_BLOCK, &all, &old);	/* no handler of the parent's runs in the child */
	pid = syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
	if (pid == 0) {
		struct sigaction sa = {.sa_handler = keeper_on_signal};
		sigset_t none;
		for (int sig = 1; sig < 32; sig++)
			if (sig != SIGKILL && sig != SIGSTOP)
				signal(sig, SIG_IGN);
		sigaction(SIGUSR1, &sa, NULL);		/* the parent died */
		sigaction(SIGTERM, &sa, NULL);		/* stand down: the parent stops gracefully */
		prctl(PR_SET_NAME, KEEPER_NAME);
		prctl(PR_SET_PDEATHSIG, SIGUSR1);
		sigemptyset(&none);
		if (getppid() != parent)
			keeper_signal = SIGUSR1;	/* died before PDEATHSIG was set */
		/* every signal is still blocked here: sigsuspend() unblocks and waits in one step, so a
		 * signal that came since the check above is not missed (pause() could wait forever) */
		while (!keeper_signal)
			sigsuspend(&none);
		if (keeper_signal == SIGUSR1)
			keeper_reset_all();
		syscall(SYS_exit_group, 0);
	}
	sigprocmask(SIG_SETMASK, &old, NULL);
	if (pid < 0)
		return -errno;
	c->keeper = pid;
	return 0;
}

void core_keeper_release(struct core *c)
{
	if (c->keeper > 0) {
		kill(c->keeper, SIGTERM);
		waitpid(c->keeper, NULL, 0);
		c->keeper = 0;
	}
}
