/*
 * hello_nolibc: hello_world without any C library (static, no start-up code beyond
 * _start), for measuring the engine's spawn floor: glibc's own start-up costs
 * ~300-400 µs per process on these VMs (CPUID traps), more than the whole spawn
 * path. Same protocol and answer as hello_world: SampleResponse{greeting:
 * "Hello, world!"}. x86_64 Linux only. Built with -nostdlib -static.
 */
typedef unsigned long u64;

static long sys3(long n, long a, long b, long c) {
  long ret;
  __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
  return ret;
}

static long rd(int fd, void *buf, u64 len) { return sys3(0, fd, (long)buf, (long)len); }
static long wr(int fd, const void *buf, u64 len) { return sys3(1, fd, (long)buf, (long)len); }
static void quit(int code) {
  sys3(231, code, 0, 0);
  for (;;) {
  }
}

static int read_exact(int fd, unsigned char *p, u64 n) {
  while (n > 0) {
    long r = rd(fd, p, n);
    if (r == -4) continue; /* EINTR */
    if (r <= 0) return -1;
    p += r;
    n -= (u64)r;
  }
  return 0;
}

static int write_all(int fd, const unsigned char *p, u64 n) {
  while (n > 0) {
    long r = wr(fd, p, n);
    if (r == -4) continue;
    if (r <= 0) return -1;
    p += r;
    n -= (u64)r;
  }
  return 0;
}

static unsigned char scratch[4096];

__attribute__((used)) void start_c(long *sp) {
  long argc = sp[0];
  char **argv = (char **)(sp + 1);
  if (argc < 2) quit(2);
  int fd = 0;
  for (const char *c = argv[1]; *c; ++c) {
    if (*c < '0' || *c > '9') quit(2);
    fd = fd * 10 + (*c - '0');
  }
  unsigned char ready = 'R';
  if (write_all(fd, &ready, 1) != 0) quit(1);
  /* Read and discard the request: varint length, then the body. */
  u64 len = 0;
  for (int i = 0; i < 10; ++i) {
    unsigned char b;
    if (read_exact(fd, &b, 1) != 0) quit(1);
    len |= (u64)(b & 0x7f) << (7 * i);
    if (!(b & 0x80)) break;
    if (i == 9) quit(1);
  }
  while (len > 0) {
    u64 chunk = len < sizeof scratch ? len : sizeof scratch;
    if (read_exact(fd, scratch, chunk) != 0) quit(1);
    len -= chunk;
  }
  /* SampleResponse{greeting = 1: "Hello, world!"}, length-delimited. */
  static const unsigned char response[] = {15, 0x0a, 13, 'H', 'e', 'l', 'l', 'o', ',', ' ', 'w', 'o', 'r', 'l', 'd', '!'};
  if (write_all(fd, response, sizeof response) != 0) quit(1);
  quit(0);
}

__asm__(".text\n.global _start\n_start:\n  mov %rsp, %rdi\n  and $-16, %rsp\n  call start_c\n  hlt\n");
