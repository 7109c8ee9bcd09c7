"""What the test node changes on the machine, and how to undo all of it, even after a crash.

tests/infra/node.py records each run in a state file (`NodeState`); `cleanup(state)` needs nothing
else, so the same code serves `Cluster.stop()`, `python -m tests.infra.node down`, the reaper that
runs when the test process dies, and the next start after a crash. What a run changes:
- the cgroup folder CGROUP_PARENT in every hierarchy: our host processes join <it>/host (pids
  hierarchy) and the kubelet puts pods under <it>/kubepods, so killing every process listed under it
  leaves nothing behind, containers and containerd's shims (which re-parent to init) included;
- mounts under the run folder (kubelet volumes, containerd's rootfs and shm, pods' network
  namespaces: containerd keeps them in its state folder, which is in the run folder);
- iptables chains KUBE-* (kube-proxy, kubelet) and CNI-* (portmap), IPv4 and IPv6;
- the kubelet's symbolic links in /var/log/containers (a fixed folder) to its pods' logs;
- containerd's shim sockets in /run/containerd/s (a fixed folder; a killed shim leaves its socket);
- the interfaces NODE_LINK (holds NODE_IP) and POD_BRIDGE (CNI's bridge, with pods' veths);
- sysctls net.ipv4.ip_forward and net.bridge.bridge-nf-call-iptables, set to 1 and left so.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.infra.node_config import CGROUP_PARENT, NODE_IP, NODE_LINK, POD_BRIDGE

CGROUP_FS = Path("/sys/fs/cgroup")
CONTAINER_LOG_LINKS = Path("/var/log/containers")
SHIM_SOCKETS = Path("/run/containerd/s")
_MNT_DETACH = 2


@dataclass
class NodeState:
    """One run, as written to the state file before anything is started."""

    run_dir: str
    owner_pid: int  # the process whose death ends the run (0: started detached by `up`)
    reaper_pid: int = 0
    keep_dir: bool = False

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> NodeState | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


# ---- processes and cgroups ------------------------------------------------------------------------


def _hierarchies() -> list[Path]:
    """Every cgroup hierarchy mounted under /sys/fs/cgroup (v1 controllers, name=systemd, unified)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mount_point = Path(left.split()[4])
        if right.split()[0] in ("cgroup", "cgroup2") and mount_point.parent == CGROUP_FS:
            found.append(mount_point)
    return found


def pids_cgroup(sub: str = "") -> Path:
    """Our folder in the pids hierarchy (where every process of a run is listed)."""
    return CGROUP_FS / "pids" / CGROUP_PARENT / sub if sub else CGROUP_FS / "pids" / CGROUP_PARENT


def prepare_cgroups() -> None:
    """Create CGROUP_PARENT in every hierarchy (the kubelet insists its cgroupRoot exists) and
    <it>/host in the pids hierarchy for our host processes."""
    for hierarchy in _hierarchies():
        folder = hierarchy / CGROUP_PARENT
        folder.mkdir(exist_ok=True)
        if hierarchy.name == "cpuset":  # a new cpuset is empty: no process could join it
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if not (folder / knob).read_text().strip():
                    (folder / knob).write_text((hierarchy / knob).read_text())
    pids_cgroup("host").mkdir(exist_ok=True)


def join_host_cgroup() -> None:
    """In a child before exec: join <CGROUP_PARENT>/host, so cleanup finds it and all it forks."""
    (pids_cgroup("host") / "cgroup.procs").write_text(str(os.getpid()))


def cgroup_pids(sub: str = "") -> list[int]:
    """Every process listed anywhere under our pids folder (or its `sub` folder)."""
    root = pids_cgroup(sub)
    if not root.is_dir():
        return []
    pids: list[int] = []
    for procs in root.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def kill_cgroup(sub: str = "", timeout_s: float = 15.0) -> None:
    """SIGKILL every process under our pids folder until none is left (a dying shim may still fork)."""
    deadline = time.monotonic() + timeout_s
    while pids := [p for p in cgroup_pids(sub) if p != os.getpid()]:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes survive SIGKILL in {pids_cgroup(sub)}: {pids}")
        time.sleep(0.05)


def remove_cgroups() -> None:
    """rmdir CGROUP_PARENT and everything below it in every hierarchy (processes must be gone)."""
    for hierarchy in _hierarchies():
        top = hierarchy / CGROUP_PARENT
        if not top.is_dir():
            continue
        folders = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for folder in [*folders, top]:
            for _ in range(50):  # a just-killed process can hold its cgroup for a moment
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    """Is there a process (not a zombie) with this pid?"""
    try:
        return pid > 0 and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# ---- mounts, network, iptables --------------------------------------------------------------------


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        raw = line.split()[4]
        # mountinfo escapes blanks and backslashes as octal (\040 ...)
        points.append(raw.encode().decode("unicode_escape"))
    return points


