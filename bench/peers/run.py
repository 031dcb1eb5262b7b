"""Serves the same model (and the echo handler, and the two-step 1 MiB image scenario) with each
framework, checks they answer alike, and loads each with wrk on 127.0.0.1, rounds interleaved;
prints a Markdown table of medians and writes ``bench/results/peers.json``. Run ``setup.py``
first (``make bench-peers`` does both).

    python bench/peers/run.py [--only ours,mosec] [--handlers embed,echo,image] [--rounds 2]
                              [--seconds 20] [--connections 32]

CPU per request is the machine's busy CPU time during the load (``/proc/stat``), less wrk's own,
over the requests served: what the framework and the model cost together on this host, whatever
processes the framework starts (Ray's raylet and actors are not the server's children).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from setup import FRAMEWORKS, python_of  # noqa: E402

#: framework -> (server script, URL path for a handler); every server takes --handler and --port.
SERVERS = {
    'ours_http': ('aqueduct_http.py', '/{handler}'),
    'ours': ('aqueduct_aiohttp.py', '/{handler}'),
    'aqueduct115': ('aqueduct_aiohttp.py', '/{handler}'),
    'fastapi_ppe': ('fastapi_ppe.py', '/{handler}'),
    'mosec': ('mosec_server.py', '/inference'),
    'litserve': ('litserve_server.py', '/predict'),
    'ray': ('ray_serve.py', '/'),
}
LABELS = {
    'ours_http': 'aqueduct-rs, its HTTP front',
    'ours': 'aqueduct-rs + aiohttp',
    'aqueduct115': 'aqueduct 1.15 + aiohttp',
    'fastapi_ppe': 'FastAPI + ProcessPoolExecutor(2)',
    'mosec': 'mosec 0.9',
    'litserve': 'LitServe 0.2',
    'ray': 'Ray Serve 2.60 (`@serve.batch`)',
}
#: The text every loaded request carries (about 60 tokens), and the texts the answers are checked on.
LOAD_TEXT = (
    'Aqueduct runs CPU-bound Python work in parallel processes as pipelines: queues between '
    'steps, several processes per step, dynamic batching and shared memory for big arrays.'
)
#: Servers that take the image scenario's upload base64-encoded in JSON (`{"image": ...}`), the
#: way their request type allows; every other server takes the raw bytes.
IMAGE_AS_JSON = ('litserve',)
#: The images the answers are checked on (seeds of `model.image_bytes`); the load sends seed 0.
CHECK_IMAGES = [0, 1, 2, 3]
#: Servers that run in another one's venv.
VENV_OF = {'ours_http': 'ours'}
CHECK_TEXTS = ['hello', LOAD_TEXT, 'ünïcødé ✓ ' * 40, 'a ' * 400]


def venv_python(server: str) -> Path:
    return python_of(VENV_OF.get(server, server))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def post(url: str, text: str, timeout: float = 30) -> dict:
    return post_bytes(url, json.dumps({'text': text}).encode(), 'application/json', timeout)


def post_bytes(url: str, body: bytes, content_type: str, timeout: float = 30) -> dict:
    req = urllib.request.Request(url, body, {'Content-Type': content_type})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def image(seed: int) -> bytes:
    """An upload of the image scenario (written by `reference_answers` in a framework's venv:
    this interpreter need not have numpy)."""
    return (HERE / '.cache' / f'image-{seed}.bin').read_bytes()


def upload(framework: str, seed: int) -> tuple:
    """The image scenario's request body for ``framework`` and its content type."""
    if framework in IMAGE_AS_JSON:
        return json.dumps({'image': base64.b64encode(image(seed)).decode()}).encode(), 'application/json'
    return image(seed), 'application/octet-stream'


def session_members(sid: int) -> list:
    """The live processes of session ``sid`` (field 6 of ``/proc/<pid>/stat``)."""
    found = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                stat = Path(f'/proc/{entry}/stat').read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(')') + 2 :].split()[3]) == sid:
                found.append(int(entry))
    return found


