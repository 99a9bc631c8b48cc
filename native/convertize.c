/* libconvertize: LD_PRELOAD shim that sends an unchanged program's TCP connections through an
 * RFC 8803 Transport Converter (`mimbox client --convert`).
 *
 * connect(fd, dst) to an IPv4 destination becomes a TCP Fast Open sendto() to the converter
 * (MIMBOX_CONVERT_VIA=a.b.c.d:port) whose SYN carries a Convert message with a Connect TLV for dst
 * once the kernel holds the converter's TFO cookie; the first connection to a converter asks for the
 * cookie and the kernel sends the message right after the handshake (the converter takes SYN data
 * only with a valid cookie: a spoofed SYN's data is never read). If the SYN could not carry it, the
 * message goes out before the program's first bytes. The converter's own Convert message starts
 * its byte stream: the first read()/recv()/recvfrom() of such a socket consume it; an Error TLV
 * fails that read with ECONNREFUSED (errno) and MIMBOX_CONVERT_DEBUG=1 prints its code.
 * Destinations in MIMBOX_CONVERT_SKIP (comma-separated IPv4 addresses), loopback and the converter
 * itself are connected to directly. MIMBOX_CONVERT_FASTOPEN=0 sends the message right after the
 * handshake instead (one round trip later; see README on MPTCP with SYN data on Linux 6.18).
 * Wire format: mimbox/rfc8803.py (RFC 8803 §4). */
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

#define MAX_FDS 65536
#define CONNECT_LEN 24		/* fixed header (1 word) + Connect TLV without options (5 words) */
#define TLV_CONNECT 10
#define TLV_ERROR 30

enum { IDLE, SEND_MSG, READ_REPLY, CONVERTED };

struct conv_fd {
	uint8_t state;
	uint16_t have;		/* reply bytes read so far */
	uint8_t msg[CONNECT_LEN];
	uint8_t reply[1020];
};

static struct conv_fd *fds[MAX_FDS];
static struct sockaddr_in via;
static int via_ok = -1;
static in_addr_t skip[32];
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
	const char *v = getenv("MIMBOX_CONVERT_VIA");
	char host[64];
	const char *colon = v ? strrchr(v, ':') : NULL;
	if (!colon || colon - v >= (long)sizeof(host))
		return;
	memcpy(host, v, colon - v);
	host[colon - v] = 0;
	memset(&via, 0, sizeof(via));
	via.sin_family = AF_INET;
	via.sin_port = htons((uint16_t)atoi(colon + 1));
	if (inet_pton(AF_INET, host, &via.sin_addr) != 1)
		return;
	via_ok = 1;
	const char *f = getenv("MIMBOX_CONVERT_FASTOPEN");
	fastopen = !(f && f[0] == '0');
	const char *s = getenv("MIMBOX_CONVERT_SKIP");
	while (s && *s && nskip < 32) {
		char a[32];
		size_t n = strcspn(s, ",");
		if (n < sizeof(a)) {
			memcpy(a, s, n);
			a[n] = 0;
			if (inet_pton(AF_INET, a, &skip[nskip]) == 1)
				nskip++;
		}
		s += n + (s[n] == ',');
	}
}

static int redirected(int fd, const struct sockaddr *addr)
{
	int type;
	socklen_t len = sizeof(type);
	if (via_ok != 1 || fd < 0 || fd >= MAX_FDS || !addr || addr->sa_family != AF_INET)
		return 0;
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) || type != SOCK_STREAM)
		return 0;
	in_addr_t dst = ((const struct sockaddr_in *)addr)->sin_addr.s_addr;
	if ((ntohl(dst) >> 24) == 127 || dst == via.sin_addr.s_addr)
		return 0;
	for (int i = 0; i < nskip; i++)
		if (skip[i] == dst)
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
	const struct sockaddr_in *dst = (const struct sockaddr_in *)addr;
	struct conv_fd *c = fds[fd];
	if (!c && !(c = fds[fd] = calloc(1, sizeof(*c))))
		return real_connect(fd, addr, alen);
	memset(c, 0, sizeof(*c));
	/* fixed header: version 1, 6 words, unassigned 0; Connect TLV: type 10, 5 words, port,
	 * ::ffff:a.b.c.d */
	uint8_t *m = c->msg;
	m[0] = 1;
	m[1] = CONNECT_LEN / 4;
	m[4] = TLV_CONNECT;
	m[5] = 5;
	memcpy(m + 6, &dst->sin_port, 2);
	m[18] = m[19] = 0xff;
	memcpy(m + 20, &dst->sin_addr, 4);
	int nonblocking = fcntl(fd, F_GETFL) & O_NONBLOCK;
	if (!fastopen) {
		int r = real_connect(fd, (const struct sockaddr *)&via, sizeof(via));
		if (r == 0 || errno == EINPROGRESS) {
			c->state = SEND_MSG;	/* the message goes before the program's first bytes */
			c->have = 0;
		}
		return r;
	}
	ssize_t n = real_sendto(fd, m, CONNECT_LEN, MSG_FASTOPEN | MSG_NOSIGNAL,
				(const struct sockaddr *)&via, sizeof(via));
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
