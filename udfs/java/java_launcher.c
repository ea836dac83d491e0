/*
 * java_launcher: the ELF binary of a Java UDF (built as `java_hello`).
 *
 * A UDF must be an ELF executable, so this small C program stands in for the class:
 * it moves the Roma socket (argv[1]) to fd 0 - Java has no public way to open a
 * stream on an inherited fd number, but FileDescriptor.in is fd 0 (the worker's
 * stdin is /dev/null, so nothing is lost) - and execs the JVM as
 *
 *     <ROMA_JAVA_PATH> <JVM flags> -cp <ROMA_JAVA_CLASSES> Hello <argv[1]>
 *
 * The JVM's real path (e.g. /usr/lib/jvm/java-17-openjdk-amd64/bin/java, under
 * the default /usr/lib mount) and the directory javac compiled Hello.class into
 * are embedded at build time by build/samples.rs in the generated header
 * java_hello_config.h. That directory must be visible inside the sandbox: add it
 * to Config::lib_mounts.
 *
 * The JVM starts in the sandbox's read-only root without /proc, /dev or /tmp; see
 * udfs/README.md ("Java") for the mounts and the syscall-filter level it needs.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "java_hello_config.h"

int main(int argc, char **argv) {
  if (argc < 2 || argv[1][0] < '0' || argv[1][0] > '9') {
    fprintf(stderr, "usage: %s <socket fd>\n", argv[0]);
    return 1;
  }
  int fd = atoi(argv[1]);
  if (fd != 0) {
    if (dup2(fd, 0) != 0) {
      fprintf(stderr, "java_hello: dup2(%d, 0): %s\n", fd, strerror(errno));
      return 1;
    }
    close(fd);
  }
  /*
   * JVM flags, all optional (the JVM starts in the sandbox without any of them);
   * they make a short-lived JVM cheaper:
   *   -Xshare:auto            use the JDK's class-data-sharing archive when it maps
   *                           (the default, spelled out: never fail because of it);
   *   -XX:-UsePerfData        no hsperfdata file: /tmp is absent or read-only;
   *   -XX:+UseSerialGC        no GC worker threads (G1 starts several);
   *   -XX:TieredStopAtLevel=1 C1 only, no C2 compiler;
   *   -XX:-MaxFDLimit         do not try to raise RLIMIT_NOFILE (setrlimit is denied
   *                           under the `untrusted` filter);
   *   -Xss512k -Xmx64m        small stacks and heap: less address space reserved,
   *                           which matters with Config::memory_limit (RLIMIT_AS).
   */
  char *args[] = {
      (char *)ROMA_JAVA_PATH,
      (char *)"-Xshare:auto",
      (char *)"-XX:-UsePerfData",
      (char *)"-XX:+UseSerialGC",
      (char *)"-XX:TieredStopAtLevel=1",
      (char *)"-XX:-MaxFDLimit",
      (char *)"-Xss512k",
      (char *)"-Xmx64m",
      (char *)"-cp",
      (char *)ROMA_JAVA_CLASSES,
      (char *)"Hello",
      argv[1],
      NULL,
  };
  /* The java binary finds libjli.so through RPATH $ORIGIN/../lib, but glibc
   * computes $ORIGIN of the main program from /proc/self/exe, and the sandbox has
   * no /proc: name the directory explicitly. (The launcher does not re-exec itself
   * for this LD_LIBRARY_PATH: it does not name libjvm.so's directory.) */
  char *env[] = {(char *)"LD_LIBRARY_PATH=" ROMA_JAVA_LIB_DIR, NULL};
  execve(ROMA_JAVA_PATH, args, env);
  /* Only reached when the exec failed (JVM not mounted, say). */
  fprintf(stderr, "java_hello: cannot exec %s: %s\n", ROMA_JAVA_PATH, strerror(errno));
  return 127;
}
