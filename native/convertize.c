/* libconvertize: LD_PRELOAD shim that sends an unchanged program's TCP connections through an
 * RFC 8803 Transport Converter (`mimbox client --convert`).
 *
 * connect(fd, dst) to an IPv4 or IPv6 destination becomes a TCP Fast Open sendto() to the converter
 * (MIMBOX_CONVERT_VIA=a.b.c.d:port or [v6]:port; MIMBOX_CONVERT_VIA6=[v6]:port gives an IPv4
 * converter's IPv6 address too) whose SYN carries a Convert message with a Connect TLV for dst
 * once the kernel holds the converter's TFO cookie; the first connection to a converter asks for the
 * cookie and the kernel sends the message right after the handshake (the converter takes SYN data
 * only with a valid cookie: a spoofed SYN's data is never read). If the SYN could not carry it, the
 * message goes out before the program's first bytes. The converter's own Convert message starts
 * its byte stream: the first read()/recv()/recvfrom() of such a socket consume it; an Error TLV
 * fails that read with ECONNREFUSED (errno) and MIMBOX_CONVERT_DEBUG=1 prints its code.
 * An IPv4 socket goes to the converter's IPv4 address, an IPv6 socket to its IPv6 address or else to
 * ::ffff: its IPv4 one; an IPv4 socket fails (EPERM) when the converter has only an IPv6 address.
 * Destinations in MIMBOX_CONVERT_SKIP (comma-separated addresses of either family), loopback and the
 * converter itself are connected to directly. MIMBOX_CONVERT_FASTOPEN=0 sends the message right after the
 * handshake instead (one round trip later; see README on MPTCP with SYN data on Linux 6.18).
 * Wire format: mimbox/wire/rfc8803.py (RFC 8803 §4). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef MSG_FASTOPEN
#define MSG_FASTOPEN 0x20000000
#endif

#include "convert.h"		/* generated from mimbox/wire/rfc8803.py: CONNECT_LEN, TLV_*, CONVERT_VERSION */

#define MAX_FDS 65536

enum { IDLE, SEND_MSG, READ_REPLY, CONVERTED };

struct conv_fd {
	uint8_t state;
	uint16_t have;		/* reply bytes read so far */
	uint8_t msg[CONNECT_LEN];
	uint8_t reply[1020];
};

static struct conv_fd *fds[MAX_FDS];
static struct sockaddr_in via4;		/* sin_family 0: the converter has no IPv4 address */
static struct sockaddr_in6 via6;	/* its IPv6 address, or ::ffff: its IPv4 one */
static int via_ok = -1;
static struct in6_addr skip[32];	/* IPv4 as ::ffff:a.b.c.d */
static int nskip;
static int fastopen = 1;

