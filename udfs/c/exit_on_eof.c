/*
 * exit_on_eof: answers like hello_world, then keeps reading its socket and exits
 * only when the host closes the stream (read returns 0) or breaks it. Shows that
 * the host's end of a worker's channel really closes once the response is read:
 * the worker goes away at once, not at its execution's timeout.
 */
#include <stdlib.h>

#include "roma_udf.h"

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("exit_on_eof: usage: exit_on_eof <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("exit_on_eof: cannot read the request");
  free(request);

  roma_pb_buf response;
  roma_pb_buf_init(&response);
  roma_pb_put_string_field(&response, 1, "Hello, world!"); /* SampleResponse.greeting */
  if (roma_write_response_buf(fd, &response) != 0) roma_udf_die("exit_on_eof: cannot write the response");
  roma_pb_buf_free(&response);

  for (;;) {
    uint8_t byte;
    ssize_t n = read(fd, &byte, 1);
    if (n == 0) exit(0);                  /* host closed the stream */
    if (n < 0 && errno != EINTR) exit(0); /* stream broken */
  }
}
