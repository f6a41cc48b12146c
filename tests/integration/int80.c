/* i386 syscalls through `int $0x80` from a 64-bit static non-PIE binary (the compat
 * entry that the syscalls:* tracepoints never see). Pointers must fit in 32 bits: the
 * path is copied into a static buffer (non-PIE: below 4 GiB). Usage:
 *   int80 open PATH        open(PATH, O_RDWR|O_APPEND) via i386 open (5)
 *   int80 dup2 PORT        connect to 127.0.0.1:PORT (64-bit), i386 dup2(sock, 1) (63)
 *   int80 fcntl PORT       connect, close(0), i386 fcntl64(sock, F_DUPFD, 0) (221)
 *   int80 ptrace -         fork a child, i386 ptrace(PTRACE_ATTACH, child) (26), kill it
 * Exits 0 when the 32-bit call succeeded, 2 when it failed (-errno in the message). */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static char path[4096];

static long sys32(long nr, long a, long b, long c)
{
	long ret;

	asm volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
	return ret;
}

static int connected(const char *port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(atoi(port)) };
	int s = socket(AF_INET, SOCK_STREAM, 0);

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		perror("connect");
		exit(3);
	}
	return s;
}

int main(int argc, char **argv)
{
	long r;
	int s;

	if (argc != 3)
		return 1;
	if (!strcmp(argv[1], "open")) {
		strncpy(path, argv[2], sizeof(path) - 1);
		r = sys32(5, (long)path, O_RDWR | O_APPEND, 0);
	} else if (!strcmp(argv[1], "dup2")) {
		s = connected(argv[2]);
		r = sys32(63, s, 1, 0);
	} else if (!strcmp(argv[1], "fcntl")) {
		s = connected(argv[2]);
		close(0);
		r = sys32(221, s, F_DUPFD, 0);
	} else if (!strcmp(argv[1], "ptrace")) {
		s = fork();
		if (s == 0) {
			pause();
			_exit(0);
		}
		r = sys32(26, 16, s, 0);	/* PTRACE_ATTACH */
		kill(s, SIGKILL);
		waitpid(s, NULL, 0);
	} else {
		return 1;
	}
	if (r < 0) {
		fprintf(stderr, "int80 %s: %ld\n", argv[1], r);
		return 2;
	}
	return 0;
}
