/*
 * never_ready: never writes its ready byte; it keeps its socket open and sleeps
 * for ever. Exercises the host's worker start-up timeout.
 */
#include <unistd.h>

int main(void) {
  for (;;) pause();
}
