/* libmptcpize: LD_PRELOAD shim that turns an unchanged program's TCP sockets into MPTCP sockets
 * (what mptcpize does; Debian 12 does not package it). socket(AF_INET{,6}, SOCK_STREAM, 0|TCP)
 * becomes IPPROTO_MPTCP; if the kernel refuses MPTCP, the plain TCP socket is returned instead.
 *
 * MPTCPIZE_LISTEN_ONLY=1: only listening sockets become MPTCP (so the connections they accept are
 * MPTCP), the connections the program opens stay TCP -- a proxy in front of TCP servers, as a
 * native `bind mptcp4@...` would be. socket() is left alone and listen() swaps the TCP socket for
 * an MPTCP one with the same options, flags and address (a socket cannot change protocol).
 *
 * MPTCPIZE_DEBUG=1 prints each conversion to stderr.
 *
 * Both are read once, when the shim is loaded: a program may clear its environment after it starts
 * (nginx keeps only TZ unless told otherwise), and its sockets must not change mode when it does. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif
#ifndef SOL_IP
#define SOL_IP 0
#endif

static int (*real_socket)(int, int, int);
static int (*real_listen)(int, int);

static void resolve(void)
{
	if (!real_socket)
		real_socket = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
	if (!real_listen)
		real_listen = (int (*)(int, int))dlsym(RTLD_NEXT, "listen");
}

static int flag(const char *name)
{
	const char *v = getenv(name);
	return v && *v && strcmp(v, "0") != 0;
}

static int listen_only_mode, debug_mode;

__attribute__((constructor)) static void read_environment(void)
{
	listen_only_mode = flag("MPTCPIZE_LISTEN_ONLY");
	debug_mode = flag("MPTCPIZE_DEBUG");
}

static int listen_only(void)
{
	return listen_only_mode;
}

static int tcp_like(int domain, int type, int protocol)
{
	return (domain == AF_INET || domain == AF_INET6) && (type & 0xff) == SOCK_STREAM &&
	       (protocol == 0 || protocol == IPPROTO_TCP);
}

int socket(int domain, int type, int protocol)
{
	resolve();
	if (!listen_only() && tcp_like(domain, type, protocol)) {
		int fd = real_socket(domain, type, IPPROTO_MPTCP);
		if (fd >= 0) {
			if (debug_mode)
				fprintf(stderr, "mptcpize: fd %d is MPTCP\n", fd);
			return fd;
		}
	}
	return real_socket(domain, type, protocol);
}

/* integer options a listener may carry from before listen(); the rest are set afterwards */
static const struct { int level, name; } carried[] = {
	{SOL_SOCKET, SO_REUSEADDR}, {SOL_SOCKET, SO_REUSEPORT}, {SOL_SOCKET, SO_KEEPALIVE},
	{SOL_SOCKET, SO_MARK}, {SOL_IP, IP_TRANSPARENT}, {SOL_IP, IP_FREEBIND},
	{IPPROTO_TCP, TCP_NODELAY}, {IPPROTO_TCP, TCP_DEFER_ACCEPT},
};

/* A TCP socket, bound or not, replaced in place by an MPTCP one: -1 (errno set) leaves fd as it was. */
static int swap_for_mptcp(int fd)
{
	int domain, type, protocol;
	socklen_t len = sizeof(int);
	struct sockaddr_storage addr;
	socklen_t alen = sizeof(addr);

	if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0 ||
	    getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 ||
	    getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &len) < 0)
		return -1;
	if (!tcp_like(domain, type, protocol)) {
		errno = EPROTONOSUPPORT;
		return -1;
	}
	if (getsockname(fd, (struct sockaddr *)&addr, &alen) < 0)
		return -1;
	int fl = fcntl(fd, F_GETFL), fdfl = fcntl(fd, F_GETFD);
	int m = real_socket(domain, SOCK_STREAM, IPPROTO_MPTCP);
	if (m < 0)
		return -1;
	for (size_t i = 0; i < sizeof(carried) / sizeof(carried[0]); i++) {
		int v;
		socklen_t vl = sizeof(v);
		if (getsockopt(fd, carried[i].level, carried[i].name, &v, &vl) == 0 && v)
			setsockopt(m, carried[i].level, carried[i].name, &v, vl);
	}
	if (domain == AF_INET6) {
		int v;
		socklen_t vl = sizeof(v);
		if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v, &vl) == 0)
			setsockopt(m, IPPROTO_IPV6, IPV6_V6ONLY, &v, vl);
	}
	int port = domain == AF_INET ? ((struct sockaddr_in *)&addr)->sin_port
				     : ((struct sockaddr_in6 *)&addr)->sin6_port;
	/* dup2 closes the TCP socket (its address is free again) and puts the MPTCP one at its number */
	if (dup2(m, fd) < 0) {
		int e = errno;
		close(m);
		errno = e;
		return -1;
	}
	close(m);
	if (fl >= 0)
		fcntl(fd, F_SETFL, fl);
	if (fdfl >= 0)
		fcntl(fd, F_SETFD, fdfl);
	if (port && bind(fd, (struct sockaddr *)&addr, alen) < 0)
		return -2;   /* the TCP socket is gone: the caller's listen() must fail */
	return 0;
}

int listen(int fd, int backlog)
{
	resolve();
	if (listen_only()) {
		int r = swap_for_mptcp(fd);	/* -1: not a TCP socket (or no MPTCP): listen as it is */
		if (r == -2)
			return -1;
		if (r == 0 && debug_mode)
			fprintf(stderr, "mptcpize: listening fd %d is MPTCP\n", fd);
	}
	return real_listen(fd, backlog);
}
