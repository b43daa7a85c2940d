"""Socket I/O for the vhost-user back-end: accept one front-end, feed its messages to a Backend.

Like virtiofsd, the daemon serves exactly one front-end and exits when it disconnects: QEMU and
cloud-hypervisor never reconnect a vhost-user-fs back-end, and Kata relies on the exit. Signals
are the daemon's business (vhostfs.daemon), which cancels `serve` to stop it.
"""

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

from vhostfs.vhost import protocol as p
from vhostfs.vhost.backend import Backend
from vhostfs.vhost.codec import MessageReader, ProtocolError
from vhostfs.vhost.virtqueue import RequestHandler, stop_offload

log = logging.getLogger(__name__)


def listen_unix(path: str) -> socket.socket:
    """Bind a listening socket at path, replacing a stale socket file left by a dead daemon."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.exists(path) and not _is_socket(path):
            raise FileExistsError(f"{path} exists and is not a socket")
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Only our own user may connect (a writable passthrough runs with umask 0): whoever
    # connects gets the export.
    old_umask = os.umask(0o077)
    try:
        listener.bind(path)
        listener.listen(1)
    except BaseException:
        listener.close()
        raise
    finally:
        os.umask(old_umask)
    return listener


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.lstat(path).st_mode)


def inherited_listener(fd: int) -> socket.socket:
    """A listening socket passed by the launcher (Kata's --fd=3)."""
    return socket.socket(fileno=fd)


async def _receive(conn: socket.socket, reader: MessageReader) -> bool:
    """Receive the next piece of a message; False at end of stream."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, fds, flags, _ = socket.recv_fds(
                conn, reader.header_bytes_missing(), p.MAX_FDS, socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            readable = loop.create_future()
            loop.add_reader(conn.fileno(), readable.set_result, None)
            try:
                await readable
            finally:
                loop.remove_reader(conn.fileno())
            continue
        except ConnectionResetError:
            return False
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("file descriptors were truncated")
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        reader.feed(data, fds)
        return True


async def serve_connection(conn: socket.socket, backend: Backend) -> None:
    """Run one front-end session until it hangs up or breaks the protocol."""
    loop = asyncio.get_running_loop()
    reader = MessageReader()
    try:
        while True:
            message = reader.next_message()
            if message is None:
                if not await _receive(conn, reader):
                    log.info("front-end disconnected")
                    return
                continue
            log.debug(
                "<- %s flags=%#x size=%d fds=%d",
                message.name,
                message.flags,
                len(message.payload),
                len(message.fds),
            )
            await backend.before(message)
            reply = backend.handle(message)
            if reply is not None:
                await loop.sock_sendall(conn, reply)
    except ProtocolError as exc:
        log.error("closing the front-end connection: %s", exc)
    finally:
        reader.close()
        backend.shutdown()


async def serve(
    listener: socket.socket, make_handler: Callable[[], RequestHandler], num_queues: int
) -> None:
    """Accept one front-end and serve it until it goes away; cancel the call to stop sooner
    (the daemon does, on SIGTERM). The listener is closed either way."""
    loop = asyncio.get_running_loop()
    try:
        listener.setblocking(False)
        conn, _ = await loop.sock_accept(listener)
        listener.close()
        conn.setblocking(False)
        log.info("front-end connected")
        with conn:
            await serve_connection(conn, Backend(make_handler(), num_queues))
    finally:
        listener.close()
        stop_offload()  # every ring has stopped with the connection
