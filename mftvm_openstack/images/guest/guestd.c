/*
 * guestd - the workload programs that run inside an mftvm test guest.
 *
 * One static binary with sub-modes, so the initramfs carries a single file:
 *
 *   guestd writer DEV [interval_ms [max_records [TAG]]]
 *   guestd counter PORT DEV
 *   guestd session PORT DEV
 *   guestd iobench DEV SECONDS
 *   guestd dirty MIB [RATE_MIB_PER_S]
 *   guestd diskrate DEV RATE_MIB_PER_S KIB [SECONDS]
 *
 * Every mode writes one-line, machine-parsable reports to stdout (the guest
 * serial console).  The tests and benchmarks on the host read them there and
 * compare them with what the disk holds after a failover.
 *
 * Disk layout of DEV (shared by the modes, so they can run together):
 *
 *   [0, 4 KiB)           counter block: "MFTVCNT1" + u64 value (LE)
 *   [4 KiB, 8 KiB)       session counter block: "MFTVSES1" + u64 value
 *   [1 MiB, 512 MiB)     writer records, record k at 1 MiB + k * 4 KiB
 *   [512 MiB, 576 MiB)   iobench scratch area
 *   [576 MiB, 832 MiB)   diskrate scratch area
 *
 * Writer record k (4096 bytes, little-endian):
 *
 *   0   "MFTVREC1"
 *   8   u64 seq (= k)
 *   16  prev hash (32 bytes; zeros for record 0)
 *   48  this hash = SHA-256(seq || prev hash || payload)
 *   80  payload: the 8 bytes of seq repeated up to 4096
 *
 * mftvm_openstack/images/records.py is the Python mirror of this layout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define WRITER_BASE (1ULL << 20)
#define WRITER_END (512ULL << 20)
#define IOBENCH_BASE (512ULL << 20)
#define IOBENCH_SPAN (64ULL << 20)
#define DISKRATE_BASE (576ULL << 20)
#define DISKRATE_SPAN (256ULL << 20)
#define REC_HDR 80
#define REC_PAYLOAD (BLOCK - REC_HDR)

/* ---------------------------------------------------------------- SHA-256 */

typedef struct {
	uint32_t h[8];
	uint64_t len;
	uint8_t buf[64];
	size_t fill;
} sha256_ctx;

static const uint32_t K256[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
	0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
	0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
	0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
	0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
	0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
	0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
	0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
	0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(sha256_ctx *c, const uint8_t *p)
{
	uint32_t w[64], a, b, d, e, f, g, h, cc, t1, t2;
	int i;

	for (i = 0; i < 16; i++)
		w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
		       (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (i = 16; i < 64; i++) {
		uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
		uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
		w[i] = w[i - 16] + s0 + w[i - 7] + s1;
	}
	a = c->h[0]; b = c->h[1]; cc = c->h[2]; d = c->h[3];
	e = c->h[4]; f = c->h[5]; g = c->h[6]; h = c->h[7];
	for (i = 0; i < 64; i++) {
		t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) +
		     K256[i] + w[i];
		t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & cc) ^ (b & cc));
		h = g; g = f; f = e; e = d + t1;
		d = cc; cc = b; b = a; a = t1 + t2;
	}
	c->h[0] += a; c->h[1] += b; c->h[2] += cc; c->h[3] += d;
	c->h[4] += e; c->h[5] += f; c->h[6] += g; c->h[7] += h;
}

static void sha256_init(sha256_ctx *c)
{
	static const uint32_t iv[8] = {
		0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
		0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
	};
	memcpy(c->h, iv, sizeof(iv));
	c->len = 0;
	c->fill = 0;
}

static void sha256_update(sha256_ctx *c, const void *data, size_t n)
{
	const uint8_t *p = data;

	c->len += n;
	while (n > 0) {
		size_t take = 64 - c->fill;
		if (take > n)
			take = n;
		memcpy(c->buf + c->fill, p, take);
		c->fill += take;
		p += take;
		n -= take;
		if (c->fill == 64) {
			sha256_block(c, c->buf);
			c->fill = 0;
		}
	}
}

