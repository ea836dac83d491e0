/*
 * close_after_request: sends the ready byte, reads the request, closes its socket
 * without answering, then sleeps for ever. Exercises the host failing the
 * execution (and killing the worker) without waiting for its timeout.
 */
#include <stdlib.h>
#include <unistd.h>

#include "roma_udf.h"

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("close_after_request: usage: close_after_request <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("close_after_request: cannot read the request");
  free(request);
  close(fd);
  for (;;) pause();
}
