/*
 * payload_write: WritePayloadRequest{element_size, element_count} ->
 * WritePayloadResponse{payloads: element_count payloads of element_size bytes of
 * 'a'}. Exercises large responses.
 */
#include <stdlib.h>

#include "roma_udf.h"

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("payload_write: usage: payload_write <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("payload_write: cannot read the request");

  /* WritePayloadRequest: uint64 element_size = 1; uint64 element_count = 2. */
  uint64_t element_size = 0, element_count = 0;
  roma_pb_reader reader;
  roma_pb_field field;
  int rc;
  roma_pb_reader_init(&reader, request, request_len);
  while ((rc = roma_pb_next(&reader, &field)) == 1) {
    if (field.wire_type != ROMA_PB_WIRE_VARINT) continue;
    if (field.number == 1) element_size = field.value;
    if (field.number == 2) element_count = field.value;
  }
  if (rc < 0) roma_udf_die("payload_write: malformed WritePayloadRequest");
  free(request);

  /* Size the response exactly up front (one allocation, no copies), refusing
   * requests whose size overflows. */
  uint64_t per_element = 1 + (uint64_t)roma_pb_varint_size(element_size) + element_size;
  if (element_size > (uint64_t)PTRDIFF_MAX || (element_count != 0 && per_element > (uint64_t)PTRDIFF_MAX / element_count))
    roma_udf_die("payload_write: requested response is too large");

  roma_pb_buf response;
  roma_pb_buf_init(&response);
  if (roma_pb_buf_reserve(&response, (size_t)(per_element * element_count)) != 0)
    roma_udf_die("payload_write: out of memory");
  for (uint64_t i = 0; i < element_count; ++i) {
    /* WritePayloadResponse.payloads = 1 */
    uint8_t *dst = roma_pb_put_bytes_field_uninit(&response, 1, (size_t)element_size);
    if (dst == NULL) roma_udf_die("payload_write: out of memory");
    memset(dst, 'a', (size_t)element_size);
  }
  if (roma_write_response_buf(fd, &response) != 0) roma_udf_die("payload_write: cannot write the response");
  roma_pb_buf_free(&response);
  return 0;
}
