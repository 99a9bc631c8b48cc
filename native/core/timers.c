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
 * deadline). Once a second Python calls core_sweep, which walks the seconds that passed since. */
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

static double earliest(double a, double b)
{
	return a <= 0 ? b : b <= 0 ? a : a < b ? a : b;
}

/* connection i's next deadline (0: none), from its state now */
static double conn_deadline(struct core *c, struct conn *k)
{
	double when = 0;
	if (k->state == CONN_CONNECTING)
		return k->t_accept + c->cfg.connect_timeout;
	if (k->state != CONN_RELAYING)
		return 0;
	if (c->cfg.idle_timeout > 0)
		when = k->last + c->cfg.idle_timeout;
	if (k->client_synrecv)
		when = earliest(when, c->now + 1);	/* looked at each second until its handshake is seen */
	else if (k->down.prefix && !k->up.bytes)
		when = earliest(when, k->last + c->cfg.prefix_wait);
	return when;
}

/* (re)place connection i on the wheel at its next deadline */
void conn_timer(struct core *c, int i)
{
	timer_set(c, i << 1 | TIMER_CONN, conn_deadline(c, c->conns[i]));
}

void held_timer(struct core *c, int i)
{
	struct held *h = &c->held[i];
	double when = h->state == HELD_WAITING ? h->t_syn + c->cfg.connect_timeout :
		      h->state == HELD_RELEASED ? h->ready_at + c->cfg.handshake_timeout : 0;
	timer_set(c, i << 1 | TIMER_HELD, when);
}

/* the timeouts changed (a reload): every entry placed again by the new ones (once, not per second) */
void timers_rearm_all(struct core *c)
{
	for (int i = 0; i < c->nheld_slots; i++)
		if (c->held[i].state != HELD_FREE)
			held_timer(c, i);
	for (int i = 0; i < c->nconns; i++)
		if (c->conns[i]->state == CONN_CONNECTING || c->conns[i]->state == CONN_RELAYING)
			conn_timer(c, i);
}

static void held_due(struct core *c, int i)
{
	struct held *h = &c->held[i];
	if (h->state == HELD_WAITING && c->now - h->t_syn > c->cfg.connect_timeout) {
		c->st.held_connect_timeouts++;
		return held_end(c, i, CAUSE_SERVER_TIMEOUT, ETIMEDOUT, 0);
	}
	if (h->state == HELD_RELEASED && c->now - h->ready_at > c->cfg.handshake_timeout) {
		c->st.handshake_timeouts++;	/* the client never completed its handshake */
		return held_end(c, i, CAUSE_HANDSHAKE_TIMEOUT, 0, 0);
	}
	held_timer(c, i);
}

static void conn_due(struct core *c, int i)
{
	struct conn *k = c->conns[i];
	switch (k->state) {
	case CONN_FREE:
	case CONN_ENDED:
		return;
	case CONN_CONNECTING:
		if (c->now - k->t_accept > c->cfg.connect_timeout) {
			c->st.connect_timeouts++;
			return conn_end(c, i, END_CONNECT_FAILED, ETIMEDOUT);
		}
		break;
	case CONN_RELAYING:
		if (c->cfg.idle_timeout > 0 && c->now - k->last > c->cfg.idle_timeout)
			return conn_end(c, i, END_IDLE, ETIME);
		if (k->client_synrecv) {
			if (client_ready(k))	/* (its EPOLLOUT edge should have said so) */
				client_established(c, i);
		} else if (k->down.prefix && !k->up.bytes && c->now - k->last > c->cfg.prefix_wait &&
			   xfer_flush_prefix(&k->down) < 0)
			return conn_end(c, i, END_RESET, EPIPE);
		break;
	}
	if (k->state == CONN_CONNECTING || k->state == CONN_RELAYING)
		conn_timer(c, i);
}

/* the entries of second `tick`: each judged now; those the batch has no room left for wait a second */
static void sweep_tick(struct core *c, uint64_t tick)
{
	int id;
	while ((id = c->wheel.head[tick % WHEEL_SLOTS]) >= 0) {	/* (one at a time: the list stays whole) */
		timer_stop(c, id);
		c->st.timer_visits++;
		if (c->nout + 2 > c->maxout)	/* (an end emits an event or two) */
			timer_set(c, id, c->now + 1);
		else if ((id & 1) == TIMER_HELD)
			held_due(c, id >> 1);
		else
			conn_due(c, id >> 1);
	}
}

int core_sweep(struct core *c, struct core_event *out, int maxout)
{
	uint64_t now_tick, tick;
	c->out = out;
	c->maxout = maxout;
	c->nout = 0;
	c->now = monotonic();
	now_tick = (uint64_t)c->now;
	tick = c->wheel.tick;
	if (now_tick > tick + WHEEL_SLOTS)	/* (not swept for longer than the wheel: every list once) */
		tick = now_tick - WHEEL_SLOTS;
	while (tick < now_tick) {
		c->wheel.tick = ++tick;		/* (set again: into a later second than this one) */
		sweep_tick(c, tick);
	}
	conns_free_ended(c);
	c->maxout = 0;		/* (as core_run: no event outside a batch) */
	return c->nout;
}
