/*
 * never_answer: sends the ready byte, reads the request, then never responds: it
 * blocks reading the socket again (the host never sends more). Exercises the host's
 * timeout. If the host closes the socket (read returns 0) it exits with status 0.
 */
#include <stdlib.h>

#include "roma_udf.h"

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("never_answer: usage: never_answer <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("never_answer: cannot read the request");
  free(request);

  for (;;) {
    uint8_t byte;
    ssize_t n = read(fd, &byte, 1);
    if (n == 0) exit(0);                  /* host closed the stream */
    if (n < 0 && errno != EINTR) exit(0); /* stream broken: nothing left to wait for */
  }
}
