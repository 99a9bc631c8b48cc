// SPDX-License-Identifier: GPL-2.0
/* The core's counters and histograms (struct core_stats, read by Python: `mimbox stats`, /metrics),
 * and the layout checks Python runs at load (core_abi*). */
#include "rooms.h"
#include <stddef.h>

static const double CONNECT_BUCKETS_US[] = CONNECT_BUCKETS_US_INIT;
static const double DURATION_BUCKETS_S[] = DURATION_BUCKETS_S_INIT;

/* the histogram bucket of v: the first upper bound it does not exceed, or n (above all) */
static int bucket(const double *bounds, int n, double v)
{
	int i = 0;
	while (i < n && v > bounds[i])
		i++;
	return i;
}

void count_connect_time(struct core *c, double us)
{
	c->st.connect_hist[bucket(CONNECT_BUCKETS_US, CONNECT_BUCKET_COUNT, us)]++;
	c->st.server_connects++;
	c->st.server_connect_us_sum += us;
	if (us > c->st.server_connect_us_max)
		c->st.server_connect_us_max = us;
}

void count_duration(struct core *c, double s)
{
	c->st.duration_hist[bucket(DURATION_BUCKETS_S, DURATION_BUCKET_COUNT, s)]++;
	c->st.duration_sum += s;
}

const struct core_stats *core_stats(struct core *c)
{
	c->st.active = c->active;
	c->st.pipes_pooled = c->npool;
	c->st.spares = c->nspare[0][0] + c->nspare[0][1] + c->nspare[1][0] + c->nspare[1][1];
	return &c->st;
}

/* sizeof shared struct `which` (mimbox.converter.core.LAYOUTS' order) */
int core_abi(int which)
{
	switch (which) {
	case 0: return sizeof(struct core_config);
	case 1: return sizeof(struct core_event);
	case 2: return sizeof(struct core_stats);
	case 3: return sizeof(struct core_conn_info);
	case 4: return sizeof(struct syn_info);
	}
	return -1;
}

/* the offset of field k (mimbox.converter.core's order) of shared struct `which`, -1 past the last: Python
 * checks every field against this build, not only the sizes */
int core_abi_offset(int which, int k)
{
	static const size_t o0[] = ABI_OFFSETS_0, o1[] = ABI_OFFSETS_1, o2[] = ABI_OFFSETS_2, o3[] = ABI_OFFSETS_3,
			    o4[] = ABI_OFFSETS_4;
	static const size_t *all[] = {o0, o1, o2, o3, o4};
	static const int n[] = {sizeof(o0) / sizeof(*o0), sizeof(o1) / sizeof(*o1), sizeof(o2) / sizeof(*o2),
				sizeof(o3) / sizeof(*o3), sizeof(o4) / sizeof(*o4)};
	if (which < 0 || which > 4 || k < 0 || k >= n[which])
		return -1;
	return (int)all[which][k];
}

/* the name of field k of shared struct `which` as this library was built with (NULL past the last) */
const char *core_abi_field(int which, int k)
{
	static const char *n0[] = ABI_NAMES_0, *n1[] = ABI_NAMES_1, *n2[] = ABI_NAMES_2, *n3[] = ABI_NAMES_3,
			  *n4[] = ABI_NAMES_4;
	static const char **all[] = {n0, n1, n2, n3, n4};
	if (core_abi_offset(which, k) < 0)
		return NULL;
	return all[which][k];
}
