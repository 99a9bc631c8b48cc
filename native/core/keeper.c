// SPDX-License-Identifier: GPL-2.0
/* The keeper: a crash resets the connections instead of ending them cleanly.
 * When a process dies the kernel closes its sockets gracefully: a client whose converter crashed mid-
 * download sees a shorter stream ending like a complete one. The keeper shares this process's file
 * table (clone CLONE_FILES, no shared memory), so the sockets outlive a crash; told by PDEATHSIG that
 * its parent died without releasing it, it resets every connected TCP/MPTCP socket in the table (RST,
 * MPTCP: on every subflow) and exits. A graceful stop releases it first (core_keeper_release).
 * It runs only this C code after clone: no interpreter, no allocation. */
#include "rooms.h"
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t keeper_signal;

static void keeper_on_signal(int sig)
{
	keeper_signal = sig;
}

static void keeper_reset_all(void)
{
	char buf[4096];
	int dir = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	long n;
	if (dir < 0)
		return;
	while ((n = syscall(SYS_getdents64, dir, buf, sizeof(buf))) > 0) {
		for (long off = 0; off < n;) {
			struct { uint64_t ino; int64_t off; unsigned short reclen; unsigned char type; char name[]; } *d =
				(void *)(buf + off);
			int fd = 0, v = 0;
			socklen_t len = sizeof(v);
			struct sockaddr_storage peer;
			socklen_t plen = sizeof(peer);
			off += d->reclen;
			for (const char *p = d->name; *p >= '0' && *p <= '9'; p++)
				fd = fd * 10 + (*p - '0');
			if (d->name[0] < '0' || d->name[0] > '9' || fd == dir)
				continue;
			if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &len) || v != SOCK_STREAM)
				continue;
			len = sizeof(v);
			if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &v, &len) || v)
				continue;	/* a listener: its queue is reset when the keeper exits */
			if (getpeername(fd, (struct sockaddr *)&peer, &plen) ||
			    (peer.ss_family != AF_INET && peer.ss_family != AF_INET6))
				continue;
			reset_close(fd);
		}
	}
	close(dir);
}



/* 0 in the parent (the keeper's pid is kept), -errno; the child never returns */
int core_keeper(struct core *c)
{
	pid_t parent = getpid();
	sigset_t all, old;
	long pid;

	sigfillset(&all);
	sigprocmask(SIG_BLOCK, &all, &old);	/* no handler of the parent's runs in the child */
	pid = syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
	if (pid == 0) {
		struct sigaction sa = {.sa_handler = keeper_on_signal};
		sigset_t none;
		for (int sig = 1; sig < 32; sig++)
			if (sig != SIGKILL && sig != SIGSTOP)
				signal(sig, SIG_IGN);
		sigaction(SIGUSR1, &sa, NULL);		/* the parent died */
		sigaction(SIGTERM, &sa, NULL);		/* stand down: the parent stops gracefully */
		prctl(PR_SET_NAME, KEEPER_NAME);
		prctl(PR_SET_PDEATHSIG, SIGUSR1);
		sigemptyset(&none);
		if (getppid() != parent)
			keeper_signal = SIGUSR1;	/* died before PDEATHSIG was set */
		/* every signal is still blocked here: sigsuspend() unblocks and waits in one step, so a
		 * signal that came since the check above is not missed (pause() could wait forever) */
		while (!keeper_signal)
			sigsuspend(&none);
		if (keeper_signal == SIGUSR1)
			keeper_reset_all();
		syscall(SYS_exit_group, 0);
	}
	sigprocmask(SIG_SETMASK, &old, NULL);
	if (pid < 0)
		return -errno;
	c->keeper = pid;
	return 0;
}

void core_keeper_release(struct core *c)
{
	if (c->keeper > 0) {
		kill(c->keeper, SIGTERM);
		waitpid(c->keeper, NULL, 0);
		c->keeper = 0;
	}
}
