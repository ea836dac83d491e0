/*
 * probe: ProbeRequest{probe, arg} -> ProbeResponse{result}. Tries one operation
 * that the sandbox must forbid (or allow) and reports what happened: "ok" on
 * success, otherwise the errno name ("EROFS", "EPERM", "ENOENT", ...). Used by the
 * sandbox tests; it never crashes, whatever the probe's outcome.
 *
 * Probes:
 *   create_file   open(arg, O_CREAT|O_WRONLY|O_EXCL, 0644)
 *   delete_file   unlink(arg)
 *   edit_file     open(arg, O_WRONLY), then write 1 byte
 *   stat_path     stat(arg)
 *   list_dir      names in directory arg, sorted, comma-separated (no . and ..)
 *   msgq_put      msgget(0x524f4d41, IPC_CREAT|0600), msgsnd type 1 "roma"
 *   msgq_get      msgget(0x524f4d41, 0), msgrcv(IPC_NOWAIT): "message:<text>",
 *                 "empty" (ENOMSG) or the errno name
 *   capabilities  capget(v3): "eff=<hex> prm=<hex> inh=<hex>"
 *   socket        socket(AF_UNIX, SOCK_STREAM, 0)
 *   network       socket(AF_INET, SOCK_STREAM, 0) + connect(127.0.0.1:9)
 *   unshare_user  unshare(CLONE_NEWUSER)
 *   shm_residue   (shared-memory transport) "clean <size> ino <inode>" if every
 *                 byte of the region past the request is zero, else
 *                 "dirty at <offset>" (the inode number tells regions apart)
 *   shm_truncate  (shared-memory transport) ftruncate(4, 0) on the region:
 *                 must fail (the host seals it against shrinking)
 *   shm_fill      (shared-memory transport) fills the region past the request
 *                 with 0xAB: "filled <n> ino <inode>"
 *   io_uring      io_uring_setup(1, ...) (kernel attack surface the runner's
 *                 denylist removes at level worker-engine)
 *   fork          fork(); the child _exit(0)s, the parent waitpid()s
 *   uid           "uid=<n>" (or the errno name if a seccomp filter denies getuid)
 *   kill_parent   kill(getppid(), SIGKILL) ("ESRCH" when there is no visible
 *                 parent, i.e. getppid() == 0, rather than signalling our own
 *                 process group)
 *   open_fds      the fd numbers open in this process, comma-separated (found
 *                 with fcntl(F_GETFD) up to 4096: no /proc needed)
 *   environ       the environment's entries, comma-separated ("" when empty)
 *   argv          the command line's arguments, comma-separated
 *   memory_residue "clean" if a static 64 KiB buffer is all zero and a static
 *                 initialised marker still holds its initial value, else "dirty";
 *                 then writes both (so a process that saw an earlier execution's
 *                 memory would say "dirty")
 *   anything else "unknown probe"
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "roma_udf.h"

#define MSGQ_KEY ((key_t)0x524f4d41) /* "ROMA" */
#define RESULT_MAX 4096

/* Result text, filled by the probes. */
static char result[RESULT_MAX];

static void set_result(const char *s) { snprintf(result, sizeof result, "%s", s); }

/* Sets the result to the name of `err` (e.g. "EPERM"). */
static void set_errno_result(int err) {
  const char *name = strerrorname_np(err);
  if (name != NULL) {
    set_result(name);
  } else {
    snprintf(result, sizeof result, "errno=%d", err);
  }
}

/* "ok" when rc is not negative, else the errno name. */
static void set_rc_result(long rc) {
  if (rc < 0) {
    set_errno_result(errno);
  } else {
    set_result("ok");
  }
}

static void probe_create_file(const char *path) {
  int fd = open(path, O_CREAT | O_WRONLY | O_EXCL, 0644);
  if (fd >= 0) close(fd);
  set_rc_result(fd);
}

static void probe_edit_file(const char *path) {
  int fd = open(path, O_WRONLY);
  if (fd < 0) {
    set_rc_result(-1);
    return;
  }
  ssize_t n;
  do {
    n = write(fd, "x", 1);
  } while (n < 0 && errno == EINTR);
  int err = errno;
  close(fd);
  errno = err;
  set_rc_result(n < 0 ? -1 : 0);
}

