/*
 * payload_write: WritePayloadRequest{element_size, element_count} ->
 * WritePayloadResponse{payloads: element_count payloads of element_size bytes of
 * 'a'}. Exercises large responses. Runs on the socket transport and on the
 * shared-memory transport, where it encodes straight into the response area.
 */
#include <stdlib.h>

#include "roma_udf.h"

int main(int argc, char **argv) {
  roma_udf u;
  if (roma_udf_open(&u, argc, argv) != 0) roma_udf_die("payload_write: usage: payload_write <socket fd> [<shm fd>]");

  const uint8_t *request;
  size_t request_len;
  if (roma_udf_read_request(&u, &request, &request_len) != 0) roma_udf_die("payload_write: cannot read the request");

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

  /* Size the response exactly up front (one allocation, no copies), refusing
   * requests whose size overflows. */
  uint64_t per_element = 1 + (uint64_t)roma_pb_varint_size(element_size) + element_size;
  if (element_size > (uint64_t)PTRDIFF_MAX || (element_count != 0 && per_element > (uint64_t)PTRDIFF_MAX / element_count))
    roma_udf_die("payload_write: requested response is too large");

  size_t room;
  uint8_t *area = roma_udf_response_area(&u, &room);
  if (area != NULL) {
    /* Shared memory: encode in place, no copy. */
    uint64_t total = per_element * element_count;
    if (total > room) roma_udf_die("payload_write: response does not fit the shared-memory region");
    roma_udf_prepare_response(&u, (size_t)total);
    uint8_t *p = area;
    for (uint64_t i = 0; i < element_count; ++i) {
      *p++ = (1 << 3) | ROMA_PB_WIRE_LEN;
      p += roma_pb_encode_varint(p, element_size);
      memset(p, 'a', (size_t)element_size);
      p += element_size;
    }
    if (roma_udf_write_response(&u, area, (size_t)total) != 0) roma_udf_die("payload_write: cannot write the response");
    roma_udf_close(&u);
    return 0;
  }

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
  if (roma_udf_write_response_buf(&u, &response) != 0) roma_udf_die("payload_write: cannot write the response");
  roma_pb_buf_free(&response);
  roma_udf_close(&u);
  return 0;
}
