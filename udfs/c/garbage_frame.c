/*
 * garbage_frame: sends the ready byte, reads the request, then answers with 11
 * bytes of 0xff (a varint length longer than the 10-byte maximum: an invalid
 * frame) and exits with status 0.
 */
#include <stdlib.h>

#include "roma_udf.h"

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("garbage_frame: usage: garbage_frame <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("garbage_frame: cannot read the request");
  free(request);

  uint8_t garbage[11];
  memset(garbage, 0xff, sizeof garbage);
  if (roma_write_all(fd, garbage, sizeof garbage) != 0) roma_udf_die("garbage_frame: cannot write");
  return 0;
}