static void probe_stat_path(const char *path) {
  struct stat st;
  set_rc_result(stat(path, &st));
}

static int compare_names(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static void probe_list_dir(const char *path) {
  DIR *dir = opendir(path);
  if (dir == NULL) {
    set_rc_result(-1);
    return;
  }
  char **names = NULL;
  size_t count = 0, cap = 0;
  struct dirent *entry;
  errno = 0;
  while ((entry = readdir(dir)) != NULL) {
    if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
    if (count == cap) {
      cap = cap ? cap * 2 : 16;
      char **grown = (char **)realloc(names, cap * sizeof *names);
      if (grown == NULL) break;
      names = grown;
    }
    names[count] = strdup(entry->d_name);
    if (names[count] == NULL) break;
    ++count;
    errno = 0;
  }
  int err = errno;
  closedir(dir);
  if (err != 0) {
    set_errno_result(err);
  } else {
    if (count > 1) qsort(names, count, sizeof *names, compare_names);
    size_t used = 0;
    result[0] = '\0';
    for (size_t i = 0; i < count && used < sizeof result - 1; ++i) {
      int n = snprintf(result + used, sizeof result - used, "%s%s", i ? "," : "", names[i]);
      if (n < 0) break;
      used += (size_t)n;
    }
  }
  for (size_t i = 0; i < count; ++i) free(names[i]);
  free(names);
}

struct roma_msg {
  long mtype;
  char mtext[256];
};

static void probe_msgq_put(void) {
  int id = msgget(MSGQ_KEY, IPC_CREAT | 0600);
  if (id < 0) {
    set_rc_result(-1);
    return;
  }
  struct roma_msg msg;
  msg.mtype = 1;
  memcpy(msg.mtext, "roma", 4);
  /* IPC_NOWAIT: a full queue reports EAGAIN instead of blocking forever. */
  set_rc_result(msgsnd(id, &msg, 4, IPC_NOWAIT));
}

static void probe_msgq_get(void) {
  int id = msgget(MSGQ_KEY, 0);
  if (id < 0) {
    set_rc_result(-1);
    return;
  }
  struct roma_msg msg;
  ssize_t n = msgrcv(id, &msg, sizeof msg.mtext - 1, 0, IPC_NOWAIT | MSG_NOERROR);
  if (n < 0) {
    if (errno == ENOMSG) {
      set_result("empty");
    } else {
      set_rc_result(-1);
    }
    return;
  }
  msg.mtext[n] = '\0';
  snprintf(result, sizeof result, "message:%s", msg.mtext);
}

static void probe_capabilities(void) {
  struct __user_cap_header_struct header;
  struct __user_cap_data_struct data[2];
  memset(&header, 0, sizeof header);
  memset(data, 0, sizeof data);
  header.version = _LINUX_CAPABILITY_VERSION_3;
  header.pid = 0;
  if (syscall(SYS_capget, &header, data) < 0) {
    set_rc_result(-1);
    return;
  }
  unsigned long long eff = (unsigned long long)data[0].effective | (unsigned long long)data[1].effective << 32;
  unsigned long long prm = (unsigned long long)data[0].permitted | (unsigned long long)data[1].permitted << 32;
  unsigned long long inh =
      (unsigned long long)data[0].inheritable | (unsigned long long)data[1].inheritable << 32;
  snprintf(result, sizeof result, "eff=%llx prm=%llx inh=%llx", eff, prm, inh);
}

/* open_fds: every open fd number below 4096, as "0,1,2,3". */
static void probe_open_fds(void) {
  size_t used = 0;
  result[0] = '\0';
  for (int fd = 0; fd < 4096; ++fd) {
    if (fcntl(fd, F_GETFD) < 0) continue;
    int n = snprintf(result + used, sizeof result - used, used == 0 ? "%d" : ",%d", fd);
    if (n < 0 || (size_t)n >= sizeof result - used) {
      set_result("too many open fds");
      return;
    }
    used += (size_t)n;
  }
}

/* The inode number of the region (fd 4): which memfd this worker got. */
static unsigned long long shm_inode(void) {
  struct stat st;
  return fstat(4, &st) == 0 ? (unsigned long long)st.st_ino : 0;
}

/* shm_residue: any non-zero byte in the region outside the header, the request and
 * the response length field means something survived from an earlier request. */
static void probe_shm_residue(roma_udf *u) {
  if (u->shm == NULL) {
    snprintf(result, sizeof result, "no shared memory");
    return;
  }
  size_t req_end = ROMA_SHM_HEADER + u->request_len;
  for (size_t i = ROMA_SHM_HEADER; i < u->shm_len; ++i) {
    if (i < req_end) continue;
    if (u->shm[i] != 0) {
      snprintf(result, sizeof result, "dirty at %zu", i);
      return;
    }
  }
  snprintf(result, sizeof result, "clean %zu ino %llu", u->shm_len, shm_inode());
}

/* shm_fill: scribble over the whole region past the request, as a UDF leaving
 * secrets behind would. */
static void probe_shm_fill(roma_udf *u) {
  if (u->shm == NULL) {
    snprintf(result, sizeof result, "no shared memory");
    return;
  }
  size_t start = ROMA_SHM_HEADER + u->request_len;
  memset(u->shm + start, 0xAB, u->shm_len - start);
  snprintf(result, sizeof result, "filled %zu ino %llu", u->shm_len - start, shm_inode());
}

static void probe_io_uring(void) {
  unsigned char params[120]; /* struct io_uring_params */
  memset(params, 0, sizeof params);
  long fd = syscall(SYS_io_uring_setup, 1, params);
  if (fd >= 0) close((int)fd);
  set_rc_result(fd < 0 ? -1 : 0);
}

static void probe_socket(void) {
  int s = socket(AF_UNIX, SOCK_STREAM, 0);
  if (s >= 0) close(s);
  set_rc_result(s);
}

static void probe_network(void) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  if (s < 0) {
    set_rc_result(-1);
    return;
  }
  struct sockaddr_in addr;
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_port = htons(9); /* discard */
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int rc = connect(s, (const struct sockaddr *)&addr, sizeof addr);
  int err = errno;
  close(s);
  errno = err;
  set_rc_result(rc);
}

