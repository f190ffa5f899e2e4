"""
Benchmark mtasts-twisted's socketmap server against postfix-mta-sts-resolver
("the peer") on the same machine, in the same run.

    sudo /work/venv/bin/python bench/run.py [--quick] [--only PHASE,...] [--ours daemon|twistd]

As root.  Outside the namespace it installs the peer into bench/.peer-venv
(from PyPI, once), then re-executes itself under ``unshare --net --mount``:
a network namespace with only ``lo`` (no route out) and a private mount
namespace where /etc/resolv.conf is bind-mounted to a file naming
127.0.0.1.  Inside, bench/world.py serves DNS on 127.0.0.1:53 and HTTPS on
127.0.0.1:443 for generated domains with a private CA (SSL_CERT_FILE for the
peer, --ca-file for us); both daemons listen on loopback; bench/loadgen.py
(a separate process) drives the same load against each, alternating runs.
Every load run is bounded in time and request count.

Phases (--only): cached, coalesce, sqlite, backoff, cold, rss, relay, profile.
Results: a table on stdout, and the raw JSON in $WORKDIR/results.json
(the path is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from mtasts_twisted.testing.postfix import MASTER_CF  # the same master.cf as the Postfix tests
from relay import json_request  # bench/relay.py (this script runs from bench/)

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_VENV = os.path.join(HERE, ".peer-venv")
PEER_DAEMON = os.path.join(PEER_VENV, "bin", "mta-sts-daemon")
PY = sys.executable
CONTROL = 9999
NS_ENV = "MTASTS_BENCH_IN_NAMESPACE"
PHASES = ("cached", "coalesce", "sqlite", "backoff", "cold", "rss", "relay", "profile", "profile-cold")
SINK_CONTROL = 9998
RELAY_INTAKE = 2525      # ours: twistd -n mtasts --smtp
POSTFIX_INTAKE = 10025   # Postfix's smtpd (on 127.0.0.2: see PostfixRelay)


# --- outside the namespace ---------------------------------------------------------


def install_peer() -> None:
    if os.path.exists(PEER_DAEMON):
        return
    print("installing postfix-mta-sts-resolver[sqlite,uvloop] into", PEER_VENV, flush=True)
    subprocess.run([sys.executable, "-m", "venv", PEER_VENV], check=True)
    subprocess.run([os.path.join(PEER_VENV, "bin", "pip"), "install", "-q",
                    "postfix-mta-sts-resolver[sqlite,uvloop]"], check=True)


def enter_namespace() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench/run.py needs root (it creates network and mount namespaces)")
    install_peer()
    env = dict(os.environ, **{NS_ENV: "1"})
    argv = ["unshare", "--net", "--mount", "--propagation", "private",
            sys.executable, os.path.abspath(__file__)] + sys.argv[1:]
    os.execvpe("unshare", argv, env)


def setup_namespace(workdir: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout
    names = [line.split(":")[1].strip() for line in links.splitlines()]
    if names != ["lo"] or "default" in routes:
        raise SystemExit(f"namespace not isolated: links {names}, routes {routes!r}")
    resolv = os.path.join(workdir, "resolv.conf")
    with open(resolv, "w") as f:
        f.write("nameserver 127.0.0.1\noptions attempts:2 timeout:2\n")
    subprocess.run(["mount", "--bind", resolv, "/etc/resolv.conf"], check=True)


# --- processes ----------------------------------------------------------------------


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"process {proc.args[:3]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listening on {port} after {timeout} s")


def wait_answer(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until a socketmap request is answered ('twistd -n mtasts' accepts and closes until it is ready)."""
    request = b"22:postfix [127.0.0.1]:25,"  # an address literal: answered NOTFOUND without any lookup
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"process {proc.args[:3]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(request)
                if s.recv(100).endswith(b","):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"no socketmap answer on {port} after {timeout} s")


