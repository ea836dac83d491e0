/* abort_after_ready: sends the ready byte, reads the request, then abort()s (SIGABRT). */
#include <stdlib.h>

#include "roma_udf.h"

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("abort_after_ready: usage: abort_after_ready <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("abort_after_ready: cannot read the request");
  abort();
}
