// hello_cpp: a C++ UDF built on udfs/c/roma_udf.h (g++, dynamically linked against
// glibc and libstdc++).
//
// SampleRequest -> SampleResponse{greeting: "Hello from C++!"}.
// When the request's prime_bound (field 1) is 1, it first calls the host function
// "test.Echo" with the payload "cpp" and answers with the reply instead
// (greeting = the reply's bytes, or "error:<text>" when the call failed), which
// exercises Host API callbacks from C++ (load the code token with
// LoadOptions { host_api: true, .. }).
//
// Uses the roma_udf session functions, so it runs on the socket and on the
// shared-memory transport alike.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "roma_udf.h"

namespace {

[[noreturn]] void Die(const std::string& msg) {
  roma_udf_die(("hello_cpp: " + msg).c_str());  // writes to stderr and exits
  std::exit(1);                                 // (not declared noreturn in C)
}

// Decodes SampleRequest.prime_bound (int32, field 1); unknown fields are skipped.
int32_t PrimeBound(const uint8_t* request, size_t len) {
  int32_t bound = 0;
  roma_pb_reader reader;
  roma_pb_field field;
  int rc;
  roma_pb_reader_init(&reader, request, len);
  while ((rc = roma_pb_next(&reader, &field)) == 1) {
    if (field.number == 1 && field.wire_type == ROMA_PB_WIRE_VARINT) bound = static_cast<int32_t>(field.value);
  }
  if (rc < 0) Die("malformed SampleRequest");
  return bound;
}

// Calls host function `function` with `payload`; returns its response bytes, or
// "error:<text>" when the host reported an error.
std::string CallHost(roma_udf* session, const char* function, const std::string& payload) {
  roma_udf_reply reply;
  if (roma_udf_call(session, function, payload.data(), payload.size(), &reply) != 0) {
    Die(std::string("host call ") + function + " failed on the wire");
  }
  std::string result;
  if (reply.error != nullptr) {
    result = std::string("error:") + reply.error;
  } else if (reply.response != nullptr) {
    result.assign(reinterpret_cast<const char*>(reply.response), reply.response_len);
  }
  roma_udf_reply_free(&reply);
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  roma_udf session;
  if (roma_udf_open(&session, argc, argv) != 0) Die("usage: hello_cpp <socket fd> [<shm fd>]");
  const uint8_t* request;
  size_t request_len;
  if (roma_udf_read_request(&session, &request, &request_len) != 0) Die("cannot read the request");

  std::string greeting = "Hello from C++!";
  if (PrimeBound(request, request_len) == 1) greeting = CallHost(&session, "test.Echo", "cpp");

  roma_pb_buf response;
  roma_pb_buf_init(&response);
  roma_pb_put_bytes_field(&response, 1, greeting.data(), greeting.size());  // SampleResponse.greeting
  if (roma_udf_write_response_buf(&session, &response) != 0) Die("cannot write the response");
  roma_pb_buf_free(&response);
  roma_udf_close(&session);
  return 0;
}
