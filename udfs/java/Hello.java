// Hello: a Java UDF, standard library only (the protobuf encoding is written by
// hand). Answers any SampleRequest with SampleResponse{greeting: "Hello from Java!"}.
//
// A UDF must be an ELF binary, so this class is started by the launcher
// java_launcher.c (built as `java_hello`), which execs the JVM. Java has no public
// way to open a stream on an inherited fd number, so the launcher first moves the
// Roma socket (argv[1]) to fd 0: this class talks to the host through
// FileDescriptor.in, both ways (a stream socket is bidirectional). args[0] is the
// original fd number, for information only.
//
// Wire protocol (Roma BYOB): write one ready byte, read one varint-length-delimited
// request, write one varint-length-delimited response, exit 0.
import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.EOFException;
import java.io.FileDescriptor;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;

public final class Hello {
  private static int readByte(InputStream in) throws IOException {
    int b = in.read();
    if (b < 0) throw new EOFException("the host closed the socket");
    return b;
  }

  private static long readVarint(InputStream in) throws IOException {
    long value = 0;
    for (int i = 0; i < 10; i++) {
      int b = readByte(in);
      value |= (long) (b & 0x7f) << (7 * i);
      if ((b & 0x80) == 0) return value;
    }
    throw new IOException("varint longer than 10 bytes");
  }

  private static void writeVarint(ByteArrayOutputStream out, long v) {
    while ((v & ~0x7fL) != 0) {
      out.write((int) ((v & 0x7f) | 0x80));
      v >>>= 7;
    }
    out.write((int) v);
  }

  public static void main(String[] args) throws IOException {
    FileInputStream in = new FileInputStream(FileDescriptor.in);
    FileOutputStream out = new FileOutputStream(FileDescriptor.in);
    out.write('R'); // ready

    long len = readVarint(in); // SampleRequest: nothing in it is needed
    if (len > Integer.MAX_VALUE - 8) throw new IOException("request too large");
    byte[] request = new byte[(int) len];
    // readFully, not FileInputStream.readNBytes: JDK 17's readNBytes calls
    // position() on the fd, which fails with "Illegal seek" on a socket.
    new DataInputStream(in).readFully(request);

    byte[] greeting = "Hello from Java!".getBytes(StandardCharsets.UTF_8);
    ByteArrayOutputStream message = new ByteArrayOutputStream();
    writeVarint(message, 1 << 3 | 2); // SampleResponse.greeting, length-delimited
    writeVarint(message, greeting.length);
    message.write(greeting, 0, greeting.length);
    ByteArrayOutputStream frame = new ByteArrayOutputStream();
    writeVarint(frame, message.size());
    message.writeTo(frame);
    out.write(frame.toByteArray());
    out.flush();
  }
}
