"""Local users must not run code in a flow or its clients through aqueduct's Unix sockets.

The flow server's socket, the SocketFlow client, the stats socket and ``python -m aqueduct top``:
private directory and socket modes, never replacing what is not a dead socket of ours, peer
credentials checked on both ends before a byte is read, a bounded binary handshake with nothing
unpickled from anyone unauthenticated, and a top that a hostile stats server cannot hang, bloat
or use to drive the terminal. Tests that act as another user fork a child that drops to
``nobody`` (uid 65534), which needs root.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import pickle
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator

import pytest
from aqueduct import Flow, FlowStep, _unixsock, top
from aqueduct.exceptions import FlowError
from aqueduct.sockets import FlowSocketServer, SocketFlow
from aqueduct.sockets import flow as sockets_flow
from aqueduct.sockets.flow_server import ACCEPTED, HANDSHAKE, MAGIC, PROTOCOL_VERSION, REFUSED, encode_handshake

from .conftest import children, python_script
from .handlers import Add, Task

NOBODY = 65534
as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason='acting as another user needs root: a forked child drops to nobody (uid 65534)'
)
REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def private_runtime(tmp_path, monkeypatch) -> pathlib.Path:
    """A private XDG_RUNTIME_DIR and temporary directory of the test's own: nothing here reads or
    writes the machine's /tmp. Returns the directory default sockets go to."""
    runtime = tmp_path / 'run'
    runtime.mkdir(mode=0o700)
    scratch = tmp_path / 'tmp'
    scratch.mkdir()
    monkeypatch.setenv('XDG_RUNTIME_DIR', str(runtime))
    monkeypatch.setenv('TMPDIR', str(scratch))
    monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
    return runtime / 'aqueduct'


class Bomb:
    """Unpickling it creates ``marker``: the proof that a peer's pickle ran code."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def mode_of(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def listening_socket(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
        s.listen(8)
    except BaseException:
        s.close()
        raise
    return s


def dead_socket(path) -> None:
    """A socket file nobody listens on any more: what a killed process leaves behind."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


@contextlib.contextmanager
def fake_server(path, answer: Callable[[socket.socket, threading.Event], None], connections: int = 1):
    """A listener of this user at ``path``; ``answer(conn, stop)`` talks to each connection in a
    thread. ``stop`` is set when the test is done with it."""
    listener = listening_socket(path)
    listener.settimeout(0.1)
    stop = threading.Event()

    def run() -> None:
        served = 0
        while served < connections and not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            served += 1
            with conn:
                conn.settimeout(10)
                try:
                    answer(conn, stop)
                except OSError:
                    pass  # the client hung up on us: what most tests expect

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(10)
        listener.close()
        assert not thread.is_alive()


class Child:
    """A forked child; :meth:`receive` waits (bounded) for the JSON it reports; killed and reaped
    at the end whatever happened."""

    def __init__(self, body: Callable[[Callable[[dict], None]], None]):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(read_end)
                body(lambda message: os.write(write_end, (json.dumps(message) + '\n').encode()))
                code = 0
            except BaseException as exc:
                os.write(write_end, (json.dumps({'error': repr(exc)}) + '\n').encode())
            finally:
                os._exit(code)
        os.close(write_end)
        self.pid = pid
        self._read_end = read_end
        self._buffer = b''

    def receive(self, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while b'\n' not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._read_end], [], [], remaining)[0]:
                raise AssertionError('the child reported nothing in time')
            chunk = os.read(self._read_end, 65536)
            if not chunk:
                raise AssertionError('the child exited without reporting')
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b'\n', 1)
        return json.loads(line)

    def close(self) -> int:
        """Waits up to 10 s for the child to exit (its pidfd becomes readable), then kills it."""
        os.close(self._read_end)
        pidfd = os.pidfd_open(self.pid)
        try:
            if not select.select([pidfd], [], [], 10)[0]:
                os.kill(self.pid, signal.SIGKILL)
        finally:
            os.close(pidfd)
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