def stop_session(proc: subprocess.Popen) -> None:
    """Stops a server started in a session of its own, and everything left in that session."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
    # What moved to a process group of its own stays in the session: nothing of one server
    # may run on into the next one's measurement.
    for pid in session_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def busy_cpu_seconds() -> float:
    """CPU time the machine spent on anything but idling, since boot (all CPUs)."""
    fields = [int(x) for x in Path('/proc/stat').read_text().split('\n', 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf('SC_CLK_TCK')


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Server:
    def __init__(self, framework: str, handler: str):
        script, path = SERVERS[framework]
        self.framework = framework
        self.handler = handler
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}' + path.format(handler=handler)
        server = HERE / 'servers' / script
        cmd = [str(venv_python(framework)), str(server), '--handler', handler, '--port', str(self.port)]
        # A file, not a pipe: a server that logs every message (1.15 does, at DEBUG) would fill an
        # unread pipe and stall.
        self.log = HERE / '.cache' / f'{framework}-{handler}.log'
        with open(self.log, 'wb') as log:
            self.proc = subprocess.Popen(cmd, cwd=HERE, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors='replace')[-2000:]
                raise RuntimeError(f'{self.url}: the server exited ({self.proc.returncode}): {tail}')
            try:
                if self.handler == 'image':
                    post_bytes(self.url, *upload(self.framework, 0), timeout=5)
                else:
                    post(self.url, 'ready?', timeout=5)
                return
            except OSError:
                time.sleep(0.2)  # polling a server that is starting: no event to wait on
        raise RuntimeError(f'{self.url}: not answering after {timeout} s')

    def stop(self) -> None:
        stop_session(self.proc)


def answer_of(handler: str, reply: dict):
    return reply['embedding'] if handler == 'embed' else reply['length']


def check_close(expected: list, got: list) -> None:
    """Raises unless ``got`` is ``expected``'s vector up to float rounding (cosine ≥ 0.9999)."""
    if len(got) != len(expected):
        raise AssertionError(f'a vector of {len(got)} floats where {len(expected)} were expected')
    dot = sum(a * b for a, b in zip(expected, got, strict=True))
    norms = math.sqrt(sum(a * a for a in expected)) * math.sqrt(sum(b * b for b in got))
    if not dot >= 0.9999 * norms:
        raise AssertionError(f'cosine {dot / norms if norms else 0:.6f} to the reference vector')


def check(handler: str, server: Server, reference: dict) -> None:
    if handler == 'image':
        for seed in CHECK_IMAGES:
            got = post_bytes(server.url, *upload(server.framework, seed))['top5']
            if got != reference['images'][seed]:
                raise AssertionError(f'image {seed}: top 5 {got}, expected {reference["images"][seed]}')
        return
    for text in CHECK_TEXTS:
        got = answer_of(handler, post(server.url, text))
        if handler == 'embed':
            check_close(reference[text], got)
        elif got != len(text):
            raise AssertionError(f'echo of a {len(text)}-character text answered {got}')


def wrk(url: str, seconds: int, connections: int, handler: str, framework: str) -> dict:
    script = HERE / '.cache' / 'post.lua'
    if handler == 'image':
        body, content_type = upload(framework, 0)
        path = HERE / '.cache' / 'upload.bin'
        path.write_bytes(body)
        script.write_text(
            'wrk.method = "POST"\n'
            f'wrk.headers["Content-Type"] = "{content_type}"\n'
            f'local f = io.open({json.dumps(str(path))}, "rb")\n'
            'wrk.body = f:read("*all")\n'
            'f:close()\n'
        )
    else:
        script.write_text(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.body = {json.dumps(json.dumps({"text": LOAD_TEXT}))}\n'
        )
    out = subprocess.run(
        ['wrk', '-t1', f'-c{connections}', f'-d{seconds}s', '--latency', '-s', str(script), url],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    ).stdout  # fmt: skip
    unit = {'us': 1e-3, 'ms': 1.0, 's': 1e3}

    def latency(pct: str) -> float:
        m = re.search(rf'^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$', out, re.MULTILINE)
        if not m:
            raise RuntimeError(f'no {pct}% latency in wrk output:\n{out}')
        return float(m.group(1)) * unit[m.group(2)]

    requests = int(re.search(r'(\d+) requests in', out).group(1))
    errors = re.search(r'Non-2xx or 3xx responses: (\d+)', out)
    socket_errors = re.search(r'Socket errors: (.*)', out)
    return {
        'rps': float(re.search(r'Requests/sec:\s+([\d.]+)', out).group(1)),
        'p50_ms': latency('50'),
        'p99_ms': latency('99'),
        'requests': requests,
        'bad': int(errors.group(1)) if errors else 0,
        'socket_errors': socket_errors.group(1) if socket_errors else '',
    }


