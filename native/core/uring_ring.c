// SPDX-License-Identifier: GPL-2.0
/* The io_uring engine's ring: made disabled, its provided buffers registered, restricted to the
 * operations engine_uring.c posts (a worker's seccomp filter cannot see inside a ring: the ring's own
 * restriction list is its filter), then enabled by the thread that runs the loop; and freed. */
#include "rooms.h"
#include "uring-t.h"
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* the ring may do what this file does, nothing else */
static int restrict_ring(struct io_uring *ring)
{
	static const uint8_t ops[] = {IORING_OP_RECV, IORING_OP_SEND, IORING_OP_POLL_ADD, IORING_OP_ASYNC_CANCEL,
				      IORING_OP_ACCEPT};
	struct io_uring_restriction res[8];
	unsigned n = 0;
	memset(res, 0, sizeof(res));
	for (unsigned j = 0; j < sizeof(ops); j++) {
		res[n].opcode = IORING_RESTRICTION_SQE_OP;
		res[n++].sqe_op = ops[j];
	}
	res[n].opcode = IORING_RESTRICTION_SQE_FLAGS_ALLOWED;
	res[n++].sqe_flags = IOSQE_BUFFER_SELECT;
	res[n].opcode = IORING_RESTRICTION_REGISTER_OP;
	res[n++].register_op = IORING_REGISTER_SYNC_CANCEL;
	/* (Debian's liburing 2.3 declares io_uring_register_restrictions and io_uring_enable_rings but
	 * does not export them: the system call itself) */
	return syscall(__NR_io_uring_register, ring->ring_fd, IORING_REGISTER_RESTRICTIONS, res, n) < 0 ? -errno : 0;
}

/* The ring starts disabled; the thread that runs the loop enables it, and only that thread may submit
 * (SINGLE_ISSUER, which DEFER_TASKRUN needs: completions are run when the loop asks, in batches). */
int ring_enable(struct uring *u)
{
	if (u->enabled)
		return 0;
	if (syscall(__NR_io_uring_register, u->ring.ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0) < 0)
		return -errno;
	u->enabled = 1;
	return 0;
}

int uring_init(struct core *c)
{
	struct io_uring_params p = {.flags = IORING_SETUP_R_DISABLED | IORING_SETUP_SINGLE_ISSUER |
					     IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG |
					     IORING_SETUP_CQSIZE, .cq_entries = CQ_ENTRIES};
	struct io_uring_buf_reg reg = {.bgid = 0};
	struct uring *u = calloc(1, sizeof(*u));
	int r;

	if (!u)
		return -ENOMEM;
	u->buf_size = c->cfg.pipe_size < BUF_MAX ? c->cfg.pipe_size : BUF_MAX;
	u->nbufs = c->cfg.uring_buffers > 0 ? (uint32_t)c->cfg.uring_buffers : BUFS_DEFAULT;
	if (u->nbufs & (u->nbufs - 1) || u->nbufs > 32768) {	/* (mimbox.config checks it first) */
		free(u);
		return -EINVAL;
	}
	reg.ring_entries = u->nbufs;
	u->bufs = mmap(NULL, (size_t)u->nbufs * u->buf_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	u->br = mmap(NULL, u->nbufs * sizeof(struct io_uring_buf), PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (u->bufs == MAP_FAILED || u->br == MAP_FAILED) {
		r = -ENOMEM;
		goto out;
	}
	r = io_uring_queue_init_params(RING_ENTRIES, &u->ring, &p);
	if (r < 0)
		goto out;
	reg.ring_addr = (unsigned long)u->br;
	io_uring_buf_ring_init(u->br);
	for (unsigned b = 0; b < u->nbufs; b++)
		io_uring_buf_ring_add(u->br, buf_addr(u, b), u->buf_size, b, io_uring_buf_ring_mask(u->nbufs), b);
	io_uring_buf_ring_advance(u->br, u->nbufs);
	if ((r = io_uring_register_buf_ring(&u->ring, &reg, 0)) < 0 || (r = restrict_ring(&u->ring)) < 0) {
		io_uring_queue_exit(&u->ring);
		goto out;
	}
	c->u = u;
	return 0;
out:
	if (u->bufs != MAP_FAILED && u->bufs)
		munmap(u->bufs, (size_t)u->nbufs * u->buf_size);
	if (u->br != MAP_FAILED && u->br)
		munmap(u->br, u->nbufs * sizeof(struct io_uring_buf));
	free(u);
	return r;
}

void uring_free(struct core *c)
{
	struct uring *u = c->u;
	if (!u)
		return;
	io_uring_queue_exit(&u->ring);
	munmap(u->bufs, (size_t)u->nbufs * u->buf_size);
	munmap(u->br, u->nbufs * sizeof(struct io_uring_buf));
	free(u);
	c->u = NULL;
}
