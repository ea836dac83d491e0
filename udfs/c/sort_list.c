/*
 * sort_list: SortListRequest{count, seed} -> SortListResponse{count, min, max,
 * checksum}. Generates `count` int32 with xorshift32 (state = seed, or 2463534242
 * when 0; per item x ^= x << 13; x ^= x >> 17; x ^= x << 5; item = (int32_t)x),
 * sorts them ascending, and answers with checksum = sum over i of
 * (i + 1) * (uint32_t)sorted[i] mod 2^64. A CPU-bound UDF with small messages
 * (Roma BYOB's sort benchmarks).
 */
#include <stdlib.h>

#include "roma_udf.h"

static int cmp_i32(const void *a, const void *b) {
  int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  roma_udf u;
  if (roma_udf_open(&u, argc, argv) != 0) roma_udf_die("sort_list: usage: sort_list <socket fd> [<shm fd>]");
  const uint8_t *request;
  size_t request_len;
  if (roma_udf_read_request(&u, &request, &request_len) != 0) roma_udf_die("sort_list: cannot read the request");

  uint32_t count = 0, seed = 0;
  roma_pb_reader reader;
  roma_pb_field field;
  int rc;
  roma_pb_reader_init(&reader, request, request_len);
  while ((rc = roma_pb_next(&reader, &field)) == 1) {
    if (field.wire_type != ROMA_PB_WIRE_VARINT) continue;
    if (field.number == 1) count = (uint32_t)field.value;
    if (field.number == 2) seed = (uint32_t)field.value;
  }
  if (rc < 0) roma_udf_die("sort_list: malformed SortListRequest");

  int32_t *items = (int32_t *)malloc((count > 0 ? count : 1) * sizeof(int32_t));
  if (items == NULL) roma_udf_die("sort_list: out of memory");
  uint32_t x = seed != 0 ? seed : 2463534242u;
  for (uint32_t i = 0; i < count; ++i) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    items[i] = (int32_t)x;
  }
  qsort(items, count, sizeof(int32_t), cmp_i32);
  uint64_t checksum = 0;
  for (uint32_t i = 0; i < count; ++i) checksum += (uint64_t)(i + 1) * (uint64_t)(uint32_t)items[i];

  roma_pb_buf response;
  roma_pb_buf_init(&response);
  if (count != 0) {
    roma_pb_put_varint_field(&response, 1, count);
    if (items[0] != 0) roma_pb_put_int32_field(&response, 2, items[0]);
    if (items[count - 1] != 0) roma_pb_put_int32_field(&response, 3, items[count - 1]);
    if (checksum != 0) roma_pb_put_varint_field(&response, 4, checksum);
  }
  if (roma_udf_write_response_buf(&u, &response) != 0) roma_udf_die("sort_list: cannot write the response");
  roma_pb_buf_free(&response);
  free(items);
  roma_udf_close(&u);
  return 0;
}
