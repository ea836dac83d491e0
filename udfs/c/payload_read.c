/*
 * payload_read: ReadPayloadRequest{payloads} -> ReadPayloadResponse{payload_size:
 * the sum of the lengths of all payloads}. Exercises large requests. Runs on the
 * socket transport and on the shared-memory transport (roma_udf_* session).
 */
#include <stdlib.h>

/* Only the field headers of the request are read, never the payload bytes: map
 * nothing ahead (see roma_udf.h). */
#define ROMA_UDF_LAZY_MAPPING
#include "roma_udf.h"

int main(int argc, char **argv) {
  roma_udf u;
  if (roma_udf_open(&u, argc, argv) != 0) roma_udf_die("payload_read: usage: payload_read <socket fd> [<shm fd>]");

  const uint8_t *request;
  size_t request_len;
  if (roma_udf_read_request(&u, &request, &request_len) != 0) roma_udf_die("payload_read: cannot read the request");

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

  roma_pb_buf response;
  roma_pb_buf_init(&response);
  /* ReadPayloadResponse.payload_size = 1 (omitted when 0, as proto3 does). */
  if (total != 0) roma_pb_put_varint_field(&response, 1, total);
  if (roma_udf_write_response_buf(&u, &response) != 0) roma_udf_die("payload_read: cannot write the response");
  roma_pb_buf_free(&response);
  roma_udf_close(&u);
  return 0;
}
