# hello.py: a Python UDF, standard library only (the protobuf encoding is written
# by hand). Answers any SampleRequest with SampleResponse{greeting: "Hello from Python!"}.
#
# A UDF must be an ELF binary, so this script is not run directly: the launcher
# python_launcher.c (built as `python_hello`) embeds its text and execs
#     <python3> -I -S -c <this script> <fd>
# so sys.argv[1] is the socket fd, as for any Roma BYOB UDF.
#
# Wire protocol (Roma BYOB): write one ready byte, read one varint-length-delimited
# request, write one varint-length-delimited response, exit 0.
import os
import sys


def read_exact(fd, n):
    chunks = []
    while n > 0:
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError("the host closed the socket")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_varint(fd):
    value = 0
    for i in range(10):
        b = read_exact(fd, 1)[0]
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return value
    raise ValueError("varint longer than 10 bytes")


def varint(v):
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main():
    fd = int(sys.argv[1])
    write_all(fd, b"R")  # ready
    read_exact(fd, read_varint(fd))  # SampleRequest: nothing in it is needed
    greeting = "Hello from Python!".encode()
    message = varint(1 << 3 | 2) + varint(len(greeting)) + greeting  # SampleResponse.greeting
    write_all(fd, varint(len(message)) + message)


main()
