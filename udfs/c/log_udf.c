/*
 * log_udf: writes "I am a stdout log.\n" to stdout and "I am a stderr log.\n" to
 * stderr (write(2) directly: nothing buffered, nothing lost at exit), then answers
 * SampleResponse{greeting: "Hello, world!"}.
 */
#include <stdlib.h>

#include "roma_udf.h"

static void log_to(int fd, const char *line) {
  /* Logging is best effort: a closed stdout/stderr must not fail the request. */
  (void)roma_write_all(fd, line, strlen(line));
}

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("log_udf: usage: log_udf <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("log_udf: cannot read the request");
  free(request);

  log_to(1, "I am a stdout log.\n");
  log_to(2, "I am a stderr log.\n");

  roma_pb_buf response;
  roma_pb_buf_init(&response);
  roma_pb_put_string_field(&response, 1, "Hello, world!"); /* SampleResponse.greeting */
  if (roma_write_response_buf(fd, &response) != 0) roma_udf_die("log_udf: cannot write the response");
  roma_pb_buf_free(&response);
  return 0;
}
