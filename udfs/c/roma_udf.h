/*
 * roma_udf.h - header-only helper library for writing roma-byob UDFs in C or C++.
 *
 * Copyright the roma-byob authors. Licensed under the Apache License, Version 2.0.
 *
 * A UDF ("user-defined function") is a small program that roma-byob runs once per
 * request, inside a sandbox. It talks to the host over one connected stream socket
 * whose file descriptor number is passed, in decimal, as argv[1]. The conversation
 * (the Roma BYOB wire protocol) is always:
 *
 *   1. UDF -> host: exactly one byte, any value (the "ready" byte). Do any expensive
 *      initialisation *before* this point: the host only sends the request once the
 *      UDF is ready.
 *   2. host -> UDF: one request frame = protobuf varint length (LEB128, at most 10
 *      bytes) followed by exactly that many bytes of a serialized protobuf message.
 *   3. UDF -> host: one response frame, encoded the same way.
 *   4. The UDF exits with status 0.
 *
 * This header gives you everything needed for that, with no protobuf library:
 *
 *   - roma_udf_start():        parse the fd from argv and send the ready byte;
 *   - roma_read_exact(), roma_write_all(): read/write loops that survive short
 *                              reads/writes and EINTR;
 *   - roma_read_varint_fd(), roma_read_request(): read one request frame into a
 *                              malloc'd buffer sized by the declared length;
 *   - roma_write_response(), roma_write_response_buf(): write one response frame;
 *   - roma_pb_reader / roma_pb_next(): iterate over the fields of a protobuf message
 *                              (unknown fields of every wire type are skipped);
 *   - roma_pb_buf / roma_pb_put_*(): encode fields into a growable buffer.
 *
 * Only plain read(2)/write(2) and malloc are used, so the code runs under a tight
 * seccomp filter (no threads, no /proc, no /dev, no /tmp needed).
 *
 * Minimal UDF (see udfs/README.md for more):
 *
 *     #include "roma_udf.h"
 *     int main(int argc, char **argv) {
 *       int fd = roma_udf_start(argc, argv);         // ready byte sent
 *       if (fd < 0) roma_udf_die("usage: udf <fd>");
 *       uint8_t *req; size_t req_len;
 *       if (roma_read_request(fd, &req, &req_len) != 0) roma_udf_die("read request");
 *       roma_pb_buf out;
 *       roma_pb_buf_init(&out);
 *       roma_pb_put_string_field(&out, 1, "Hello, world!");
 *       if (roma_write_response_buf(fd, &out) != 0) roma_udf_die("write response");
 *       return 0;
 *     }
 *
 * Error convention: functions returning int return 0 on success and -1 on failure
 * with errno set (EPIPE when the peer closed the stream too early, EPROTO for a
 * malformed frame or message, ENOMEM when an allocation failed).
 *
 * Note on SIGPIPE: if the host has gone away, write(2) raises SIGPIPE, which kills
 * the UDF. That is harmless (nobody is listening any more); install
 * signal(SIGPIPE, SIG_IGN) yourself if you prefer to get EPIPE instead.
 */
#ifndef ROMA_UDF_H
#define ROMA_UDF_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Largest encoded size of a varint (a 64-bit value in 7-bit groups). */
#define ROMA_PB_MAX_VARINT_LEN 10

/* Protobuf wire types. */
enum {
  ROMA_PB_WIRE_VARINT = 0, /* int32, int64, uint32, uint64, sint*, bool, enum */
  ROMA_PB_WIRE_I64 = 1,    /* fixed64, sfixed64, double */
  ROMA_PB_WIRE_LEN = 2,    /* string, bytes, sub-messages, packed repeated */
  ROMA_PB_WIRE_SGROUP = 3, /* start group (deprecated) */
  ROMA_PB_WIRE_EGROUP = 4, /* end group (deprecated) */
  ROMA_PB_WIRE_I32 = 5     /* fixed32, sfixed32, float */
};

/* ------------------------------------------------------------------------------ */
/* Plumbing: fd, ready byte, exact reads and writes                                */
/* ------------------------------------------------------------------------------ */

/*
 * Writes `msg` and a newline to stderr (fd 2) and exits with status 1.
 * Convenience for fatal errors; uses write(2) directly, so nothing is buffered.
 */
static inline void roma_udf_die(const char *msg) {
  size_t n = strlen(msg);
  ssize_t ignored = write(2, msg, n);
  ignored = write(2, "\n", 1);
  (void)ignored;
  exit(1);
}

