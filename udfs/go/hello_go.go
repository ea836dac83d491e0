// hello_go: a Go UDF, standard library only (the protobuf encoding is written by
// hand). Answers any SampleRequest with SampleResponse{greeting: "Hello from Go!"}.
//
// Wire protocol (Roma BYOB): argv[1] is the socket fd; write one ready byte, read
// one varint-length-delimited request, write one varint-length-delimited response,
// exit 0.
//
// Built by build/samples.rs with `CGO_ENABLED=0 go build` (a static binary that
// needs no library mount), only when `go` is installed.
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
)

func die(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "hello_go: "+format+"\n", args...)
	os.Exit(1)
}

// readVarint reads one varint (at most 10 bytes).
func readVarint(r io.ByteReader) (uint64, error) {
	var value uint64
	for i := 0; i < 10; i++ {
		b, err := r.ReadByte()
		if err != nil {
			return 0, err
		}
		value |= uint64(b&0x7f) << (7 * i)
		if b&0x80 == 0 {
			return value, nil
		}
	}
	return 0, errors.New("varint longer than 10 bytes")
}

func appendVarint(out []byte, v uint64) []byte {
	for v >= 0x80 {
		out = append(out, byte(v)|0x80)
		v >>= 7
	}
	return append(out, byte(v))
}

func main() {
	if len(os.Args) < 2 {
		die("usage: hello_go <socket fd>")
	}
	fd, err := strconv.ParseUint(os.Args[1], 10, 31)
	if err != nil {
		die("bad socket fd %q", os.Args[1])
	}
	conn := os.NewFile(uintptr(fd), "roma-socket")
	if _, err := conn.Write([]byte{'R'}); err != nil {
		die("cannot send the ready byte: %v", err)
	}

	// The request: varint length, then the SampleRequest (nothing in it is needed).
	// The buffered reader may read ahead, which is fine: nothing follows the request.
	in := bufio.NewReader(conn)
	n, err := readVarint(in)
	if err != nil {
		die("cannot read the request length: %v", err)
	}
	if _, err := io.CopyN(io.Discard, in, int64(n)); err != nil {
		die("cannot read the request: %v", err)
	}

	greeting := "Hello from Go!"
	var msg []byte
	msg = appendVarint(msg, 1<<3|2) // SampleResponse.greeting, length-delimited
	msg = appendVarint(msg, uint64(len(greeting)))
	msg = append(msg, greeting...)
	frame := appendVarint(nil, uint64(len(msg)))
	frame = append(frame, msg...)
	if _, err := conn.Write(frame); err != nil {
		die("cannot write the response: %v", err)
	}
}
