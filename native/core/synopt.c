// SPDX-License-Identifier: GPL-2.0
/* A SYN's TCP options: the destination option (DST_OPT, mimbox/wire/dstopt.py declares its layout) and
 * MPTCP's subtypes. mimbox/wire/dstopt.py parse_options makes the same decisions (tests/test_core.py
 * compares them; tests/fuzz/fuzz_core.c fuzzes this parser). */
#include "rooms.h"
#include <netinet/in.h>
#include <linux/types.h>
#include "dstopt.h"		/* generated from mimbox/wire/dstopt.py */

/* 0: a TCP SYN in IPv4 or in IPv6 without extension headers (options parsed, never fails on them;
 * bad_source set for a source no real client has, addr.h addr_source_bad), -1: not one. Addresses as
 * 16 bytes (addr.h). */
int core_parse_syn(const uint8_t *p, int len, struct syn_info *s)
{
	int ihl, doff, i, n;
	const uint8_t *t, *o;
	memset(s, 0, sizeof(*s));
	if (len >= 20 && p[0] >> 4 == 4) {
		struct in6_addr a;
		uint32_t v4;
		ihl = (p[0] & 0x0F) * 4;
		if (ihl < 20 || p[9] != IPPROTO_TCP)
			return -1;
		memcpy(&v4, p + 12, 4);
		a = addr_of_v4(v4);
		memcpy(s->saddr, &a, 16);
		memcpy(&v4, p + 16, 4);
		a = addr_of_v4(v4);
		memcpy(s->daddr, &a, 16);
	} else if (len >= 40 && p[0] >> 4 == 6) {
		ihl = 40;
		if (p[6] != IPPROTO_TCP)	/* extension headers: not parsed, the kernel's (and accept.c's) */
			return -1;
		memcpy(s->saddr, p + 8, 16);
		memcpy(s->daddr, p + 24, 16);
	} else {
		return -1;
	}
	{
		struct in6_addr sa = addr_load(s->saddr), da = addr_load(s->daddr);
		s->bad_source = addr_source_bad(&sa, p[0] >> 4 == 6, addr_is_loopback(&da));
	}
	if (len < ihl + 20)
		return -1;
	t = p + ihl;
	doff = (t[12] >> 4) * 4;
	if (doff < 20 || len - ihl < doff)
		return -1;
	memcpy(&s->sport, t, 2);
	memcpy(&s->dport, t + 2, 2);
	o = t + 20;
	n = doff - 20;
	for (i = 0; i < n;) {
		int kind = o[i], olen;
		if (kind == 0)
			break;
		if (kind == 1) {
			i++;
			continue;
		}
		if (i + 1 >= n) {
			if (!s->error)
				s->error = SYN_TRUNCATED;
			break;
		}
		olen = o[i + 1];
		if (olen < 2 || i + olen > n) {
			if (!s->error) {
				s->error = SYN_BAD_LENGTH;
				s->arg = kind << 8 | olen;
			}
			break;
		}
		if (kind == DSTOPT_KIND) {
			int exid = olen >= 4 ? (o[i + 2] << 8 | o[i + 3]) : -1;
			if (exid >= 0 && exid != DSTOPT_EXID) {
				if (!s->error) {
					s->error = SYN_UNKNOWN_EXID;
					s->arg = exid;
				}
			} else if (s->has_dst) {
				s->error = SYN_MORE_THAN_ONE;
			} else if (olen != DSTOPT_LEN && olen != DSTOPT_LEN6) {
				s->error = SYN_DSTOPT_LENGTH;
				s->arg = olen;
			} else if (exid != DSTOPT_EXID) {
				s->error = SYN_UNKNOWN_EXID;
				s->arg = exid;
			} else {
				/* the IPv4 form (10 bytes) or the IPv6 form (22): mimbox/wire/dstopt.py */
				struct in6_addr a;
				uint16_t port;
				if (olen == DSTOPT_LEN) {
					uint32_t v4;
					memcpy(&v4, o + i + DSTOPT_OFF_ADDR, 4);
					a = addr_of_v4(v4);
					memcpy(&port, o + i + DSTOPT_OFF_PORT, 2);
				} else {
					memcpy(&a, o + i + DSTOPT_OFF_ADDR, 16);
					memcpy(&port, o + i + DSTOPT_OFF_PORT6, 2);
				}
				if (!port) {
					s->error = SYN_PORT0;
				} else if (addr_is_zero(&a)) {
					s->error = SYN_ADDR0;
					s->arg = addr_is_v4(&a) ? 4 : 6;	/* 0.0.0.0 or :: */
				} else {
					s->has_dst = 1;
					memcpy(s->dst_addr, &a, 16);
					s->dst_port = port;
				}
			}
		} else if (kind == 30 && olen >= 3) {	/* MPTCP */
			int sub = o[i + 2] >> 4;
			s->mp_capable |= sub == 0;
			s->mp_join |= sub == 1;
		}
		i += olen;
	}
	if (s->error)
		s->has_dst = 0;
	else if (!s->has_dst)
		s->error = SYN_NO_DSTOPT;
	return 0;
}
