// SPDX-License-Identifier: GPL-2.0
/* The core's own types: a worker's core, its connections and the SYNs it holds, with their states.
 * The layouts shared with Python (struct core_config, core_event, core_stats, core_conn_info,
 * syn_info) and the codes (CAUSE_*, EV_*, SYN_*, ...) are generated from mimbox/converter/layouts.py and codes.py into
 * relaycore.h; nothing here crosses to Python. */
#pragma once
#include <stdint.h>
#include <sys/types.h>
#include "relaycore.h"		/* generated: shared layouts and codes */
#include "addr.h"		/* addresses of both families */

#define MAX_RULES 256		/* destination rules: more refuse to start (mimbox.converter.core.Core.policy) */
#define MAX_LISTENERS 64
#define MAX_EVENTS 256		/* epoll events per wait */
#define DESTINATIONS (1 << 16)	/* explicit mode: DST_OPTs of SYNs the kernel answered */
#define MEMO_SLOTS 4096		/* servers seen without MPTCP */
#define HELD_FILTER (1 << 16)	/* slots of the fast filter of clients with a held entry */
#define DIR_QUEUE 4		/* uring: buffers a direction may hold (read, not yet sent) */
#define ACCEPT_PAUSE 0.1	/* seconds a listener rests after accept() ran out of fds (EMFILE/ENFILE) */

/* What an fd in the epoll set is: the top bits of its event's data (FD_SHIFT); the low bits say which. */
enum fd_kind {
	FD_PYTHON = 0,		/* Python's (stats socket, greetings, health probes): reported as EV_FD */
	FD_LISTENER = 1,	/* a listener (low bits: the fd): accept_all() */
	FD_CONN = 2,		/* a relayed connection's socket (slot << 1 | is_client): conn_ready() */
	FD_QUEUE = 3,		/* the NFQUEUE socket: queue_ready() */
	FD_HELD = 4,		/* a held SYN's server socket (generation << GEN_SHIFT | slot): held_ready() */
	FD_LINK = 5,		/* a unix socket from another worker (the fd): clients handed over, link_ready() */
};
#define FD_SHIFT 60
#define GEN_SHIFT 32
#define GEN_MASK 0xFFFFFFF

/* A relayed connection's life; it ends in conn_end() (conn.c), nowhere else. */
enum conn_state {
	CONN_FREE = 0,		/* the slot is on the free list */
	CONN_CONNECTING,	/* client accepted, server connect() in progress: the client's events are kept */
	CONN_RELAYING,		/* both sides connected: bytes move, each direction in its own dir_state */
	CONN_ENDED,		/* both sockets closed by conn_end(); the slot is freed when the batch ends */
};

/* One direction of a connection (client -> server is "up"). */
enum dir_state {
	DIR_OPEN = 0,		/* bytes flow from src to dst */
	DIR_EOF,		/* src sent its FIN and everything before it was read; buffered bytes still go */
	DIR_DONE,		/* all out, and dst got shutdown(SHUT_WR): the FIN is passed on */
};

/* A client SYN the core holds (synq.c): the paper's order, server first. */
enum held_state {
	HELD_FREE = 0,		/* the slot is on the free list */
	HELD_WAITING,		/* the SYN waits in NFQUEUE while the server connect() is in progress */
	HELD_RELEASED,		/* the server answered; the SYN went on to the kernel, which completes the
				 * client's handshake: the entry waits for accept() to pair the two sockets */
};

/* How a connection ends (conn_end). */
enum conn_end_how {
	END_FINISHED,		/* both directions done: close(), each side got the other's FIN */
	END_RESET,		/* an error (errno) on either side: both reset, EV_ABORTED */
	END_IDLE,		/* nothing moved for idle_timeout: both reset, EV_ABORTED (ETIME) */
	END_CONNECT_FAILED,	/* the server connection failed (errno): a refusal; the client is reset, or in
				 * convert mode handed back to Python for its Error TLV (EV_GIVEBACK) */
	END_SHUTDOWN,		/* the converter stops (core_abort_all): both reset */
};