@contextlib.contextmanager
def child(body) -> Iterator[Child]:
    proc = Child(body)
    try:
        yield proc
    finally:
        proc.close()


def become_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def read_to_eof(sock: socket.socket, timeout: float = 10.0) -> tuple:
    """(bytes, number of descriptors) a peer sent until it closed."""
    sock.settimeout(timeout)
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 8)
    for fd in fds:
        os.close(fd)
    while True:
        more = sock.recv(1 << 16)
        if not more:
            return data, len(fds)
        data += more


# ---------------------------------------------------------------------------- private directory


def test_the_private_directory_is_made_0700_and_an_unsafe_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv('XDG_RUNTIME_DIR')
    expected = tmp_path / 'tmp' / f'aqueduct-{os.geteuid()}'
    assert _unixsock.private_dir() == str(expected)
    assert stat.S_ISDIR(os.lstat(expected).st_mode) and mode_of(expected) == 0o700
    assert _unixsock.private_dir() == str(expected), 'an existing private directory is reused'

    os.chmod(expected, 0o755)
    with pytest.raises(_unixsock.UnsafeSocketError, match='mode 0o755, which lets other users in'):
        _unixsock.private_dir()
    os.rmdir(expected)
    (tmp_path / 'elsewhere').mkdir(mode=0o700)
    expected.symlink_to(tmp_path / 'elsewhere')
    with pytest.raises(_unixsock.UnsafeSocketError, match='symbolic link'):
        _unixsock.private_dir()
    expected.unlink()
    expected.write_text('')
    with pytest.raises(_unixsock.UnsafeSocketError, match='not a directory'):
        _unixsock.private_dir()
    expected.unlink()
    if os.geteuid() == 0:  # another user created it first
        expected.mkdir(mode=0o700)
        os.chown(expected, NOBODY, NOBODY)
        with pytest.raises(_unixsock.UnsafeSocketError, match=f'owned by uid {NOBODY}, not by this user'):
            _unixsock.private_dir()


def test_xdg_runtime_dir_is_used_only_when_it_is_private(tmp_path, monkeypatch, private_runtime):
    assert _unixsock.private_dir() == str(private_runtime)
    assert mode_of(private_runtime) == 0o700
    fallback = str(tmp_path / 'tmp' / f'aqueduct-{os.geteuid()}')
    os.chmod(private_runtime.parent, 0o755)  # a runtime directory others may enter is not used
    assert _unixsock.private_dir() == fallback
    monkeypatch.setenv('XDG_RUNTIME_DIR', str(tmp_path / 'missing'))
    assert _unixsock.private_dir() == fallback
    monkeypatch.setenv('XDG_RUNTIME_DIR', 'relative/dir')
    assert _unixsock.private_dir() == fallback


# ---------------------------------------------------------------------------- modes, replacing


def test_sockets_are_created_0600_under_umask_000(tmp_path):
    """In a child process: the umask is process-wide, and pytest's must not change."""
    explicit, stats, plain = (str(tmp_path / name) for name in ('flow.sock', 'stats.sock', 'plain.sock'))
    code = f"""
        import asyncio, json, os, socket, stat
        os.umask(0)
        from aqueduct import Flow, FlowStep, _unixsock
        from aqueduct.sockets import FlowSocketServer
        from tests.handlers import Add

        def mode(path):
            return oct(stat.S_IMODE(os.lstat(path).st_mode))

        plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        plain.bind({plain!r})  # what a bind alone gives under this umask
        explicit = FlowSocketServer(Flow(FlowStep(Add())), socket_path={explicit!r})
        explicit.bind()
        default = FlowSocketServer(Flow(FlowStep(Add())))
        default.bind()

        async def main():
            flows = [Flow(FlowStep(Add()), stats_socket={stats!r}), Flow(FlowStep(Add()))]
            for flow in flows:
                flow.start(timeout=30)
            try:
                print(json.dumps({{
                    'plain': mode({plain!r}), 'private_dir': mode(_unixsock.private_dir()),
                    'server': mode({explicit!r}), 'default_server': mode(default.socket_path),
                    'default_in_private_dir': os.path.dirname(default.socket_path) == _unixsock.private_dir(),
                    'stats': mode({stats!r}), 'default_stats': mode(flows[1].stats_socket_path),
                }}))
            finally:
                for flow in flows:
                    await flow.stop()

        asyncio.run(main())
    """
    with python_script(code) as proc:
        out, _ = proc.communicate(timeout=50)
    assert proc.returncode == 0
    modes = json.loads(out)
    assert modes.pop('plain') == '0o777', 'the umask really was 000 in the child'
    assert modes.pop('private_dir') == '0o700'
    assert modes.pop('default_in_private_dir') is True
    assert modes == {'server': '0o600', 'default_server': '0o600', 'stats': '0o600', 'default_stats': '0o600'}


