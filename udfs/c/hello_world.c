/* hello_world: answers any request with SampleResponse{greeting: "Hello, world!"}. */
#include <stdlib.h>

#include "roma_udf.h"

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("hello_world: usage: hello_world <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("hello_world: cannot read the request");
  free(request); /* SampleRequest: nothing in it is needed */

  roma_pb_buf response;
  roma_pb_buf_init(&response);
  roma_pb_put_string_field(&response, 1, "Hello, world!"); /* SampleResponse.greeting */
  if (roma_write_response_buf(fd, &response) != 0) roma_udf_die("hello_world: cannot write the response");
  roma_pb_buf_free(&response);
  return 0;
}