def measure(framework: str, handler: str, args, reference: dict) -> dict:
    server = Server(framework, handler)
    try:
        server.wait_ready()
        check(handler, server, reference)
        wrk(server.url, 3, args.connections, handler, framework)  # warm-up: batch sizes, caches, lazy imports
        busy, load = busy_cpu_seconds(), children_cpu_seconds()
        result = wrk(server.url, args.seconds, args.connections, handler, framework)
        served = (busy_cpu_seconds() - busy) - (children_cpu_seconds() - load)  # less wrk's own
        result['cpu_ms_per_request'] = served * 1e3 / max(result['requests'], 1)
        return result
    finally:
        server.stop()


def reference_answers(framework: str) -> dict:
    """Each check text's vector, one text per call (no padding), and each check image's top 5,
    in ``framework``'s venv; writes the images for the loads."""
    code = (
        'import json, sys; from model import Classifier, Embedder, image_bytes, preprocess; m = Embedder(); '
        't = json.load(sys.stdin); c = Classifier(); '
        'out = {x: m.embed([x])[0] for x in t}; '
        f'seeds = {CHECK_IMAGES!r}; '
        "[open(f'.cache/image-{s}.bin', 'wb').write(image_bytes(s)) for s in seeds]; "
        'out["images"] = [c.top5([preprocess(image_bytes(s))])[0] for s in seeds]; '
        'print(json.dumps(out))'
    )
    out = subprocess.run(
        [str(venv_python(framework)), '-c', code], cwd=HERE, input=json.dumps(CHECK_TEXTS),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--only', help='comma-separated: ' + ', '.join(SERVERS))
    parser.add_argument('--handlers', default='embed,echo,image')
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--seconds', type=int, default=20)
    parser.add_argument('--connections', type=int, default=32)
    args = parser.parse_args()
    names = args.only.split(',') if args.only else list(SERVERS)
    missing = [n for n in names if VENV_OF.get(n, n) not in FRAMEWORKS or not venv_python(n).exists()]
    if missing:
        parser.error(f'no venv for {missing}: run bench/peers/setup.py first')
    reference = reference_answers(names[0])
    results: dict = {}
    for round_ in range(args.rounds):
        order = names if round_ % 2 == 0 else names[::-1]  # interleaved, alternating who goes first
        for handler in args.handlers.split(','):
            for name in order:
                r = measure(name, handler, args, reference)
                results.setdefault(handler, {}).setdefault(name, []).append(r)
                line = f'round {round_ + 1} {handler:<5} {name:<12} {r["rps"]:>9.1f} req/s p50 {r["p50_ms"]:.1f} ms'
                line += f' p99 {r["p99_ms"]:.1f} ms {r["cpu_ms_per_request"]:.2f} CPU ms/req, {r["bad"]} errors'
                print(line, flush=True)
    host = {'cpu': _cpu_model(), 'cpus': os.cpu_count(), 'kernel': platform.release()}
    out = ROOT / 'bench' / 'results' / 'peers.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({'host': host, 'args': vars(args), 'results': results}, indent=1))
    print(table(results, host, args))
    return 0


def _cpu_model() -> str:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
        if line.startswith('model name'):
            return line.split(':', 1)[1].strip()
    return platform.processor()


def table(results: dict, host: dict, args) -> str:
    lines = [
        f'{host["cpus"]} CPUs ({host["cpu"]}), Linux {host["kernel"]}; wrk -t1 -c{args.connections} '
        f'-d{args.seconds}s on 127.0.0.1, {args.rounds} rounds interleaved, medians (rounds in brackets).',
        '',
        '| framework | ' + ' | '.join(f'{h} req/s | {h} p50 / p99 | {h} CPU ms/req' for h in results) + ' |',
        '|---|' + '---|---|---|' * len(results),
    ]
    names = list(next(iter(results.values())))
    for name in names:
        cells = []
        for handler in results:
            runs = results[handler].get(name)
            if not runs:
                cells += ['—', '—', '—']
                continue
            rps = statistics.median(r['rps'] for r in runs)
            rounds = ' / '.join(f'{r["rps"]:,.0f}' for r in runs)
            p50 = statistics.median(r['p50_ms'] for r in runs)
            p99 = statistics.median(r['p99_ms'] for r in runs)
            cpu = statistics.median(r['cpu_ms_per_request'] for r in runs)
            bad = sum(r['bad'] for r in runs)
            errors = f', {bad} errors' if bad else ''
            cells += [f'{rps:,.0f} ({rounds}){errors}', f'{p50:.1f} / {p99:.1f} ms', f'{cpu:.2f}']
        lines.append(f'| {LABELS[name]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


if __name__ == '__main__':
    sys.exit(main())