static void probe_fork(void) {
  pid_t pid = fork();
  if (pid < 0) {
    set_rc_result(-1);
    return;
  }
  if (pid == 0) _exit(0);
  int status;
  pid_t rc;
  do {
    rc = waitpid(pid, &status, 0);
  } while (rc < 0 && errno == EINTR);
  set_rc_result(rc);
}

static void probe_uid(void) {
  /* getuid() cannot fail, except under a seccomp filter; glibc's getuid() does not
   * report that through errno, syscall() does. */
  long uid = syscall(SYS_getuid);
  if (uid < 0) {
    set_errno_result(errno);
    return;
  }
  snprintf(result, sizeof result, "uid=%lu", (unsigned long)uid);
}

static void probe_kill_parent(void) {
  /* syscall() rather than getppid(): only it reports a seccomp denial via errno. */
  long parent = syscall(SYS_getppid);
  if (parent < 0) {
    set_errno_result(errno);
    return;
  }
  if (parent == 0) {
    /* No parent in our pid namespace: kill(0, ...) would signal our own process
     * group (including ourselves), which is not what this probe is about. */
    set_errno_result(ESRCH);
    return;
  }
  set_rc_result(kill((pid_t)parent, SIGKILL));
}

/* Copies a protobuf string into a NUL-terminated heap string (or dies). */
extern char **environ;

/* Appends `items` (NULL-terminated), comma-separated, to the result. */
static void set_joined(char **items) {
  size_t used = 0;
  result[0] = '\0';
  for (char **it = items; it && *it; it++) {
    int n = snprintf(result + used, sizeof result - used, "%s%s", used ? "," : "", *it);
    if (n < 0 || (size_t)n >= sizeof result - used) break;
    used += (size_t)n;
  }
}

static unsigned char residue[64 * 1024];
static volatile int residue_marker = 0x5a;

static void probe_memory_residue(void) {
  int dirty = residue_marker != 0x5a;
  for (size_t i = 0; i < sizeof residue && !dirty; i++) dirty = residue[i] != 0;
  set_result(dirty ? "dirty" : "clean");
  memset(residue, 0xab, sizeof residue);
  residue_marker = 0;
}

