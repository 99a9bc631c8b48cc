// SPDX-License-Identifier: GPL-2.0
/* dest.c, alone (tests/test_core.py builds and runs this with the core's rooms): explicit mode's
 * remembered destinations of deferred SYNs. Clients whose keys share a slot each keep their own
 * (the table was direct-mapped: the second overwrote the first, refused later as "no destination");
 * a retransmission keeps the first SYN's destination; another destination is a conflict; an entry
 * is taken once; 16 live entries around one key push out the oldest, counted. Exit 0: all held. */
#include "rooms.h"
#include <stdio.h>
#include <stdlib.h>

#define CHECK(x) do { if (!(x)) { fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, #x); return 1; } } while (0)

static struct flow client(uint32_t ip, uint16_t port, uint16_t dport)
{
	uint8_t a[16] = {[10] = 0xff, [11] = 0xff}, d[16] = {[10] = 0xff, [11] = 0xff, 10, 0, 101, 1};
	a[12] = ip >> 24, a[13] = ip >> 16, a[14] = ip >> 8, a[15] = ip;
	return flow_load(a, port, d, dport);
}

int main(void)
{
	struct core c = {0};
	struct flow f[20], got;
	uint64_t slot0;
	int n = 0;

	c.dests = calloc(DESTINATIONS, sizeof(*c.dests));
	c.cfg.handshake_timeout = 15;
	c.now = 1000;
	/* 20 clients whose keys all hash to the same first slot */
	f[n++] = client(0x0a000101, 40000, 80);
	slot0 = hash64(client_key(&f[0].caddr, f[0].cport)) & (DESTINATIONS - 1);
	for (uint32_t ip = 0x0a000102; n < 20; ip++)
		for (uint16_t port = 1024; port < 65535 && n < 20; port += 7) {
			struct flow g = client(ip, port, 8000 + n);
			if ((hash64(client_key(&g.caddr, g.cport)) & (DESTINATIONS - 1)) == slot0)
				f[n++] = g;
		}
	for (int i = 0; i < 16; i++)
		CHECK(dest_remember(&c, client_key(&f[i].caddr, f[i].cport), &f[i]) == 0);
	/* a retransmission of client 0: kept; the same client naming another destination: refused */
	CHECK(dest_remember(&c, client_key(&f[0].caddr, f[0].cport), &f[0]) == 0);
	got = f[0];
	got.dport = 9999;
	CHECK(dest_remember(&c, client_key(&got.caddr, got.cport), &got) == -1);
	/* every one of the 16 finds its own destination, once */
	for (int i = 15; i >= 0; i--) {
		struct refusal why;
		got = f[i];
		memset(&got.daddr, 0, sizeof(got.daddr));
		got.dport = 0;
		c.cfg.dst_source = DST_EXPLICIT;
		c.cfg.recorder_fd = -1;
		CHECK(destination_of(&c, -1, &got, &why) == 0);
		CHECK(got.dport == f[i].dport && addr_eq(&got.daddr, &f[i].daddr));
		CHECK(destination_of(&c, -1, &got, &why) == -1 && why.cause == CAUSE_NO_DESTINATION);
	}
	/* 17 live around one key: the oldest gives way, counted */
	for (int i = 0; i < 17; i++) {
		c.now = 2000 + i;
		CHECK(dest_remember(&c, client_key(&f[i].caddr, f[i].cport), &f[i]) == 0);
	}
	CHECK(c.st.dest_evictions == 1);
	/* an entry past 2 x handshake_timeout is gone (its slot free again) */
	c.now = 2000 + 17 + 31;
	got = f[16];
	CHECK(destination_of(&c, -1, &got, &(struct refusal){0}) == -1);
	printf("dest: %d colliding clients, each its own destination\n", n);
	free(c.dests);
	return 0;
}
