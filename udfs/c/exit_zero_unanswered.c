/* exit_zero_unanswered: sends the ready byte, reads the request, exits with status 0 without responding. */
#include <stdlib.h>

#include "roma_udf.h"

int main(int argc, char **argv) {
  int fd = roma_udf_start(argc, argv);
  if (fd < 0) roma_udf_die("exit_zero_unanswered: usage: exit_zero_unanswered <socket fd>");

  uint8_t *request;
  size_t request_len;
  if (roma_read_request(fd, &request, &request_len) != 0) roma_udf_die("exit_zero_unanswered: cannot read the request");
  exit(0);
}
