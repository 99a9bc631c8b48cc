// SPDX-License-Identifier: GPL-2.0
/* The core's exports: what mimbox/converter/core.py binds with ctypes (mimbox/converter/layouts.py SIGNATURES) (and the fuzz harness calls). Everything
 * else is built with -fvisibility=hidden. Ports are in network order unless noted; an address is 16
 * bytes, IPv6 or an IPv4 address as ::ffff:a.b.c.d (addr.h), a prefix its length over those 16 bytes.
 *
 * Where to look:  a SYN is held ........ synq.c      its options are parsed ... synopt.c
 *                 who may go where ..... admit.c     where a client goes ...... dest.c
 *                 accept, hand-over .... accept.c    server sockets ........... connect.c
 *                 bytes move ........... engine_epoll.c (copy, splice), engine_uring.c (uring; its ring: uring_ring.c)
 *                 a direction holds .... dir.c       a connection ends ........ conn.c (conn_end)
 *                 the loop ............. loop.c      the timer wheel .......... timers.c
 *                 events for Python .... events.c    counters, ABI ............ stats.c
 *                 set-up, reload, free . setup.c     a crash resets ........... keeper.c
 *                 this host's own ...... own.c       both families ............ addr.h
 * The rooms' own calls, floor by floor: rooms.h. Types and states: core-t.h.
 */
#pragma once
#include <stdint.h>
#include "core-t.h"

#define CORE_API __attribute__((visibility("default")))

/* setup.c */
CORE_API struct core *core_new(const struct core_config *cfg);
CORE_API int core_reconfigure(struct core *c, const struct core_config *n);	/* SIGHUP: RELOADABLE fields; 0 or -ENOMEM */
CORE_API void core_free(struct core *c);					/* aborts what is relayed */

CORE_API int core_abort_all(struct core *c);					/* the converter stops */

/* loop.c */
CORE_API int core_watch(struct core *c, int fd, uint32_t events, int listener);	/* 0 or -errno */
CORE_API int core_unwatch(struct core *c, int fd);
CORE_API int core_run(struct core *c, int timeout_ms, struct core_event *out, int maxout);
CORE_API int core_sweep(struct core *c, struct core_event *out, int maxout);	/* once a second */

/* admit.c: policy, the SYN gate, the shared connection limit */
CORE_API int core_policy(struct core *c, int kind, const uint8_t *net, int len);
CORE_API int core_rule(struct core *c, int allow, const uint8_t *net, int len, int lo, int hi);	/* ports host order */
CORE_API int core_refusal(struct core *c, const uint8_t *caddr, const uint8_t *daddr, uint16_t dport, int *detail);
CORE_API int core_gate(struct core *c, const uint8_t *caddr);
CORE_API void core_gate_hold(struct core *c, const uint8_t *caddr, int on);
CORE_API int core_admit(int64_t *counter, int64_t limit);
CORE_API void core_unadmit(int64_t *counter);

/* own.c: this host's own destinations, from the kernel's local table */
CORE_API int core_own_refresh(struct core *c, int nlfd);
CORE_API int core_own_count(struct core *c, int which);

/* synq.c, synopt.c */
CORE_API int core_queue(struct core *c, int num);
CORE_API int core_pending(struct core *c);
CORE_API int core_parse_syn(const uint8_t *p, int len, struct syn_info *s);

/* accept.c */
CORE_API int core_link(struct core *c, int worker, int fd);
CORE_API int core_worker_of_port(int sport, int workers);		/* host order */
CORE_API void core_greeting_end(struct core *c, const uint8_t *caddr, int keep_admission);
CORE_API int core_greetings(struct core *c);
CORE_API int core_greeting_admit(struct core *c, const uint8_t *caddr, uint16_t cport, int count, int *detail);
CORE_API int core_convert_connect(struct core *c, int cfd, const uint8_t *caddr, uint16_t cport, const uint8_t *daddr,
				  uint16_t dport, double t, const char *reply, uint32_t reply_len, const char *early,
				  uint32_t early_len, int *detail, int *err);

/* connect.c */
CORE_API int core_cause_of_errno(int err);		/* a failed server connect's CAUSE_* */

/* conn.c */
CORE_API int core_add(struct core *c, int cfd, int sfd, int connecting, int tried_mptcp, int server_mptcp,
		      const uint8_t *caddr, uint16_t cport, const uint8_t *daddr, uint16_t dport, double t_syn,
		      const char *prefix, uint32_t prefix_len, const char *early, uint32_t early_len);
CORE_API int core_list(struct core *c, struct core_conn_info *out, int max);
CORE_API int core_active(struct core *c);

/* stats.c */
CORE_API const struct core_stats *core_stats(struct core *c);
CORE_API int core_abi(int which);
CORE_API int core_abi_offset(int which, int k);
CORE_API const char *core_abi_field(int which, int k);

/* keeper.c */
CORE_API int core_keeper(struct core *c);
CORE_API void core_keeper_release(struct core *c);