class Daemon:
    name = "?"

    def __init__(self, port: int, workdir: str, tag: str) -> None:
        self.port = port
        self.workdir = workdir
        self.tag = tag
        self.proc: subprocess.Popen | None = None
        self.log = os.path.join(workdir, f"{tag}.log")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> tuple[list[str], dict]:
        raise NotImplementedError

    def start(self) -> "Daemon":
        argv, env = self.command()
        self.proc = subprocess.Popen(argv, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        wait_port(self.port, self.proc)
        wait_answer(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_process(self.proc, signal.SIGTERM, 15)


def stop_process(proc: subprocess.Popen, sig: int, timeout: float) -> None:
    """Send C{sig}, wait up to C{timeout} seconds, then kill."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Ours(Daemon):
    name = "ours"

    def __init__(self, port, workdir, tag, data_dir, mode="daemon", profile=None, database=None):
        super().__init__(port, workdir, tag)
        self.database = database
        self.data_dir = data_dir
        self.mode = mode
        self.profile = profile

    def command(self):
        ca = os.path.join(self.workdir, "ca.pem")
        if self.mode == "twistd":
            twistd = os.path.join(os.path.dirname(PY), "twistd")
            argv = [twistd, "-n", "--pidfile=", "mtasts", "--data-dir", self.data_dir,
                    "--socketmap", f"tcp:{self.port}:interface=127.0.0.1", "--smtp", "none",
                    "--nameserver", "127.0.0.1:53", "--ca-file", ca, "--no-reports"]
            if self.database:
                argv += ["--database", self.database]
        else:
            argv = [PY, os.path.join(HERE, "daemon.py"), "--port", str(self.port), "--data-dir", self.data_dir,
                    "--nameserver", "127.0.0.1:53", "--ca-file", ca]
            if self.profile:
                argv += ["--profile", self.profile]
        return argv, dict(os.environ)


class Peer(Daemon):
    name = "peer"

    def __init__(self, port, workdir, tag, cache="internal"):
        super().__init__(port, workdir, tag)
        self.cache = cache

    def command(self):
        if self.cache == "sqlite":
            db = os.path.join(self.workdir, f"{self.tag}.sqlite")
            cache = f"  type: sqlite\n  options:\n    filename: {db}\n"
        else:
            cache = "  type: internal\n  options:\n    cache_size: 10000\n"
        zone = "  strict_testing: false\n  timeout: 4\n  require_sni: true\n  tlsrpt: false\n"
        config = (f"host: 127.0.0.1\nport: {self.port}\nreuse_port: true\nshutdown_timeout: 1\n"
                  f"cache_grace: 60\nproactive_policy_fetching:\n  enabled: false\n"
                  f"cache:\n{cache}default_zone:\n{zone}zones:\n  postfix:\n"
                  + zone.replace("  ", "    "))
        path = os.path.join(self.workdir, f"{self.tag}.yml")
        with open(path, "w") as f:
            f.write(config)
        env = dict(os.environ, SSL_CERT_FILE=os.path.join(self.workdir, "ca.pem"))
        env.pop("SSL_CERT_DIR", None)
        return [PEER_DAEMON, "-c", path, "-v", "warn"], env


def loadgen(daemon: Daemon, **kw) -> dict:
    argv = [PY, os.path.join(HERE, "loadgen.py"), "--port", str(daemon.port), "--pid", str(daemon.pid)]
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (None, False):
            argv += [flag, str(value)]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"loadgen failed: {out.stderr}")
    return json.loads(out.stdout)


def rss_kb(pid: int, field: str = "VmRSS:") -> int:
    """The process's resident set (or with field="VmHWM:", its peak) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def control(request: dict) -> dict:
    return json_request(CONTROL, request)


def cpu_ticks(pid: int, children: bool = False) -> int:
    """utime+stime (and with children, cutime+cstime: reaped children) of pid, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def tree_cpu_ticks(root: int) -> int:
    """CPU of a Postfix master: its own, its reaped children's, and its live children's."""
    total = cpu_ticks(root, children=True)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == root:
                total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return total



# Postfix 3.7 as a relay: mail from loopback to any domain, MX lookups through the
# system resolver (/etc/resolv.conf, bind-mounted to the bench DNS), TLS policy from
# the peer over socketmap, default "may" elsewhere.  Every other setting is Postfix's
# default (default_destination_concurrency_limit 20, no TLS connection reuse).
_POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
config_directory = {conf}
queue_directory = {queue}
data_directory = {data}
daemon_directory = /usr/lib/postfix/sbin
command_directory = /usr/sbin
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {log}
maillog_file_prefixes = {base}
syslog_name = postfix-bench
myhostname = relay-host.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.2
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
biff = no
alias_maps =
alias_database =
local_recipient_maps =
relayhost =
smtp_tls_security_level = may
smtp_tls_policy_maps = socketmap:inet:127.0.0.1:{peer_port}:postfix
smtp_tls_CAfile = {ca}
smtp_tls_loglevel = 1
smtpd_tls_security_level = none
"""


class PostfixRelay:
    """
    A Postfix 3.7 instance in DIR relaying to the MX through the peer's socketmap.

    Its smtpd listens on 127.0.0.2 (phase_relay adds that address to the namespace's
    lo): with inet_interfaces = 127.0.0.1, Postfix's smtp(8) would refuse the MX at
    127.0.0.1 as itself ("mail for ... loops back to myself").
    """

    def __init__(self, directory: str, peer_port: int, ca: str, port: int = POSTFIX_INTAKE,
                 tls_reuse: bool = False) -> None:
        self.directory = directory
        self.tls_reuse = tls_reuse
        self.conf = os.path.join(directory, "conf")
        self.queue = os.path.join(directory, "queue")
        self.log = os.path.join(directory, "maillog")
        self.port = port
        self.peer_port = peer_port
        self.ca = ca
        self.started = False

    def run(self, *args, timeout=60.0):
        return subprocess.run(["/usr/sbin/postfix", "-c", self.conf, *args], capture_output=True, text=True,
                              timeout=timeout, env={"PATH": "/usr/sbin:/usr/bin:/bin", "LANG": "C"})

    def start(self) -> "PostfixRelay":
        for path in (self.directory, self.conf, self.queue):  # data_directory: made by postfix, owned by it
            os.makedirs(path, exist_ok=True)
            os.chmod(path, 0o755)
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(_POSTFIX_MAIN_CF.format(conf=self.conf, queue=self.queue, data=os.path.join(self.directory, "data"),
                                            log=self.log, base=self.directory, peer_port=self.peer_port, ca=self.ca))
            if self.tls_reuse:
                # Postfix >= 3.4: TLS sessions go through tlsproxy(8) and are cached for reuse.
                f.write("smtp_tls_connection_reuse = yes\n")
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(listen=f"127.0.0.2:{self.port}"))
            if self.tls_reuse:
                f.write("tlsproxy  unix  -       -       n       -       0       tlsproxy\n")
        done = self.run("start")
        if done.returncode != 0:
            try:
                with open(self.log, errors="replace") as f:
                    tail = f.read()[-2000:]
            except OSError:
                tail = ""
            raise SystemExit(f"postfix start failed: {done.stderr}{done.stdout}{tail}")
        self.started = True
        wait_banner("127.0.0.2", self.port, None, 60)
        return self

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.queue, "pid", "master.pid")) as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        for command in ("stop", "abort"):
            try:
                self.run(command, timeout=20)
            except subprocess.TimeoutExpired:
                pass
            for _ in range(100):
                if self.master_pid() is None:
                    return
                time.sleep(0.1)
        pid = self.master_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)

    def log_count(self, needle: str) -> int:
        try:
            with open(self.log, errors="replace") as f:
                return sum(needle in line for line in f)
        except OSError:
            return 0


