/*
 * alloc: AllocRequest{megabytes} -> SampleResponse{greeting: "allocated <n> MB"}.
 * Allocates and touches `megabytes` MiB; used to test the engine's memory limits.
 * When the allocation fails it exits with status 4 without answering.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "roma_udf.h"

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("alloc: usage: alloc <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("alloc: cannot read the request");
  uint64_t megabytes = 0;
  roma_pb_reader reader;
  roma_pb_field field;
  int rc;
  roma_pb_reader_init(&reader, request, request_len);
  while ((rc = roma_pb_next(&reader, &field)) == 1) {
    if (field.number == 1 && field.wire_type == ROMA_PB_WIRE_VARINT) megabytes = field.value;
  }
  if (rc < 0) roma_udf_die("alloc: malformed AllocRequest");
  free(request);

  size_t bytes = (size_t)megabytes << 20;
  char *block = (char *)malloc(bytes > 0 ? bytes : 1);
  if (block == NULL) return 4;
  memset(block, 1, bytes);

  char text[64];
  snprintf(text, sizeof text, "allocated %llu MB", (unsigned long long)megabytes);
  roma_pb_buf response;
  roma_pb_buf_init(&response);
  roma_pb_put_string_field(&response, 1, text);
  if (roma_write_response_buf(fd, &response) != 0) roma_udf_die("alloc: cannot write the response");
  roma_pb_buf_free(&response);
  free(block);
  return 0;
}