static int (*real_connect)(int, const struct sockaddr *, socklen_t);
static ssize_t (*real_read)(int, void *, size_t);
static ssize_t (*real_recv)(int, void *, size_t, int);
static ssize_t (*real_recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_send)(int, const void *, size_t, int);
static ssize_t (*real_sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
static int (*real_close)(int);

static int parse_addr(const char *t, struct in6_addr *a);
static int parse_hostport(const char *v, struct in6_addr *a, uint16_t *port);

static void init(void)
{
	if (via_ok >= 0)
		return;
	real_connect = dlsym(RTLD_NEXT, "connect");
	real_read = dlsym(RTLD_NEXT, "read");
	real_recv = dlsym(RTLD_NEXT, "recv");
	real_recvfrom = dlsym(RTLD_NEXT, "recvfrom");
	real_write = dlsym(RTLD_NEXT, "write");
	real_send = dlsym(RTLD_NEXT, "send");
	real_sendto = dlsym(RTLD_NEXT, "sendto");
	real_close = dlsym(RTLD_NEXT, "close");
	via_ok = 0;
	struct in6_addr a;
	uint16_t port = 0;
	if (parse_hostport(getenv("MIMBOX_CONVERT_VIA"), &a, &port))
		return;
	via6.sin6_family = AF_INET6;
	via6.sin6_port = port;
	via6.sin6_addr = a;
	if (IN6_IS_ADDR_V4MAPPED(&a)) {
		via4.sin_family = AF_INET;
		via4.sin_port = port;
		memcpy(&via4.sin_addr, &a.s6_addr[12], 4);
		struct in6_addr b;
		uint16_t port6;
		if (!parse_hostport(getenv("MIMBOX_CONVERT_VIA6"), &b, &port6) && !IN6_IS_ADDR_V4MAPPED(&b))
			via6.sin6_addr = b;	/* the same port: the converter's listener */
	}
	via_ok = 1;
	const char *f = getenv("MIMBOX_CONVERT_FASTOPEN");
	fastopen = !(f && f[0] == '0');
	const char *s = getenv("MIMBOX_CONVERT_SKIP");
	while (s && *s && nskip < 32) {
		char t[64];
		size_t n = strcspn(s, ",");
		if (n < sizeof(t)) {
			memcpy(t, s, n);
			t[n] = 0;
			if (parse_addr(t, &skip[nskip]) == 0)
				nskip++;
		}
		s += n + (s[n] == ',');
	}
}

/* "a.b.c.d" or "v6" as 16 bytes (IPv4 as ::ffff:a.b.c.d); 0 on success */
static int parse_addr(const char *t, struct in6_addr *a)
{
	struct in_addr v4;
	if (inet_pton(AF_INET, t, &v4) == 1) {
		memset(a, 0, sizeof(*a));
		a->s6_addr[10] = a->s6_addr[11] = 0xff;
		memcpy(&a->s6_addr[12], &v4, 4);
		return 0;
	}
	return inet_pton(AF_INET6, t, a) == 1 ? 0 : -1;
}

/* "a.b.c.d:port" or "[v6]:port"; port in network order; 0 on success */
static int parse_hostport(const char *v, struct in6_addr *a, uint16_t *port)
{
	char host[64];
	const char *colon = v ? strrchr(v, ':') : NULL;
	size_t n;
	if (!colon)
		return -1;
	n = colon - v;
	if (n >= 2 && v[0] == '[' && v[n - 1] == ']') {
		v++;
		n -= 2;
	}
	if (n >= sizeof(host))
		return -1;
	memcpy(host, v, n);
	host[n] = 0;
	*port = htons((uint16_t)atoi(colon + 1));
	return parse_addr(host, a);
}

/* The destination of connect(addr) as 16 bytes and a port; -1 if it is not IPv4 or IPv6. */
static int destination(const struct sockaddr *addr, struct in6_addr *a, uint16_t *port)
{
	if (addr->sa_family == AF_INET) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)addr;
		memset(a, 0, sizeof(*a));
		a->s6_addr[10] = a->s6_addr[11] = 0xff;
		memcpy(&a->s6_addr[12], &in->sin_addr, 4);
		*port = in->sin_port;
		return 0;
	}
	if (addr->sa_family == AF_INET6) {
		const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)addr;
		*a = in6->sin6_addr;
		*port = in6->sin6_port;
		return 0;
	}
	return -1;
}

/* 1: through the converter; 0: directly */
static int redirected(int fd, const struct sockaddr *addr)
{
	int type;
	socklen_t len = sizeof(type);
	struct in6_addr dst;
	uint16_t port;
	if (via_ok != 1 || fd < 0 || fd >= MAX_FDS || !addr || destination(addr, &dst, &port))
		return 0;
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) || type != SOCK_STREAM)
		return 0;
	if (IN6_IS_ADDR_LOOPBACK(&dst) || (IN6_IS_ADDR_V4MAPPED(&dst) && dst.s6_addr[12] == 127))
		return 0;
	if ((via4.sin_family && IN6_IS_ADDR_V4MAPPED(&dst) && !memcmp(&dst.s6_addr[12], &via4.sin_addr, 4)) ||
	    IN6_ARE_ADDR_EQUAL(&dst, &via6.sin6_addr))
		return 0;
	for (int i = 0; i < nskip; i++)
		if (IN6_ARE_ADDR_EQUAL(&skip[i], &dst))
			return 0;
	return 1;
}

static void debug(const char *what, int fd, int code)
{
	if (getenv("MIMBOX_CONVERT_DEBUG"))
		fprintf(stderr, "convertize: fd %d %s %d\n", fd, what, code);
}

