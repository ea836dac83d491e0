/*
 * payload_read: ReadPayloadRequest{payloads} -> ReadPayloadResponse{payload_size:
 * the sum of the lengths of all payloads}. Exercises large requests.
 */
#include <stdlib.h>

#include "roma_udf.h"

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("payload_read: usage: payload_read <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("payload_read: cannot read the request");

  /* ReadPayloadRequest: repeated bytes payloads = 1. */
  uint64_t total = 0;
  roma_pb_reader reader;
  roma_pb_field field;
  int rc;
  roma_pb_reader_init(&reader, request, request_len);
  while ((rc = roma_pb_next(&reader, &field)) == 1) {
    if (field.number == 1 && field.wire_type == ROMA_PB_WIRE_LEN) total += field.len;
  }
  if (rc < 0) roma_udf_die("payload_read: malformed ReadPayloadRequest");
  free(request);

  roma_pb_buf response;
  roma_pb_buf_init(&response);
  /* ReadPayloadResponse.payload_size = 1 (omitted when 0, as proto3 does). */
  if (total != 0) roma_pb_put_varint_field(&response, 1, total);
  if (roma_write_response_buf(fd, &response) != 0) roma_udf_die("payload_read: cannot write the response");
  roma_pb_buf_free(&response);
  return 0;
}
