// SPDX-License-Identifier: GPL-2.0
/* What goes back to Python: events (struct core_event) in the batch Python gave to core_run or
 * core_sweep. The bottom room: every other room may emit, this one calls none of them. */
#include "rooms.h"

/* the batch begins: events go into out, at most maxout */
void batch_begin(struct core *c, struct core_event *out, int maxout)
{
	c->out = out;
	c->maxout = maxout;
	c->nout = 0;
}

/* the batch is over: calls from Python until the next one emit nothing (their events would overwrite
 * the ones Python is reading); how many events it has */
int batch_end(struct core *c)
{
	c->maxout = 0;
	return c->nout;
}

/* the next event for Python in this batch; NULL when there is no room (or no batch: a call from Python) */
struct core_event *emit(struct core *c, int kind)
{
	struct core_event *e;
	if (c->nout >= c->maxout)
		return NULL;
	e = &c->out[c->nout++];
	memset(e, 0, sizeof(*e));
	e->kind = kind;
	e->fd = -1;
	return e;
}