int connect(int fd, const struct sockaddr *addr, socklen_t alen)
{
	init();
	if (!redirected(fd, addr))
		return real_connect(fd, addr, alen);
	struct in6_addr dst;
	uint16_t dport = 0;
	destination(addr, &dst, &dport);
	/* the converter in the socket's family */
	const struct sockaddr *conv = addr->sa_family == AF_INET ? (const struct sockaddr *)&via4
								  : (const struct sockaddr *)&via6;
	socklen_t conv_len = addr->sa_family == AF_INET ? sizeof(via4) : sizeof(via6);
	if (addr->sa_family == AF_INET && !via4.sin_family) {
		errno = EPERM;		/* no IPv4 address to reach the converter at: never around it */
		return -1;
	}
	struct conv_fd *c = fds[fd];
	if (!c && !(c = fds[fd] = calloc(1, sizeof(*c))))
		return real_connect(fd, addr, alen);
	memset(c, 0, sizeof(*c));
	/* fixed header: version, total words, unassigned 0; Connect TLV: type, words, port, the
	 * address as 16 bytes (IPv4 as ::ffff:a.b.c.d) */
	uint8_t *m = c->msg;
	m[0] = CONVERT_VERSION;
	m[1] = CONNECT_LEN / CONVERT_WORD;
	m[4] = TLV_CONNECT;
	m[5] = CONNECT_TLV_WORDS;
	memcpy(m + 6, &dport, 2);
	memcpy(m + 8, &dst, 16);
	int nonblocking = fcntl(fd, F_GETFL) & O_NONBLOCK;
	if (!fastopen) {
		int r = real_connect(fd, conv, conv_len);
		if (r == 0 || errno == EINPROGRESS) {
			c->state = SEND_MSG;	/* the message goes before the program's first bytes */
			c->have = 0;
		}
		return r;
	}
	ssize_t n = real_sendto(fd, m, CONNECT_LEN, MSG_FASTOPEN | MSG_NOSIGNAL,
				conv, conv_len);
	int err = errno;
	if (n == CONNECT_LEN) {
		c->state = READ_REPLY;
		debug("Connect in the SYN, bytes", fd, (int)n);
		if (nonblocking) {
			errno = EINPROGRESS;
			return -1;
		}
		return 0;
	}
	if (n < 0 && err != EINPROGRESS) {
		c->state = IDLE;
		errno = err;
		return -1;
	}
	/* the SYN left without the message (or with part of it): send it before the first bytes */
	c->state = SEND_MSG;
	c->have = n > 0 ? (uint16_t)n : 0;
	debug("Connect after the handshake, already sent", fd, c->have);
	if (nonblocking) {
		errno = EINPROGRESS;
		return -1;
	}
	return 0;
}

/* Before the program's first bytes: the rest of the Convert message, if the SYN did not carry it. */
static int flush_msg(int fd)
{
	struct conv_fd *c = fd >= 0 && fd < MAX_FDS ? fds[fd] : NULL;
	if (!c || c->state != SEND_MSG)
		return 0;
	while (c->have < CONNECT_LEN) {
		ssize_t n = real_send(fd, c->msg + c->have, CONNECT_LEN - c->have, MSG_NOSIGNAL);
		if (n < 0)
			return -1;
		c->have += (uint16_t)n;
	}
	c->state = READ_REPLY;
	c->have = 0;
	return 0;
}

/* Consume the converter's reply; 1 when the program's bytes may be read, -1 with errno set. */
static int take_reply(int fd)
{
	struct conv_fd *c = fd >= 0 && fd < MAX_FDS ? fds[fd] : NULL;
	if (!c || c->state == IDLE || c->state == CONVERTED)
		return 1;
	if (c->state == SEND_MSG && flush_msg(fd) < 0)
		return -1;
	for (;;) {
		size_t want = c->have < 4 ? 4 : (size_t)c->reply[1] * 4;
		if (c->have >= 4 && want < 4) {
			errno = EPROTO;
			return -1;
		}
		if (c->have >= want)
			break;
		ssize_t n = real_recv(fd, c->reply + c->have, want - c->have, 0);
		if (n == 0) {
			errno = ECONNRESET;	/* closed before it answered */
			return -1;
		}
		if (n < 0)
			return -1;	/* EAGAIN: the reply is still on its way */
		c->have += (uint16_t)n;
	}
	size_t len = (size_t)c->reply[1] * 4;
	for (size_t off = 4; off + 2 <= len && c->reply[off + 1]; off += (size_t)c->reply[off + 1] * 4) {
		if (c->reply[off] == TLV_ERROR && off + 2 < len) {
			debug("converter answered with Error", fd, c->reply[off + 2]);
			c->state = IDLE;
			errno = ECONNREFUSED;
			return -1;
		}
	}
	c->state = CONVERTED;
	return 1;
}

ssize_t read(int fd, void *buf, size_t len)
{
	init();
	if (take_reply(fd) < 0)
		return -1;
	return real_read(fd, buf, len);
}

ssize_t recv(int fd, void *buf, size_t len, int flags)
{
	init();
	if (take_reply(fd) < 0)
		return -1;
	return real_recv(fd, buf, len, flags);
}

ssize_t recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *a, socklen_t *alen)
{
	init();
	if (take_reply(fd) < 0)
		return -1;
	return real_recvfrom(fd, buf, len, flags, a, alen);
}

ssize_t write(int fd, const void *buf, size_t len)
{
	init();
	if (flush_msg(fd) < 0)
		return -1;
	return real_write(fd, buf, len);
}

ssize_t send(int fd, const void *buf, size_t len, int flags)
{
	init();
	if (flush_msg(fd) < 0)
		return -1;
	return real_send(fd, buf, len, flags);
}

int close(int fd)
{
	init();
	if (fd >= 0 && fd < MAX_FDS && fds[fd])
		fds[fd]->state = IDLE;
	return real_close(fd);
}
