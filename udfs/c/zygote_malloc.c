/* zygote_malloc: hello_world that replaces malloc/free (a bump allocator). The
 * executable exports them, so library code calls them, also before main (library
 * constructors): the zygote load refuses it. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "roma_udf.h"

static _Alignas(16) unsigned char arena[1 << 20];
static size_t used;

void *malloc(size_t n) {
  size_t at = (used + 15) & ~(size_t)15;
  if (n > sizeof arena - at) return NULL;
  used = at + n;
  return arena + at;
}
void free(void *p) { (void)p; }
void *calloc(size_t n, size_t size) {
  if (size != 0 && n > SIZE_MAX / size) return NULL;
  unsigned char *p = malloc(n * size);
  if (p)
    for (size_t i = 0; i < n * size; i++) p[i] = 0;
  return p;
}
void *realloc(void *old, size_t n) {
  unsigned char *p = malloc(n);
  if (p && old) {
    /* Copies n bytes, which may read past the old block but stays in the arena. */
    size_t avail = (size_t)(arena + sizeof arena - (unsigned char *)old);
    size_t k = n < avail ? n : avail;
    for (size_t i = 0; i < k; i++) p[i] = ((unsigned char *)old)[i];
  }
  return p;
}

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("zygote_malloc: usage: zygote_malloc <socket fd>");
  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("zygote_malloc: cannot read the request");
  free(request);
  roma_pb_buf response;
  roma_pb_buf_init(&response);
  roma_pb_put_string_field(&response, 1, "Hello, world!");
  if (roma_write_response_buf(fd, &response) != 0) roma_udf_die("zygote_malloc: cannot write the response");
  roma_pb_buf_free(&response);
  return 0;
}