/* What admit() came to (admit.c). */
enum admission {
	ADMITTED = 0,		/* every check asked for passed (ADMIT_LIMIT: a place is taken) */
	REFUSED,		/* one did not: its struct refusal says which and why */
};

/* How a held SYN's entry ends (held_end, synq.c). */
enum held_end_how {
	HELD_PAIRED,		/* accept() paired it with its client: its server socket and admission
				 * now belong to the connection */
	HELD_DROPPED,		/* it ends alone: a SYN still waiting is refused (its struct refusal says
				 * why), the server socket is closed, the admission given back */
};

/* What admit() checks (admit.c), in this order; a set of them per path. */
enum admit_check {
	ADMIT_CLIENT = 1 << 0,		/* the client is in an allowed prefix */
	ADMIT_DESTINATION = 1 << 1,	/* the destination rules allow client -> destination */
	ADMIT_GATE = 1 << 2,		/* under the held caps: pending_limit in all, pending_per_prefix per /24 or /64 */
	ADMIT_FDS = 1 << 3,		/* inside this worker's fd capacity */
	ADMIT_LIMIT = 1 << 4,		/* no memory pressure, and a place under the workers' shared connection limit:
					 * taken if admitted */
};

/* A client and where it goes, network order (daddr :: or 0.0.0.0: not known yet); addr.h says how
 * both families are held. */
struct flow {
	struct in6_addr caddr, daddr;
	uint16_t cport, dport;
};

/* Why something was refused: a CAUSE_*, its detail (SYN_* for a bad option, DENIED_* or the rule for a
 * denied destination) and argument (the cap that was reached), the errno of a failed server connect. */
struct refusal {
	int cause, detail, arg, err;
};

struct dir {
	enum dir_state state;
	int src, dst, pipe_r, pipe_w;	/* pipe: splice engine, -1: none held */
	char *buf;			/* what a short write left (malloc'd), from off */
	uint32_t off, buffered;		/* buffered: bytes in buf, or in the pipe (splice) */
	uint64_t bytes;
	char *prefix;			/* convert mode: the answer, written in front of the first bytes */
	uint32_t prefix_len, prefix_in_buf;
	/* the uring engine (engine_uring.c): at most one recv and one send in flight */
	uint8_t recving;		/* a recv is in flight (or waits for a free buffer) */
	uint8_t sending;		/* 0, or the U_SEND* in flight */
	uint8_t qhead, qn;		/* provided buffers read, not yet all sent (a ring of DIR_QUEUE) */
	uint16_t qbid[DIR_QUEUE];
	uint32_t qlen[DIR_QUEUE];
	uint32_t qoff;			/* bytes of the head already sent */
};

/* A place on the timer wheel (timers.c): a connection or a held SYN that may time out sits in the list of
 * the second its next deadline falls in; prev/next are timer ids (TIMER_CONN/TIMER_HELD | slot << 1). */
struct timer {
	int32_t prev, next;		/* -1: none */
	uint64_t tick;			/* the second it is due in */
	uint8_t on;			/* on the wheel */
};
#define WHEEL_SLOTS 512		/* seconds ahead; a later deadline waits in the furthest one, then is set again */
struct wheel {
	int32_t head[WHEEL_SLOTS];	/* -1: empty */
	uint64_t tick;			/* the last second swept */
};
enum timer_kind {
	TIMER_CONN = 0,			/* c->conns[id >> 1] */
	TIMER_HELD = 1,			/* c->held[id >> 1] */
};

