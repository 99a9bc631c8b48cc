// SPDX-License-Identifier: GPL-2.0
/* The loop: the top room. core_run() waits on the engine (c->eng: epoll alone, or a ring with the epoll
 * set on it) and hands each epoll event to its room by the kind of fd (enum fd_kind); core_sweep()
 * hands each timer due to its owner. Python's fds and what the core cannot decide alone go back to
 * Python as events (events.c). Busy polling and the spare server sockets live here because they are
 * about when the loop sleeps. */
#include "rooms.h"
#include <sys/epoll.h>

int core_watch(struct core *c, int fd, uint32_t events, int listener)
{
	struct epoll_event ev = {.events = events, .data.u64 = (uint64_t)FD_PYTHON << FD_SHIFT | (uint32_t)fd};
	if (listener) {
		if (c->nlisteners == MAX_LISTENERS)
			return -ENOSPC;
		c->listeners[c->nlisteners++] = fd;
		return c->eng->listen(c, fd);
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
		if (c->listeners[j] == fd) {
			c->listeners[j] = c->listeners[--c->nlisteners];
			return c->eng->unlisten(c, fd);
		}
	return epoll_ctl(c->epfd, EPOLL_CTL_DEL, fd, NULL) == 0 ? 0 : -errno;
}

static int busy_polling(struct core *c)
{
	return c->cfg.busy_poll_us > 0 && (c->now - c->last_event) * 1e6 < c->cfg.busy_poll_us;
}

static void dispatch(struct core *c, const struct epoll_event *ev)
{
	uint64_t data = ev->data.u64;
	struct core_event *e;
	switch ((enum fd_kind)(data >> FD_SHIFT)) {
	case FD_CONN:
		return conn_ready(c, data, ev->events);
	case FD_LISTENER:
		return accept_all(c, (int)(uint32_t)data);
	case FD_QUEUE:
		return queue_ready(c);
	case FD_HELD:
		return held_ready(c, data, ev->events);
	case FD_LINK:
		return link_ready(c, (int)(uint32_t)data);
	case FD_PYTHON:
		break;
	}
	e = emit(c, EV_FD);
	if (e) {
		e->fd = (int)(uint32_t)data;
		e->events = ev->events;
	}
}

/* Wait up to timeout_ms, handle what is the core's, return how many events are Python's (in out),
 * or -errno (EINTR: a signal, Python's handler runs now). Returns early once Python has events.
 * Before sleeping it makes the spare server sockets that are missing (only when nothing waits), and
 * with busy_poll_us it polls instead of sleeping for that long after the last event: on a VM a
 * sleeping core's wake-up costs more than the converter's work (docs/findings.md, Table 1). */
int core_run(struct core *c, int timeout_ms, struct core_event *out, int maxout)
{
	struct epoll_event evs[MAX_EVENTS];
	double deadline;
	int n, wait, room, work;

	c->now = monotonic();
	deadline = c->now + timeout_ms / 1000.0;
	batch_begin(c, out, maxout);
	for (;;) {
		int polling = timeout_ms && busy_polling(c);
		if (c->accept_paused_until > 0 && c->now >= c->accept_paused_until)
			accept_resume(c);
		wait = timeout_ms && (polling || spare_missing(c)) ? 0 : timeout_ms;
		if (c->accept_paused_until > 0 && wait > (int)((c->accept_paused_until - c->now) * 1000) + 1)
			wait = (int)((c->accept_paused_until - c->now) * 1000) + 1;
		room = c->maxout - c->nout < MAX_EVENTS ? c->maxout - c->nout : MAX_EVENTS;
		n = c->eng->wait(c, evs, room, wait, &work);
		if (n < 0) {
			n = c->nout ? c->nout : -errno;
			batch_end(c);
			return n;
		}
		c->now = monotonic();
		if (work == 0 && wait != timeout_ms) {	/* nothing waits: make spares, poll on or sleep */
			if (c->now >= deadline)
				break;
			if (spare_missing(c))
				spare_refill(c);
			timeout_ms = (int)((deadline - c->now) * 1000) + 1;
			continue;
		}
		if (work) {
			c->last_event = c->now;
			c->st.busy_polls += polling;
			c->st.wakeups++;
		}
		for (int j = 0; j < n; j++)
			dispatch(c, &evs[j]);
		conns_free_ended(c);
		if (c->nout || work == 0 || c->now >= deadline || c->maxout - c->nout < 8)
			break;
		timeout_ms = (int)((deadline - c->now) * 1000) + 1;
	}
	return batch_end(c);
}

/* Once a second (Python): what waited too long, from the timer wheel (timers.c); each entry judged by
 * its owner (conn_due, held_due). Returns how many events are Python's (in out). */
int core_sweep(struct core *c, struct core_event *out, int maxout)
{
	int id;
	batch_begin(c, out, maxout);
	c->now = monotonic();
	while ((id = timer_due(c, (uint64_t)c->now)) >= 0) {
		if (c->nout + 2 > c->maxout)	/* (an end emits an event or two): it waits a second */
			timer_set(c, id, c->now + 1);
		else if ((id & 1) == TIMER_HELD)
			held_due(c, id >> 1);
		else
			conn_due(c, id >> 1);
	}
	conns_free_ended(c);
	return batch_end(c);
}
