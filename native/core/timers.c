// SPDX-License-Identifier: GPL-2.0
/* What waited too long, found on a timer wheel: the cost of a sweep follows the timers due, not the
 * connections held (100,000 idle connections with a 300 s idle timeout: ~330 visits a second).
 *
 * What may time out: held SYNs whose server never answered, released SYNs whose client never completed
 * its handshake, server connects past connect_timeout, idle connections, convert answers waiting alone
 * for a first byte down, and TFO clients whose handshake completed without the EPOLLOUT edge that says
 * so. Each connection and held SYN has one place on the wheel (struct timer), in the list of the second
 * its next deadline falls in. Deadlines are read lazily: a byte that moves only sets k->last; when the
 * second comes, the entry is judged on what is true then (timed out: ended; else set again at its new
 * deadline). Once a second Python calls core_sweep (loop.c), which takes what is due (timer_due).
 * The wheel knows no deadline itself: conn.c (conn_timer) and synq.c (held_timer) compute them. */
#include "rooms.h"

static struct timer *timer_of(struct core *c, int id)
{
	return (id & 1) == TIMER_HELD ? &c->held[id >> 1].timer : &c->conns[id >> 1]->timer;
}

void wheel_init(struct core *c)
{
	for (int s = 0; s < WHEEL_SLOTS; s++)
		c->wheel.head[s] = -1;
	c->wheel.tick = (uint64_t)monotonic();
}

void timer_stop(struct core *c, int id)
{
	struct timer *t = timer_of(c, id);
	if (!t->on)
		return;
	if (t->prev >= 0)
		timer_of(c, t->prev)->next = t->next;
	else
		c->wheel.head[t->tick % WHEEL_SLOTS] = t->next;
	if (t->next >= 0)
		timer_of(c, t->next)->prev = t->prev;
	t->on = 0;
}

/* due at `when` (monotonic seconds; <= 0: never): in the list of the first second not before it */
void timer_set(struct core *c, int id, double when)
{
	struct timer *t = timer_of(c, id);
	uint64_t tick;
	timer_stop(c, id);
	if (when <= 0)
		return;
	tick = (uint64_t)when;
	if ((double)tick < when)
		tick++;				/* the first whole second not before it */
	if (tick <= c->wheel.tick)
		tick = c->wheel.tick + 1;
	if (tick > c->wheel.tick + WHEEL_SLOTS - 1)	/* (never the list being swept) */
		tick = c->wheel.tick + WHEEL_SLOTS - 1;	/* looked at then, and set again */
	t->tick = tick;
	t->prev = -1;
	t->next = c->wheel.head[tick % WHEEL_SLOTS];
	if (t->next >= 0)
		timer_of(c, t->next)->prev = id;
	c->wheel.head[tick % WHEEL_SLOTS] = id;
	t->on = 1;
}

/* The next entry due by second now_tick, taken off the wheel (counted: timer_visits), the wheel moved
 * on through the seconds that passed; -1: none is due. Its owner judges it and sets it again if it
 * still waits (conn_due, held_due: the loop's core_sweep calls them). */
int timer_due(struct core *c, uint64_t now_tick)
{
	struct wheel *w = &c->wheel;
	if (now_tick > w->tick + WHEEL_SLOTS)	/* (not swept for longer than the wheel: every list once) */
		w->tick = now_tick - WHEEL_SLOTS;
	for (;;) {
		int id = w->head[w->tick % WHEEL_SLOTS];	/* (the list of the second being swept) */
		if (id >= 0) {
			timer_stop(c, id);
			c->st.timer_visits++;
			return id;
		}
		if (w->tick >= now_tick)
			return -1;
		w->tick++;		/* (set again: into a later second than this one) */
	}
}