struct conn {
	enum conn_state state;
	struct timer timer;
	uint8_t tried_mptcp, client_mptcp, server_mptcp;
	uint8_t client_synrecv;		/* an MPTCP client accepted at its TFO SYN, its handshake not yet
					 * complete: nothing is written to it until it is (dir.c client_ready) */
	uint8_t client_out;		/* epoll: the client's socket is watched for EPOLLOUT (engine_epoll.c) */
	int cfd, sfd;
	struct dir up, down;
	struct flow f;
	double t_syn, t_accept, last;
	char *early;			/* convert mode: client bytes after its message, for the server */
	uint32_t early_len;
	uint32_t client_ev;		/* the client's epoll events while the server connection was made */
	uint32_t down_ev;		/* the server's events while the client's handshake completes */
	int32_t end_err;		/* why it ended: 0 both sides finished, else an errno (ETIME: idle) */
	int next_free;
	uint32_t gen;			/* uring: this tenant of the slot (0: none); a completion carries it */
	uint8_t polling;		/* uring: polls in flight on its sockets (server connect, TFO client) */
};

struct held {				/* a held SYN and its server connection */
	enum held_state state;
	struct timer timer;
	uint8_t tried_mptcp, server_mptcp;
	uint32_t gen;			/* bumped at each use of the slot: a stale event does not match */
	uint32_t id;			/* its NFQUEUE packet id */
	struct flow f;
	uint64_t key;			/* client_key(caddr, cport) */
	int sfd, next_free;
	double t_syn, ready_at;
};

struct memo { struct in6_addr addr; uint16_t port; double until; };	/* port 0: empty */
struct destination { uint64_t key; struct flow f; double t; };	/* key 0: empty; f: the client and where */
struct rule { struct prefix p; uint16_t lo, hi; int32_t allow; };	/* ports host order; first match decides */
struct gate_count { uint64_t prefix; int32_t n; };	/* gate_prefix() + 1 (0: never used) */

/* This host's own destinations, as the kernel's local routing table lists them (RTN_LOCAL: every
 * address, and AnyIP's `ip route add local ...`): one set of masked addresses per prefix length in
 * use, so a lookup costs one probe per length (usually one or two), whatever the count; grown as
 * needed, never truncated (own.c). */
struct own_set {
	struct in6_addr *slots;		/* open addressing, :: empty, at most half full */
	int nslots, n;
	uint8_t has_zero;		/* :: itself is in the set (a prefix of zeros) */
};
struct own_table {
	struct own_set by_len[129];	/* [length over 16 bytes]: the masked addresses of that length */
	uint8_t lens[129];		/* the lengths in use, in the order first seen */
	int nlens;
	int naddrs, nnets;		/* routes of one address (128), and shorter ones */
	int complete;			/* 0: being listed anew, or a listing failed: every destination refused */
};

struct nfq_handle;
struct nfq_q_handle;
struct uring;
struct core;
struct epoll_event;
struct sockaddr_storage;

/* The engine: where bytes move and where the loop waits (HAProxy's poller and transport operations in
 * one table). One is chosen by config engine in core_new(), once; the rooms call it through c->eng and
 * never ask which it is.
 *   engine_epoll (engine_epoll.c)  copy, splice, auto: a connection's sockets in the epoll set
 *   engine_uring (engine_uring.c)  uring: a ring; the epoll set is one poll on it */
struct engine {
	const char *name;
	int (*init)(struct core *c);		/* its own state (core_new); 0 or -errno */
	void (*free)(struct core *c);
	/* the loop's wait, up to wait_ms (0: none): the epoll set's events into evs (at most room), their
	 * count returned (-1 with errno: EINTR a signal); *work: events and completions handled */
	int (*wait)(struct core *c, struct epoll_event *evs, int room, int wait_ms, int *work);
	int (*listen)(struct core *c, int lfd);		/* a listener takes clients (again): 0 or -errno */
	int (*unlisten)(struct core *c, int lfd);	/* ... leaves, or rests (accept_pause) */
	int (*conn_watch)(struct core *c, int i);	/* conn_add: its sockets watched; 0 or -errno (nothing kept) */
	void (*conn_start)(struct core *c, int i);	/* conn_add, counted: connecting, or bytes may move */
	void (*conn_event)(struct core *c, int i, int is_client, uint32_t ev);	/* an epoll event, CONN_RELAYING */
	void (*server_connected)(struct core *c, int i, uint32_t ev);	/* server_ready: it answered */
	void (*client_established)(struct core *c, int i);	/* a TFO client's handshake is complete */
	void (*conn_stop)(struct core *c, struct conn *k, int keep_client);	/* conn_end, before the closes */
};

