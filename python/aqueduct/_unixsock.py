"""Who may talk to aqueduct's Unix sockets, and how they are made: the one place for that policy.

Used by the flow server and its clients (:mod:`aqueduct.sockets`), the flow's stats socket and
``python -m aqueduct top``; ``docs/security.md`` describes the trust model. This module owns:

- the private directory the default socket paths live in (``$XDG_RUNTIME_DIR/aqueduct``, else
  ``<tmp>/aqueduct-<uid>``), created 0700 and verified (owner, mode, not a symbolic link);
- binding a socket with an explicit mode (0600, or 0660 for an allowed group) whatever the umask;
- replacing a path only when it is a dead socket of this user: never a file that is not a socket,
  never a socket another user owns, never a socket a live server answers on;
- the peer-credential check (``SO_PEERCRED``) both ends of a connection run before they read a
  byte: the same uid, or the one group the caller explicitly allows;
- reads bounded by one overall deadline and a size limit, so a peer that dribbles or floods an
  answer cannot hang or bloat the reader.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import tempfile
import time
from typing import List, NamedTuple, Optional

from .exceptions import FlowError

#: Linux's SO_PEERGROUPS (4.13+; Python has no constant for it): the peer's supplementary groups.
_SO_PEERGROUPS = getattr(socket, 'SO_PEERGROUPS', 59)
_UCRED = struct.Struct('=iII')  # struct ucred: pid_t pid; uid_t uid; gid_t gid
#: Mode of the private socket directory, and of sockets only their owner may use.
PRIVATE_DIR_MODE = 0o700
PRIVATE_SOCKET_MODE = 0o600
#: Mode of a socket that members of an allowed group may use too.
GROUP_SOCKET_MODE = 0o660


class UnsafeSocketError(FlowError, PermissionError):
    """A socket, its directory, the path it should be bound at, or the process at its other end
    is not safe to use; nothing was read from it or replaced."""


class SocketProtocolError(FlowError, ConnectionError):
    """The peer's answer is not what the protocol allows: wrong magic or version, too large, cut
    short, or not complete before the deadline."""


class Peer(NamedTuple):
    """The credentials of the process at the other end (taken by the kernel at connect() for a
    client, at listen() for a server: a peer cannot change them afterwards)."""

    pid: int
    uid: int
    gid: int


# ---------------------------------------------------------------------------- private directory


def private_dir() -> str:
    """The directory default sockets live in, which only this user can enter; created if needed.

    ``$XDG_RUNTIME_DIR/aqueduct`` when ``$XDG_RUNTIME_DIR`` is set and is a directory of ours that
    nobody else may enter (systemd's per-user runtime directory), else ``<tmp>/aqueduct-<uid>``.
    Raises :class:`UnsafeSocketError` when the directory exists but is not safe: a symbolic link,
    owned by another user, or open to the group or others (someone else may have created it first
    in the world-writable temporary directory, to plant or read sockets there)."""
    uid = os.geteuid()
    runtime = os.environ.get('XDG_RUNTIME_DIR', '')
    if os.path.isabs(runtime) and _is_private_dir(runtime, uid):
        return _ensure_private_dir(os.path.join(runtime, 'aqueduct'), uid)
    return _ensure_private_dir(os.path.join(tempfile.gettempdir(), f'aqueduct-{uid}'), uid)


def _is_private_dir(path: str, uid: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and stat.S_IMODE(st.st_mode) & 0o077 == 0


def _ensure_private_dir(path: str, uid: int) -> str:
    try:
        os.mkdir(path, PRIVATE_DIR_MODE)
    except FileExistsError:
        pass
    else:
        # mkdir's mode is masked by the umask (0o277 would leave it unwritable): set it exactly,
        # through a descriptor that cannot follow a symbolic link swapped in meanwhile.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, PRIVATE_DIR_MODE)
        finally:
            os.close(fd)
    verify_private_dir(path, uid)
    return path


def verify_private_dir(path: str, uid: Optional[int] = None) -> None:
    """Raises :class:`UnsafeSocketError` unless ``path`` is a real directory (not a symbolic
    link) owned by ``uid`` (default: ours) that nobody else may enter or write."""
    uid = os.geteuid() if uid is None else uid
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeSocketError(f'{path} is a symbolic link, not a private directory: refusing to use it for sockets')
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeSocketError(f'{path} is not a directory: refusing to use it for sockets')
    if st.st_uid != uid:
        raise UnsafeSocketError(
            f'{path} is owned by uid {st.st_uid}, not by this user (uid {uid}): refusing to use it for sockets '
            '(another user may have created it first; remove it, or set XDG_RUNTIME_DIR)'
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise UnsafeSocketError(
            f'{path} has mode {mode:#o}, which lets other users in: refusing to use it for sockets '
            f'(chmod {PRIVATE_DIR_MODE:o} it, or remove it)'
        )


def default_path(name: str) -> str:
    """``name`` in the private directory (created if needed)."""
    return os.path.join(private_dir(), name)


# ---------------------------------------------------------------------------- binding, replacing


def answers(path: str) -> bool:
    """Whether a server listens on the socket at ``path``. Connects without sending or reading
    anything, so it cannot be fooled by what a peer would say."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except BlockingIOError:
        return True  # its backlog is full: very much alive
    except (ConnectionRefusedError, FileNotFoundError):
        return False  # nobody listens: a socket its process left behind when it died
    finally:
        probe.close()
    return True


def check_free(path: str) -> bool:
    """Raises :class:`UnsafeSocketError` unless ``path`` may be bound: free (returns ``False``)
    or a dead socket of this user (returns ``True``: it has to be removed first). A file that
    is not a socket, a socket of another user and a socket a live server answers on are never
    replaced."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafeSocketError(
            f'{path} exists and is not a socket ({_kind(st.st_mode)}): refusing to replace it; '
            'remove it yourself or choose another path'
        )
    if st.st_uid != os.geteuid():
        raise UnsafeSocketError(f'{path} is a socket of uid {st.st_uid}, not of this user: refusing to replace it')
    if answers(path):
        raise UnsafeSocketError(
            f'a live server answers on {path}: refusing to take its socket over (stop it first, or choose another path)'
        )
    return True


def remove_if_stale(path: str) -> bool:
    """Removes ``path`` if it is a socket of this user that nobody answers on; whether it did."""
    try:
        if check_free(path):
            os.unlink(path)
            return True
    except OSError:
        pass
    return False


def bind_unix(path: str, backlog: int, *, allowed_gid: Optional[int] = None) -> socket.socket:
    """A listening socket at ``path`` with mode 0600 (0660 and group ``allowed_gid`` when given),
    whatever the umask. Replaces only a dead socket of ours (see :func:`check_free`)."""
    if check_free(path):
        os.unlink(path)
    mode = PRIVATE_SOCKET_MODE if allowed_gid is None else GROUP_SOCKET_MODE
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)  # fails (EADDRINUSE) if anything, a symbolic link included, took the path meanwhile
    except BaseException:
        sock.close()
        raise
    try:
        # The mode is set before listen(): until then a connect() is refused, so nobody gets in
        # while the file still has the umask's mode. (fchmod on a socket does not change its file.)
        if allowed_gid is not None:
            os.chown(path, -1, allowed_gid)
        os.chmod(path, mode)
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != mode:
            raise UnsafeSocketError(f'{path} was replaced while it was being bound: refusing to use it')
        sock.listen(backlog)
    except BaseException:
        sock.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    return sock


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, 'a symbolic link'),
        (stat.S_ISDIR, 'a directory'),
        (stat.S_ISREG, 'a regular file'),
        (stat.S_ISFIFO, 'a FIFO'),
    ):
        if test(mode):
            return name
    return 'a device or other special file'


# ---------------------------------------------------------------------------- peer credentials


def peer_credentials(sock: socket.socket) -> Peer:
    """The kernel's record of who is at the other end of ``sock`` (``SO_PEERCRED``)."""
    return Peer(*_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)))


