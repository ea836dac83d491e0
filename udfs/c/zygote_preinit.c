/* zygote_preinit: hello_world with a DT_PREINIT_ARRAY entry, which the dynamic
 * loader runs before any library constructor: the zygote load refuses it. */
#include <stdlib.h>

#include "roma_udf.h"

static int early;
static void mark_early(void) { early = 1; }
__attribute__((section(".preinit_array"), used)) static void (*preinit_entry)(void) = mark_early;

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("zygote_preinit: usage: zygote_preinit <socket fd>");
  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("zygote_preinit: cannot read the request");
  free(request);
  roma_pb_buf response;
  roma_pb_buf_init(&response);
  roma_pb_put_string_field(&response, 1, early ? "Hello, world!" : "no preinit");
  if (roma_write_response_buf(fd, &response) != 0) roma_udf_die("zygote_preinit: cannot write the response");
  roma_pb_buf_free(&response);
  return 0;
}