static char *dup_string(const roma_pb_field *f) {
  char *s = (char *)malloc(f->len + 1);
  if (s == NULL) roma_udf_die("probe: out of memory");
  if (f->len > 0) memcpy(s, f->data, f->len);
  s[f->len] = '\0';
  return s;
}

int main(int argc, char **argv) {
  roma_udf u;
  if (roma_udf_open(&u, argc, argv) != 0) roma_udf_die("probe: usage: probe <socket fd> [<shm fd>]");

  const uint8_t *request;
  size_t request_len;
  if (roma_udf_read_request(&u, &request, &request_len) != 0) roma_udf_die("probe: cannot read the request");

  /* ProbeRequest: string probe = 1; string arg = 2. */
  char *probe = NULL, *arg = NULL;
  roma_pb_reader reader;
  roma_pb_field field;
  int rc;
  roma_pb_reader_init(&reader, request, request_len);
  while ((rc = roma_pb_next(&reader, &field)) == 1) {
    if (field.wire_type != ROMA_PB_WIRE_LEN) continue;
    if (field.number == 1) {
      free(probe);
      probe = dup_string(&field);
    } else if (field.number == 2) {
      free(arg);
      arg = dup_string(&field);
    }
  }
  if (rc < 0) roma_udf_die("probe: malformed ProbeRequest");
  if (probe == NULL) probe = strdup("");
  if (arg == NULL) arg = strdup("");
  if (probe == NULL || arg == NULL) roma_udf_die("probe: out of memory");

  if (strcmp(probe, "shm_residue") == 0) {
    probe_shm_residue(&u);
  } else if (strcmp(probe, "shm_truncate") == 0) {
    set_rc_result(u.shm != NULL ? ftruncate(4, 0) : -1);
  } else if (strcmp(probe, "shm_fill") == 0) {
    probe_shm_fill(&u);
  } else if (strcmp(probe, "create_file") == 0) {
    probe_create_file(arg);
  } else if (strcmp(probe, "delete_file") == 0) {
    set_rc_result(unlink(arg));
  } else if (strcmp(probe, "edit_file") == 0) {
    probe_edit_file(arg);
  } else if (strcmp(probe, "stat_path") == 0) {
    probe_stat_path(arg);
  } else if (strcmp(probe, "list_dir") == 0) {
    probe_list_dir(arg);
  } else if (strcmp(probe, "msgq_put") == 0) {
    probe_msgq_put();
  } else if (strcmp(probe, "msgq_get") == 0) {
    probe_msgq_get();
  } else if (strcmp(probe, "capabilities") == 0) {
    probe_capabilities();
  } else if (strcmp(probe, "socket") == 0) {
    probe_socket();
  } else if (strcmp(probe, "network") == 0) {
    probe_network();
  } else if (strcmp(probe, "io_uring") == 0) {
    probe_io_uring();
  } else if (strcmp(probe, "unshare_user") == 0) {
    set_rc_result(unshare(CLONE_NEWUSER));
  } else if (strcmp(probe, "fork") == 0) {
    probe_fork();
  } else if (strcmp(probe, "uid") == 0) {
    probe_uid();
  } else if (strcmp(probe, "kill_parent") == 0) {
    probe_kill_parent();
  } else if (strcmp(probe, "open_fds") == 0) {
    probe_open_fds();
  } else if (strcmp(probe, "environ") == 0) {
    set_joined(environ);
  } else if (strcmp(probe, "argv") == 0) {
    set_joined(argv);
  } else if (strcmp(probe, "memory_residue") == 0) {
    probe_memory_residue();
  } else {
    set_result("unknown probe");
  }
  free(probe);
  free(arg);

  roma_pb_buf response;
  roma_pb_buf_init(&response);
  roma_pb_put_string_field(&response, 1, result); /* ProbeResponse.result */
  if (roma_udf_write_response_buf(&u, &response) != 0) roma_udf_die("probe: cannot write the response");
  roma_udf_close(&u);
  roma_pb_buf_free(&response);
  return 0;
}
