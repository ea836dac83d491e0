/*
 * callback_udf: CallbackRequest{functions, payload} -> CallbackResponse{results}.
 * Starts one host call per listed function (all in flight at once, call ids 1..n),
 * then collects the replies in whatever order they come and answers with one result
 * per call, in request order: "ok:<response bytes>" or "error:<error text>".
 * With the payload "abort" it calls abort() after the replies instead of
 * answering (under the `untrusted` filter tgkill is refused and glibc ends it
 * with SIGSEGV): a crash after observable work, for the exactly-once tests.
 */
#include <stdio.h>
#include <stdlib.h>

#include "roma_udf.h"

#define MAX_CALLS 1024

int main(int argc, char **argv) {
  roma_udf u;
  if (roma_udf_open(&u, argc, argv) != 0) roma_udf_die("callback_udf: usage: callback_udf <socket fd> [<shm fd>]");
  const uint8_t *request;
  size_t request_len;
  if (roma_udf_read_request(&u, &request, &request_len) != 0) roma_udf_die("callback_udf: cannot read the request");

  char *functions[MAX_CALLS];
  size_t n = 0;
  const uint8_t *payload = (const uint8_t *)"";
  size_t payload_len = 0;
  roma_pb_reader reader;
  roma_pb_field field;
  int rc;
  roma_pb_reader_init(&reader, request, request_len);
  while ((rc = roma_pb_next(&reader, &field)) == 1) {
    if (field.wire_type != ROMA_PB_WIRE_LEN) continue;
    if (field.number == 1 && n < MAX_CALLS) {
      functions[n] = (char *)malloc(field.len + 1);
      if (functions[n] == NULL) roma_udf_die("callback_udf: out of memory");
      memcpy(functions[n], field.data, field.len);
      functions[n][field.len] = '\0';
      ++n;
    } else if (field.number == 2) {
      payload = field.data;
      payload_len = field.len;
    }
  }
  if (rc < 0) roma_udf_die("callback_udf: malformed CallbackRequest");

  for (size_t i = 0; i < n; ++i) {
    if (roma_udf_call_start(&u, (uint64_t)(i + 1), functions[i], payload, payload_len) != 0)
      roma_udf_die("callback_udf: cannot send a host call");
  }
  char *results[MAX_CALLS] = {0};
  for (size_t got = 0; got < n; ++got) {
    roma_udf_reply reply;
    if (roma_udf_call_wait(&u, &reply) != 0) roma_udf_die("callback_udf: cannot read a host reply");
    if (reply.call_id < 1 || reply.call_id > n || results[reply.call_id - 1] != NULL)
      roma_udf_die("callback_udf: reply for an unknown call");
    size_t cap = 16 + (reply.error ? strlen(reply.error) : reply.response_len);
    char *text = (char *)malloc(cap);
    if (text == NULL) roma_udf_die("callback_udf: out of memory");
    if (reply.error != NULL)
      snprintf(text, cap, "error:%s", reply.error);
    else
      snprintf(text, cap, "ok:%.*s", (int)reply.response_len, reply.response ? (const char *)reply.response : "");
    results[reply.call_id - 1] = text;
    roma_udf_reply_free(&reply);
  }

  if (payload_len == 5 && memcmp(payload, "abort", 5) == 0) abort();

  roma_pb_buf response;
  roma_pb_buf_init(&response);
  for (size_t i = 0; i < n; ++i) roma_pb_put_string_field(&response, 1, results[i]);
  if (roma_udf_write_response_buf(&u, &response) != 0) roma_udf_die("callback_udf: cannot write the response");
  roma_pb_buf_free(&response);
  roma_udf_close(&u);
  return 0;
}