/*
 * Parses argv[1] as the decimal number of the socket shared with the host.
 * Returns the fd, or -1 (errno = EINVAL) if argv[1] is missing or not a
 * non-negative decimal int.
 */
static inline int roma_udf_parse_fd(int argc, char **argv) {
  if (argc < 2 || argv[1] == NULL || argv[1][0] == '\0') {
    errno = EINVAL;
    return -1;
  }
  long fd = 0;
  for (const char *p = argv[1]; *p != '\0'; ++p) {
    if (*p < '0' || *p > '9') {
      errno = EINVAL;
      return -1;
    }
    fd = fd * 10 + (*p - '0');
    if (fd > 0x7fffffffL) {
      errno = EINVAL;
      return -1;
    }
  }
  return (int)fd;
}

/*
 * Writes all `len` bytes of `buf` to `fd`, looping over short writes and EINTR.
 * Returns 0, or -1 with errno set.
 */
static inline int roma_write_all(int fd, const void *buf, size_t len) {
  const uint8_t *p = (const uint8_t *)buf;
  while (len > 0) {
    ssize_t n = write(fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (n == 0) {
      errno = EPIPE;
      return -1;
    }
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

/*
 * Reads exactly `len` bytes from `fd` into `buf`, looping over short reads and
 * EINTR. Returns 0, or -1 with errno set (EPIPE if end-of-stream came first).
 */
static inline int roma_read_exact(int fd, void *buf, size_t len) {
  uint8_t *p = (uint8_t *)buf;
  while (len > 0) {
    ssize_t n = read(fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (n == 0) {
      errno = EPIPE;
      return -1;
    }
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

/*
 * Parses the fd from argv[1] and writes the one-byte "ready" signal to it.
 * Call this once your UDF has finished its initialisation. Returns the fd, or -1
 * with errno set (EINVAL for a bad argv).
 */
static inline int roma_udf_start(int argc, char **argv) {
  int fd = roma_udf_parse_fd(argc, argv);
  if (fd < 0) return -1;
  const uint8_t ready = 'R';
  if (roma_write_all(fd, &ready, 1) != 0) return -1;
  return fd;
}

/* ------------------------------------------------------------------------------ */
/* Frames: varint length + message                                                 */
/* ------------------------------------------------------------------------------ */

/*
 * Reads one varint (LEB128, at most 10 bytes) from `fd`, one byte at a time so
 * that nothing past the varint is consumed. Returns 0, or -1 with errno set
 * (EPROTO if the varint is longer than 10 bytes).
 */
static inline int roma_read_varint_fd(int fd, uint64_t *out) {
  uint64_t value = 0;
  for (int i = 0; i < ROMA_PB_MAX_VARINT_LEN; ++i) {
    uint8_t b;
    if (roma_read_exact(fd, &b, 1) != 0) return -1;
    value |= (uint64_t)(b & 0x7f) << (7 * i);
    if ((b & 0x80) == 0) {
      *out = value;
      return 0;
    }
  }
  errno = EPROTO;
  return -1;
}

/*
 * Reads one request frame: its varint length, then exactly that many bytes into
 * a buffer allocated with malloc() (sized by the declared length; the caller frees
 * it). On success stores the buffer in *out and its length in *out_len and
 * returns 0. Returns -1 with errno set on failure (ENOMEM for a length that
 * cannot be allocated), in which case *out is NULL.
 */
static inline int roma_read_request(int fd, uint8_t **out, size_t *out_len) {
  uint64_t len;
  *out = NULL;
  *out_len = 0;
  if (roma_read_varint_fd(fd, &len) != 0) return -1;
  if (len > (uint64_t)PTRDIFF_MAX) {
    errno = ENOMEM;
    return -1;
  }
  uint8_t *buf = (uint8_t *)malloc(len > 0 ? (size_t)len : 1);
  if (buf == NULL) {
    errno = ENOMEM;
    return -1;
  }
  if (roma_read_exact(fd, buf, (size_t)len) != 0) {
    int saved = errno;
    free(buf);
    errno = saved;
    return -1;
  }
  *out = buf;
  *out_len = (size_t)len;
  return 0;
}

/* Encodes `v` as a varint into `dst` (at least 10 bytes); returns bytes used. */
static inline size_t roma_pb_encode_varint(uint8_t *dst, uint64_t v) {
  size_t n = 0;
  while (v >= 0x80) {
    dst[n++] = (uint8_t)(v | 0x80);
    v >>= 7;
  }
  dst[n++] = (uint8_t)v;
  return n;
}

/* Number of bytes the varint encoding of `v` takes (1..10). */
static inline size_t roma_pb_varint_size(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++n;
  }
  return n;
}

/*
 * Writes one response frame: the varint length of `msg`, then `len` bytes of
 * `msg` (a serialized protobuf message). Returns 0, or -1 with errno set.
 */
static inline int roma_write_response(int fd, const void *msg, size_t len) {
  uint8_t header[ROMA_PB_MAX_VARINT_LEN];
  size_t header_len = roma_pb_encode_varint(header, (uint64_t)len);
  if (roma_write_all(fd, header, header_len) != 0) return -1;
  return roma_write_all(fd, msg, len);
}

/* ------------------------------------------------------------------------------ */
/* Decoding: iterate over the fields of a protobuf message                         */
/* ------------------------------------------------------------------------------ */

/* Cursor over a serialized message. Initialise with roma_pb_reader_init(). */
typedef struct roma_pb_reader {
  const uint8_t *p;   /* next unread byte */
  const uint8_t *end; /* one past the last byte */
} roma_pb_reader;

/* One decoded field, as returned by roma_pb_next(). */
typedef struct roma_pb_field {
  uint32_t number; /* field number (>= 1) */
  int wire_type;   /* one of ROMA_PB_WIRE_* */
  /*
   * ROMA_PB_WIRE_VARINT: the varint (cast to int32_t/int64_t for signed int32/int64
   * fields; zig-zag decode for sint*); ROMA_PB_WIRE_I64 / ROMA_PB_WIRE_I32: the
   * little-endian fixed value. 0 for the other wire types.
   */
  uint64_t value;
  /*
   * ROMA_PB_WIRE_LEN: the payload (string/bytes contents, sub-message, or the
   * packed values of a repeated scalar); ROMA_PB_WIRE_SGROUP: the group's contents.
   * NULL/0 for the other wire types. Points into the reader's buffer (not copied,
   * not NUL-terminated).
   */
  const uint8_t *data;
  size_t len;
} roma_pb_field;

static inline void roma_pb_reader_init(roma_pb_reader *r, const void *buf, size_t len) {
  r->p = (const uint8_t *)buf;
  r->end = r->p + len;
}

/*
 * Decodes one varint at *p (not past `end`) and advances *p. Returns 0, or -1
 * (errno = EPROTO) if it is truncated or longer than 10 bytes. Also the way to
 * walk the values of a packed repeated varint field:
 *
 *     const uint8_t *q = field.data, *q_end = field.data + field.len;
 *     while (q < q_end) {
 *       uint64_t v;
 *       if (roma_pb_read_varint(&q, q_end, &v) != 0) return -1;
 *       int32_t value = (int32_t)v;   // repeated int32
 *       ...
 *     }
 */
static inline int roma_pb_read_varint(const uint8_t **p, const uint8_t *end, uint64_t *out) {
  const uint8_t *q = *p;
  uint64_t value = 0;
  for (int i = 0; i < ROMA_PB_MAX_VARINT_LEN; ++i) {
    if (q >= end) break;
    uint8_t b = *q++;
    value |= (uint64_t)(b & 0x7f) << (7 * i);
    if ((b & 0x80) == 0) {
      *out = value;
      *p = q;
      return 0;
    }
  }
  errno = EPROTO;
  return -1;
}

/* Reads a little-endian fixed-width value of `n` (4 or 8) bytes. */
static inline int roma_pb_read_fixed_(const uint8_t **p, const uint8_t *end, size_t n,
                                      uint64_t *out) {
  if ((size_t)(end - *p) < n) {
    errno = EPROTO;
    return -1;
  }
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= (uint64_t)(*p)[i] << (8 * i);
  *p += n;
  *out = v;
  return 0;
}

/* Internal: reads a tag, checking the field number and wire type. */
static inline int roma_pb_read_tag_(const uint8_t **p, const uint8_t *end, uint32_t *number,
                                    int *wire_type) {
  uint64_t tag;
  if (roma_pb_read_varint(p, end, &tag) != 0) return -1;
  uint64_t num = tag >> 3;
  int wt = (int)(tag & 7);
  if (num == 0 || num > 536870911u || wt > 5) {
    errno = EPROTO;
    return -1;
  }
  *number = (uint32_t)num;
  *wire_type = wt;
  return 0;
}

/*
 * Internal: skips the contents of a group whose start tag (field `number`) has
 * just been read, leaving *p just after the matching end-group tag and storing
 * the end of the contents (start of that tag) in *contents_end.
 */
static inline int roma_pb_skip_group_(const uint8_t **p, const uint8_t *end, uint32_t number,
                                      const uint8_t **contents_end) {
  /* Iterative with an explicit depth: nested groups of any field number. The
   * numbers of the open groups are not tracked individually beyond the outermost
   * one; a mismatched end-group at the outermost level is rejected. */
  uint32_t depth = 1;
  while (*p < end) {
    const uint8_t *tag_start = *p;
    uint32_t num;
    int wt;
    uint64_t v;
    if (roma_pb_read_tag_(p, end, &num, &wt) != 0) return -1;
    switch (wt) {
      case ROMA_PB_WIRE_VARINT:
        if (roma_pb_read_varint(p, end, &v) != 0) return -1;
        break;
      case ROMA_PB_WIRE_I64:
        if (roma_pb_read_fixed_(p, end, 8, &v) != 0) return -1;
        break;
      case ROMA_PB_WIRE_I32:
        if (roma_pb_read_fixed_(p, end, 4, &v) != 0) return -1;
        break;
      case ROMA_PB_WIRE_LEN:
        if (roma_pb_read_varint(p, end, &v) != 0) return -1;
        if (v > (uint64_t)(end - *p)) {
          errno = EPROTO;
          return -1;
        }
        *p += v;
        break;
      case ROMA_PB_WIRE_SGROUP:
        if (depth >= 100) { /* protobuf's default recursion limit */
          errno = EPROTO;
          return -1;
        }
        ++depth;
        break;
      case ROMA_PB_WIRE_EGROUP:
        if (--depth == 0) {
          if (num != number) {
            errno = EPROTO;
            return -1;
          }
          *contents_end = tag_start;
          return 0;
        }
        break;
    }
  }
  errno = EPROTO; /* unterminated group */
  return -1;
}

/*
 * Decodes the next field. Returns 1 and fills *f when a field was decoded, 0 at
 * the end of the message, -1 (errno = EPROTO) if the message is malformed.
 * Typical use:
 *
 *     roma_pb_reader r;
 *     roma_pb_field f;
 *     int rc;
 *     roma_pb_reader_init(&r, req, req_len);
 *     while ((rc = roma_pb_next(&r, &f)) == 1) {
 *       if (f.number == 1 && f.wire_type == ROMA_PB_WIRE_VARINT) bound = (int32_t)f.value;
 *       // anything else: ignore (it has already been skipped)
 *     }
 *     if (rc < 0) ... malformed ...
 *
 * Remember that a repeated scalar field may arrive packed (ROMA_PB_WIRE_LEN, walk
 * it with roma_pb_read_varint) or unpacked (one ROMA_PB_WIRE_VARINT field per
 * element); decoders should accept both.
 */
static inline int roma_pb_next(roma_pb_reader *r, roma_pb_field *f) {
  if (r->p >= r->end) return 0;
  const uint8_t *p = r->p;
  uint32_t number;
  int wt;
  if (roma_pb_read_tag_(&p, r->end, &number, &wt) != 0) return -1;
  f->number = number;
  f->wire_type = wt;
  f->value = 0;
  f->data = NULL;
  f->len = 0;
  switch (wt) {
    case ROMA_PB_WIRE_VARINT:
      if (roma_pb_read_varint(&p, r->end, &f->value) != 0) return -1;
      break;
    case ROMA_PB_WIRE_I64:
      if (roma_pb_read_fixed_(&p, r->end, 8, &f->value) != 0) return -1;
      break;
    case ROMA_PB_WIRE_I32:
      if (roma_pb_read_fixed_(&p, r->end, 4, &f->value) != 0) return -1;
      break;
    case ROMA_PB_WIRE_LEN: {
      uint64_t len;
      if (roma_pb_read_varint(&p, r->end, &len) != 0) return -1;
      if (len > (uint64_t)(r->end - p)) {
        errno = EPROTO;
        return -1;
      }
      f->data = p;
      f->len = (size_t)len;
      p += len;
      break;
    }
    case ROMA_PB_WIRE_SGROUP: {
      const uint8_t *contents = p;
      const uint8_t *contents_end = p;
      if (roma_pb_skip_group_(&p, r->end, number, &contents_end) != 0) return -1;
      f->data = contents;
      f->len = (size_t)(contents_end - contents);
      break;
    }
    default: /* ROMA_PB_WIRE_EGROUP without a matching start */
      errno = EPROTO;
      return -1;
  }
  r->p = p;
  return 1;
}

/* ------------------------------------------------------------------------------ */
/* Encoding: build a message in a growable buffer                                  */
/* ------------------------------------------------------------------------------ */

/*
 * Growable output buffer. Initialise with roma_pb_buf_init() (or roma_pb_buf_reserve()
 * when you know the size), append with roma_pb_put_*(), send with
 * roma_write_response_buf(), release with roma_pb_buf_free().
 * If an allocation fails, `failed` is set, later appends do nothing, and
 * roma_write_response_buf() refuses to send (errno = ENOMEM): checking once at the
 * end is enough.
 */
typedef struct roma_pb_buf {
  uint8_t *data;
  size_t len;
  size_t cap;
  int failed;
} roma_pb_buf;

static inline void roma_pb_buf_init(roma_pb_buf *b) {
  b->data = NULL;
  b->len = 0;
  b->cap = 0;
  b->failed = 0;
}

static inline void roma_pb_buf_free(roma_pb_buf *b) {
  free(b->data);
  roma_pb_buf_init(b);
}

/* Makes room for `extra` more bytes. Returns 0, or -1 (and sets b->failed). */
static inline int roma_pb_buf_reserve(roma_pb_buf *b, size_t extra) {
  if (b->failed) return -1;
  if (extra <= b->cap - b->len) return 0;
  if (extra > (size_t)PTRDIFF_MAX - b->len) {
    b->failed = 1;
    return -1;
  }
  size_t need = b->len + extra;
  size_t cap = b->cap < 64 ? 64 : b->cap;
  while (cap < need) cap = cap > (size_t)PTRDIFF_MAX / 2 ? need : cap * 2;
  uint8_t *data = (uint8_t *)realloc(b->data, cap);
  if (data == NULL) {
    b->failed = 1;
    return -1;
  }
  b->data = data;
  b->cap = cap;
  return 0;
}

/* Appends raw bytes. */
static inline void roma_pb_put_raw(roma_pb_buf *b, const void *src, size_t len) {
  if (roma_pb_buf_reserve(b, len) != 0) return;
  if (len > 0) memcpy(b->data + b->len, src, len);
  b->len += len;
}

/* Appends a bare varint (no tag). */
static inline void roma_pb_put_varint(roma_pb_buf *b, uint64_t v) {
  if (roma_pb_buf_reserve(b, ROMA_PB_MAX_VARINT_LEN) != 0) return;
  b->len += roma_pb_encode_varint(b->data + b->len, v);
}

/* Appends a field tag (field number + wire type). */
static inline void roma_pb_put_tag(roma_pb_buf *b, uint32_t field, int wire_type) {
  roma_pb_put_varint(b, ((uint64_t)field << 3) | (uint64_t)(wire_type & 7));
}

/*
 * Appends a varint field (uint32/uint64/bool/enum, or int64 cast to uint64_t).
 * Always written, even when 0 (proto3 encoders normally omit zero scalars: skip the
 * call yourself if you want the canonical encoding).
 */
static inline void roma_pb_put_varint_field(roma_pb_buf *b, uint32_t field, uint64_t v) {
  roma_pb_put_tag(b, field, ROMA_PB_WIRE_VARINT);
  roma_pb_put_varint(b, v);
}

/* Appends an int32 field (negative values are sign-extended to 10 bytes, as protobuf
 * requires). */
static inline void roma_pb_put_int32_field(roma_pb_buf *b, uint32_t field, int32_t v) {
  roma_pb_put_varint_field(b, field, (uint64_t)(int64_t)v);
}

/* Appends a length-delimited field (bytes, string or an encoded sub-message). */
static inline void roma_pb_put_bytes_field(roma_pb_buf *b, uint32_t field, const void *data,
                                           size_t len) {
  roma_pb_put_tag(b, field, ROMA_PB_WIRE_LEN);
  roma_pb_put_varint(b, (uint64_t)len);
  roma_pb_put_raw(b, data, len);
}

/*
 * Appends the tag and length of a `len`-byte length-delimited field and returns a
 * pointer to its (uninitialised) `len` bytes for the caller to fill in place, or
 * NULL if memory ran out. The pointer is valid until the next append.
 */
static inline uint8_t *roma_pb_put_bytes_field_uninit(roma_pb_buf *b, uint32_t field,
                                                      size_t len) {
  roma_pb_put_tag(b, field, ROMA_PB_WIRE_LEN);
  roma_pb_put_varint(b, (uint64_t)len);
  if (roma_pb_buf_reserve(b, len) != 0) return NULL;
  uint8_t *dst = b->data + b->len;
  b->len += len;
  return dst;
}

/* Appends a string field from a NUL-terminated string. */
static inline void roma_pb_put_string_field(roma_pb_buf *b, uint32_t field, const char *s) {
  roma_pb_put_bytes_field(b, field, s, strlen(s));
}

/*
 * Appends a packed repeated int32 field (the proto3 default encoding). Nothing is
 * written when n == 0 (an empty repeated field is simply absent).
 */
static inline void roma_pb_put_packed_int32(roma_pb_buf *b, uint32_t field, const int32_t *values,
                                            size_t n) {
  if (n == 0) return;
  size_t payload = 0;
  for (size_t i = 0; i < n; ++i) payload += roma_pb_varint_size((uint64_t)(int64_t)values[i]);
  roma_pb_put_tag(b, field, ROMA_PB_WIRE_LEN);
  roma_pb_put_varint(b, (uint64_t)payload);
  if (roma_pb_buf_reserve(b, payload) != 0) return;
  uint8_t *dst = b->data + b->len;
  for (size_t i = 0; i < n; ++i) dst += roma_pb_encode_varint(dst, (uint64_t)(int64_t)values[i]);
  b->len += payload;
}

/*
 * Writes the buffer as one response frame. Returns 0, or -1 with errno set
 * (ENOMEM if an earlier append ran out of memory: nothing is sent then).
 */
static inline int roma_write_response_buf(int fd, const roma_pb_buf *b) {
  if (b->failed) {
    errno = ENOMEM;
    return -1;
  }
  return roma_write_response(fd, b->data != NULL ? b->data : (const uint8_t *)"", b->len);
}

/* ------------------------------------------------------------------------------ */
/* Sessions: the socket transport or the shared-memory transport, same code         */
/* ------------------------------------------------------------------------------ */

/*
 * Shared-memory transport (opt-in per load on the host: LoadOptions::shared_memory).
 * The host then passes argv[2] = the fd of a memfd region laid out as:
 *
 *   offset 0   u64  request length n            (host)
 *   offset 8   u64  response length m           (UDF; all ones until written)
 *   offset 16  u32  magic 0x4d534252 ("RBSM"), offset 20 u32 version 1 (host)
 *   offset 24  u64  prepared: bytes from offset 0 the host already allocated
 *                   (0 = none; a hint of how much this token's executions use)
 *   offset 64  n bytes: the request message (no length prefix)
 *   offset 64 + round_up(n, 64): the response message (UDF)
 *
 * After the ready byte, the host places the request and writes one doorbell byte on
 * the socket; the UDF writes the response and its length, then one doorbell byte
 * back. Every worker gets a region of its own, all zeroes past the header. The
 * roma_udf_* session functions below hide the difference: a UDF written with them
 * runs on either transport. roma_udf_open() maps the `prepared` bytes into the UDF
 * before the ready byte, so that reading the request and writing the response take
 * no page faults; roma_udf_read_request() maps the rest of a large request with one
 * call. A UDF that reads only part of a large request (field headers, say) may
 * `#define ROMA_UDF_LAZY_MAPPING` before including this header: then nothing is
 * mapped ahead and pages fault in as they are touched (roma_udf_prepare_response()
 * still pre-faults a response area on request).
 */
#define ROMA_SHM_HEADER 64u
#define ROMA_SHM_MAGIC 0x4d534252u
#define ROMA_SHM_PREPARED_AT 24u

typedef struct roma_udf {
  int fd;                 /* the socket */
  uint8_t *shm;           /* mapped region, or NULL on the socket transport */
  size_t shm_len;
  size_t shm_mapped;      /* bytes from offset 0 pre-faulted at open */
  size_t request_len;
  uint8_t *request_owned; /* malloc'd request (socket transport) */
} roma_udf;

/* Opens the session: parses argv, maps the region if there is one, sends the ready
 * byte. Returns 0, or -1 with errno set. */
static inline int roma_udf_open(roma_udf *u, int argc, char **argv) {
  memset(u, 0, sizeof *u);
  u->fd = roma_udf_parse_fd(argc, argv);
  if (u->fd < 0) return -1;
  if (argc >= 3 && argv[2] != NULL) {
    char *args[2] = {argv[0], argv[2]};
    int shm_fd = roma_udf_parse_fd(2, args);
    if (shm_fd < 0) return -1;
    struct stat st;
    if (fstat(shm_fd, &st) != 0) return -1;
    if (st.st_size < (off_t)ROMA_SHM_HEADER) {
      errno = EPROTO;
      return -1;
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, shm_fd, 0);
    if (p == MAP_FAILED) return -1;
    u->shm = (uint8_t *)p;
    u->shm_len = (size_t)st.st_size;
    uint32_t magic;
    memcpy(&magic, u->shm + 16, sizeof magic);
    if (magic != ROMA_SHM_MAGIC) {
      errno = EPROTO;
      return -1;
    }
#if defined(MADV_POPULATE_WRITE) && !defined(ROMA_UDF_LAZY_MAPPING)
    /* Map what the host prepared now, before the ready byte, with one call: the
     * request and response then take no page faults (Linux 5.14+; best effort). */
    uint64_t prepared;
    memcpy(&prepared, u->shm + ROMA_SHM_PREPARED_AT, sizeof prepared);
    if (prepared > u->shm_len) prepared = u->shm_len;
    prepared &= ~(uint64_t)4095;
    if (prepared >= 65536 && madvise(u->shm, (size_t)prepared, MADV_POPULATE_WRITE) == 0)
      u->shm_mapped = (size_t)prepared;
#endif
  }
  const uint8_t ready = 'R';
  return roma_write_all(u->fd, &ready, 1);
}

/* Reads the request. On the shared-memory transport *req points into the region
 * (no copy); otherwise into a buffer the session frees in roma_udf_close(). */
static inline int roma_udf_read_request(roma_udf *u, const uint8_t **req, size_t *len) {
  if (u->shm == NULL) {
    if (roma_read_request(u->fd, &u->request_owned, &u->request_len) != 0) return -1;
    *req = u->request_owned;
    *len = u->request_len;
    return 0;
  }
  uint8_t doorbell;
  if (roma_read_exact(u->fd, &doorbell, 1) != 0) return -1;
  uint64_t n;
  memcpy(&n, u->shm, sizeof n);
  if (n > u->shm_len - ROMA_SHM_HEADER) {
    errno = EPROTO;
    return -1;
  }
  u->request_len = (size_t)n;
#if defined(MADV_POPULATE_READ) && !defined(ROMA_UDF_LAZY_MAPPING)
  /* Fault in the request's pages not mapped at open with one call instead of one
   * fault per page (Linux 5.14+; ignored where unsupported). */
  size_t end = ROMA_SHM_HEADER + (size_t)n;
  if (end > u->shm_mapped && end - u->shm_mapped >= 65536)
    (void)madvise(u->shm + u->shm_mapped, end - u->shm_mapped, MADV_POPULATE_READ);
#endif
  *req = u->shm + ROMA_SHM_HEADER;
  *len = u->request_len;
  return 0;
}

/* Where the response goes on the shared-memory transport, and how much fits. */
static inline uint8_t *roma_udf_response_area(roma_udf *u, size_t *room) {
  size_t off = ROMA_SHM_HEADER + (u->request_len + 63) / 64 * 64;
  if (u->shm == NULL || off > u->shm_len) {
    *room = 0;
    return NULL;
  }
  *room = u->shm_len - off;
  return u->shm + off;
}

/* Pre-faults `len` bytes of the response area before writing a large response
 * (one call instead of a page fault per 4 KiB; a no-op where unsupported). */
static inline void roma_udf_prepare_response(roma_udf *u, size_t len) {
  size_t room;
  uint8_t *area = roma_udf_response_area(u, &room);
#ifdef MADV_POPULATE_WRITE
  if (area != NULL && len >= 65536 && len <= room) {
    uintptr_t start = (uintptr_t)area & ~(uintptr_t)4095;
    uintptr_t end = (uintptr_t)area + len;
    uintptr_t mapped = (uintptr_t)u->shm + u->shm_mapped;
    if (start < mapped) start = mapped; /* already mapped at open */
    if (end > start && end - start >= 65536) (void)madvise((void *)start, end - start, MADV_POPULATE_WRITE);
  }
#else
  (void)area;
  (void)len;
#endif
}

/* Sends the response (a serialized message of `len` bytes). On the shared-memory
 * transport `msg` may already be the response area (no copy then). Returns 0, or
 * -1 with errno set (ENOSPC when it does not fit the region). */
static inline int roma_udf_write_response(roma_udf *u, const void *msg, size_t len) {
  if (u->shm == NULL) return roma_write_response(u->fd, msg, len);
  size_t room;
  uint8_t *area = roma_udf_response_area(u, &room);
  if (area == NULL || len > room) {
    errno = ENOSPC;
    return -1;
  }
  if ((const uint8_t *)msg != area) memcpy(area, msg, len);
  uint64_t m = (uint64_t)len;
  __atomic_thread_fence(__ATOMIC_RELEASE);
  memcpy(u->shm + 8, &m, sizeof m);
  const uint8_t doorbell = 0;
  return roma_write_all(u->fd, &doorbell, 1);
}

/* Sends a response built in a roma_pb_buf. */
static inline int roma_udf_write_response_buf(roma_udf *u, const roma_pb_buf *b) {
  if (b->failed) {
    errno = ENOMEM;
    return -1;
  }
  return roma_udf_write_response(u, b->data != NULL ? b->data : (const uint8_t *)"", b->len);
}

/* ------------------------------------------------------------------------------ */
/* Host API: call host functions during an execution                                */
/* ------------------------------------------------------------------------------ */

/*
 * Wire format (proto/host_api.proto): the UDF writes the marker varint(1 << 63)
 * (10 bytes: 80 80 80 80 80 80 80 80 80 01), then a length-delimited
 *   HostCall { uint64 call_id = 1; string function = 2; bytes request = 3; }
 * The host answers each call with a length-delimited
 *   HostReply { uint64 call_id = 1; bytes response = 2; string error = 3; }
 * Replies may come in any order when several calls are in flight. Calls are only
 * allowed between reading the request and writing the response, and only when the
 * code token was loaded with LoadOptions::host_api (otherwise the reply is an error).
 */
static const uint8_t ROMA_CALL_MARKER[10] = {0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01};

/* Sends one host call. Returns 0, or -1 with errno set. */
static inline int roma_udf_call_start(roma_udf *u, uint64_t call_id, const char *function, const void *request,
                                      size_t request_len) {
  roma_pb_buf call;
  roma_pb_buf_init(&call);
  roma_pb_put_varint_field(&call, 1, call_id);
  roma_pb_put_string_field(&call, 2, function);
  roma_pb_put_bytes_field(&call, 3, request, request_len);
  int rc = -1;
  if (!call.failed && roma_write_all(u->fd, ROMA_CALL_MARKER, sizeof ROMA_CALL_MARKER) == 0)
    rc = roma_write_response_buf(u->fd, &call);
  else if (call.failed)
    errno = ENOMEM;
  roma_pb_buf_free(&call);
  return rc;
}

/* One host reply. `response` and `error` are malloc'd (free with
 * roma_udf_reply_free); `error` is NULL when the call succeeded. */
typedef struct roma_udf_reply {
  uint64_t call_id;
  uint8_t *response;
  size_t response_len;
  char *error;
} roma_udf_reply;

static inline void roma_udf_reply_free(roma_udf_reply *r) {
  free(r->response);
  free(r->error);
  r->response = NULL;
  r->error = NULL;
}

/* Reads the next reply (whichever call it answers). Returns 0, or -1 with errno set. */
static inline int roma_udf_call_wait(roma_udf *u, roma_udf_reply *out) {
  memset(out, 0, sizeof *out);
  uint8_t *msg;
  size_t len;
  if (roma_read_request(u->fd, &msg, &len) != 0) return -1;
  roma_pb_reader r;
  roma_pb_field f;
  int rc;
  roma_pb_reader_init(&r, msg, len);
  while ((rc = roma_pb_next(&r, &f)) == 1) {
    if (f.number == 1 && f.wire_type == ROMA_PB_WIRE_VARINT) {
      out->call_id = f.value;
    } else if (f.number == 2 && f.wire_type == ROMA_PB_WIRE_LEN) {
      free(out->response);
      out->response = (uint8_t *)malloc(f.len > 0 ? f.len : 1);
      if (out->response == NULL) break;
      memcpy(out->response, f.data, f.len);
      out->response_len = f.len;
    } else if (f.number == 3 && f.wire_type == ROMA_PB_WIRE_LEN && f.len > 0) {
      free(out->error);
      out->error = (char *)malloc(f.len + 1);
      if (out->error == NULL) break;
      memcpy(out->error, f.data, f.len);
      out->error[f.len] = '\0';
    }
  }
  free(msg);
  if (rc < 0) {
    roma_udf_reply_free(out);
    errno = EPROTO;
    return -1;
  }
  if (rc == 1) {
    roma_udf_reply_free(out);
    errno = ENOMEM;
    return -1;
  }
  return 0;
}

/* Calls one host function and waits for its reply (no other call in flight). */
static inline int roma_udf_call(roma_udf *u, const char *function, const void *request, size_t request_len,
                                roma_udf_reply *out) {
  static uint64_t next_id = 1;
  uint64_t id = next_id++;
  if (roma_udf_call_start(u, id, function, request, request_len) != 0) return -1;
  return roma_udf_call_wait(u, out);
}

/* Releases what the session allocated. */
static inline void roma_udf_close(roma_udf *u) {
  free(u->request_owned);
  u->request_owned = NULL;
}

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* ROMA_UDF_H */
