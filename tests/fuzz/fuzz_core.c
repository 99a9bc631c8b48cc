// SPDX-License-Identifier: GPL-2.0
/* libFuzzer harnesses for the core's SYN path, built with ASan and UBSan (tests/test_fuzz.py builds,
 * runs and bounds them; the seed corpus is tests/fuzz/corpus/<target>/):
 *
 *   -DFUZZ_PARSER   core_parse_syn() on any bytes: never reads out of bounds, and what it reports
 *                   holds together (a destination only without an error, never 0.0.0.0 or port 0).
 *   -DFUZZ_HANDLER  a packet as NFQUEUE hands it to the core (libnetfilter_queue stubbed below):
 *                   the whole SYN handler (parse, policy, gate, destination table, hold, server
 *                   connect) in explicit mode; every SYN gets exactly one verdict or is held, and the
 *                   counts of held SYNs stay within their caps. Run it in a network namespace of its
 *                   own (unshare -n) whose route to 10/8 leads nowhere: held SYNs stay held.
 *
 * Built with the core's rooms (every .c in native/core) and linked against these stubs instead of
 * libnetfilter_queue; rooms.h declares what is reachable between rooms. */
#include "rooms.h"
#include <stdlib.h>
#include <linux/types.h>
#include <linux/netfilter.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

#include <assert.h>
#include <stdio.h>

/* -- libnetfilter_queue, stubbed: verdicts are counted, packets come from the fuzzer --------------------- */
static struct {
	const uint8_t *payload;
	int len;
	uint32_t mark;
	struct nfqnl_msg_packet_hdr hdr;
	long verdicts, held_full;
} q;

struct nfq_handle *nfq_open(void) { return (struct nfq_handle *)&q; }
int nfq_close(struct nfq_handle *h) { (void)h; return 0; }
struct nfq_q_handle *nfq_create_queue(struct nfq_handle *h, uint16_t num, nfq_callback *cb, void *data)
{
	(void)h; (void)num; (void)cb; (void)data;
	return (struct nfq_q_handle *)&q;
}
int nfq_destroy_queue(struct nfq_q_handle *qh) { (void)qh; return 0; }
int nfq_set_mode(struct nfq_q_handle *qh, uint8_t mode, uint32_t range) { (void)qh; (void)mode; (void)range; return 0; }
int nfq_set_queue_maxlen(struct nfq_q_handle *qh, uint32_t len) { (void)qh; (void)len; return 0; }
int nfq_fd(struct nfq_handle *h) { (void)h; return -1; }
int nfq_handle_packet(struct nfq_handle *h, char *buf, int len) { (void)h; (void)buf; (void)len; return 0; }
int nfq_set_verdict(struct nfq_q_handle *qh, uint32_t id, uint32_t verdict, uint32_t len, const unsigned char *buf)
{
	(void)qh; (void)id; (void)verdict; (void)len; (void)buf;
	q.verdicts++;
	return 0;
}
int nfq_set_verdict2(struct nfq_q_handle *qh, uint32_t id, uint32_t verdict, uint32_t mark, uint32_t len,
		     const unsigned char *buf)
{
	(void)mark;
	return nfq_set_verdict(qh, id, verdict, len, buf);
}
struct nfqnl_msg_packet_hdr *nfq_get_msg_packet_hdr(struct nfq_data *nfad) { (void)nfad; return &q.hdr; }
int nfq_get_payload(struct nfq_data *nfad, unsigned char **data)
{
	(void)nfad;
	*data = (unsigned char *)q.payload;
	return q.len;
}
uint32_t nfq_get_nfmark(struct nfq_data *nfad) { (void)nfad; return q.mark; }

#ifdef FUZZ_PARSER
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct syn_info s;
	uint8_t *copy = malloc(size ? size : 1);	/* exactly `size` bytes: ASan sees any overread */
	memcpy(copy, data, size);
	if (core_parse_syn(copy, (int)size, &s) == 0) {
		assert(!(s.has_dst && s.error));
		assert(s.has_dst || s.error);
		assert(!s.has_dst || (!addr_is_zero((struct in6_addr *)s.dst_addr) && s.dst_port));
	}
	free(copy);
	return 0;
}
#endif