def not_sockets(tmp_path) -> list:
    """Paths a socket must never replace: a file, a directory, a symbolic link (to a file)."""
    regular = tmp_path / 'file.sock'
    regular.write_text('precious')
    directory = tmp_path / 'dir.sock'
    directory.mkdir()
    target = tmp_path / 'target'
    target.write_text('precious too')
    link = tmp_path / 'link.sock'
    link.symlink_to(target)
    return [regular, directory, link]


def unchanged(paths) -> bool:
    return (
        paths[0].read_text() == 'precious' and paths[1].is_dir() and paths[2].is_symlink()
        and paths[2].read_text() == 'precious too'
    )  # fmt: skip


def test_the_flow_server_never_replaces_a_file_that_is_not_a_socket(tmp_path):
    paths = not_sockets(tmp_path)
    for path in paths:
        with pytest.raises(_unixsock.UnsafeSocketError, match='exists and is not a socket'):
            FlowSocketServer(Flow(FlowStep(Add())), socket_path=str(path)).bind()
    done = subprocess.run(
        [sys.executable, '-m', 'aqueduct', 'serve', 'tests.handlers:build_shared_flow', '--socket', str(paths[0])],
        cwd=REPO, capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert 'is not a socket (a regular file): refusing to replace it' in done.stderr
    assert unchanged(paths)


def test_a_live_socket_is_not_stolen_and_a_dead_one_is_replaced(tmp_path):
    live_path = tmp_path / 'live.sock'
    with listening_socket(live_path):
        inode = os.lstat(live_path).st_ino
        with pytest.raises(_unixsock.UnsafeSocketError, match='a live server answers on .*: refusing to take'):
            FlowSocketServer(Flow(FlowStep(Add())), socket_path=str(live_path)).bind()
        done = subprocess.run(
            [sys.executable, '-m', 'aqueduct', 'serve', 'tests.handlers:build_shared_flow', '--socket', str(live_path)],
            cwd=REPO, capture_output=True, text=True, timeout=50,
        )  # fmt: skip
        assert done.returncode == 1 and 'a live server answers on' in done.stderr, done.stderr
        assert os.lstat(live_path).st_ino == inode, 'the live server keeps its socket'
        assert children() == [], 'serve started no flow for a path it cannot have'
    dead_path = tmp_path / 'dead.sock'
    dead_socket(dead_path)
    server = FlowSocketServer(Flow(FlowStep(Add())), socket_path=str(dead_path))
    server.bind()
    try:
        assert mode_of(dead_path) == 0o600
    finally:
        server._listener.close()


def test_an_allowed_group_gets_a_0660_socket_of_that_group_and_needs_an_explicit_path(tmp_path):
    gid = os.getegid()
    path = tmp_path / 'group.sock'
    server = FlowSocketServer(Flow(FlowStep(Add())), socket_path=str(path), allowed_gid=gid)
    server.bind()
    try:
        st = os.lstat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
    finally:
        server._listener.close()
    with pytest.raises(ValueError, match='allowed_gid needs an explicit socket_path'):
        FlowSocketServer(Flow(FlowStep(Add())), allowed_gid=gid)
    done = subprocess.run(
        [sys.executable, '-m', 'aqueduct', 'serve', 'tests.handlers:build_shared_flow', '--allowed-gid', str(gid)],
        cwd=REPO, capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    assert done.returncode == 2 and '--allowed-gid needs --socket' in done.stderr, done.stderr


@pytest.fixture
def live_default_socket(private_runtime):
    """A live listener at SocketFlow's default path (what preload must not take over)."""
    private_runtime.mkdir(mode=0o700)
    with listening_socket(private_runtime / 'flow.sock') as s:
        yield s


def test_preload_refuses_a_live_socket_before_forking(live_default_socket):
    with pytest.raises(_unixsock.UnsafeSocketError, match='a live server answers'):
        SocketFlow().preload(Flow(FlowStep(Add())))
    assert children() == []


async def test_the_stats_socket_replaces_neither_a_file_nor_a_live_socket(tmp_path, caplog):
    paths = not_sockets(tmp_path)
    live_path = tmp_path / 'live.sock'
    with listening_socket(live_path):
        inode = os.lstat(live_path).st_ino
        for path, reason in [(p, 'is not a socket') for p in paths] + [(live_path, 'a live server answers')]:
            flow = Flow(FlowStep(Add()), stats_socket=str(path))
            caplog.clear()
            flow.start(timeout=30)
            try:
                assert f'cannot serve flow stats at {path}' in caplog.text and reason in caplog.text
                t = Task(1)
                await flow.process(t)
                assert t.result == 2, 'the flow runs without its stats'
            finally:
                await flow.stop()
        assert os.lstat(live_path).st_ino == inode
    assert unchanged(paths)


# ---------------------------------------------------------------------------- peer credentials


def test_check_peer_allows_our_uid_or_the_allowed_group_only():
    me = os.geteuid()
    stranger = _unixsock.Peer(pid=4242, uid=NOBODY, gid=NOBODY)
    with pytest.raises(_unixsock.UnsafeSocketError, match=f'pid 4242.* uid {NOBODY}.*only uid {me} may connect'):
        _unixsock.check_peer(stranger)
    with pytest.raises(_unixsock.UnsafeSocketError, match=f'only uid {me} or group 5 may connect'):
        _unixsock.check_peer(stranger, allowed_gid=5)
    assert _unixsock.check_peer(stranger, allowed_gid=NOBODY) == stranger
    assert _unixsock.check_peer(stranger, allowed_gid=5, groups=(3, 5)) == stranger, 'a supplementary group'
    assert _unixsock.check_peer(_unixsock.Peer(1, me, 12345)) is not None
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert _unixsock.authenticate(a) == (os.getpid(), me, os.getegid())


def foreign(real):
    """``peer_credentials`` as if the peer ran as nobody."""
    return lambda sock: real(sock)._replace(uid=NOBODY, gid=NOBODY)


async def test_a_client_refuses_a_listener_with_foreign_credentials(tmp_path, monkeypatch):
    path = tmp_path / 'flow.sock'
    marker = tmp_path / 'pwned'
    monkeypatch.setenv('_SOCKET_PATH', str(path))
    monkeypatch.setattr(_unixsock, 'peer_credentials', foreign(_unixsock.peer_credentials))
    bomb = encode_handshake(REFUSED, info={'error': 'x'}) + pickle.dumps(Bomb(marker))

    with fake_server(path, lambda conn, stop: conn.sendall(bomb)):
        with pytest.raises(_unixsock.UnsafeSocketError, match=f'the listener at .*flow.sock .* runs as uid {NOBODY}'):
            await SocketFlow().start()
    assert not marker.exists()


@as_root
async def test_a_client_refuses_a_listener_of_another_user(tmp_path, monkeypatch):
    path = tmp_path / 'flow.sock'
    marker = tmp_path / 'pwned'
    monkeypatch.setenv('_SOCKET_PATH', str(path))
    old_style = pickle.dumps({'version': 1, 'conditions': pickle.dumps(Bomb(marker)), 'bomb': Bomb(marker)})

    def squatter(report) -> None:  # another user took the path first
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(path))
            os.chmod(path, 0o777)
            become_nobody()
            listener.listen(1)  # the kernel records the listener's credentials here
            report({'ready': True})
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                try:
                    conn.sendall(struct.pack('>I', len(old_style)) + old_style)
                    closed = conn.recv(1) == b''
                except (BrokenPipeError, ConnectionResetError):
                    closed = True  # the client hung up before it all went out
                report({'closed_by_client': closed})

    with child(squatter) as proc:
        assert proc.receive() == {'ready': True}
        with pytest.raises(FlowError, match=f'runs as uid {NOBODY}, gid {NOBODY}; only uid 0 may connect: refused'):
            await SocketFlow().start()
        assert proc.receive() == {'closed_by_client': True}
    assert not marker.exists(), 'nothing the other user sent was unpickled'


async def test_the_server_refuses_a_client_with_foreign_credentials(tmp_path, monkeypatch):
    """The server (forked by preload) sees every client as nobody; the client, in this process,
    sees the server as it is."""
    monkeypatch.setenv('_SOCKET_PATH', str(tmp_path / 'flow.sock'))
    test_pid = os.getpid()
    real = _unixsock.peer_credentials
    lie = foreign(real)
    monkeypatch.setattr(_unixsock, 'peer_credentials', lambda s: real(s) if os.getpid() == test_pid else lie(s))
    client = SocketFlow()
    server = client.preload(Flow(FlowStep(Add())), timeout=30)
    try:
        with pytest.raises(FlowError, match=f'refused the connection: .*a client .* runs as uid {NOBODY}'):
            await client.start()
        assert not client.is_running
    finally:
        server.stop(timeout=10)
    assert children() == []


@as_root
async def test_the_server_refuses_a_client_of_another_user(tmp_path, monkeypatch):
    """Even with a socket anyone may open (as a umask of 000 used to make it), a client of
    another user gets neither the descriptors nor the conditions."""
    open_dir = tmp_path / 'open'
    open_dir.mkdir()
    os.chmod(open_dir, 0o755)
    path = open_dir / 'flow.sock'
    monkeypatch.setenv('_SOCKET_PATH', str(path))
    client = SocketFlow()
    server = client.preload(Flow(FlowStep(Add())), timeout=30)
    try:
        os.chmod(path, 0o666)

        def intruder(report) -> None:
            os.chdir(open_dir)  # as root: nobody could not walk tmp_path's private parents
            become_nobody()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect('flow.sock')
                data, nfds = read_to_eof(s)
            report({'nfds': nfds, 'magic': data[:4].hex(), 'body': data[HANDSHAKE.size :].decode(errors='replace')})

        with child(intruder) as proc:
            answer = proc.receive()
        assert answer['nfds'] == 0, 'no descriptor reached the other user'
        assert answer['magic'] == MAGIC.hex() and f'runs as uid {NOBODY}' in json.loads(answer['body'])['error']
        await client.start()  # its own user still gets in
        try:
            t = Task(1)
            await client.process(t)
            assert t.result == 2
        finally:
            await client.stop()
    finally:
        server.stop(timeout=10)
    assert children() == []


@as_root
async def test_a_client_of_the_allowed_group_is_served(tmp_path, monkeypatch):
    open_dir = tmp_path / 'open'
    open_dir.mkdir()
    os.chmod(open_dir, 0o755)
    path = open_dir / 'flow.sock'
    monkeypatch.setenv('_SOCKET_PATH', str(path))
    client = SocketFlow(allowed_gid=NOBODY)
    server = client.preload(Flow(FlowStep(Add())), timeout=30)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660 and os.lstat(path).st_gid == NOBODY

        def member(report) -> None:  # another user, in the allowed group
            os.chdir(open_dir)
            become_nobody()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect('flow.sock')
                s.settimeout(10)
                data, fds, _, _ = socket.recv_fds(s, HANDSHAKE.size, 8)
                for fd in fds:
                    os.close(fd)
                report({'nfds': len(fds), 'status': HANDSHAKE.unpack(data)[2]})

        with child(member) as proc:
            assert proc.receive() == {'nfds': 4, 'status': ACCEPTED}
    finally:
        server.stop(timeout=10)
    assert children() == []


async def test_the_stats_socket_answers_only_this_user(tmp_path, monkeypatch):
    path = tmp_path / 'stats.sock'
    flow = Flow(FlowStep(Add()), stats_socket=str(path))
    flow.start(timeout=30)
    loop = asyncio.get_running_loop()

    def raw_read() -> bytes:  # a reader that checks nothing itself
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            return _unixsock.read_all(s, limit=1 << 20, timeout=10)

    try:
        assert mode_of(path) == 0o600
        with monkeypatch.context() as m:
            m.setattr(_unixsock, 'peer_credentials', foreign(_unixsock.peer_credentials))
            assert await loop.run_in_executor(None, raw_read) == b'', 'a foreign peer gets nothing'
        assert json.loads(await loop.run_in_executor(None, raw_read))['steps'], 'this user gets the stats'
    finally:
        await flow.stop()


@as_root
async def test_the_stats_socket_refuses_another_user(tmp_path):
    open_dir = tmp_path / 'open'
    open_dir.mkdir()
    os.chmod(open_dir, 0o755)
    path = open_dir / 'stats.sock'
    flow = Flow(FlowStep(Add()), stats_socket=str(path))
    flow.start(timeout=30)
    try:
        os.chmod(path, 0o666)

        def intruder(report) -> None:
            os.chdir(open_dir)
            become_nobody()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect('stats.sock')
                report({'connected': True, 'answer': read_to_eof(s)[0].decode()})

        with child(intruder) as proc:
            # The stats are served by this loop: wait for the child elsewhere.
            answer = await asyncio.get_running_loop().run_in_executor(None, proc.receive)
        assert answer == {'connected': True, 'answer': ''}
    finally:
        await flow.stop()


# ---------------------------------------------------------------------------- the handshake


def header(version=PROTOCOL_VERSION, status=ACCEPTED, nfds=4, json_len=0, pickle_len=0, magic=MAGIC) -> bytes:
    return HANDSHAKE.pack(magic, version, status, nfds, 1, 0, 1, json_len, pickle_len)


def bomb_for(marker: pathlib.Path) -> bytes:
    return pickle.dumps(Bomb(marker))


def sends(payload: bytes):
    def answer(conn, stop) -> None:
        conn.sendall(payload)
        stop.wait(10)  # keep the connection open: the client must not wait for the end of it

    return answer


def with_descriptors(payload: bytes):
    """Sends ``payload``'s header with four descriptors (a pipe's ends), as a flow server does."""

    def answer(conn, stop) -> None:
        r, w = os.pipe()
        try:
            socket.send_fds(conn, [payload[: HANDSHAKE.size]], [r, w, r, w])
            conn.sendall(payload[HANDSHAKE.size :])
        finally:
            os.close(r)
            os.close(w)
        stop.wait(10)

    return answer


HOSTILE = {
    # aqueduct's version-1 handshake: a length and a pickle
    'length-prefixed pickle': (
        lambda b: sends(struct.pack('>I', len(b)) + b), 'is not an aqueduct flow server: its answer starts with'
    ),
    'a bare pickle': (lambda b: sends(b), 'is not an aqueduct flow server'),
    'an older version': (
        lambda b: sends(header(version=1, nfds=0, pickle_len=len(b)) + b), 'speaks handshake version 1; this'
    ),
    # version 2 pickled every task body: its workers cannot read this client's compact bodies
    'the version before the compact bodies': (
        lambda b: sends(header(version=2, nfds=0, pickle_len=len(b)) + b), 'speaks handshake version 2; this'
    ),
    'oversized lengths': (lambda b: sends(header(json_len=1 << 30) + b), 'more than the'),
    'descriptors announced, none passed': (
        lambda b: sends(header(json_len=2, pickle_len=len(b)) + b'{}' + b), 'passed 0 descriptors, not 4'
    ),
    'accepted without step names': (
        lambda b: with_descriptors(header(json_len=15, pickle_len=len(b)) + b'{"error": "no"}' + b),
        'a handshake without step names',
    ),
    'a pickle where the JSON goes': (
        lambda b: sends(header(status=REFUSED, nfds=0, json_len=len(b)) + b), 'a handshake that is not JSON'
    ),
    'cut short': (lambda b: lambda conn, stop: conn.sendall(header()[:10]), 'closed the connection after 10 of 28'),
    'silence': (lambda b: lambda conn, stop: stop.wait(10), 'sent no handshake within 0.5 s'),
    'a byte at a time': (
        lambda b: lambda conn, stop: [conn.send(bytes([c])) for c in header() if not stop.wait(0.2)],
        'before the deadline',
    ),
}


@pytest.mark.parametrize('kind', list(HOSTILE))
async def test_a_hostile_handshake_is_refused_clearly_and_nothing_is_unpickled(kind, tmp_path, monkeypatch):
    path = tmp_path / 'flow.sock'
    marker = tmp_path / 'pwned'
    monkeypatch.setenv('_SOCKET_PATH', str(path))
    monkeypatch.setattr(sockets_flow, 'HANDSHAKE_TIMEOUT', 0.5)
    make_answer, message = HOSTILE[kind]
    with fake_server(path, make_answer(bomb_for(marker))):
        started = time.monotonic()
        with pytest.raises(_unixsock.SocketProtocolError, match=message):
            await SocketFlow().start()
        assert time.monotonic() - started < 5, 'refused within the handshake deadline, not after a hang'
    assert not marker.exists()


# ---------------------------------------------------------------------------- top


def test_top_gives_up_on_a_dribbling_server_within_its_deadline(tmp_path, capsys):
    path = tmp_path / 'stats.sock'

    def dribble(conn, stop) -> None:
        conn.sendall(b'{')
        while not stop.wait(0.3):  # always less than a per-recv timeout would allow
            conn.sendall(b' ')

    with fake_server(path, dribble, connections=2) as stop:
        started = time.monotonic()
        with pytest.raises(_unixsock.SocketProtocolError, match='did not send a complete answer within 1 s'):
            top.read_snapshot(str(path), timeout=1.0)
        assert time.monotonic() - started < 2.5
        started = time.monotonic()
        assert top.main([str(path), '--once']) == 1
        assert time.monotonic() - started < 4.5, 'the default deadline is 2 s'
        stop.set()
    assert 'did not send a complete answer within 2 s' in capsys.readouterr().err


def test_top_refuses_an_oversized_answer(tmp_path):
    path = tmp_path / 'stats.sock'
    flood = b'[' + b' ' * (8 << 20)  # twice the limit, and never a complete answer

    with fake_server(path, lambda conn, stop: conn.sendall(flood)):
        with pytest.raises(_unixsock.SocketProtocolError, match=f'sent more than {top.MAX_SNAPSHOT:,} bytes'):
            top.read_snapshot(str(path))


def test_top_refuses_a_stats_server_of_another_user(tmp_path, monkeypatch):
    path = tmp_path / 'stats.sock'
    monkeypatch.setattr(_unixsock, 'peer_credentials', foreign(_unixsock.peer_credentials))
    with fake_server(path, sends(b'{}')):
        with pytest.raises(_unixsock.UnsafeSocketError, match=f'the stats socket .* runs as uid {NOBODY}'):
            top.read_snapshot(str(path))


HOSTILE_SNAPSHOT = {
    'pid': '1\x1b[2J',
    'state': 'running\x9b31m',
    'ready': True,
    'steps': [
        {
            'name': 'step1\x1b]0;owned\x07\x1b[H\x7f',
            'alive': 1, 'nprocs': 1, 'queue_len': '\x1b[5m', 'in_flight': 0,
            'handle_us': [[0] * 10], 'batch_size': [[0] * 10, 0, 0], 'deaths': 0, 'restarts': 0,
        }
    ],
    'rss': {},
    'outcomes': {'0': {'complete\x1b[8m': 1}},
}  # fmt: skip


def control_characters(text: str) -> list:
    return [c for c in text if (ord(c) < 0x20 and c != '\n') or 0x7F <= ord(c) <= 0x9F]


def test_top_escapes_control_characters_in_everything_it_prints(tmp_path, capsys):
    frame = top.render(HOSTILE_SNAPSHOT, None, 1.0)
    assert control_characters(frame) == []
    assert 'step1\\x1b]0;owned\\x07\\x1b[H\\x7f' in frame and 'running\\x9b31m' in frame
    assert 'complete\\x1b[8m 1' in frame
    path = tmp_path / 'stats.sock'
    with fake_server(path, lambda conn, stop: conn.sendall(json.dumps(HOSTILE_SNAPSHOT).encode()), connections=2):
        assert top.main([str(path), '--once', '--interval', '0.01']) == 0
    out = capsys.readouterr().out
    assert 'step1\\x1b' in out and control_characters(out) == []
    broken = dict(HOSTILE_SNAPSHOT, steps=[{'name': 'x\x1b[2J'}])
    path = tmp_path / 'broken.sock'
    with fake_server(path, lambda conn, stop: conn.sendall(json.dumps(broken).encode())):
        assert top.main([str(path), '--once']) == 1
    assert 'unexpected answer from' in capsys.readouterr().err


def test_top_finds_only_this_users_sockets_and_removes_stale_ones(tmp_path, private_runtime):
    private_runtime.mkdir(mode=0o700)
    me, gone = os.getpid(), dead_pid()
    live_path = private_runtime / f'aqueduct-{me}-1.sock'
    stale = private_runtime / f'aqueduct-{gone}-1.sock'
    not_a_socket = private_runtime / f'aqueduct-{gone}-2.sock'
    answering = private_runtime / f'aqueduct-{gone}-3.sock'  # a dead pid here, alive elsewhere
    legacy_stale = tmp_path / 'tmp' / f'aqueduct-{gone}-1.sock'  # where aqueduct used to put them
    legacy_live = tmp_path / 'tmp' / f'aqueduct-{me}-2.sock'
    dead_socket(stale)
    dead_socket(legacy_stale)
    not_a_socket.write_text('')
    with listening_socket(live_path), listening_socket(answering), listening_socket(legacy_live):
        foreign_path = private_runtime / f'aqueduct-{me}-9.sock'
        if os.geteuid() == 0:
            dead_socket(foreign_path)
            os.chown(foreign_path, NOBODY, NOBODY)
        assert top.find_sockets() == [str(live_path)], 'only this user\'s live sockets in the private directory'
        assert not stale.exists() and not legacy_stale.exists(), 'sockets of dead flows are removed'
        assert not_a_socket.exists() and answering.exists() and legacy_live.exists()
        if os.geteuid() == 0:
            assert foreign_path.exists(), 'another user\'s socket is neither picked nor removed'


async def test_a_new_flow_removes_stale_stats_sockets(private_runtime):
    private_runtime.mkdir(mode=0o700)
    stale = private_runtime / f'aqueduct-{dead_pid()}-1.sock'
    dead_socket(stale)
    flow = Flow(FlowStep(Add()))
    flow.start(timeout=30)
    try:
        assert not stale.exists()
        path = flow.stats_socket_path
        assert os.path.dirname(path) == str(private_runtime) and mode_of(path) == 0o600
        assert top.find_sockets() == [path]
        snap = await asyncio.get_running_loop().run_in_executor(None, top.read_snapshot, path)
        assert snap['pid'] == os.getpid()
    finally:
        await flow.stop()
    assert not os.path.exists(path)
