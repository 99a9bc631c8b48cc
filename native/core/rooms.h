// SPDX-License-Identifier: GPL-2.0
/* What the rooms call of each other (hidden from the library's users; see core.h for the map). */
#pragma once
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include "core.h"

struct nfgenmsg;
struct nfq_data;
struct sockaddr_storage;

#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif
#define TCP_IS_MPTCP 43
#define WATCH_CONN (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)	/* a connection's sockets, and a held SYN's */
#define DRAINED (EPOLLRDHUP | EPOLLERR | EPOLLHUP)		/* read until EAGAIN: no new edge will come */

static inline double monotonic(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline uint64_t hash64(uint64_t k)
{
	return (k * 0x9E3779B97F4A7C15ull) >> 32;
}

/* a flow from the 16-byte addresses and ports Python or a packet gives */
static inline struct flow flow_load(const uint8_t *caddr, uint16_t cport, const uint8_t *daddr, uint16_t dport)
{
	return (struct flow){addr_load(caddr), addr_load(daddr), cport, dport};
}

/* a flow into an event for Python (addresses as 16 bytes, addr.h) */
static inline void event_flow(struct core_event *e, const struct flow *f)
{
	memcpy(e->caddr, &f->caddr, 16);
	memcpy(e->daddr, &f->daddr, 16);
	e->cport = f->cport;
	e->dport = f->dport;
}

static inline int errno_slot(int err)
{
	return err > 0 && err < ERRNO_SLOTS ? err : 0;
}

/* Each room's functions, from the bottom floor up: a room calls the rooms of its own section and the
 * ones listed above it, never one below it (the engines report up through struct engine_hooks, and
 * the loop reaches them through struct engine: core-t.h). */

/* -- floor 1: what goes back to Python, counters, tables of their own --------------------------------- */
/* events.c */
void batch_begin(struct core *c, struct core_event *out, int maxout);
int batch_end(struct core *c);
struct core_event *emit(struct core *c, int kind);	/* NULL: no room (or not inside core_run/sweep) */

/* stats.c */
void count_connect_time(struct core *c, double us);
void count_duration(struct core *c, double s);

/* own.c */
int own_add(struct own_table *t, const struct in6_addr *a, int len);
int own_has(const struct own_table *t, const struct in6_addr *a);
void own_forget(struct own_table *t);
void own_free(struct own_table *t);

/* timers.c: the wheel (its owners compute the deadlines: conn_timer, held_timer) */
void wheel_init(struct core *c);
void timer_set(struct core *c, int id, double when);
void timer_stop(struct core *c, int id);
int timer_due(struct core *c, uint64_t now_tick);

/* -- floor 2: who may go where, server sockets, where a client goes ----------------------------------- */
/* admit.c */
enum admission admit(struct core *c, unsigned checks, const struct flow *f, struct refusal *why);
void policy_free(struct core *c);
void admission_return(struct core *c);
int gate_size(struct core *c, int pending_limit);
int gate_open(struct core *c, const struct in6_addr *caddr);
void gate_hold(struct core *c, const struct in6_addr *caddr);
void gate_release(struct core *c, const struct in6_addr *caddr);
int syn_gate(struct core *c, const struct in6_addr *caddr);
void refused(struct core *c, const struct refusal *why, int after_accept, const struct flow *f);

/* connect.c */
int connect_result(int fd, uint32_t ev);
void synack_options(struct core *c, int sfd, const struct in6_addr *daddr, uint16_t dport, char **prefix,
		    uint32_t *prefix_len);
int server_answered(struct core *c, int sfd, double t_syn, int tried_mptcp, int server_mptcp,
		    const struct in6_addr *daddr, uint16_t dport);
int open_server(struct core *c, const struct in6_addr *daddr, uint16_t dport, int *tried_mptcp);
int spare_missing(struct core *c);
void spare_refill(struct core *c);
int cause_of_errno(int err);
int sock_is_mptcp(int fd);
int tcp_state(int fd);
void reset_close(int fd);

/* dest.c */
int dest_remember(struct core *c, uint64_t key, const struct flow *f);
int destination_of(struct core *c, int cfd, struct flow *f, struct refusal *why);

/* -- floor 3: what a direction holds ------------------------------------------------------------------- */
/* dir.c */
void dir_init(struct dir *d, int src, int dst);
void pipe_give(struct core *c, struct dir *d);
int pipe_take(struct core *c, struct dir *d);
void dir_release(struct core *c, struct dir *d);
int dir_own_append(struct dir *d, const char *p, uint32_t n);
void dir_own_sent(struct dir *d, uint32_t n);
int dir_own_flush(struct dir *d);
int dir_write_prefixed(struct dir *d, const char *data, uint32_t n);
int dir_flush_prefix(struct dir *d);
int client_ready(struct conn *k);

/* -- floor 4: the engines, where bytes move (struct engine; each reports up through c->hooks) ---------- */
extern const struct engine engine_epoll;	/* engine_epoll.c */
extern const struct engine engine_uring;	/* engine_uring.c */

/* -- floor 5: connections, held SYNs ------------------------------------------------------------------- */
/* conn.c */
int conn_add(struct core *c, int cfd, int sfd, int connecting, int tried_mptcp, int server_mptcp,
	     const struct flow *f, double t_syn, const char *prefix, uint32_t prefix_len, const char *early,
	     uint32_t early_len);
void conn_ready(struct core *c, uint64_t data, uint32_t ev);
void server_ready(struct core *c, int i, uint32_t ev);
void conn_end(struct core *c, int i, enum conn_end_how how, int err);
void conns_free_ended(struct core *c);
void conn_timer(struct core *c, int i);
void conn_due(struct core *c, int i);

/* synq.c */
int held_find(struct core *c, uint64_t key, const struct in6_addr *caddr, uint16_t cport);
void held_end(struct core *c, int i, enum held_end_how how, const struct refusal *why);
void held_ready(struct core *c, uint64_t data, uint32_t ev);
void held_timer(struct core *c, int i);
void held_due(struct core *c, int i);
void queue_ready(struct core *c);
int queue_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa, void *data);

/* -- floor 6: accept ----------------------------------------------------------------------------------- */
/* accept.c */
void accept_all(struct core *c, int lfd);
void accept_resume(struct core *c);
void accept_failed(struct core *c, int err);
void accept_one(struct core *c, int fd, const struct sockaddr_storage *peer);
void link_ready(struct core *c, int fd);

/* -- floor 7: the loop (loop.c) and set-up (setup.c): core.h's exports only ---------------------------- */