def wait_banner(host: str, port: int, proc, timeout: float) -> None:
    """Wait until an SMTP server on host:port sends its 220 greeting."""
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"process {proc.args[:3]} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                if s.recv(100).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"no SMTP greeting on {host}:{port} after {timeout} s")


# --- phases ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args, workdir):
        self.args = args
        self.workdir = workdir
        q = args.quick
        self.T = 3.0 if q else 10.0
        self.rounds = 1 if q else 3
        self.cold_rounds = 1 if q else 3
        self.n_cached = 300 if q else 1000
        self.n_cold = 800 if q else 3000
        self.backoff_window = 20.0 if q else 300.0
        self.rss_policies = 100000
        self.rss_window = 10.0 if q else 60.0
        self.relay_messages = 300 if q else 2000
        self.relay_rounds = 1 if q else 3
        self.relay_timeout = 120.0 if q else 300.0
        self.results: dict = {"runs": []}
        self.port = 18460
        self.world = None
        self.daemons: list[Daemon] = []

    def next_port(self) -> int:
        self.port += 1
        return self.port

    def ours(self, tag, data_dir=None, profile=None, database=None) -> Ours:
        """Our daemon: per --ours (bench/daemon.py when profiling; C{database} only with twistd)."""
        data_dir = data_dir or os.path.join(self.workdir, tag)
        mode = "daemon" if profile else self.args.ours
        d = Ours(self.next_port(), self.workdir, tag, data_dir, mode, profile, database)
        self.daemons.append(d)
        return d.start()

    def peer(self, tag, cache="internal") -> Peer:
        d = Peer(self.next_port(), self.workdir, tag, cache)
        self.daemons.append(d)
        return d.start()

    def start_world(self):
        argv = [PY, os.path.join(HERE, "world.py"), "--workdir", self.workdir, "--cached", str(self.n_cached),
                "--cold", str(self.n_cold), "--control", str(CONTROL)]
        self.world = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(os.path.join(self.workdir, "world.log"), "ab"))
        line = self.world.stdout.readline()
        if b"READY" not in line:
            raise SystemExit("world did not start; see world.log")
        control({"op": "ping"})

    def record(self, figure, daemon, result):
        result = dict(result, figure=figure, daemon=daemon)
        self.results["runs"].append(result)
        print(f"  {figure:<28} {daemon:<5} {result.get('rps', ''):>9} lookups/s  p50 {result.get('p50_ms')} ms"
              f"  p99 {result.get('p99_ms')} ms  cpu/lookup {result.get('cpu_per_lookup_us')} us"
              f"  kinds {result.get('kinds')}", flush=True)
        return result

    def warm(self, daemon, n):
        r = loadgen(daemon, conns=8, duration=120, keys="d{i}.bench.test", nkeys=n, once=True)
        if r["answered"] != n or set(r["kinds"]) != {"OK"}:
            raise SystemExit(f"warm-up of {daemon.name} failed: {r}")
        return r

    def alternate(self, figure, daemons, conns_list):
        for r in range(self.rounds):
            k = r % len(daemons)
            order = daemons[k:] + daemons[:k]
            for conns in conns_list:
                for d in order:
                    res = loadgen(d, conns=conns, duration=self.T, keys="d{i}.bench.test", nkeys=self.n_cached)
                    self.record(f"{figure} c={conns}", d.name, res)

    def phase_cached(self):
        print("phase cached: cached lookups, peer with internal cache + uvloop", flush=True)
        self.o1 = self.ours("ours-cached")
        self.p1 = self.peer("peer-internal")
        group = [self.o1, self.p1]
        for d in group:
            self.warm(d, self.n_cached)
        self.alternate("cached", group, [1, 8])
        for d in group:
            self.results[f"{d.name}_rss_kb_cached"] = rss_kb(d.pid)

    def phase_coalesce(self):
        print("phase coalesce: 100 connections, one uncached domain", flush=True)
        o = getattr(self, "o1", None) or self.ours("ours-cached")
        p = getattr(self, "p1", None) or self.peer("peer-internal")
        for d, domain in ((o, "coal0.bench.test"), (p, "coal1.bench.test")):
            res = loadgen(d, conns=100, burst=True, duration=60, keys=domain, nkeys=1)
            counts = control({"op": "counts", "txt": [domain], "https": [domain]})
            res["txt_queries"] = counts["txt"][domain]
            res["https_fetches"] = counts["https"][domain]
            self.record("coalesce", d.name, res)
            print(f"    {d.name}: {res['answered']} answers, {res['txt_queries']} TXT queries, "
                  f"{res['https_fetches']} HTTPS fetches", flush=True)

    def phase_sqlite(self):
        print("phase sqlite: cached lookups, peer with its sqlite cache; ours restarted on its SQLite file", flush=True)
        for d in (getattr(self, "o1", None), getattr(self, "p1", None)):
            if d is not None:
                d.stop()
        group = [self.ours("ours-sqlite", data_dir=os.path.join(self.workdir, "ours-cached")),
                 self.peer("peer-sqlite", cache="sqlite")]
        for d in group:
            self.warm(d, self.n_cached)
        self.alternate("sqlite", group, [1, 8])
        for d in group:
            d.stop()

    def start_backoff(self):
        print(f"phase backoff (background): 1 lookup/s of a failing domain for {self.backoff_window:.0f} s", flush=True)
        self.bo = self.ours("ours-backoff")
        self.bp = self.peer("peer-backoff")
        self.backoff_procs = []
        for d, domain in ((self.bo, "fail0.bench.test"), (self.bp, "fail1.bench.test")):
            argv = [PY, os.path.join(HERE, "loadgen.py"), "--port", str(d.port), "--pid", str(d.pid),
                    "--conns", "1", "--rate", "1", "--duration", str(self.backoff_window),
                    "--max", str(int(self.backoff_window)), "--keys", domain]
            self.backoff_procs.append((d, domain, subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)))

    def finish_backoff(self):
        for d, domain, proc in self.backoff_procs:
            out, _ = proc.communicate()
            res = json.loads(out)
            counts = control({"op": "counts", "txt": [domain], "https": [domain]})
            res["txt_queries"] = counts["txt"][domain]
            res["https_fetches"] = counts["https"][domain]
            res["window_s"] = self.backoff_window
            scale = 300.0 / self.backoff_window
            res["https_fetches_per_5min"] = res["https_fetches"] if d.name == "ours" and res["https_fetches"] <= 1 \
                else round(res["https_fetches"] * scale)
            self.record("backoff", d.name, res)
            print(f"    {d.name}: {res['answered']} lookups in {self.backoff_window:.0f} s, "
                  f"{res['https_fetches']} HTTPS fetches, {res['txt_queries']} TXT queries", flush=True)
        self.bo.stop()
        self.bp.stop()

    def phase_cold(self):
        print("phase cold: unique uncached domains, 32 connections, fresh daemons", flush=True)
        for r in range(self.cold_rounds):
            # The figure: both with their default cache (ours SQLite, the peer
            # internal); then like for like: both in memory, both SQLite.
            makers = [("ours", lambda r=r: self.ours(f"ours-cold{r}")), ("peer", lambda r=r: self.peer(f"peer-cold{r}"))]
            if self.args.ours == "twistd":
                makers.append(("ours-memory", lambda r=r: self.ours(f"ours-memory-cold{r}", database="memory:")))
            makers.append(("peer-sqlite", lambda r=r: self.peer(f"peer-sqlite-cold{r}", cache="sqlite")))
            if r % 2:
                makers.reverse()
            for name, make in makers:
                d = make()
                spy = None
                if self.args.cold_profile and r == 0 and name.startswith("ours"):
                    # The profiled run's figures count too: py-spy samples from outside, at 200 Hz.
                    spy = self.start_py_spy(d.pid, f"{name}-cold", self.T + 30)
                before = control({"op": "counts"})
                world_before = cpu_ticks(self.world.pid)
                res = loadgen(d, conns=32, duration=self.T, keys="c{i}.bench.test", nkeys=self.n_cold, once=True)
                world_ticks = cpu_ticks(self.world.pid) - world_before
                after = control({"op": "counts"})
                # The DNS and HTTPS servers share the two cores with the daemon
                # under test: their CPU per lookup says how much is left to it.
                res["world_cpu_per_lookup_us"] = round(
                    world_ticks / os.sysconf("SC_CLK_TCK") * 1e6 / max(1, res["answered"]), 1)
                res["rss_kb_after"] = rss_kb(d.pid)
                if spy is not None:
                    self.results.setdefault("cold_py_spy", {})[name] = self.stop_py_spy(spy)
                res["dns_queries_per_lookup"] = round((after["dns_total"] - before["dns_total"]) / max(1, res["answered"]), 2)
                self.record("cold c=32", name, res)
                print(f"    {name}: {res['dns_queries_per_lookup']} DNS queries per cold lookup", flush=True)
                d.stop()

    def phase_rss(self):
        print(f"phase rss: {self.rss_policies} policies pre-seeded into our SQLite cache", flush=True)
        data_dir = os.path.join(self.workdir, "ours-rss")
        t = time.time()
        subprocess.run([PY, os.path.join(HERE, "seed.py"), "--data-dir", data_dir, "--count", str(self.rss_policies)],
                       check=True)
        seed_s = time.time() - t
        o = self.ours("ours-rss", data_dir=data_dir)
        idle = rss_kb(o.pid)
        first = loadgen(o, max=1, keys="r0.rss.bench.test")
        counts = control({"op": "counts", "txt": ["r0.rss.bench.test"], "https": ["r0.rss.bench.test"]})
        res = loadgen(o, conns=8, duration=self.rss_window, keys="r{i}.rss.bench.test", nkeys=self.rss_policies,
                      once=True)
        self.record("rss lookups c=8", "ours", res)
        after = rss_kb(o.pid)
        peak = rss_kb(o.pid, "VmHWM:")
        self.results["rss"] = {
            "policies": self.rss_policies, "seed_s": round(seed_s, 1), "rss_kb_start": idle,
            "first_answer": first["samples"], "first_https": counts["https"]["r0.rss.bench.test"],
            "first_kinds": first["kinds"], "looked_up": res["answered"], "rss_kb_after": after,
            "rss_kb_peak": peak,
        }
        print(f"    {self.results['rss']}", flush=True)
        o.stop()

    def submit(self, port: int, tag: str) -> dict:
        argv = [PY, os.path.join(HERE, "relay.py"), "submit", "--port", str(port), "--count",
                str(self.relay_messages), "--tag", tag, "--conns", "4", "--timeout", str(self.relay_timeout),
                "--control", str(SINK_CONTROL)]
        if port == POSTFIX_INTAKE:
            argv += ["--host", "127.0.0.2"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=self.relay_timeout + 60)
        if out.returncode != 0:
            raise SystemExit(f"relay submit failed: {out.stderr}")
        return json.loads(out.stdout)

    def relay_ours(self, tag: str, reuse: bool = True) -> dict:
        data_dir = os.path.join(self.workdir, tag)
        twistd = [os.path.join(os.path.dirname(PY), "twistd")]
        argv = twistd + ["-n", "--pidfile=", "mtasts", "--data-dir", data_dir,
                "--smtp", f"tcp:{RELAY_INTAKE}:interface=127.0.0.1", "--socketmap", "none",
                "--nameserver", "127.0.0.1:53", "--ca-file", os.path.join(self.workdir, "ca.pem"), "--no-reports"]
        if not reuse:
            argv += ["--session-reuse", "0"]
        log = os.path.join(self.workdir, f"{tag}.log")
        proc = subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=self.workdir)
        try:
            wait_banner("127.0.0.1", RELAY_INTAKE, proc, 60)
            before = cpu_ticks(proc.pid)
            res = self.submit(RELAY_INTAKE, tag)
            res["cpu_ticks"] = cpu_ticks(proc.pid) - before
            with open(log, errors="replace") as f:  # our delivery's debug line per TLS session
                sessions = [line for line in f if "TLS to mx.relay.bench.test" in line]
            res["tls_sessions"] = len(sessions)
            res["verified_tls_sessions"] = sum("verified=True" in line for line in sessions)
            if self.args.relay_profile and tag not in self.results.get("relay_py_spy", {}) \
                    and not any(t.startswith(tag[:-1]) for t in self.results.get("relay_py_spy", {})):
                self.py_spy(proc.pid, tag)  # the first run of ours
        finally:
            stop_process(proc, signal.SIGTERM, 15)
        return res

    def start_py_spy(self, pid: int, tag: str, duration: float) -> tuple:
        """Start C{py-spy record} (raw stacks, 200 Hz) of process C{pid}; stop it with L{stop_py_spy}."""
        py_spy = os.path.join(os.path.dirname(PY), "py-spy")
        out = os.path.join(self.workdir, f"{tag}-py-spy.txt")
        spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
                                "--nonblocking", "--output", out, "--duration", str(int(duration))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        return spy, out

    def stop_py_spy(self, spy: tuple) -> str:
        proc, out = spy
        stop_process(proc, signal.SIGINT, 30)  # py-spy writes its output on SIGINT
        print(f"    py-spy raw stacks: {out}", flush=True)
        return out

    def py_spy(self, pid: int, tag: str) -> None:
        """py-spy record of our relay over a second, identical load (the first run's figures stand)."""
        spy = self.start_py_spy(pid, tag, self.relay_timeout)
        try:
            res = self.submit(RELAY_INTAKE, tag + "spy")
            print(f"    profiled run: {res['msgs_per_s']} msgs/s", flush=True)
        finally:
            out = self.stop_py_spy(spy)
        self.results.setdefault("relay_py_spy", {})[tag] = out

    def relay_postfix(self, tag: str, tls_reuse: bool = False) -> dict:
        peer = self.peer(f"peer-{tag}")
        pf = PostfixRelay(os.path.join(self.workdir, tag), peer.port, os.path.join(self.workdir, "ca.pem"),
                          tls_reuse=tls_reuse)
        try:
            pf.start()
            master = pf.master_pid()
            before = tree_cpu_ticks(master)
            peer_before = cpu_ticks(peer.pid)
            res = self.submit(POSTFIX_INTAKE, tag)
            res["cpu_ticks_postfix"] = tree_cpu_ticks(master) - before
            res["cpu_ticks_peer"] = cpu_ticks(peer.pid) - peer_before
            res["cpu_ticks"] = res["cpu_ticks_postfix"] + res["cpu_ticks_peer"]
            res["tls_sessions"] = pf.log_count("TLS connection established to mx.relay.bench.test")
            res["verified_tls_sessions"] = pf.log_count("Verified TLS connection established to mx.relay.bench.test")
            res["reused_tls_sessions"] = pf.log_count("TLS connection reused to mx.relay.bench.test")
            res["sent"] = pf.log_count("status=sent")
        finally:
            pf.stop()
            peer.stop()
        return res

    def phase_relay(self):
        n = self.relay_messages
        print(f"phase relay: {n} messages to relay.bench.test (enforce) via ours and via Postfix 3.7 + the peer",
              flush=True)
        sink = subprocess.Popen([PY, os.path.join(HERE, "relay.py"), "sink", "--cert",
                                 os.path.join(self.workdir, "mx-relay.pem"), "--key",
                                 os.path.join(self.workdir, "mx-relay.key"), "--port", "25",
                                 "--control", str(SINK_CONTROL)],
                                stdout=subprocess.PIPE, stderr=open(os.path.join(self.workdir, "sink.log"), "ab"))
        try:
            addrs = subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
            if "127.0.0.2/" not in addrs:
                subprocess.run(["ip", "addr", "add", "127.0.0.2/8", "dev", "lo"], check=True)
            if b"READY" not in sink.stdout.readline():
                raise SystemExit("relay sink did not start; see sink.log")
            hz = os.sysconf("SC_CLK_TCK")
            for r in range(self.relay_rounds):
                names = ("ours", "postfix") + (("ours-noreuse", "postfix-reuse") if self.args.relay_variants else ())
                for name in names:
                    tag = f"{name.replace('-', '')}{r}"  # tags: letters and digits
                    if name.startswith("ours"):
                        res = self.relay_ours(tag, reuse=name == "ours")
                    else:
                        res = self.relay_postfix(tag, tls_reuse=name == "postfix-reuse")
                    res["cpu_ms_per_msg"] = round(res["cpu_ticks"] * 1000.0 / hz / max(1, res["received"]), 2)
                    if "cpu_ticks_postfix" in res:
                        res["cpu_ms_per_msg_postfix_only"] = round(
                            res["cpu_ticks_postfix"] * 1000.0 / hz / max(1, res["received"]), 2)
                    res.pop("t_first", None)
                    self.record("relay", name, dict(res, rps=res["msgs_per_s"]))
                    print(f"    {name}: {res['received']}/{n} over TLS ({res['plain']} plain) in {res['total_s']} s "
                          f"(submitted in {res['submit_s']} s): {res['msgs_per_s']} msgs/s, "
                          f"CPU {res['cpu_ms_per_msg']} ms/msg"
                          + (f" (Postfix alone {res['cpu_ms_per_msg_postfix_only']}); status=sent {res['sent']}"
                             if name.startswith("postfix") else "")
                          + f"; TLS sessions in its log {res['tls_sessions']}, verified {res['verified_tls_sessions']}"
                          + (f"; errors {res['errors']}" if res["errors"] else ""), flush=True)
        finally:
            sink.terminate()
            sink.wait()

    def profiled_load(self, o, prof: str, label: str, top: tuple[int, int], **load) -> None:
        """Run one load on daemon C{o} between SIGUSR1/SIGUSR2 (cProfile on/off); print the profile."""
        o.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.2)
        res = loadgen(o, duration=self.T, **load)
        o.proc.send_signal(signal.SIGUSR2)
        for _ in range(100):
            time.sleep(0.1)
            if os.path.exists(prof):
                break
        time.sleep(0.5)
        self.record(label, "ours", res)
        o.stop()
        import pstats

        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(top[0])
        stats.sort_stats("cumulative").print_stats(top[1])

    def phase_profile(self):
        print("phase profile: cProfile of our daemon under cached load, 8 connections", flush=True)
        prof = os.path.join(self.workdir, "ours-cached.prof")
        o = self.ours("ours-profile", data_dir=os.path.join(self.workdir, "ours-profile"), profile=prof)
        self.warm(o, self.n_cached)
        loadgen(o, conns=8, duration=1, keys="d{i}.bench.test", nkeys=self.n_cached)
        self.profiled_load(o, prof, "profiled c=8", (25, 30), conns=8, keys="d{i}.bench.test",
                           nkeys=self.n_cached)
        self.results["profile"] = prof

    def phase_profile_cold(self):
        print("phase profile-cold: cProfile of our daemon under cold load, 32 connections", flush=True)
        prof = os.path.join(self.workdir, "ours-cold.prof")
        o = self.ours("ours-profile-cold", profile=prof)
        self.profiled_load(o, prof, "profiled cold c=32", (30, 40), conns=32, keys="c{i}.bench.test",
                           nkeys=self.n_cold, once=True)

    def stop_all(self):
        for d in self.daemons:
            d.stop()
        if self.world is not None:
            self.world.terminate()
            self.world.wait()


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def table(results: dict, bench: Bench) -> str:
    """Markdown table: ours (per --ours), the peer, the ratio, the target, and whether it is met."""
    runs = results["runs"]

    def fig(figure, daemon, key):
        return median([r.get(key) for r in runs if r["figure"] == figure and r["daemon"] == daemon])

    rows = []

    def f(v, fmt):
        if v is None:
            return "-"
        return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    def row(label, ours, peer, target, check=None, fmt="{:.0f}"):
        ratio = ours / peer if isinstance(ours, (int, float)) and isinstance(peer, (int, float)) and peer else None
        met = "-" if check is None else ("yes" if check(ours, ratio) else "NO")
        rows.append((label, f(ours, fmt), f(peer, fmt), "-" if ratio is None else f"{ratio:.2f}x", target, met))

    def at_least(k):
        return lambda v, ratio: ratio is not None and ratio >= k

    def at_most(k):
        return lambda v, ratio: ratio is not None and ratio <= k

    for conns in (1, 8):
        key = f"cached c={conns}"
        if fig(key, "ours", "rps") is not None:
            row(f"cached lookups/s, {conns} conn", fig(key, "ours", "rps"), fig(key, "peer", "rps"), ">= 1.5x",
                at_least(1.5))
    for conns in (1, 8):
        key = f"cached c={conns}"
        if fig(key, "ours", "rps") is not None:
            row(f"daemon CPU us per cached lookup, {conns} conn", fig(key, "ours", "cpu_per_lookup_us"),
                fig(key, "peer", "cpu_per_lookup_us"), "<= 0.6x", at_most(0.6), fmt="{:.1f}")
    for conns in (1, 8):
        key = f"cached c={conns}"
        if fig(key, "ours", "rps") is not None:
            row(f"cached p50 / p99 latency ms, {conns} conn",
                f"{fig(key, 'ours', 'p50_ms')} / {fig(key, 'ours', 'p99_ms')}",
                f"{fig(key, 'peer', 'p50_ms')} / {fig(key, 'peer', 'p99_ms')}", "(info)")
    for conns in (1, 8):
        key = f"sqlite c={conns}"
        if fig(key, "ours", "rps") is not None:
            row(f"cached lookups/s, SQLite cache, {conns} conn", fig(key, "ours", "rps"), fig(key, "peer", "rps"),
                ">= 5x", at_least(5))
    co = {r["daemon"]: r for r in runs if r["figure"] == "coalesce"}
    if co:
        row("100 conns, 1 uncached domain: TXT queries", co["ours"]["txt_queries"], co["peer"]["txt_queries"],
            "ours == 1", lambda v, r: v == 1)
        row("100 conns, 1 uncached domain: HTTPS fetches", co["ours"]["https_fetches"], co["peer"]["https_fetches"],
            "ours == 1", lambda v, r: v == 1)
    bo = {r["daemon"]: r for r in runs if r["figure"] == "backoff"}
    if bo:
        label = "failing policy fetch, 1 lookup/s: HTTPS fetches in 5 min"
        if bench.backoff_window < 300:
            label += f" ({bench.backoff_window:.0f} s measured; peer scaled)"
        row(label, bo["ours"]["https_fetches_per_5min"], bo["peer"]["https_fetches_per_5min"], "ours == 1",
            lambda v, r: bo["ours"]["https_fetches"] == 1)
    o = fig("cold c=32", "ours", "rps")
    if o is not None:
        # Issue 19's targets: >= 1.2x the peer's rate, <= 0.8x its CPU, <= 1.0x its RSS.
        row("cold lookups/s, unique domains, 32 conns", o, fig("cold c=32", "peer", "rps"), ">= 1.2x",
            at_least(1.2), fmt="{:.1f}")
        row("daemon CPU ms per cold lookup", fig("cold c=32", "ours", "cpu_per_lookup_us") / 1000,
            fig("cold c=32", "peer", "cpu_per_lookup_us") / 1000, "<= 0.8x", at_most(0.8), fmt="{:.2f}")
        if fig("cold c=32", "ours", "rss_kb_after") is not None:
            row("RSS MB after the cold phase", fig("cold c=32", "ours", "rss_kb_after") / 1024,
                fig("cold c=32", "peer", "rss_kb_after") / 1024, "<= 1.0x", at_most(1.0), fmt="{:.1f}")
        if fig("cold c=32", "ours", "world_cpu_per_lookup_us") is not None:
            row("  bench DNS+HTTPS servers' CPU ms per cold lookup (same cores)",
                fig("cold c=32", "ours", "world_cpu_per_lookup_us") / 1000,
                fig("cold c=32", "peer", "world_cpu_per_lookup_us") / 1000, "(info)", fmt="{:.2f}")
        for ours_, peer_, label in (("ours-memory", "peer", "both caches in memory (ours --database memory:)"),
                                    ("ours", "peer-sqlite", "both caches in SQLite")):
            if fig("cold c=32", ours_, "rps") is not None and fig("cold c=32", peer_, "rps") is not None:
                row(f"  cold lookups/s, {label}", fig("cold c=32", ours_, "rps"), fig("cold c=32", peer_, "rps"),
                    "(info)", fmt="{:.1f}")
                row("    daemon CPU ms per cold lookup", fig("cold c=32", ours_, "cpu_per_lookup_us") / 1000,
                    fig("cold c=32", peer_, "cpu_per_lookup_us") / 1000, "(info)", fmt="{:.1f}")
    if "rss" in results:
        r = results["rss"]
        row(f"RSS MB: 100k policies cached (SQLite), after {r['looked_up']} lookups", r["rss_kb_after"] / 1024, None,
            "<= 100 MB", lambda v, ratio: v <= 100, fmt="{:.1f}")
        row("  same, peak RSS (VmHWM) MB", r["rss_kb_peak"] / 1024, None, "(info)", None, fmt="{:.1f}")
        served = r["first_https"] == 0 and r["first_kinds"] == {"OK": 1}
        row("after restart, first lookup served from disk (no HTTPS)", "yes" if served else "no", None, "yes",
            lambda v, ratio: v == "yes")
    rl = [r for r in runs if r["figure"] == "relay"]
    if rl:
        n = rl[0]["count"]
        row(f"relay msgs/s to enforce MX over verified TLS ({n} msgs, vs Postfix 3.7 + peer)",
            fig("relay", "ours", "msgs_per_s"), fig("relay", "postfix", "msgs_per_s"), ">= 0.5x", at_least(0.5),
            fmt="{:.1f}")
        if fig("relay", "ours-noreuse", "msgs_per_s") is not None:
            row("  same, ours with --session-reuse 0", fig("relay", "ours-noreuse", "msgs_per_s"),
                fig("relay", "postfix", "msgs_per_s"), "(info)", None, fmt="{:.1f}")
        if fig("relay", "postfix-reuse", "msgs_per_s") is not None:
            row("  same, Postfix with smtp_tls_connection_reuse = yes", fig("relay", "ours", "msgs_per_s"),
                fig("relay", "postfix-reuse", "msgs_per_s"), "(info)", None, fmt="{:.1f}")
        row("relay daemon CPU ms per message (Postfix: all its processes + the peer)",
            fig("relay", "ours", "cpu_ms_per_msg"), fig("relay", "postfix", "cpu_ms_per_msg"), "(info)", None,
            fmt="{:.2f}")
        row("relay messages received over TLS / sent (all runs)",
            f"{sum(r['received'] for r in rl if r['daemon'] == 'ours')}/{sum(r['count'] for r in rl if r['daemon'] == 'ours')}",
            f"{sum(r['received'] for r in rl if r['daemon'] == 'postfix')}/{sum(r['count'] for r in rl if r['daemon'] == 'postfix')}",
            "(info)")


        def sessions(daemon):
            runs_ = [r for r in rl if r["daemon"] == daemon]
            return (f"{sum(r.get('verified_tls_sessions', 0) for r in runs_)}"
                    f"/{sum(r.get('tls_sessions', r.get('verified_tls_sessions', 0)) for r in runs_)}")

        row("relay TLS sessions to the MX: verified / all (all runs)", sessions("ours"), sessions("postfix"),
            "all verified", lambda v, ratio: v.split("/")[0] == v.split("/")[1] != "0")
    if "ours_rss_kb_cached" in results:
        row(f"RSS MB after the cached phase ({bench.n_cached} domains)", results["ours_rss_kb_cached"] / 1024,
            results["peer_rss_kb_cached"] / 1024, "(info)", None, fmt="{:.1f}")
    header = ("figure", f"ours ({bench.args.ours})", "peer", "ours/peer", "target", "met")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = []
    for r in [header] + rows:
        lines.append("| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(r)) + " |")
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}; nproc {os.cpu_count()}; {model}; "
            f"Python {platform.python_version()}; {platform.system()} {platform.release()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 s runs, one round, 20 s backoff window")
    parser.add_argument("--only", default=",".join(p for p in PHASES if not p.startswith("profile")),
                        help=f"comma-separated phases of {', '.join(PHASES)}")
    parser.add_argument("--ours", choices=("daemon", "twistd"), default="twistd",
                        help="'twistd -n mtasts' (default) or bench/daemon.py (the same objects, no twistd)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--cold-profile", action="store_true",
                        help="cold phase: py-spy record our daemons during their first cold run")
    parser.add_argument("--relay-variants", action="store_true",
                        help="relay phase: also ours with --session-reuse 0 and Postfix with smtp_tls_connection_reuse")
    parser.add_argument("--relay-profile", action="store_true",
                        help="relay phase: py-spy record our relay over an extra load after the first run")
    args = parser.parse_args()
    if os.environ.get(NS_ENV) != "1":
        enter_namespace()
    phases = [p for p in args.only.split(",") if p]
    for p in phases:
        if p not in PHASES:
            raise SystemExit(f"unknown phase {p}")
    workdir = tempfile.mkdtemp(prefix="mtasts-bench-")
    os.chmod(workdir, 0o755)  # Postfix's daemons (user postfix) must reach the relay phase's instance
    setup_namespace(workdir)
    bench = Bench(args, workdir)
    print(f"work directory {workdir}; {machine()}", flush=True)
    try:
        bench.start_world()
        if "backoff" in phases:
            bench.start_backoff()
        for p in ("cached", "coalesce", "sqlite", "cold", "rss", "relay", "profile", "profile-cold"):
            if p in phases:
                try:
                    getattr(bench, "phase_" + p.replace("-", "_"))()
                except SystemExit as e:  # one failed phase must not lose the others' figures
                    print(f"phase {p} FAILED: {e}", flush=True)
                    bench.results.setdefault("failed", []).append(f"{p}: {e}")
        if "backoff" in phases:
            bench.finish_backoff()
        bench.results["machine"] = machine()
        bench.results["quick"] = args.quick
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(bench.results, f, indent=1)
        print()
        print(f"mtasts-twisted vs postfix-mta-sts-resolver ({'quick' if args.quick else 'full'} run)")
        print(machine())
        text = table(bench.results, bench)
        print(text)
        with open(os.path.join(workdir, "table.md"), "w") as f:
            f.write(machine() + "\n\n" + text + "\n")
        print(f"raw results: {os.path.join(workdir, 'results.json')}")
    finally:
        bench.stop_all()
        if not args.keep:
            for name in os.listdir(workdir):
                if name.endswith((".json", ".prof", ".log")):
                    continue
                path = os.path.join(workdir, name)
                shutil.rmtree(path) if os.path.isdir(path) else None


if __name__ == "__main__":
    main()
