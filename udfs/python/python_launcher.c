/*
 * python_launcher: the ELF binary of a Python UDF (built as `python_hello`).
 *
 * A UDF must be an ELF executable, so this small C program stands in for the
 * script: it execs the Python interpreter as
 *
 *     <PYTHON3_PATH> -I -S -c <script> <argv[1]> [<argv[2]> ...]
 *
 * keeping the Roma BYOB argv semantics for the script (sys.argv[1] = the socket
 * fd). The script text and the interpreter's real path (e.g. /usr/bin/python3.11,
 * symlinks resolved) are embedded at build time by build/samples.rs, in the
 * generated header python_hello_script.h (ROMA_PYTHON3_PATH, ROMA_PYTHON_SCRIPT).
 *
 * -I (isolated: no environment variables, no user site, script directory not on
 * sys.path) and -S (no `site` import) keep start-up small and independent of the
 * (empty) environment. The interpreter must be visible inside the sandbox: add
 * ROMA_PYTHON3_PATH to Config::lib_mounts (its standard library lives under
 * /usr/lib, a default mount).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "python_hello_script.h"

#define MAX_ARGS 16

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s <socket fd>\n", argv[0]);
    return 1;
  }
  char *args[MAX_ARGS + 6];
  int n = 0;
  args[n++] = (char *)ROMA_PYTHON3_PATH;
  args[n++] = (char *)"-I";
  args[n++] = (char *)"-S";
  args[n++] = (char *)"-c";
  args[n++] = (char *)ROMA_PYTHON_SCRIPT;
  for (int i = 1; i < argc && i <= MAX_ARGS; ++i) args[n++] = argv[i];
  args[n] = NULL;
  execv(ROMA_PYTHON3_PATH, args);
  /* Only reached when the exec failed (interpreter not mounted, say). */
  fprintf(stderr, "python_hello: cannot exec %s: %s\n", ROMA_PYTHON3_PATH, strerror(errno));
  return 127;
}
