"""A small NBD client (fixed newstyle, NBD_OPT_STARTTLS, NBD_OPT_GO, simple replies) for the
verifying block load.

Only what the load needs: read, write (optionally FUA) and flush, one request at a time. Every
failure raises NbdError; the caller treats the outcome of that request as unknown.
"""

import socket
import ssl
import struct

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

OPT_STARTTLS = 5
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_FLAG_FUA = 1


class NbdError(Exception):
    pass


class NbdClient:
    def __init__(self, host, port, export, timeout=10.0, tls=None):
        """`tls`: an ssl.SSLContext (the cluster CA, a client certificate) for STARTTLS."""
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.handle = 0
        self.host = host
        try:
            self._handshake(export, tls)
        except (OSError, struct.error) as e:
            self.close()
            raise NbdError(f"handshake: {e}") from e

    def _recv(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise NbdError("connection closed by the server")
            buf += chunk
        return bytes(buf)

    def _reply(self):
        magic, _opt, rtype, length = struct.unpack(">QIII", self._recv(20))
        if magic != REPLY_MAGIC:
            raise NbdError("bad option reply magic")
        return rtype, self._recv(length) if length else b""

    def _handshake(self, export, tls):
        hello = self._recv(18)
        if hello[:8] != NBDMAGIC or struct.unpack(">Q", hello[8:16])[0] != IHAVEOPT:
            raise NbdError("not a newstyle NBD server")
        # Client flags: fixed newstyle, no zeroes.
        self.sock.sendall(struct.pack(">I", 1 | 2))
        if tls is not None:
            self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0))
            rtype, body = self._reply()
            if rtype != REP_ACK:
                raise NbdError(f"STARTTLS refused: {body.decode(errors='replace')}")
            self.sock = tls.wrap_socket(self.sock, server_hostname=self.host)
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        self.size = None
        while True:
            rtype, body = self._reply()
            if rtype & 0x80000000:
                raise NbdError(f"export {export!r} refused: {body.decode(errors='replace')}")
            if rtype == REP_INFO and len(body) >= 12 and struct.unpack(">H", body[:2])[0] == INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", body[2:12])
            if rtype == REP_ACK:
                break
        if self.size is None:
            raise NbdError("no export size in the reply")

    def _request(self, cmd, offset, length, payload=b"", flags=0):
        self.handle += 1
        h = self.handle
        try:
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, h, offset, length) + payload)
            magic, err, handle = struct.unpack(">IIQ", self._recv(16))
            if magic != SIMPLE_REPLY_MAGIC or handle != h:
                raise NbdError("bad reply")
            if err:
                # The server read past its reply; drop the connection.
                raise NbdError(f"server error {err}")
            return self._recv(length) if cmd == CMD_READ else b""
        except OSError as e:
            raise NbdError(str(e)) from e

    def read(self, offset, length):
        return self._request(CMD_READ, offset, length)

    def write(self, offset, data, fua=False):
        self._request(CMD_WRITE, offset, len(data), data, CMD_FLAG_FUA if fua else 0)

    def flush(self):
        self._request(CMD_FLUSH, 0, 0)

    def close(self):
        try:
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
