/*
 * linger_after_response: answers like hello_world, then does not exit: it sleeps
 * forever and ignores the host closing the socket. Exercises the host killing a
 * worker that outlives its execution's timeout.
 */
#include <stdlib.h>
#include <unistd.h>

#include "roma_udf.h"

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("linger_after_response: usage: linger_after_response <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("linger_after_response: cannot read the request");
  free(request);

  roma_pb_buf response;
  roma_pb_buf_init(&response);
  roma_pb_put_string_field(&response, 1, "Hello, world!"); /* SampleResponse.greeting */
  if (roma_write_response_buf(fd, &response) != 0) roma_udf_die("linger_after_response: cannot write the response");
  roma_pb_buf_free(&response);
  for (;;) pause();
}
