/*
 * prime_sieve: SampleRequest{prime_bound} -> SampleResponse{prime_number: every
 * prime below prime_bound}, packed. prime_bound 0 (absent) means 100000; a negative
 * bound yields no primes.
 */
#include <stdlib.h>

#include "roma_udf.h"

#define DEFAULT_PRIME_BOUND 100000

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("prime_sieve: usage: prime_sieve <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("prime_sieve: cannot read the request");

  /* SampleRequest: int32 prime_bound = 1 (last occurrence wins, as in protobuf). */
  int32_t bound = 0;
  roma_pb_reader reader;
  roma_pb_field field;
  int rc;
  roma_pb_reader_init(&reader, request, request_len);
  while ((rc = roma_pb_next(&reader, &field)) == 1) {
    if (field.number == 1 && field.wire_type == ROMA_PB_WIRE_VARINT) bound = (int32_t)field.value;
  }
  if (rc < 0) roma_udf_die("prime_sieve: malformed SampleRequest");
  free(request);
  if (bound == 0) bound = DEFAULT_PRIME_BOUND;

  /* Sieve of Eratosthenes over [0, bound). */
  size_t n = bound > 0 ? (size_t)bound : 0;
  uint8_t *composite = (uint8_t *)calloc(n > 0 ? n : 1, 1);
  /* Upper bound on the number of primes below n is n/2 + 1. */
  int32_t *primes = (int32_t *)malloc((n / 2 + 1) * sizeof(int32_t));
  if (composite == NULL || primes == NULL) roma_udf_die("prime_sieve: out of memory");
  size_t count = 0;
  for (size_t i = 2; i < n; ++i) {
    if (composite[i]) continue;
    primes[count++] = (int32_t)i;
    if (i <= (n - 1) / i) {
      for (size_t j = i * i; j < n; j += i) composite[j] = 1;
    }
  }
  free(composite);

  roma_pb_buf response;
  roma_pb_buf_init(&response);
  roma_pb_put_packed_int32(&response, 2, primes, count); /* SampleResponse.prime_number */
  free(primes);
  if (roma_write_response_buf(fd, &response) != 0) roma_udf_die("prime_sieve: cannot write the response");
  roma_pb_buf_free(&response);
  return 0;
}
