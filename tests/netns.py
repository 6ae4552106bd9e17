"""Virtual hosts for multi-node tests: Linux network namespaces on one private switch.

`VirtualNetwork(["a", "b"])` builds, for this process (names carry the pid, so two runs never
clash):

- a "switch" namespace `pdsw<pid>` holding a bridge `br0` (so that the root namespace's
  firewall and `br_netfilter` settings never see the traffic);
- one namespace `pdns<pid><name>` per host, with `lo` up and `eth0` (a veth whose peer
  `h<name>` is a port of the bridge) addressed `10.213.<octet>.<10 + i>/24`;
- a veth from the root namespace (`pdr<pid>`, address `.1`) to the bridge, so that the test
  process itself reaches every host directly (HTTP clients, nothing else).

`set_link(name, up=False)` takes a host's bridge port down: its packets are dropped from then
on, open TCP connections stay open without a reset, a real partition. `popen(name, argv)` starts
a process inside a host in a session of its own; `close()` kills every process of those
sessions (Ray's workers included) and removes every namespace and link (idempotent, each step
on its own, so that a failed step never leaves the rest behind).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any


class NetnsUnavailable(RuntimeError):
    """This machine or user cannot build network namespaces; the message says why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def check_available() -> None:
    """Raise NetnsUnavailable naming what is missing: the `ip` tool, root, or the kernel's
    support for network namespaces, veth and bridges (tried on a throwaway namespace)."""
    if shutil.which("ip") is None:
        raise NetnsUnavailable("the `ip` tool (iproute2) is not installed")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
    probe = f"pdprobe{os.getpid()}"
    try:
        add = _ip("netns", "add", probe, check=False)
        if add.returncode != 0:
            raise NetnsUnavailable(f"`ip netns add` failed: {add.stderr.strip()}")
        for args in (
            ("link", "add", "br0", "type", "bridge"),
            ("link", "add", "v0", "type", "veth", "peer", "name", "v1"),
        ):
            proc = _ip("-n", probe, *args, check=False)
            if proc.returncode != 0:
                raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    finally:
        _ip("netns", "del", probe, check=False)


