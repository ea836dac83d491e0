/* zygote_ifunc: hello_world whose greeting comes from an IFUNC of its own. Its
 * resolver runs in the dynamic loader, before main: the zygote load refuses it. */
#include <stdlib.h>

#include "roma_udf.h"

static const char *greeting_impl(void) { return "Hello, world!"; }
static const char *(*resolve_greeting(void))(void) { return greeting_impl; }
const char *greeting(void) __attribute__((ifunc("resolve_greeting")));

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("zygote_ifunc: usage: zygote_ifunc <socket fd>");
  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("zygote_ifunc: cannot read the request");
  free(request);
  roma_pb_buf response;
  roma_pb_buf_init(&response);
  roma_pb_put_string_field(&response, 1, greeting());
  if (roma_write_response_buf(fd, &response) != 0) roma_udf_die("zygote_ifunc: cannot write the response");
  roma_pb_buf_free(&response);
  return 0;
}
