/*
 * The zygote shim (see src/udf_runner/zygote.rs for the whole design).
 *
 * Loaded with LD_PRELOAD into a "template" process: the UDF binary exec'd once,
 * whose dynamic loader has mapped and relocated it and its libraries and run the
 * libraries' constructors. This constructor then never returns in the template:
 * it serves spawn orders from the runner on fd 3, and for each one clones a child
 * (CLONE_PARENT: the runner's child, reaped by the runner) in fresh user, PID and
 * UTS namespaces. The child places its descriptors, drops every capability,
 * erases the runner's seccomp-gate key from its memory and registers, removes
 * LD_PRELOAD from its environment and returns: the loader goes on to the
 * executable's own constructors and main(), which therefore run only in children,
 * each a fresh copy of the pristine pre-main template.
 *
 * Built with -nostdlib -ffreestanding: raw syscalls only, no libc symbol, no
 * stack protector (the build checks that the result imports nothing).
 *
 * Protocol on fd 3 (a stream socket pair with the runner's connection thread):
 *   runner -> template, once: struct setup (24 bytes, native endian).
 *   runner -> template, per worker: one flags byte, with SCM_RIGHTS
 *     [channel] + [stdout, stderr] if FLAG_LOG + [shared memory] if FLAG_SHM.
 *   template -> runner, per worker: int32 pid of the child, or -errno.
 *   End of file on fd 3: the template exits.
 * Template descriptors: 0-2 /dev/null, 3 the control socket, 4 /dev/null (a
 * placeholder: received descriptors land at 5 and above, never on a target).
 */
#include <stddef.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <linux/capability.h>
#include <linux/prctl.h>
#include <linux/sched.h>
#include <signal.h>
#include <errno.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>

#define CTL_FD 3
#define SHM_FD 4
#define FIRST_RECEIVED_FD 5
#define FLAG_LOG 1
#define FLAG_SHM 2
#define MAX_FDS 4

struct setup {
  /* The seccomp gate's key (0: no gate). Zeroed in every child before the UDF runs. */
  volatile uint64_t key;
  /* Namespace flags beyond CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWUTS. */
  uint64_t clone_flags;
  /* RLIMIT_FSIZE for workers whose output is captured (FLAG_LOG). */
  uint64_t log_fsize;
};

static struct setup setup;

/*
 * A raw syscall with the gate's key in r9 (the sixth argument register), loaded
 * from memory inside the asm and cleared right after the syscall, so no other
 * register or stack slot ever holds it. Syscalls the gate does not guard ignore r9.
 */
static long sys(long nr, long a, long b, long c, long d, long e) {
  long ret;
  register long r10 __asm__("r10") = d;
  register long r8 __asm__("r8") = e;
  __asm__ volatile("mov %[key], %%r9\n\t"
                   "syscall\n\t"
                   "xor %%r9d, %%r9d"
                   : "=a"(ret)
                   : "0"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), [key] "m"(setup.key)
                   : "rcx", "r11", "r9", "memory");
  return ret;
}

static __attribute__((noreturn)) void exit_group(int code) {
  for (;;) sys(SYS_exit_group, code, 0, 0, 0, 0);
}

static int starts_with(const char *s, const char *prefix) {
  while (*prefix)
    if (*s++ != *prefix++) return 0;
  return 1;
}

