/*
 * split_response: answers like hello_world, but writes the frame's length prefix,
 * waits 50 ms, then writes the body. Exercises a response that arrives in two
 * pieces (a caller reading the socket itself leaves it to the engine thread).
 */
#include <stdlib.h>
#include <time.h>

#include "roma_udf.h"

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("split_response: usage: split_response <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("split_response: cannot read the request");
  free(request);

  roma_pb_buf body;
  roma_pb_buf_init(&body);
  roma_pb_put_string_field(&body, 1, "Hello, world!"); /* SampleResponse.greeting */
  roma_pb_buf header;
  roma_pb_buf_init(&header);
  roma_pb_put_varint(&header, body.len);
  if (body.failed || header.failed) roma_udf_die("split_response: out of memory");
  if (roma_write_all(fd, header.data, header.len) != 0) roma_udf_die("split_response: cannot write the length");
  struct timespec pause_50ms = {0, 50 * 1000 * 1000};
  nanosleep(&pause_50ms, NULL);
  if (roma_write_all(fd, body.data, body.len) != 0) roma_udf_die("split_response: cannot write the body");
  roma_pb_buf_free(&body);
  roma_pb_buf_free(&header);
  return 0;
}
