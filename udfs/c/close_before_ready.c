/*
 * close_before_ready: closes its socket without writing the ready byte, then
 * sleeps for ever. Exercises the host killing a worker that can no longer serve
 * but does not exit.
 */
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  close(atoi(argv[1]));
  for (;;) pause();
}
