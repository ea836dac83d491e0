/* new_udf: answers any request with SampleResponse{greeting: "I am a new UDF!"}. */
#include <stdlib.h>

#include "roma_udf.h"

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("new_udf: usage: new_udf <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("new_udf: cannot read the request");
  free(request);

  roma_pb_buf response;
  roma_pb_buf_init(&response);
  roma_pb_put_string_field(&response, 1, "I am a new UDF!"); /* SampleResponse.greeting */
  if (roma_write_response_buf(fd, &response) != 0) roma_udf_die("new_udf: cannot write the response");
  roma_pb_buf_free(&response);
  return 0;
}