def unmount_all(run_dir: Path) -> None:
    """Lazily unmount everything under `run_dir`, deepest first."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    prefix = str(run_dir).rstrip("/") + "/"
    targets = [p for p in _mount_points() if p.startswith(prefix) or p == str(run_dir)]
    for point in sorted(set(targets), key=len, reverse=True):
        libc.umount2(point.encode(), _MNT_DETACH)


def remove_log_links(run_dir: Path) -> None:
    """The kubelet's links in /var/log/containers that point into `run_dir`."""
    if not CONTAINER_LOG_LINKS.is_dir():
        return
    for link in CONTAINER_LOG_LINKS.iterdir():
        with contextlib.suppress(OSError):
            if link.is_symlink() and os.readlink(link).startswith(str(run_dir).rstrip("/") + "/"):
                link.unlink()


def remove_shim_sockets(run_dir: Path) -> None:
    """The sockets of the run's (dead) shims: each task's `address` file in containerd's state names one."""
    for address in run_dir.glob("containerd-state/io.containerd.runtime.v2.task/*/*/address"):
        with contextlib.suppress(OSError):
            socket = Path(address.read_text().strip().removeprefix("unix://"))
            if socket.parent == SHIM_SOCKETS:
                socket.unlink(missing_ok=True)


def setup_network() -> None:
    """NODE_LINK (a bridge with no ports: this kernel has no dummy interfaces) holding NODE_IP/32,
    and the forwarding sysctls pods need."""
    delete_links()
    for args in (
        ["link", "add", NODE_LINK, "type", "bridge"],
        ["addr", "add", f"{NODE_IP}/32", "dev", NODE_LINK],
        ["link", "set", NODE_LINK, "up"],
    ):
        subprocess.run(["ip", *args], check=True, capture_output=True)
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    bridge_nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if bridge_nf.exists():  # pod -> Service -> pod on the same bridge needs it (else replies skip the NAT)
        bridge_nf.write_text("1")


def delete_links() -> None:
    """Remove NODE_LINK and POD_BRIDGE (silently if absent)."""
    for link in (POD_BRIDGE, NODE_LINK):
        subprocess.run(["ip", "link", "del", link], capture_output=True)


def clean_iptables() -> None:
    """Drop every KUBE-* and CNI-* chain, and the rules jumping to them, in IPv4 and IPv6 tables."""
    for save, restore in (("iptables-save", "iptables-restore"), ("ip6tables-save", "ip6tables-restore")):
        if shutil.which(save) is None:
            continue
        dump = subprocess.run([save], capture_output=True, text=True).stdout
        script = _iptables_cleanup_script(dump)
        if script:
            subprocess.run([restore, "--noflush"], input=script, text=True, capture_output=True)


def _iptables_cleanup_script(dump: str) -> str:
    """iptables-restore input that deletes our chains from an iptables-save `dump` ('' if none)."""
    ours = ("KUBE-", "CNI-")
    out: list[str] = []
    table, chains, rules = "", list[str](), list[str]()
    for line in [*dump.splitlines(), "*end"]:
        if line.startswith("*"):
            if chains:
                out += [f"*{table}", *rules, *[f"-F {c}" for c in chains], *[f"-X {c}" for c in chains], "COMMIT"]
            table, chains, rules = line[1:], [], []
        elif line.startswith(":") and line[1:].startswith(ours):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A ") and not line[3:].startswith(ours):
            words = line.split()
            targets = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-j", "-g")]
            if any(t.startswith(ours) for t in targets):
                rules.append("-D " + line[3:])
    return "\n".join(out) + "\n" if out else ""


# ---- everything -----------------------------------------------------------------------------------


def cleanup(state: NodeState, state_file: Path | None = None) -> None:
    """Undo a run: kill its processes, unmount, drop its iptables chains, interfaces and cgroups,
    remove its folder (unless kept) and the state file."""
    if state.reaper_pid and state.reaper_pid != os.getpid() and pid_alive(state.reaper_pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.reaper_pid, signal.SIGKILL)
    kill_cgroup()
    run_dir = Path(state.run_dir)
    unmount_all(run_dir)
    remove_log_links(run_dir)
    remove_shim_sockets(run_dir)
    clean_iptables()
    delete_links()
    remove_cgroups()
    if not state.keep_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    if state_file is not None:
        state_file.unlink(missing_ok=True)
