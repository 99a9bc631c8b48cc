// SPDX-License-Identifier: GPL-2.0
/* The io_uring engine's own types (engine_uring.c moves bytes on the ring, uring_ring.c makes it). */
#pragma once
#include <liburing.h>
#include <stdint.h>

#define RING_ENTRIES 4096
#define CQ_ENTRIES 65536
#define BUFS_DEFAULT 1024	/* provided buffers (config uring_buffers: a power of two) */
#define BUF_MAX (64 << 10)	/* each at most this (config pipe_size below) */

/* What a completion is (user_data bits 60-63); the rest: is_up (bit 59), slot (32-58), generation. */
enum uring_op {
	U_EPOLL = 1,		/* the epoll set has events: epoll_wait(0) reads them */
	U_RECV,			/* a direction's recv into a provided buffer */
	U_SEND,			/* a direction's send of what its recv got (from the provided buffer) */
	U_SEND_OWN,		/* a direction's send from its own buffer (prefix or leftover in front) */
	U_CONNECT,		/* the server socket's POLLOUT: its connect() finished */
	U_CLIENT_OUT,		/* a client accepted at its TFO SYN: POLLOUT, its handshake may be complete */
	U_ACCEPT,		/* a listener's multishot accept (slot: the listener's fd): a client, or why not */
	U_RECV_OWN,		/* the pool was empty: the source's POLLIN, then a recv() into the own buffer */
};

struct uring {
	struct io_uring ring;
	struct io_uring_buf_ring *br;
	char *bufs;
	uint32_t buf_size, nbufs;
	int enabled, epoll_armed, epoll_ready;
	int done;		/* completions handled in this wait */
};

static inline char *buf_addr(struct uring *u, unsigned bid)
{
	return u->bufs + (size_t)bid * u->buf_size;
}

/* uring_ring.c */
struct core;
int ring_enable(struct uring *u);
int uring_init(struct core *c);
void uring_free(struct core *c);