static void sha256_final(sha256_ctx *c, uint8_t out[32])
{
	uint64_t bits = c->len * 8;
	uint8_t pad = 0x80, zero = 0, lenbuf[8];
	int i;

	sha256_update(c, &pad, 1);
	while (c->fill != 56)
		sha256_update(c, &zero, 1);
	for (i = 0; i < 8; i++)
		lenbuf[i] = (uint8_t)(bits >> (56 - 8 * i));
	sha256_update(c, lenbuf, 8);
	for (i = 0; i < 8; i++) {
		out[4 * i] = (uint8_t)(c->h[i] >> 24);
		out[4 * i + 1] = (uint8_t)(c->h[i] >> 16);
		out[4 * i + 2] = (uint8_t)(c->h[i] >> 8);
		out[4 * i + 3] = (uint8_t)c->h[i];
	}
}

/* ---------------------------------------------------------------- helpers */

static void die(const char *what)
{
	printf("GUESTD-ERROR %s: %s\n", what, strerror(errno));
	exit(1);
}

static void put_u64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_u64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static uint8_t *alloc_block(void)
{
	void *p;
	if (posix_memalign(&p, BLOCK, BLOCK) != 0)
		die("posix_memalign");
	memset(p, 0, BLOCK);
	return p;
}

/*
 * Open for synchronous direct I/O, so every acknowledged write has really
 * left the guest (and reached QEMU's block layer) before we report it.
 * Filesystems such as tmpfs refuse O_DIRECT: fall back to O_DSYNC only, which
 * is what the unit tests use with a regular file.
 */
static int open_dev(const char *path)
{
	int fd = open(path, O_RDWR | O_DIRECT | O_DSYNC | O_CREAT, 0644);
	if (fd < 0 && errno == EINVAL)
		fd = open(path, O_RDWR | O_DSYNC | O_CREAT, 0644);
	if (fd < 0)
		die(path);
	return fd;
}

/* Device size in bytes, or 0 for a regular file (which may grow). */
static uint64_t dev_size(int fd)
{
	struct stat st;
	off_t end;

	if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
		return 0;
	end = lseek(fd, 0, SEEK_END);
	return end < 0 ? 0 : (uint64_t)end;
}

/* Read one block; bytes past the end of a regular file read as zeros. */
static void read_block(int fd, uint64_t off, uint8_t *buf)
{
	ssize_t n = pread(fd, buf, BLOCK, (off_t)off);
	if (n < 0)
		die("pread");
	if (n < BLOCK)
		memset(buf + n, 0, BLOCK - n);
}

static void write_block(int fd, uint64_t off, const uint8_t *buf)
{
	if (pwrite(fd, buf, BLOCK, (off_t)off) != BLOCK)
		die("pwrite");
	if (fdatasync(fd) != 0)
		die("fdatasync");
}

static int all_zero(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i])
			return 0;
	return 1;
}

/* ----------------------------------------------------------------- writer */

/* Fill buf with record seq chained after prev; its hash lands at buf+48. */
static void make_record(uint8_t *buf, uint64_t seq, const uint8_t prev[32])
{
	sha256_ctx c;

	memcpy(buf, "MFTVREC1", 8);
	put_u64(buf + 8, seq);
	memcpy(buf + 16, prev, 32);
	for (int i = REC_HDR; i < BLOCK; i += 8)
		put_u64(buf + i, seq);
	sha256_init(&c);
	sha256_update(&c, buf + 8, 8);
	sha256_update(&c, prev, 32);
	sha256_update(&c, buf + REC_HDR, REC_PAYLOAD);
	sha256_final(&c, buf + 48);
}

/* Is the block in buf exactly record seq chained after prev? */
static int record_valid(const uint8_t *buf, uint64_t seq, const uint8_t prev[32])
{
	static uint8_t *want;

	if (!want)
		want = alloc_block();
	make_record(want, seq, prev);
	return memcmp(buf, want, BLOCK) == 0;
}

