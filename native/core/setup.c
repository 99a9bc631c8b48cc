// SPDX-License-Identifier: GPL-2.0
/* A worker's core made (its engine chosen, once), reconfigured on a reload, stopped and freed. */
#include "rooms.h"
#include <stdlib.h>
#include <sys/epoll.h>
#include <unistd.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

static int held_size(struct core *c, int pending_limit);

/* what the engines report up (struct engine_hooks): the rooms above them */
static const struct engine_hooks hooks = {
	.conn_end = conn_end,
	.server_ready = server_ready,
	.accepted = accept_one,
	.accept_failed = accept_failed,
};

struct core *core_new(const struct core_config *cfg)
{
	struct core *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	c->cfg = *cfg;
	c->eng = cfg->engine == ENGINE_URING ? &engine_uring : &engine_epoll;
	c->hooks = &hooks;
	c->free_head = -1;
	c->held_free = -1;
	c->qfd = -1;
	wheel_init(c);
	for (int w = 0; w < MAX_WORKERS; w++)
		c->links[w] = -1;
	c->epfd = epoll_create1(EPOLL_CLOEXEC);
	c->copy_buf = malloc(cfg->pipe_size);
	c->dests = calloc(DESTINATIONS, sizeof(*c->dests));
	if (c->epfd < 0 || !c->copy_buf || !c->dests || held_size(c, cfg->pending_limit) ||
	    gate_size(c, cfg->pending_limit) || c->eng->init(c) < 0) {
		core_free(c);
		return NULL;
	}
	return c;
}

/* room for pending_limit held SYNs (made at start, grown by a reload that raises it: a held SYN's
 * slot index is in its epoll data, so slots are added, never moved between indices) */
static int held_size(struct core *c, int pending_limit)
{
	int n = pending_limit > 0 ? pending_limit : 1;
	struct held *h;
	if (n <= c->nheld_slots)
		return 0;
	h = realloc(c->held, n * sizeof(*h));
	if (!h)
		return -ENOMEM;
	memset(h + c->nheld_slots, 0, (n - c->nheld_slots) * sizeof(*h));
	c->held = h;
	for (int i = n - 1; i >= c->nheld_slots; i--) {
		h[i].sfd = -1;
		h[i].next_free = c->held_free;
		c->held_free = i;
	}
	c->nheld_slots = n;
	return 0;
}

/* SIGHUP: what may change in a running core (mimbox.config.RELOADABLE); new connections and
 * SYNs get it, established connections carry on */
int core_reconfigure(struct core *c, const struct core_config *n)
{
	if (held_size(c, n->pending_limit) || gate_size(c, n->pending_limit))
		return -ENOMEM;		/* (refused by name: nothing of n is applied) */
	c->cfg.server_mptcp_retry = n->server_mptcp_retry;
	c->cfg.connect_timeout = n->connect_timeout;
	c->cfg.idle_timeout = n->idle_timeout;
	c->cfg.handshake_timeout = n->handshake_timeout;
	c->cfg.admission_limit = n->admission_limit;
	c->cfg.pending_limit = n->pending_limit;
	c->cfg.pending_per_prefix = n->pending_per_prefix;
	c->cfg.pending_per_address = n->pending_per_address;
	c->cfg.access_log_every = n->access_log_every;
	/* every deadline by the new timeouts (once, not per second) */
	for (int i = 0; i < c->nheld_slots; i++)
		if (c->held[i].state != HELD_FREE)
			held_timer(c, i);
	for (int i = 0; i < c->nconns; i++)
		if (c->conns[i]->state == CONN_CONNECTING || c->conns[i]->state == CONN_RELAYING)
			conn_timer(c, i);
	return 0;
}

/* Abort every connection and held SYN (the converter stops): returns how many connections. */
int core_abort_all(struct core *c)
{
	int n = 0;
	for (int i = 0; i < c->nheld_slots; i++)
		if (c->held[i].state != HELD_FREE)
			held_end(c, i, HELD_DROPPED, &(struct refusal){.cause = CAUSE_SHUTTING_DOWN});
	for (int i = 0; i < c->nconns; i++) {
		enum conn_state s = c->conns[i]->state;
		if (s == CONN_CONNECTING || s == CONN_RELAYING) {
			conn_end(c, i, END_SHUTDOWN, 0);
			n++;
		}
	}
	conns_free_ended(c);
	return n;
}

void core_free(struct core *c)
{
	if (!c)
		return;
	core_abort_all(c);
	c->eng->free(c);
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
		for (int v6 = 0; v6 < 2; v6++)
			while (c->nspare[v6][kind] > 0)
				close(c->spare[v6][kind][--c->nspare[v6][kind]]);
	if (c->qh)
		nfq_destroy_queue(c->qh);
	if (c->nfq)
		nfq_close(c->nfq);
	free(c->qbuf);
	close(c->epfd);
	free(c->copy_buf);
	free(c->held);
	free(c->gate);
	free(c->gate_addr);
	free(c->dests);
	policy_free(c);
	free(c);
}
