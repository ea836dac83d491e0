/*
 * slow_ready: takes 300 ms to start (sleeps before its ready byte), then answers
 * like hello_world. A request written to it before its ready byte would sit in
 * its socket for those 300 ms, and count them against the execution's timeout.
 */
#include <stdlib.h>
#include <time.h>

#include "roma_udf.h"

int main(int argc, char **argv) {
  struct timespec start = {0, 300 * 1000 * 1000};
  while (nanosleep(&start, &start) != 0) {
  }
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("slow_ready: usage: slow_ready <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("slow_ready: cannot read the request");
  free(request);

  roma_pb_buf response;
  roma_pb_buf_init(&response);
  roma_pb_put_string_field(&response, 1, "Hello, world!"); /* SampleResponse.greeting */
  if (roma_write_response_buf(fd, &response) != 0) roma_udf_die("slow_ready: cannot write the response");
  roma_pb_buf_free(&response);
  return 0;
}