static int mode_writer(int argc, char **argv)
{
	const char *path = argv[2];
	long interval_ms = argc > 3 ? atol(argv[3]) : 20;
	uint64_t max_records = argc > 4 ? strtoull(argv[4], NULL, 10) : 0;
	/* A second writer (on another disk) tags its lines: "VDB-ACK ..." */
	const char *tag = argc > 5 ? argv[5] : "";
	int fd = open_dev(path);
	uint64_t size = dev_size(fd), end = WRITER_END, k = 0;
	uint8_t prev[32] = { 0 }, *buf = alloc_block();
	char hex[65];

	if (size && size < end)
		end = size;

	/* Continue an existing chain: a reboot on a used disk appends to it. */
	for (;; k++) {
		uint64_t off = WRITER_BASE + k * BLOCK;
		if (off + BLOCK > end)
			break;
		read_block(fd, off, buf);
		if (!record_valid(buf, k, prev))
			break;
		memcpy(prev, buf + 48, 32);
	}
	printf("%sWRITER-START %llu\n", tag, (unsigned long long)k);

	for (; !max_records || k < max_records; k++) {
		uint64_t off = WRITER_BASE + k * BLOCK;
		if (off + BLOCK > end) {
			printf("%sWRITER-FULL %llu\n", tag, (unsigned long long)k);
			return 0;
		}
		/*
		 * A slot we are about to fill should be empty.  If it is not, the
		 * disk holds a write this guest has not made yet in its own
		 * history: a failover restored RAM to an older epoch than the disk.
		 */
		read_block(fd, off, buf);
		if (!all_zero(buf, BLOCK))
			printf("%sFUTURE %llu\n", tag, (unsigned long long)k);
		make_record(buf, k, prev);
		write_block(fd, off, buf);
		memcpy(prev, buf + 48, 32);
		for (int i = 0; i < 32; i++)
			sprintf(hex + 2 * i, "%02x", prev[i]);
		printf("%sACK %llu %s\n", tag, (unsigned long long)k, hex);
		if (interval_ms > 0)
			sleep_ms(interval_ms);
	}
	return 0;
}

/* ---------------------------------------------------------------- counter */

/*
 * An answered connection is not closed at once: it lingers until its client
 * closes (it does once it has the answer; at most 1 s), so TIME_WAIT lands
 * on the client's side, not in this guest. A guest TIME_WAIT outlives a
 * failover, but the user-mode network's TCP peer (slirp) is reborn with the
 * new QEMU and starts its ISNs low again: a reconnect from a recently used
 * client port hits the old TIME_WAIT, which answers the SYN with a bare ACK;
 * slirp resets it and sends its SYN again only ~6 s later, past the client's
 * timeout. Lingering happens beside serving: a connection whose client died
 * with the old QEMU must not hold up the next request.
 */
#define LINGER_MAX 16
static struct {
	int fd;
	double until;
} lingering[LINGER_MAX];
static int n_lingering;

static void linger_drop(int i)
{
	close(lingering[i].fd);
	lingering[i] = lingering[--n_lingering];
}

static void linger_add(int c)
{
	if (n_lingering == LINGER_MAX)
		linger_drop(0);
	lingering[n_lingering].fd = c;
	lingering[n_lingering].until = now_s() + 1.0;
	n_lingering++;
}

/* Close lingering connections as their clients close (or time runs out)
 * until srv has a connection to accept. */
