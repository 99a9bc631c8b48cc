// SPDX-License-Identifier: GPL-2.0
/* Addresses of both families, as the core holds them: one 16-byte IPv6 address, an IPv4 address as
 * its IPv4-mapped form ::ffff:a.b.c.d (RFC 4291 2.5.5.2) -- what a dual-stack listener's accept()
 * returns for an IPv4 client anyway. So one flow, one policy table, one key and one log line serve
 * both families, and a client of one family may go to a server of the other (the converter is then
 * also a family translator). The socket a server connection uses follows its destination's family. */
#pragma once
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

static inline int addr_is_v4(const struct in6_addr *a)
{
	return IN6_IS_ADDR_V4MAPPED(a);
}

static inline int addr_is_zero(const struct in6_addr *a)
{
	return IN6_IS_ADDR_UNSPECIFIED(a) || (addr_is_v4(a) && !a->s6_addr32[3]);
}

static inline struct in6_addr addr_of_v4(uint32_t v4)	/* network order */
{
	struct in6_addr a = {0};
	a.s6_addr16[5] = 0xFFFF;
	a.s6_addr32[3] = v4;
	return a;
}

/* 16 bytes from Python or a packet (any alignment) as an address */
static inline struct in6_addr addr_load(const uint8_t *b)
{
	struct in6_addr a;
	memcpy(&a, b, 16);
	return a;
}

static inline int addr_is_loopback(const struct in6_addr *a)
{
	return addr_is_v4(a) ? a->s6_addr[12] == 127 : IN6_IS_ADDR_LOOPBACK(a);
}

/* A source no real client has (mimbox/wire/addrs.py source_bad says the same; tests compare them):
 *   IPv4 (held as ::ffff:a.b.c.d)  0/8, 127/8, 224/4 (multicast), 240/4 (reserved, broadcast);
 *   IPv6                           ::/96 (unspecified, loopback, IPv4-compatible), ff00::/8
 *                                  (multicast), and ::ffff:0:0/96 when it came as an IPv6 source on
 *                                  the wire (wire_v6: the kernel drops it only after NFQUEUE; a
 *                                  dual-stack accept() gives IPv4 clients this form, wire_v6 0).
 * A loopback source is real only towards a loopback address (to_loopback: the destination, or the
 * accepted socket's own address, is loopback): this host talking to itself on lo. */
static inline int addr_source_bad(const struct in6_addr *a, int wire_v6, int to_loopback)
{
	if (addr_is_loopback(a))
		return !to_loopback || (wire_v6 && addr_is_v4(a));
	if (addr_is_v4(a)) {
		uint8_t b = a->s6_addr[12];
		return wire_v6 || b == 0 || b >= 224;
	}
	return (!a->s6_addr32[0] && !a->s6_addr32[1] && !a->s6_addr32[2]) || a->s6_addr[0] == 0xFF;
}

static inline int addr_family(const struct in6_addr *a)
{
	return addr_is_v4(a) ? AF_INET : AF_INET6;
}

/* the two halves, in memory order (for masks and hashing, not arithmetic) */
static inline void addr_halves(const struct in6_addr *a, uint64_t h[2])
{
	memcpy(h, a, 16);
}

static inline int addr_eq(const struct in6_addr *a, const struct in6_addr *b)
{
	return !memcmp(a, b, 16);
}

/* a socket address (AF_INET or AF_INET6) as (address, port): 0, or -1 for another family */
static inline int addr_from_sockaddr(const struct sockaddr_storage *ss, struct in6_addr *a, uint16_t *port)
{
	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *s = (const struct sockaddr_in *)ss;
		*a = addr_of_v4(s->sin_addr.s_addr);
		*port = s->sin_port;
		return 0;
	}
	if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *s = (const struct sockaddr_in6 *)ss;
		*a = s->sin6_addr;
		*port = s->sin6_port;
		return 0;
	}
	return -1;
}

/* (address, port) as the socket address a socket of its family connects to; its length */
static inline socklen_t addr_to_sockaddr(const struct in6_addr *a, uint16_t port, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof(*ss));
	if (addr_is_v4(a)) {
		struct sockaddr_in *s = (struct sockaddr_in *)ss;
		s->sin_family = AF_INET;
		s->sin_addr.s_addr = a->s6_addr32[3];
		s->sin_port = port;
		return sizeof(*s);
	}
	struct sockaddr_in6 *s = (struct sockaddr_in6 *)ss;
	s->sin6_family = AF_INET6;
	s->sin6_addr = *a;
	s->sin6_port = port;
	return sizeof(*s);
}

/* A prefix: net/len over the 16 bytes (an IPv4 /n is the mapped /96+n), kept as net and mask halves. */
struct prefix {
	uint64_t net[2], mask[2];
};

static inline struct prefix prefix_make(const struct in6_addr *net, int len)
{
	struct prefix p;
	uint8_t m[16] = {0};
	uint64_t h[2];
	for (int i = 0; i < 16 && len > 0; i++, len -= 8)
		m[i] = len >= 8 ? 0xFF : (uint8_t)(0xFF << (8 - len));
	memcpy(p.mask, m, 16);
	addr_halves(net, h);
	p.net[0] = h[0] & p.mask[0];
	p.net[1] = h[1] & p.mask[1];
	return p;
}

static inline int prefix_has(const struct prefix *p, const struct in6_addr *a)
{
	uint64_t h[2];
	addr_halves(a, h);
	return (h[0] & p->mask[0]) == p->net[0] && (h[1] & p->mask[1]) == p->net[1];
}

static inline uint64_t mix64(uint64_t k)
{
	k ^= k >> 33;
	k *= 0xff51afd7ed558ccdull;
	k ^= k >> 33;
	k *= 0xc4ceb9fe1a85ec53ull;
	return k ^ (k >> 33);
}

/* A client (address, port) as one 64-bit key, never 0; the workers share them (mimbox.converter.synpath.HeldSet).
 * An IPv4 client's key is exact; an IPv6 client's is a hash (top bit set, so never an IPv4 key): a
 * table keyed by it compares the address and port too. */
static inline uint64_t client_key(const struct in6_addr *a, uint16_t port)
{
	uint64_t h[2];
	if (addr_is_v4(a))
		return ((uint64_t)ntohl(a->s6_addr32[3]) << 16 | ntohs(port)) + 1;
	addr_halves(a, h);
	return mix64(h[0] ^ mix64(h[1] ^ port)) | 1ull << 63;
}

/* the client prefix the gate counts by: an IPv4 /24 or an IPv6 /64 (one subscriber's usual share) */
static inline uint64_t gate_prefix(const struct in6_addr *a)
{
	uint64_t h[2];
	if (addr_is_v4(a))
		return 0xFFFF00000000ull | (ntohl(a->s6_addr32[3]) >> 8);
	addr_halves(a, h);
	return h[0];
}

/* the client address the gate counts by (one address's share of its prefix): exact for IPv4, a hash
 * of the 128 bits for IPv6 (top bit set, so never an IPv4 key) */
static inline uint64_t gate_address(const struct in6_addr *a)
{
	uint64_t h[2];
	if (addr_is_v4(a))
		return ntohl(a->s6_addr32[3]);
	addr_halves(a, h);
	return mix64(h[0] ^ mix64(h[1])) | 1ull << 63;
}

/* a server (address, port) for the memo's hash */
static inline uint64_t server_hash(const struct in6_addr *a, uint16_t port)
{
	uint64_t h[2];
	addr_halves(a, h);
	return mix64(h[0] ^ mix64(h[1]) ^ port);
}