/* Receives exactly `len` bytes into `buf`; 0 on success, -1 on end of file or error. */
static int recv_exact(void *buf, size_t len) {
  char *p = buf;
  while (len > 0) {
    long n = sys(SYS_read, CTL_FD, (long)p, (long)len, 0, 0);
    if (n == -EINTR) continue;
    if (n <= 0) return -1;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#define PAGE 4096UL

/* 0, or -errno (-EINVAL: the kernel does not know MADV_POPULATE_WRITE, as gVisor). */
static long populate(unsigned long start, unsigned long end) {
  start &= ~(PAGE - 1);
  end = (end + PAGE - 1) & ~(PAGE - 1);
  if (end <= start) return 0;
  return sys(SYS_madvise, (long)start, (long)(end - start), MADV_POPULATE_WRITE, 0, 0);
}

/* Whether the page at `addr` is mapped (madvise(MADV_NORMAL) fails with ENOMEM if not). */
static int mapped(unsigned long addr) {
  return sys(SYS_madvise, (long)(addr & ~(PAGE - 1)), (long)PAGE, MADV_NORMAL, 0, 0) == 0;
}

/* The writable, file-backed part of one object's segments (past its RELRO part,
 * which is read-only by now), and the page after it. */
static void populate_object(unsigned long base, const Elf64_Phdr *ph, unsigned long n) {
  unsigned long relro_end = 0;
  for (unsigned long i = 0; i < n; i++)
    if (ph[i].p_type == PT_GNU_RELRO) relro_end = (base + ph[i].p_vaddr + ph[i].p_memsz) & ~(PAGE - 1);
  for (unsigned long i = 0; i < n; i++) {
    if (ph[i].p_type != PT_LOAD || !(ph[i].p_flags & PF_W)) continue;
    unsigned long start = base + ph[i].p_vaddr, end = start + ph[i].p_filesz + PAGE;
    if (end > start + ph[i].p_memsz) end = start + ph[i].p_memsz;
    if (start < relro_end) start = relro_end;
    populate(start, end);
  }
}

/*
 * Copies, now, the template's pages this child will probably write: every loaded
 * object's data, the stack below here and the thread's TLS. Each would otherwise
 * be copied on its first write, one page fault at a time, while the UDF serves its
 * request; here they are copied before the UDF says it is ready, in one
 * MADV_POPULATE_WRITE per range. Best effort: a range that fails stays lazy, and
 * nothing more is tried where the kernel lacks MADV_POPULATE_WRITE (gVisor, where
 * each syscall also costs far more). Objects come from the loader's list (the
 * executable's DT_DEBUG entry points at it), the executable's headers from the
 * auxiliary vector after `envp`; another object's ELF header is read at its load
 * address only if that page is mapped (not so for a vDSO linked at a non-zero
 * address), and the vDSO is skipped (it has nothing writable).
 */
static void prefault(char **envp) {
  char **e = envp;
  unsigned long sp = (unsigned long)&e;
  if (populate(sp - 16 * 1024, sp) == -EINVAL) return;
  while (*e) e++;
  const Elf64_Phdr *exe_ph = 0;
  unsigned long exe_n = 0;
  for (const unsigned long *av = (const unsigned long *)(e + 1); av[0] != AT_NULL; av += 2) {
    if (av[0] == AT_PHDR) exe_ph = (const Elf64_Phdr *)av[1];
    if (av[0] == AT_PHNUM) exe_n = av[1];
  }
  if (!exe_ph) return;
  unsigned long bias = 0;
  const Elf64_Dyn *dyn = 0;
  for (unsigned long i = 0; i < exe_n; i++)
    if (exe_ph[i].p_type == PT_PHDR) bias = (unsigned long)exe_ph - exe_ph[i].p_vaddr;
  for (unsigned long i = 0; i < exe_n; i++)
    if (exe_ph[i].p_type == PT_DYNAMIC) dyn = (const Elf64_Dyn *)(bias + exe_ph[i].p_vaddr);
  populate_object(bias, exe_ph, exe_n);
  const struct r_debug *debug = 0;
  for (; dyn && dyn->d_tag != DT_NULL; dyn++)
    if (dyn->d_tag == DT_DEBUG) debug = (const struct r_debug *)dyn->d_un.d_ptr;
  if (debug) {
    for (const struct link_map *m = debug->r_map; m; m = m->l_next) {
      if (m->l_addr == 0 || m->l_addr == bias) continue; /* the executable */
      if (m->l_name && starts_with(m->l_name, "linux-vdso")) continue;
      if ((m->l_addr & (PAGE - 1)) != 0 || !mapped(m->l_addr)) continue;
      const Elf64_Ehdr *eh = (const Elf64_Ehdr *)m->l_addr;
      if (eh->e_ident[0] != 0x7f || eh->e_phentsize != sizeof(Elf64_Phdr)) continue;
      if (eh->e_phoff + (unsigned long)eh->e_phnum * sizeof(Elf64_Phdr) > PAGE) continue; /* only the page checked */
      populate_object(m->l_addr, (const Elf64_Phdr *)(m->l_addr + eh->e_phoff), eh->e_phnum);
    }
  }
  unsigned long tp;
  __asm__("mov %%fs:0, %0" : "=r"(tp));
  populate(tp - 2 * PAGE, tp + PAGE);
}

/* The child's side: descriptors, limits, capabilities, key, environment. */
static void become_worker(int flags, const int *fds, char **envp) {
  int i = 0;
  int channel = fds[i++];
  int out = -1, err = -1, shm = -1;
  if (flags & FLAG_LOG) {
    out = fds[i++];
    err = fds[i++];
  }
  if (flags & FLAG_SHM) shm = fds[i++];
  /* Every received fd is at FIRST_RECEIVED_FD or above: no dup3 clobbers one. The
   * first replaces the template's control socket, which the child must not keep. */
  if (sys(SYS_dup3, channel, CTL_FD, 0, 0, 0) < 0) exit_group(127);
  if (out >= 0 && sys(SYS_dup3, out, 1, 0, 0, 0) < 0) exit_group(127);
  if (err >= 0 && sys(SYS_dup3, err, 2, 0, 0, 0) < 0) exit_group(127);
  if (shm >= 0 && sys(SYS_dup3, shm, SHM_FD, 0, 0, 0) < 0) exit_group(127);
  /* The received copies, and the placeholder at 4 when there is no shared memory. */
  if (sys(SYS_close_range, shm >= 0 ? FIRST_RECEIVED_FD : SHM_FD, 0x7fffffff, 0, 0, 0) < 0) exit_group(127);
  if (sys(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) exit_group(127);
  if (flags & FLAG_LOG) {
    struct rlimit lim = {setup.log_fsize, setup.log_fsize};
    if (sys(SYS_prlimit64, 0, RLIMIT_FSIZE, (long)&lim, 0, 0) < 0) exit_group(127);
    /* Log writes past the limit fail with EFBIG instead of killing the UDF. */
    struct {
      unsigned long handler, flags, restorer, mask;
    } ign = {(unsigned long)SIG_IGN, 0, 0, 0};
    if (sys(SYS_rt_sigaction, SIGXFSZ, (long)&ign, 0, 8, 0) < 0) exit_group(127);
  }
  /* The new user namespace gave this child every capability in it: drop them all.
   * (no_new_privs is the template's, inherited.) */
  struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct data[2] = {{0, 0, 0}, {0, 0, 0}};
  if (sys(SYS_capset, (long)&header, (long)data, 0, 0, 0) < 0) exit_group(127);
  /* Last: the key leaves this process's memory (r9 was cleared after each call). */
  setup.key = 0;
  prefault(envp);
  /* LD_PRELOAD goes: the UDF sees the environment an exec'd worker gets. */
  char **w = envp;
  for (char **r = envp; *r; r++)
    if (!starts_with(*r, "LD_PRELOAD=")) *w++ = *r;
  *w = 0;
}

__attribute__((constructor)) static void zygote(int argc, char **argv, char **envp) {
  (void)argc;
  (void)argv;
  if (recv_exact((void *)&setup, sizeof setup) != 0) exit_group(0);
  for (;;) {
    unsigned char flags;
    union {
      struct cmsghdr align;
      char bytes[CMSG_SPACE(MAX_FDS * sizeof(int))];
    } control;
    struct iovec iov = {&flags, 1};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.bytes;
    msg.msg_controllen = sizeof control.bytes;
    long n = sys(SYS_recvmsg, CTL_FD, (long)&msg, MSG_CMSG_CLOEXEC, 0, 0);
    if (n == -EINTR) continue;
    if (n <= 0) exit_group(0); /* the runner closed the connection (unload) */
    int fds[MAX_FDS];
    int got = 0;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (c && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      got = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
      const unsigned char *src = CMSG_DATA(c);
      for (int i = 0; i < got && i < MAX_FDS; i++) {
        int fd;
        __builtin_memcpy(&fd, src + i * sizeof(int), sizeof fd);
        fds[i] = fd;
      }
    }
    int want = 1 + ((flags & FLAG_LOG) ? 2 : 0) + ((flags & FLAG_SHM) ? 1 : 0);
    int32_t reply;
    if (got != want || (msg.msg_flags & MSG_CTRUNC)) {
      reply = -EPROTO;
    } else {
      long pid = sys(SYS_clone, CLONE_PARENT | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWUTS | (long)setup.clone_flags | SIGCHLD,
                     0, 0, 0, 0);
      if (pid == 0) {
        become_worker(flags, fds, envp);
        return;
      }
      reply = (int32_t)pid;
    }
    for (int i = 0; i < got && i < MAX_FDS; i++) sys(SYS_close, fds[i], 0, 0, 0, 0);
    if (sys(SYS_write, CTL_FD, (long)&reply, sizeof reply, 0, 0) != sizeof reply) exit_group(0);
  }
}