static void linger_until_acceptable(int srv)
{
	for (;;) {
		struct pollfd pfd[LINGER_MAX + 1];
		double now = now_s(), next = 0;
		int i, timeout = -1;

		for (i = 0; i < n_lingering;) {
			if (lingering[i].until <= now) {
				linger_drop(i);
				continue;
			}
			if (!next || lingering[i].until < next)
				next = lingering[i].until;
			i++;
		}
		if (next)
			timeout = (int)((next - now) * 1000) + 1;
		pfd[0].fd = srv;
		pfd[0].events = POLLIN;
		for (i = 0; i < n_lingering; i++) {
			pfd[i + 1].fd = lingering[i].fd;
			pfd[i + 1].events = POLLIN;
		}
		if (poll(pfd, n_lingering + 1, timeout) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		/* Backwards: linger_drop(i) moves the last entry, already
		 * looked at, into slot i. */
		for (i = n_lingering - 1; i >= 0; i--) {
			char junk[64];
			if (pfd[i + 1].revents &&
			    read(lingering[i].fd, junk, sizeof(junk)) <= 0)
				linger_drop(i);
		}
		if (pfd[0].revents)
			return;
	}
}

/* Serves forever. */
static __attribute__((noreturn)) void mode_counter(int argc, char **argv)
{
	int port = atoi(argv[2]), one = 1;
	int fd = open_dev(argv[3]), srv;
	uint8_t *blk = alloc_block();
	struct sockaddr_in addr;
	uint64_t value = 0;

	(void)argc;
	read_block(fd, 0, blk);
	if (memcmp(blk, "MFTVCNT1", 8) == 0)
		value = get_u64(blk + 8);
	else if (!all_zero(blk, 16))
		printf("COUNTER-WARNING bad magic, starting at 0\n");

	srv = socket(AF_INET, SOCK_STREAM, 0);
	if (srv < 0)
		die("socket");
	setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	memset(&addr, 0, sizeof(addr));
	addr.sin_family = AF_INET;
	addr.sin_port = htons(port);
	addr.sin_addr.s_addr = htonl(INADDR_ANY);
	if (bind(srv, (struct sockaddr *)&addr, sizeof(addr)) != 0)
		die("bind");
	if (listen(srv, 16) != 0)
		die("listen");
	printf("COUNTER-READY %d %llu\n", port, (unsigned long long)value);

	for (;;) {
		char line[65], reply[32];
		size_t got = 0;
		int c;

		linger_until_acceptable(srv);
		c = accept(srv, NULL, NULL);

		if (c < 0) {
			if (errno == EINTR)
				continue;
			die("accept");
		}
		/* A peer that vanished (its host-side half died with a failed
		 * primary's QEMU) must not wedge this one-at-a-time server. */
		struct timeval tmo = { .tv_sec = 1 };
		setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tmo, sizeof(tmo));
		/* One request line; its content does not matter. A connection
		 * that ends before its newline asked for nothing: no count. */
		int complete = 0;
		while (got < sizeof(line) - 1) {
			ssize_t n = read(c, line + got, 1);
			if (n <= 0)
				break;
			if (line[got] == '\n') {
				complete = 1;
				break;
			}
			got++;
		}
		if (!complete) {
			close(c);
			continue;
		}
		/* Persist before replying: an answer the client saw must survive. */
		value++;
		memset(blk, 0, BLOCK);
		memcpy(blk, "MFTVCNT1", 8);
		put_u64(blk + 8, value);
		write_block(fd, 0, blk);
		int len = snprintf(reply, sizeof(reply), "%llu\n", (unsigned long long)value);
		if (write(c, reply, len) != len)
			printf("COUNTER-WARNING short reply\n");
		printf("COUNT %llu\n", (unsigned long long)value);
		linger_add(c);
	}
}

/* ---------------------------------------------------------------- session */

/*
 * The counter on persistent connections, for clients that keep theirs
 * open: every line a client sends is answered with the next value
 * (persisted first), many clients at once, each until it closes.
 */
#define SESSION_MAX 64
#define SESSION_BLOCK 4096