/* What an engine reports up (HAProxy's fd I/O callback): the rooms above it, set once in core_new(), so
 * no engine names a room above its own. */
struct engine_hooks {
	void (*conn_end)(struct core *c, int i, enum conn_end_how how, int err);	/* conn.c */
	void (*server_ready)(struct core *c, int i, uint32_t ev);			/* conn.c */
	void (*accepted)(struct core *c, int fd, const struct sockaddr_storage *peer);	/* accept.c */
	void (*accept_failed)(struct core *c, int err);				/* accept.c */
};

/* One worker's core: its epoll set and everything it serves. */
struct core {
	struct core_config cfg;
	struct core_stats st;
	int epfd;
	double now;				/* read when the batch began */
	double last_event;			/* busy polling: when the loop last had work */
	struct core_event *out;			/* Python's events of this batch (emit) */
	int nout, maxout;
	/* connections (conn.c) */
	struct conn **conns;
	int nconns, cap, free_head, active;
	int *dead;				/* ended during this batch: freed when it ends */
	int ndead, dead_cap;
	/* bytes (the engine; dir.c) */
	const struct engine *eng;
	const struct engine_hooks *hooks;
	char *copy_buf;
	int pool[PIPE_POOL][2];
	int npool;
	/* held SYNs (synq.c) */
	struct nfq_handle *nfq;
	struct nfq_q_handle *qh;
	int qfd;
	char *qbuf;
	struct held *held;
	int nheld_slots, held_free, nheld;
	uint32_t held_gen;
	uint64_t held_filter[HELD_FILTER];	/* clients with a held entry (a fast filter) */
	/* admission (admit.c) */
	struct gate_count *gate;		/* held SYNs and greetings per client /24 or /64 (open addressing) */
	struct gate_count *gate_addr;		/* ... and per client address (as many slots) */
	int gate_slots, gated;			/* gated: held SYNs and greetings in all */
	struct prefix *allow;			/* allowed client prefixes (grown as needed) */
	int nallow, allow_cap;
	struct rule rules[MAX_RULES];		/* destinations, in order (mimbox.converter.safety.Policy) */
	int nrules;
	struct own_table own;			/* never a destination (own.c; refreshed on netlink news) */
	uint32_t own_seq;			/* own.c: the sequence number of its last dump request */
	/* destinations (dest.c) */
	struct destination *dests;
	/* accept (accept.c) */
	int listeners[MAX_LISTENERS], nlisteners;
	double accept_paused_until;		/* EMFILE/ENFILE: listeners out of the epoll set until then */
	int greetings;				/* convert mode: accepted clients whose message Python awaits */
	int links[MAX_WORKERS];			/* worker -> a unix datagram socket to it, -1: none */
	/* server sockets (connect.c) */
	struct memo tcp_only[MEMO_SLOTS];	/* servers that answered without MPTCP, until */
	int spare[2][2][SPARE_MAX];		/* made-ahead server sockets: [family: 0 IPv4, 1 IPv6][0 TCP, 1 MPTCP] */
	int nspare[2][2], spare_wanted[2][2];	/* a kind is made ahead once it was needed */
	double spare_retry_at;			/* making spares failed: not before then */
	unsigned next_source;			/* connect.c: the next of cfg.source_addrs to use */
	/* timers.c */
	struct wheel wheel;
	/* keeper.c */
	pid_t keeper;
	/* engine_uring.c's state (NULL: the epoll engine) */
	struct uring *u;
	uint32_t conn_gen;
};