def peer_groups(sock: socket.socket) -> List[int]:
    """The peer's supplementary groups (``SO_PEERGROUPS``), or ``[]`` where the kernel has none."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 1024)
    except OSError:
        return []
    return list(struct.unpack(f'={len(raw) // 4}I', raw[: len(raw) // 4 * 4]))


def check_peer(peer: Peer, allowed_gid: Optional[int] = None, what: str = 'the peer', groups=()) -> Peer:
    """Returns ``peer`` if it may talk to us: it runs as our uid, or ``allowed_gid`` is given and
    is the peer's group (primary, or one of ``groups``). Raises :class:`UnsafeSocketError`
    otherwise."""
    if peer.uid == os.geteuid():
        return peer
    if allowed_gid is not None and (peer.gid == allowed_gid or allowed_gid in groups):
        return peer
    allowed = f'uid {os.geteuid()}' + ('' if allowed_gid is None else f' or group {allowed_gid}')
    raise UnsafeSocketError(
        f'{what} (pid {peer.pid}) runs as uid {peer.uid}, gid {peer.gid}; only {allowed} may connect: refused'
    )


def authenticate(sock: socket.socket, allowed_gid: Optional[int] = None, what: str = 'the peer') -> Peer:
    """:func:`check_peer` on the process at the other end of ``sock``. Call it before reading."""
    peer = peer_credentials(sock)
    groups = peer_groups(sock) if allowed_gid is not None and peer.uid != os.geteuid() else ()
    return check_peer(peer, allowed_gid, what, groups)


# ---------------------------------------------------------------------------- bounded reads


def read_all(
    sock: socket.socket, *, limit: int, timeout: float, what: str = 'the peer', since: Optional[float] = None
) -> bytes:
    """Everything ``sock`` sends until it closes, within one overall ``timeout`` from ``since``
    (``time.monotonic()``, default now; not one timeout per recv: a peer dribbling a byte at a
    time is cut off too) and at most ``limit`` bytes."""
    deadline = (time.monotonic() if since is None else since) + timeout
    chunks: List[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SocketProtocolError(f'{what} did not send a complete answer within {timeout:g} s')
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(1 << 16, limit + 1 - size))
        except TimeoutError:
            raise SocketProtocolError(f'{what} did not send a complete answer within {timeout:g} s') from None
        if not chunk:
            return b''.join(chunks)
        size += len(chunk)
        if size > limit:
            raise SocketProtocolError(f'{what} sent more than {limit:,} bytes: refused')
        chunks.append(chunk)


async def read_exactly(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int, deadline: float, what: str = 'the peer',
    have: bytes = b'',
) -> bytes:  # fmt: skip
    """``n`` bytes (the first of them ``have``, already read) from the non-blocking ``sock``, by
    ``deadline`` (``time.monotonic()``)."""
    buf = bytearray(have)
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SocketProtocolError(f'{what} sent {len(buf)} of {n} bytes before the deadline')
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(buf)), remaining)
        except TimeoutError:
            raise SocketProtocolError(f'{what} sent {len(buf)} of {n} bytes before the deadline') from None
        if not chunk:
            raise SocketProtocolError(f'{what} closed the connection after {len(buf)} of {n} bytes')
        buf += chunk
    return bytes(buf)