static __attribute__((noreturn)) void mode_session(int argc, char **argv)
{
	int port = atoi(argv[2]), one = 1, n = 0, i;
	int fd = open_dev(argv[3]), srv;
	uint8_t *blk = alloc_block();
	struct sockaddr_in addr;
	struct pollfd pfd[SESSION_MAX + 1];
	uint64_t value = 0;

	(void)argc;
	read_block(fd, SESSION_BLOCK, blk);
	if (memcmp(blk, "MFTVSES1", 8) == 0)
		value = get_u64(blk + 8);
	srv = socket(AF_INET, SOCK_STREAM, 0);
	if (srv < 0)
		die("socket");
	setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	memset(&addr, 0, sizeof(addr));
	addr.sin_family = AF_INET;
	addr.sin_port = htons(port);
	addr.sin_addr.s_addr = htonl(INADDR_ANY);
	if (bind(srv, (struct sockaddr *)&addr, sizeof(addr)) != 0)
		die("bind");
	if (listen(srv, SESSION_MAX) != 0)
		die("listen");
	printf("SESSION-READY %d %llu\n", port, (unsigned long long)value);
	pfd[0].fd = srv;
	pfd[0].events = POLLIN;
	for (;;) {
		if (poll(pfd, n + 1, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		/* Backwards: dropping slot i moves the last one, already
		 * looked at, into it. */
		for (i = n; i >= 1; i--) {
			char buf[256], reply[32];
			ssize_t got;
			int k, lines = 0;

			if (!pfd[i].revents)
				continue;
			got = read(pfd[i].fd, buf, sizeof(buf));
			if (got <= 0) {
				close(pfd[i].fd);
				pfd[i] = pfd[n--];
				continue;
			}
			for (k = 0; k < got; k++)
				lines += buf[k] == '\n';
			while (lines-- > 0) {
				value++;
				memset(blk, 0, BLOCK);
				memcpy(blk, "MFTVSES1", 8);
				put_u64(blk + 8, value);
				write_block(fd, SESSION_BLOCK, blk);
				int len = snprintf(reply, sizeof(reply), "%llu\n",
						   (unsigned long long)value);
				if (write(pfd[i].fd, reply, len) != len)
					printf("SESSION-WARNING short reply\n");
			}
		}
		if ((pfd[0].revents & POLLIN) && n < SESSION_MAX) {
			int c = accept(srv, NULL, NULL);

			if (c >= 0) {
				n++;
				pfd[n].fd = c;
				pfd[n].events = POLLIN;
				pfd[n].revents = 0;
			}
		}
	}
}

/* ---------------------------------------------------------------- iobench */

static int mode_iobench(int argc, char **argv)
{
	double seconds = atof(argv[3]), start, deadline, maxlat = 0;
	int fd = open_dev(argv[2]);
	uint64_t size = dev_size(fd), writes = 0;
	uint8_t *buf = alloc_block();

	(void)argc;
	if (size && size < IOBENCH_BASE + IOBENCH_SPAN) {
		printf("IOBENCH-ERROR disk has %llu bytes, needs %llu (576 MiB)\n",
		       (unsigned long long)size,
		       (unsigned long long)(IOBENCH_BASE + IOBENCH_SPAN));
		return 1;
	}
	memset(buf, 0xa5, BLOCK);
	/* The host times the run between this line and the last: a guest's
	 * clock stands still while a checkpoint has it stopped. */
	printf("IOBENCH-START\n");
	fflush(stdout);
	start = now_s();
	deadline = start + seconds;
	for (;;) {
		double t0 = now_s(), lat;
		if (t0 >= deadline)
			break;
		put_u64(buf, writes);
		write_block(fd, IOBENCH_BASE + (writes * BLOCK) % IOBENCH_SPAN, buf);
		lat = now_s() - t0;
		if (lat > maxlat)
			maxlat = lat;
		writes++;
	}
	printf("IOPS %.1f WRITES %llu MAXLAT_MS %.3f\n",
	       writes / (now_s() - start), (unsigned long long)writes, maxlat * 1000);
	return 0;
}

/* ------------------------------------------------------------------ dirty */

/*
 * Dirties MIB of memory for ever, and checks it: pass p writes p + 1 into
 * the first word of each page, after checking that the word still holds
 * p, its value of the last pass. A page that a failover restored from an
 * older checkpoint than the rest prints "DIRTY-BAD page want got" (then
 * the check carries on from what it found). "DIRTY-PASS p" after a pass,
 * at most once a second.
 *
 * RATE (MiB/s, optional): pages written per second, paced in 10 ms steps;
 * without it (or 0), a pass as fast as it goes, 1 ms apart.
 */
static __attribute__((noreturn)) void mode_dirty(int argc, char **argv)
{
	size_t bytes = (size_t)atol(argv[2]) << 20;
	double rate = argc >= 4 ? atof(argv[3]) : 0;
	long page = sysconf(_SC_PAGESIZE);
	size_t words = page / 8, npages = bytes / page;
	volatile uint64_t *mem;
	uint64_t pass = 0;
	size_t next = 0;
	double start, due = 0, said = 0;

	mem = malloc(bytes);
	if (!mem || !npages)
		die("malloc");
	for (size_t i = 0; i < npages; i++)
		mem[i * words] = 0;
	printf("DIRTY-READY %zu\n", bytes >> 20);
	fflush(stdout);
	start = now_s();
	for (;;) {
		/* the pages due by now (all of a pass without a rate) */
		size_t todo = npages - next;
		if (rate > 0) {
			double want = (now_s() - start) * rate * (1 << 20) / page;
			todo = want > due ? (size_t)(want - due) : 0;
			due += todo;
		}
		for (; todo > 0; todo--) {
			uint64_t got = mem[next * words];
			if (got != pass) {
				printf("DIRTY-BAD %zu %llu %llu\n", next,
				       (unsigned long long)pass,
				       (unsigned long long)got);
				fflush(stdout);
			}
			mem[next * words] = pass + 1;
			if (++next == npages) {
				next = 0;
				pass++;
				if (now_s() - said >= 1) {
					said = now_s();
					printf("DIRTY-PASS %llu\n",
					       (unsigned long long)pass);
					fflush(stdout);
				}
			}
		}
		sleep_ms(rate > 0 ? 10 : 1);
	}
}

/* --------------------------------------------------------------- diskrate */

/*
 * Writes the disk at a sustained rate: RATE MiB/s of KIB-sized direct
 * writes (no fdatasync: each has reached QEMU's block layer when it
 * returns), at random KIB-aligned offsets of the diskrate area, paced in
 * 10 ms steps. "DISKRATE-START", then "DISKRATE bytes" (the total so far)
 * about twice a second: the host times the rate with its own clock (a
 * guest's clock stands still while a checkpoint has it stopped). Ends
 * after SECONDS (0 or none: never).
 */
static int mode_diskrate(int argc, char **argv)
{
	double rate = atof(argv[3]), seconds = argc >= 6 ? atof(argv[5]) : 0;
	long kib = atol(argv[4]);
	size_t len = (size_t)kib << 10;
	uint64_t slots, done = 0, due = 0, seed = 88172645463325252ULL;
	int fd = open(argv[2], O_RDWR | O_DIRECT | O_CREAT, 0644);
	double start, said = 0;
	void *buf;

	if (fd < 0 && errno == EINVAL)
		fd = open(argv[2], O_RDWR | O_CREAT, 0644);
	if (fd < 0)
		die(argv[2]);
	if (kib < 4 || kib > 1024 || kib % 4 || rate <= 0) {
		printf("DISKRATE-ERROR give a rate > 0 and 4-1024 KiB in "
		       "multiples of 4\n");
		return 1;
	}
	slots = DISKRATE_SPAN / len;
	if (posix_memalign(&buf, BLOCK, len) != 0)
		die("posix_memalign");
	memset(buf, 0x5a, len);
	printf("DISKRATE-START %.3f %ld\n", rate, kib);
	fflush(stdout);
	start = now_s();
	for (;;) {
		double now = now_s();
		uint64_t want = (uint64_t)((now - start) * rate * (1 << 20) / len);
		if (seconds > 0 && now - start >= seconds)
			break;
		/* Behind a rate the disk cannot give, the writes would go
		 * on for ever: half a second of them at most, then the
		 * total is said all the same. */
		for (; due < want && now_s() - now < 0.5; due++) {
			/* xorshift64: offsets spread over the area, as a
			 * database's pages are */
			seed ^= seed << 13;
			seed ^= seed >> 7;
			seed ^= seed << 17;
			put_u64(buf, due);
			if (pwrite(fd, buf, len, (off_t)(DISKRATE_BASE +
			    (seed % slots) * len)) != (ssize_t)len)
				die("pwrite");
			done += len;
		}
		now = now_s();
		if (now - said >= 0.5) {
			said = now;
			printf("DISKRATE %llu\n", (unsigned long long)done);
			fflush(stdout);
		}
		if (due >= want)
			sleep_ms(10);
	}
	printf("DISKRATE %llu\n", (unsigned long long)done);
	return 0;
}

/* ----------------------------------------------------------------- ticker */

/* Output with no disk I/O: "TICK n" every interval. Shows which copy of
 * the guest runs when, even while its disk cannot be written. */
static void mode_ticker(int argc, char **argv)
{
	int interval = atoi(argv[2]);
	unsigned long long n = 0;

	(void)argc;
	if (interval <= 0)
		interval = 50;
	for (;; n++) {
		printf("TICK %llu\n", n);
		sleep_ms(interval);
	}
}

/* ------------------------------------------------------------------- main */

static void usage(void)
{
	fprintf(stderr,
		"usage: guestd writer DEV [interval_ms [max_records [TAG]]]\n"
		"       guestd counter PORT DEV\n"
		"       guestd session PORT DEV\n"
		"       guestd iobench DEV SECONDS\n"
		"       guestd dirty MIB\n"
		"       guestd diskrate DEV MIB_PER_S KIB [SECONDS]\n"
		"       guestd ticker INTERVAL_MS\n");
	exit(2);
}

int main(int argc, char **argv)
{
	/* Line-buffered even on a serial console or pipe: the host reads lines. */
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 3)
		usage();
	if (strcmp(argv[1], "writer") == 0)
		return mode_writer(argc, argv);
	if (strcmp(argv[1], "counter") == 0 && argc >= 4)
		mode_counter(argc, argv);
	if (strcmp(argv[1], "session") == 0 && argc >= 4)
		mode_session(argc, argv);
	if (strcmp(argv[1], "iobench") == 0 && argc >= 4)
		return mode_iobench(argc, argv);
	if (strcmp(argv[1], "dirty") == 0)
		mode_dirty(argc, argv);
	if (strcmp(argv[1], "ticker") == 0)
		mode_ticker(argc, argv);
	if (strcmp(argv[1], "diskrate") == 0 && argc >= 5)
		return mode_diskrate(argc, argv);
	usage();
	return 2;
}