def _session_members(sessions: set[int]) -> list[int]:
    """Live (not zombie) processes whose session id is in `sessions`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command: state, ppid, pgrp, session, ...
        if fields[0] != "Z" and int(fields[3]) in sessions:
            out.append(int(entry))
    return out


def _free_octet(start: int) -> int:
    """The first x from `start` (wrapping in 16..239) such that 10.213.x.0/24 appears in no
    address or route of the root namespace."""
    taken = _ip("addr").stdout + _ip("route").stdout
    for i in range(224):
        octet = 16 + (start - 16 + i) % 224
        if f"10.213.{octet}." not in taken:
            return octet
    raise RuntimeError("no free 10.213.x.0/24 subnet")


def _signal_sessions(
    sessions: set[int], grace_s: float, children: Sequence[subprocess.Popen[Any]]
) -> None:
    """SIGTERM every process of `sessions`, wait up to `grace_s` for them to go (reaping
    `children`), then SIGKILL the rest."""
    for sig, grace in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in _session_members(sessions):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while True:
            for proc in children:
                proc.poll()  # reap
            if not _session_members(sessions) or time.monotonic() > deadline:
                break
            time.sleep(0.1)


class VirtualNetwork:
    """Hosts `names` (short: [a-z0-9], at most 3 characters) in network namespaces on one
    switch, in `10.213.<octet>.0/24`; see the module doc."""

    def __init__(self, names: Sequence[str], octet: int | None = None):
        pid = os.getpid()
        self.tag = str(pid)
        self.octet = octet if octet is not None else _free_octet(16 + pid % 224)
        self.prefix = f"10.213.{self.octet}"
        self.switch = f"pdsw{pid}"
        self.root_link = f"pdr{pid}"  # the root namespace's end; its peer is `r` on the bridge
        self.root_ip = f"{self.prefix}.1"
        self.hosts = {n: f"pdns{pid}{n}" for n in names}
        self.ips = {n: f"{self.prefix}.{10 + i}" for i, n in enumerate(names)}
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False
        for n in names:
            if not (n.isalnum() and n.islower() and len(n) <= 3):
                raise ValueError(f"host name {n!r}: use at most 3 characters [a-z0-9]")

    # ---- building and removing ----------------------------------------------------------------

    def __enter__(self) -> VirtualNetwork:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        sw = self.switch
        # Names carry our pid: any namespace or link of that name is a leftover of a process
        # that had this pid before and died without cleaning up.
        for ns in [*self.hosts.values(), sw]:
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.root_link, check=False)
        _ip("netns", "add", sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for name, ns in self.hosts.items():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            port = f"h{name}"
            _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", sw, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.ips[name]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            # A default route gives programs that ask "my address towards the world" (a UDP
            # connect) the host's own address rather than 127.0.0.1.
            _ip("-n", ns, "route", "add", "default", "via", self.root_ip)
        _ip("link", "add", self.root_link, "type", "veth", "peer", "name", "r", "netns", sw)
        _ip("-n", sw, "link", "set", "r", "master", "br0", "up")
        _ip("addr", "add", f"{self.root_ip}/24", "dev", self.root_link)
        _ip("link", "set", self.root_link, "up")
        self.wait_reachable(timeout_s=10)

    def close(self, grace_s: float = 3.0) -> None:
        """Kill every process started here and all their descendants (found by session: Ray
        puts its workers in process groups of their own, but they stay in the session):
        SIGTERM, SIGKILL after `grace_s` (a Ray node takes ~10 s to stop gracefully, for nothing
        when its network goes away next); then remove the namespaces and links."""
        if self._closed:
            return
        self._closed = True
        _signal_sessions({p.pid for p in self._procs}, grace_s, self._procs)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        # Namespaces first: deleting one destroys the veth ends inside it, and with them the
        # peers. Then whatever is left (a half-built run).
        for ns in [*self.hosts.values(), self.switch]:
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.root_link, check=False)

    # ---- using ----------------------------------------------------------------------------------

    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host], *argv]

    def run(
        self, host: str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 120)
        return subprocess.run(self.exec_argv(host, argv), **kwargs)

    def popen(
        self,
        host: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start `argv` inside `host` in a new session, which `close` kills whole; `env` is
        the complete environment (default: this process's)."""
        proc = subprocess.Popen(
            self.exec_argv(host, argv),
            env=dict(env) if env is not None else None,
            start_new_session=True,
            **kwargs,
        )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace_s: float = 10.0) -> None:
        """SIGTERM `proc` (started by `popen`) and everything in its session; SIGKILL what is
        left after `grace_s`."""
        _signal_sessions({proc.pid}, grace_s, [proc])

    def link_bytes(self, host: str) -> int:
        """Bytes through `host`'s port on the switch so far (both directions)."""
        out = _ip("-j", "-s", "-n", self.switch, "link", "show", "dev", f"h{host}").stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["bytes"]) + int(stats["tx"]["bytes"])

    def set_link(self, host: str, up: bool) -> None:
        """Bring `host`'s port on the switch up or down (down: a partition, no reset)."""
        _ip("-n", self.switch, "link", "set", f"h{host}", "up" if up else "down")

    def wait_reachable(self, timeout_s: float) -> None:
        """Until the root namespace answers TCP-level reachability of each host (ARP resolved
        across the bridge); raise RuntimeError after `timeout_s`."""
        import socket

        deadline = time.monotonic() + timeout_s
        pending = dict(self.ips)
        while pending:
            for name, ip in list(pending.items()):
                # A closed port answers with a reset at once when the path works.
                with socket.socket() as s:
                    s.settimeout(0.5)
                    try:
                        s.connect((ip, 9))
                        pending.pop(name)
                    except ConnectionRefusedError:
                        pending.pop(name)
                    except OSError:
                        pass
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"hosts {sorted(pending)} unreachable from the root namespace")
            if pending:
                time.sleep(0.1)
