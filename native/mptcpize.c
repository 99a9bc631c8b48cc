/* libmptcpize: LD_PRELOAD shim that turns an unchanged program's TCP sockets into MPTCP sockets
 * (what mptcpize does; Debian 12 does not package it). socket(AF_INET{,6}, SOCK_STREAM, 0|TCP)
 * becomes IPPROTO_MPTCP; if the kernel refuses MPTCP, the plain TCP socket is returned instead.
 * MPTCPIZE_DEBUG=1 prints each conversion to stderr. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif

int socket(int domain, int type, int protocol)
{
	static int (*real_socket)(int, int, int);
	if (!real_socket)
		real_socket = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
	if ((domain == AF_INET || domain == AF_INET6) && (type & 0xff) == SOCK_STREAM &&
	    (protocol == 0 || protocol == IPPROTO_TCP)) {
		int fd = real_socket(domain, type, IPPROTO_MPTCP);
		if (fd >= 0) {
			if (getenv("MPTCPIZE_DEBUG"))
				fprintf(stderr, "mptcpize: fd %d is MPTCP\n", fd);
			return fd;
		}
	}
	return real_socket(domain, type, protocol);
}