#ifdef FUZZ_HANDLER
static struct core *fuzz_core;

static void report(void)	/* at exit: proof that the hold path was reached */
{
	fprintf(stderr, "stat::held_table_filled: %ld\n", q.held_full);
}
static int64_t admission[2];	/* the count and the pressure word (mimbox.converter.synpath.Admission) */

static struct core *make_core(void)
{
	struct core_config cfg = {.engine = ENGINE_AUTO, .pipe_size = 65536, .splice_after = 262144,
				  .dst_source = DST_EXPLICIT, .recorder_fd = -1, .server_mptcp = 1, .fd_capacity = 512,
				  .worker = 0, .workers = 1, .syns_queued = 1, .server_mptcp_retry = 300,
				  .connect_timeout = 1, .idle_timeout = 300, .prefix_wait = 0.2,
				  .admission = admission, .admission_limit = 256, .syn_path = SYN_PATH_AUTO,
				  .pending_limit = 16, .pending_per_prefix = 4, .pending_per_address = 2, .explicit_opt = 1,
				  .handshake_timeout = 15, .spare_sockets = 0};
	struct core *c = core_new(&cfg);
	assert(c);
	static const uint8_t any[16], loopback[16] = {[10] = 0xFF, [11] = 0xFF, [12] = 127},
			     ten[16] = {[10] = 0xFF, [11] = 0xFF, [12] = 10};
	core_policy(c, POLICY_ALLOW_CLIENT, any, 0);		/* every client, both families */
	core_policy(c, POLICY_OWN_DONE, NULL, 0);		/* this host's own destinations: none */
	core_rule(c, 0, loopback, 96 + 8, 1, 65535);		/* never loopback */
	core_rule(c, 1, ten, 96 + 8, 1, 65535);		/* 10/8 allowed */
	core_rule(c, 0, any, 0, 1, 65535);			/* nothing else */
	assert(core_queue(c, 0) == 0);
	return c;
}

/* byte 0: bit 0 the BPF recorder's refusal mark, bits 1-2 the SYN path; the rest: the packet */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct core_event out[64];
	long before;
	uint8_t *pkt;
	if (!fuzz_core) {
		fuzz_core = make_core();
		atexit(report);
	}
	if (size < 1)
		return 0;
	fuzz_core->cfg.syn_path = (data[0] >> 1) % 3;
	q.mark = data[0] & 1 ? REFUSE_MARK : 0;
	pkt = malloc(size - 1 ? size - 1 : 1);
	memcpy(pkt, data + 1, size - 1);
	q.payload = pkt;
	q.len = (int)size - 1;
	q.hdr.packet_id = htonl(1);
	before = q.verdicts;
	fuzz_core->out = out;
	fuzz_core->maxout = 64;
	fuzz_core->nout = 0;
	fuzz_core->now = monotonic();
	{
		int held = fuzz_core->nheld;
		queue_packet((struct nfq_q_handle *)&q, NULL, NULL, fuzz_core);
		/* one verdict, or held (its verdict comes when its server answers), or dropped as a retransmission */
		assert(q.verdicts - before == 1 || fuzz_core->nheld == held + 1 || q.verdicts == before);
		{		/* a source no real client has is never held (addr.h addr_source_bad) */
			struct syn_info s;
			if (!core_parse_syn(pkt, (int)size - 1, &s) && s.bad_source)
				assert(fuzz_core->nheld == held);
		}
	}
	assert(fuzz_core->nheld <= fuzz_core->cfg.pending_limit);
	assert(fuzz_core->gated >= 0 && fuzz_core->gated <= fuzz_core->cfg.pending_limit);
	assert(fuzz_core->nheld >= 0 && fuzz_core->greetings == 0);
	core_run(fuzz_core, 0, out, 64);			/* server connects that already failed */
	if (fuzz_core->nheld == fuzz_core->cfg.pending_limit) {
		core_abort_all(fuzz_core);			/* held SYNs refused: start again */
		assert(fuzz_core->nheld == 0 && fuzz_core->gated == 0);
		q.held_full++;
	}
	assert(admission[0] >= 0 && admission[0] <= 256);
	free(pkt);
	return 0;
}
#endif
