// SPDX-License-Identifier: GPL-2.0
/* Once a second (Python calls core_sweep): what waited too long. Held SYNs whose server never
 * answered, released SYNs whose client never completed its handshake, server connects past
 * connect_timeout, idle connections, convert answers waiting alone for a first byte down, and TFO
 * clients whose handshake completed without the EPOLLOUT edge that says so. */
#include "rooms.h"

static void sweep_held(struct core *c)
{
	for (int i = 0; i < c->nheld_slots && c->nout < c->maxout; i++) {
		struct held *h = &c->held[i];
		if (h->state == HELD_WAITING && c->now - h->t_syn > c->cfg.connect_timeout) {
			c->st.held_connect_timeouts++;
			held_end(c, i, CAUSE_SERVER_TIMEOUT, ETIMEDOUT, 0);
		} else if (h->state == HELD_RELEASED && c->now - h->ready_at > c->cfg.handshake_timeout) {
			c->st.handshake_timeouts++;	/* the client never completed its handshake */
			held_end(c, i, CAUSE_HANDSHAKE_TIMEOUT, 0, 0);
		}
	}
}

static void sweep_conns(struct core *c)
{
	for (int i = 0; i < c->nconns && c->nout < c->maxout; i++) {
		struct conn *k = c->conns[i];
		switch (k->state) {
		case CONN_FREE:
		case CONN_ENDED:
			break;
		case CONN_CONNECTING:
			if (c->now - k->t_accept > c->cfg.connect_timeout) {
				c->st.connect_timeouts++;
				conn_end(c, i, END_CONNECT_FAILED, ETIMEDOUT);
			}
			break;
		case CONN_RELAYING:
			if (c->cfg.idle_timeout > 0 && c->now - k->last > c->cfg.idle_timeout)
				conn_end(c, i, END_IDLE, ETIME);
			else if (k->client_synrecv) {
				if (client_ready(k))	/* (its EPOLLOUT edge should have said so) */
					client_established(c, i);
			} else if (k->down.prefix && !k->up.bytes && c->now - k->last > c->cfg.prefix_wait &&
				 xfer_flush_prefix(&k->down) < 0)
				conn_end(c, i, END_RESET, EPIPE);
			break;
		}
	}
}

int core_sweep(struct core *c, struct core_event *out, int maxout)
{
	c->out = out;
	c->maxout = maxout;
	c->nout = 0;
	c->now = monotonic();
	sweep_held(c);
	sweep_conns(c);
	conns_free_ended(c);
	c->maxout = 0;		/* (as core_run: no event outside a batch) */
	return c->nout;
}
