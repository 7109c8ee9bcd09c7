"""The test node's container images, built for real on this machine: no Docker engine, no registry.

    python -m tests.infra.images build [NAME...]                  # build what changed (default: all)
    python -m tests.infra.images import --address SOCK [NAME...]  # into a containerd (namespace k8s.io)
    python -m tests.infra.images export [--dir DIR] [NAME...]     # docker-archive files for `ctr import`
    python -m tests.infra.images list | prune [--all]

    from tests.infra import images
    images.build()                                         # {short name: Built}, cached by content
    images.import_images("/run/containerd/containerd.sock", ["pause", "tools", "step"])

NAME is a short name or the image's reference:

- base: localhost/clusterfit/base:bookworm, Debian (debootstrap --variant=minbase) with python3,
  python3-venv, ca-certificates and busybox-static, apt and dpkg set up as in Debian's -slim images.
- pause: localhost/clusterfit/pause:3.10, the pod sandbox: tests/infra/pause.c, static, in a scratch image.
- tools: localhost/clusterfit/tools:bookworm, the base plus BIND's nslookup/dig/host: the training
  operator's init container (`sh -c '... nslookup <job>-master-0 ...'`, as root).
- step, cluster, controller: the project's docker/Dockerfile (VARIANT=cpu),
  docker/Dockerfile.cluster (VARIANT=cpu) and docker/Dockerfile.controller, tagged
  clusterfit/clusterfit:<version>-cpu, clusterfit/clusterfit-cluster:<version>-cpu and
  clusterfit/clusterfit-controller:<version>.

How: tests/infra/mkrootfs.sh debootstraps the base's root file system from the Debian mirror this
machine's apt uses, and buildah commits it `from scratch`. The project's images are `buildah bud
--isolation chroot --network host --layers` of the Dockerfiles as they are, the local base passed in
their base-image build arguments, pip installing the locked wheels from a wheelhouse downloaded once
(by the base's own pip) and bind-mounted into the build (the Dockerfiles' PIP_FIND_LINKS/PIP_NO_INDEX).
skopeo then copies every image, layers uncompressed, into one OCI layout in the cache (blobs shared
between images; a blob already there is neither read nor written again). An import streams a tar into
`ctr images import -`: a docker-archive when containerd lacks the image's name (containerd then names
it as the kubelet asks for it), else an OCI layout with only the blobs containerd lacks (after a change
in `clusterfit/` a few hundred KB, not the step image's 6 GB). An image that containerd holds under its
name with the same image ID (config digest), unpacked, is skipped. `export` writes the docker-archive
as a file instead.

Cache (`$CLUSTERFIT_IMAGE_CACHE`, default `~/.cache/clusterfit/images`): buildah's storage (overlay
driver; its layer cache), the wheelhouse, the OCI layout and one state file per image with the content
key it was built from (recipe, Dockerfile, lock, build context, base image ID). With nothing changed a
build only hashes; a change in `clusterfit/` rebuilds the layers from its COPY on (the dependency layer
is reused). Needs root and the packages of `tests/infra/install_node_deps.sh`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DOCKER = REPO_ROOT / "docker"
# Part of every cache key: bump it when a recipe here changes in a way the hashed inputs do not show.
RECIPE = "2"
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "busybox-static")
TOOLS_PACKAGES = ("bind9-dnsutils",)
# Where builds see the wheelhouse: a folder every Debian/Ubuntu base has, empty, so the bind mount leaves
# no mount point behind in a layer (a new /wheels stays in the image as an empty folder).
WHEELS_IN_BUILD = "/mnt"
HOST_CA_IN_BUILD = "/etc/ssl/host-ca-bundle.pem"
# Staged build-context files get this mtime (2020-01-01): the COPY layers depend on content only (and
# zip, which building the package's wheel uses, refuses times before 1980).
CONTEXT_MTIME = 1577836800
DEFAULT_NAMESPACE = "k8s.io"
INSTALL_HINT = "run `bash tests/infra/install_node_deps.sh` as root"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_REF_NAME = "org.opencontainers.image.ref.name"
# containerd's own annotation for an image's full name (an OCI ref.name may be a bare tag).
CONTAINERD_NAME = "io.containerd.image.name"
COPY_BUFFER = 1 << 20


class ImageError(RuntimeError):
    """An image could not be built, exported or imported."""


@dataclass(frozen=True)
class Spec:
    """One image: its short name, its reference and how it is made."""

    short: str
    ref: str
    kind: str  # "rootfs", "pause", "tools" or "dockerfile"
    dockerfile: str = ""
    lock: str = ""
    args: tuple[tuple[str, str], ...] = ()

    @property
    def needs_base(self) -> bool:
        return self.kind in ("tools", "dockerfile")


@dataclass
class Built:
    """An image in the cache (its state file): what it was built from and where its blobs are."""

    name: str
    ref: str
    key: str
    image_id: str  # sha256:<hex>, the config digest (buildah's and containerd's image ID)
    manifest: str  # digest of its OCI manifest in the OCI layout
    layers: list[tuple[str, int]]  # (digest, size) of each uncompressed layer, bottom first
    chain_id: str  # containerd's snapshot name for the top layer
    size: int  # bytes of all layers
    timings: dict[str, float] = field(default_factory=dict)
    cached: bool = False


def _project_version() -> str:
    return str(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"])


VERSION = _project_version()
BASE = "localhost/clusterfit/base:bookworm"
PAUSE = "localhost/clusterfit/pause:3.10"
TOOLS = "localhost/clusterfit/tools:bookworm"
STEP = f"clusterfit/clusterfit:{VERSION}-cpu"
CLUSTER = f"clusterfit/clusterfit-cluster:{VERSION}-cpu"
CONTROLLER = f"clusterfit/clusterfit-controller:{VERSION}"
# Every base-image argument points at the local base, so no build ever reaches for a registry (buildah
# resolves the FROM of stages the target does not use too).
_CPU = (("VARIANT", "cpu"), ("CPU_BASE_IMAGE", BASE), ("CUDA_BASE_IMAGE", BASE))
_CTL = (("BASE_IMAGE", BASE),)
SPECS = {
    spec.short: spec
    for spec in (
        Spec("base", BASE, "rootfs"),
        Spec("pause", PAUSE, "pause"),
        Spec("tools", TOOLS, "tools"),
        Spec("step", STEP, "dockerfile", "Dockerfile", "requirements-step.txt", _CPU),
        Spec("cluster", CLUSTER, "dockerfile", "Dockerfile.cluster", "requirements-cluster-cpu.txt", _CPU),
        Spec("controller", CONTROLLER, "dockerfile", "Dockerfile.controller", "requirements-controller.txt", _CTL),
    )
}
ALL = tuple(SPECS)


# ----------------------------------------------------------------------------------------- places


def cache_dir() -> Path:
    """$CLUSTERFIT_IMAGE_CACHE, else the user cache folder + clusterfit/images."""
    if os.environ.get("CLUSTERFIT_IMAGE_CACHE"):
        return Path(os.environ["CLUSTERFIT_IMAGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clusterfit" / "images"


def _runroot() -> Path:
    """buildah's run root (locks, mount records; reset after a reboot, see _prepare_storage)."""
    return Path(os.environ.get("CLUSTERFIT_IMAGE_RUNROOT", "/run/clusterfit/images"))


def _layout() -> Path:
    """The OCI image layout every image is copied into (its blobs shared between images)."""
    return cache_dir() / "oci"


def _blob(digest: str) -> Path:
    return _layout() / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _state_path(spec: Spec) -> Path:
    return cache_dir() / "state" / f"{spec.short}.json"


def _work(name: str) -> Path:
    """A fresh scratch folder in the cache (the same file system as buildah's storage)."""
    path = cache_dir() / "work" / name
    _rmtree(path)
    path.mkdir(parents=True)
    return path


def _unmount_under(path: Path) -> None:
    """Unmount what a killed debootstrap (proc, sys) or container task left mounted under `path`."""
    for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
        mount_point = line.split()[1]
        if mount_point.startswith(f"{path}/"):
            subprocess.run(["umount", "-l", mount_point], check=False)


def _rmtree(path: Path) -> None:
    """rm -rf, never across a mount point (a forgotten bind mount of / must not be emptied)."""
    if path.exists():
        _unmount_under(path)
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


# ------------------------------------------------------------------------------------- processes


def _log(message: str) -> None:
    print(f"images: {message}", file=sys.stderr, flush=True)


def _check_program(program: str) -> None:
    if shutil.which(program) is None:
        raise ImageError(f"{program} is not installed: {INSTALL_HINT}")


def _run(argv: list[str], *, log_file: Path | None = None, timeout: float | None = None) -> str:
    """Run a command; its stdout, or ImageError with the end of its output. With log_file, the output
    goes there (long builds) and only its tail comes back in an error."""
    _check_program(argv[0])
    if log_file is None:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        output = result.stdout + result.stderr
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("w") as out:
            result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        output = f"(log: {log_file})\n" + "\n".join(log_file.read_text(errors="replace").splitlines()[-60:])
    if result.returncode:
        raise ImageError(f"{' '.join(argv)} exited {result.returncode}:\n{output[-5000:]}")
    return result.stdout or ""


def _buildah(*args: str, log_file: Path | None = None) -> str:
    """buildah on the cache's own storage, with the overlay driver (layers are shared; vfs copies them)."""
    root = ["--root", str(cache_dir() / "storage"), "--runroot", str(_runroot()), "--storage-driver", "overlay"]
    return _run(["buildah", *root, *args], log_file=log_file).strip()


@contextlib.contextmanager
def _locked(shared: bool = False) -> Iterator[None]:
    """Builds exclude each other and imports (which read the OCI layout) across processes."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield


def _prepare_storage() -> None:
    """A clean run root after a reboot (its mount records would be stale), and no working containers
    left by a killed build."""
    runroot = _runroot()
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    marker = runroot / "boot_id"
    if not marker.is_file() or marker.read_text().strip() != boot_id:
        _rmtree(runroot)
        runroot.mkdir(parents=True)
        marker.write_text(boot_id)
    _buildah("rm", "--all")


# ---------------------------------------------------------------------------------------- inputs


def spec_of(name: str) -> Spec:
    """The image for a short name or a reference."""
    for spec in SPECS.values():
        if name in (spec.short, spec.ref):
            return spec
    raise ImageError(f"unknown image {name!r}: expected one of {', '.join(ALL)} or their references")


def _with_dependencies(names: Iterable[str] | None) -> list[Spec]:
    """The images asked for plus the base they need, in build order."""
    wanted = {spec_of(n).short for n in (ALL if names is None else names)}
    if any(SPECS[n].needs_base for n in wanted):
        wanted.add("base")
    return [spec for short, spec in SPECS.items() if short in wanted]


def _sha256(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(COPY_BUFFER), b""):
            digest.update(block)
    return digest.hexdigest()


def _apt_stanzas() -> list[dict[str, str]]:
    """Every deb source of this machine's apt (deb822 *.sources and one-line *.list files)."""
    apt = Path("/etc/apt")
    stanzas: list[dict[str, str]] = []
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]:
        if path.suffix == ".sources" and path.is_file():
            for block in re.split(r"\n\s*\n", path.read_text()):
                fields = {}
                for line in block.splitlines():
                    if ":" in line and not line.startswith("#") and not line[:1].isspace():
                        key, _, value = line.partition(":")
                        fields[key.strip().lower()] = value.strip()
                stanzas += [fields] if fields else []
        elif path.name.endswith(".list") and path.is_file():
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
                if len(words) >= 4 and words[0] == "deb":
                    fields = dict(zip(("types", "uris", "suites"), words[:3], strict=True))
                    stanzas.append({**fields, "components": " ".join(words[3:])})
    return stanzas


def debian_sources(suite: str = SUITE) -> tuple[str, str]:
    """(mirror URL, deb822 sources for the image) from this machine's apt configuration: its stanzas for
    `suite`, `suite`-updates and `suite`-security; the mirror is the one serving `suite` itself."""
    ours = {suite, f"{suite}-updates", f"{suite}-security"}
    out, mirror = [], ""
    for s in _apt_stanzas():
        suites = [x for x in s.get("suites", "").split() if x in ours]
        if "deb" not in s.get("types", "").split() or not suites or s.get("enabled", "yes") == "no":
            continue
        uri = s["uris"].split()[0]
        mirror = mirror or (uri if suite in suites else "")
        lines = [
            "Types: deb",
            f"URIs: {uri}",
            f"Suites: {' '.join(suites)}",
            f"Components: {s.get('components', 'main')}",
        ]
        # debian-archive-keyring is in the image too, at the same path
        if s.get("signed-by", "").startswith("/usr/share/keyrings/"):
            lines.append(f"Signed-By: {s['signed-by']}")
        out.append("\n".join(lines))
    if not mirror:
        raise ImageError(f"no apt source for Debian {suite} in /etc/apt (sources.list, sources.list.d/)")
    return mirror, "\n\n".join(out) + "\n"


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex over slash-separated relative paths ('**' spans folders)."""
    out, i, pattern = "", 0, pattern.strip("/")
    tokens = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    while i < len(pattern):
        token = next((t for t in tokens if pattern.startswith(t, i)), None)
        out += tokens[token] if token else re.escape(pattern[i])
        i += len(token) if token else 1
    return re.compile(out)


def _ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for include, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            verdict = not include
    return verdict


def context_files(ignorefile: Path, root: Path = REPO_ROOT) -> list[str]:
    """Relative paths of the files a build context keeps under `ignorefile` (the .dockerignore syntax
    the project uses: globs, '**', '!' exceptions, the last match wins)."""
    lines = [line.strip() for line in ignorefile.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    rules = [(p.startswith("!"), _ignore_regex(p.lstrip("!").strip())) for p in patterns]
    exceptions = [p.lstrip("!").strip().strip("/") for p in patterns if p.startswith("!")]
    kept = []
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        rel = "" if rel == "." else rel + "/"
        # Descend only where an exception could keep something (.venv alone is gigabytes).
        dirs[:] = sorted(
            d for d in dirs if not _ignored(rel + d, rules) or any(e.startswith(f"{rel}{d}/") for e in exceptions)
        )
        kept += [rel + f for f in sorted(files) if not _ignored(rel + f, rules)]
    return kept


def _stage_context(spec: Spec) -> tuple[Path, str]:
    """Copy the Dockerfile's build context into the cache, every mtime fixed: (folder, content hash)."""
    files = context_files(DOCKER / f"{spec.dockerfile}.dockerignore")
    staged = _work(f"context-{spec.short}")
    digest = hashlib.sha256()
    for rel in files:
        source, target = REPO_ROOT / rel, staged / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        mode = 0o755 if os.stat(source).st_mode & stat.S_IXUSR else 0o644
        os.chmod(target, mode)
        digest.update(f"{rel}\0{mode:o}\0{_file_sha256(target)}\n".encode())
    for folder, _, names in os.walk(staged, topdown=False):
        for name in [*names, "."]:
            os.utime(os.path.join(folder, name), (CONTEXT_MTIME, CONTEXT_MTIME))
    return staged, digest.hexdigest()


def _key(spec: Spec, built: dict[str, Built], context_hash: str = "") -> str:
    """The content key: everything the image is made from."""
    base_id = built["base"].image_id if spec.needs_base else ""
    if spec.kind == "rootfs":
        mirror, sources = debian_sources()
        script = (HERE / "mkrootfs.sh").read_bytes()
        return _sha256(RECIPE, spec.ref, SUITE, ",".join(BASE_PACKAGES), mirror, sources, script)
    if spec.kind == "pause":
        gcc = _run(["gcc", "--version"]).splitlines()[0]
        return _sha256(RECIPE, spec.ref, (HERE / "pause.c").read_bytes(), gcc)
    if spec.kind == "tools":
        return _sha256(RECIPE, spec.ref, base_id, *TOOLS_PACKAGES)
    dockerfile = (DOCKER / spec.dockerfile).read_bytes()
    return _sha256(RECIPE, spec.ref, base_id, json.dumps(spec.args), dockerfile, context_hash)


# ---------------------------------------------------------------------------------------- builders


@contextlib.contextmanager
def _container(image: str) -> Iterator[tuple[str, Path]]:
    """A buildah working container from `image` ("scratch" for none), mounted: (id, mount point)."""
    ctr = _buildah("from", "--pull=never", image)
    try:
        yield ctr, Path(_buildah("mount", ctr))
    finally:
        with contextlib.suppress(ImageError):
            _buildah("rm", ctr)


def _commit(ctr: str, ref: str, *config: str) -> str:
    """Set the image config, unmount and commit the working container: the new image's ID."""
    _buildah("config", *config, ctr)
    _buildah("umount", ctr)
    return _buildah("commit", "--quiet", ctr, ref)


def _build_rootfs(spec: Spec, built: dict[str, Built], timings: dict[str, float]) -> str:
    """tests/infra/mkrootfs.sh (debootstrap), then a one-layer image from scratch."""
    mirror, sources = debian_sources()
    work = _work("rootfs")
    (work / "debian.sources").write_text(sources)
    start = time.monotonic()
    script = ["bash", str(HERE / "mkrootfs.sh"), str(work / "root"), SUITE, mirror, ",".join(BASE_PACKAGES)]
    _run([*script, str(work / "debian.sources")], log_file=cache_dir() / "logs" / "base.log")
    timings["rootfs_s"] = round(time.monotonic() - start, 1)
    with _container("scratch") as (ctr, mount):
        _run(["cp", "-a", f"{work / 'root'}/.", str(mount)])
        path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        image_id = _commit(ctr, spec.ref, "--env", path, "--env", "LANG=C.UTF-8", "--cmd", '["/bin/bash"]')
    _rmtree(work)
    return image_id


def _build_pause(spec: Spec, built: dict[str, Built], timings: dict[str, float]) -> str:
    """tests/infra/pause.c, compiled statically, alone in a scratch image (user 65535, as upstream's)."""
    work = _work("pause")
    _run(["gcc", "-static", "-Os", "-s", "-o", str(work / "pause"), str(HERE / "pause.c")])
    with _container("scratch") as (ctr, _):
        _buildah("copy", "--chmod", "0755", ctr, str(work / "pause"), "/pause")
        image_id = _commit(ctr, spec.ref, "--entrypoint", '["/pause"]', "--user", "65535:65535")
    _rmtree(work)
    return image_id


def _build_tools(spec: Spec, built: dict[str, Built], timings: dict[str, float]) -> str:
    """The base plus BIND's nslookup, dig and host (busybox's applets are there already), run as root.
    Not busybox's nslookup: since 1.31 it exits 1 when any search domain answers NXDOMAIN, which in a pod
    is always the case for `<job>-master-0` (only `<job>-master-0.<namespace>.svc.cluster.local`
    exists), so the training operator's init container would never see its master. BIND's stops at the
    first domain that answers (and needs 5 MB of the operator's 20Mi limit)."""
    with _container(BASE) as (ctr, _):
        install = f"apt-get -q update && apt-get -q install -y --no-install-recommends {' '.join(TOOLS_PACKAGES)}"
        script = f"{install} && rm -rf /var/lib/apt/lists/*"
        run = ["run", "--isolation", "chroot", "--network", "host", "--env", "DEBIAN_FRONTEND=noninteractive"]
        _buildah(*run, ctr, "--", "sh", "-c", script, log_file=cache_dir() / "logs" / "tools.log")
        return _commit(ctr, spec.ref, "--cmd", '["/bin/sh"]')


def _host_ca_bundle() -> Path:
    """The CA bundle this machine's own clients trust (pip's and OpenSSL's settings, else Debian's)."""
    for variable in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        if os.environ.get(variable) and Path(os.environ[variable]).is_file():
            return Path(os.environ[variable])
    return Path("/etc/ssl/certs/ca-certificates.crt")


def ensure_wheelhouse(lock: Path, timings: dict[str, float] | None = None) -> Path:
    """The wheelhouse (one folder for every lock) with every wheel of `lock`, checked against its hashes,
    and the package's build backend, downloaded by the base image's own Python and pip (the build's
    interpreter, tags and markers), once per lock content; pip skips files it already has. Needs the
    base image."""
    wheels = cache_dir() / "wheels"
    requires = list(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["build-system"]["requires"])
    # Which wheels fit depends on the base's Python, C library and architecture: the suite's.
    stamp = wheels / ".complete" / _sha256(lock.read_bytes(), *requires, SUITE, platform.machine())
    if stamp.is_file():
        return wheels
    stamp.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    # The host's CA bundle: where egress goes through a TLS-inspecting proxy, only it verifies the index.
    run = ["run", "--isolation", "chroot", "--network", "host"]
    run += ["-v", f"{wheels}:{WHEELS_IN_BUILD}", "-v", f"{lock.parent}:/locks:ro"]
    run += ["-v", f"{_host_ca_bundle()}:{HOST_CA_IN_BUILD}:ro", "--env", f"PIP_CERT={HOST_CA_IN_BUILD}"]
    run += ["--env", f"PIP_DEFAULT_TIMEOUT={os.environ.get('PIP_DEFAULT_TIMEOUT', '60')}"]
    pip = ["/tmp/pip/bin/pip", "download", "--disable-pip-version-check", "--progress-bar", "off"]
    pip += ["--only-binary=:all:", "--dest", WHEELS_IN_BUILD]
    logs = cache_dir() / "logs"
    # Two runs: the lock's pins carry hashes, and pip then wants one on every requirement of the run
    # (the build backend has none; the Dockerfiles install it without the lock too).
    with _container(BASE) as (ctr, _):
        _buildah(*run, ctr, "--", "python3", "-m", "venv", "/tmp/pip")
        locked = [*pip, "--require-hashes", "-r", f"/locks/{lock.name}"]
        _buildah(*run, ctr, "--", *locked, log_file=logs / f"wheels-{lock.stem}.log")
        _buildah(*run, ctr, "--", *pip, *requires, log_file=logs / f"wheels-{lock.stem}-build-backend.log")
    stamp.write_text(lock.name + "\n")
    if timings is not None:
        timings["wheels_s"] = round(time.monotonic() - start, 1)
    return wheels


def _build_dockerfile(spec: Spec, timings: dict[str, float], context: Path) -> str:
    """buildah bud of one of the project's Dockerfiles, the local base and the wheelhouse passed in."""
    wheels = ensure_wheelhouse(DOCKER / spec.lock, timings)
    iidfile = context.parent / f"{spec.short}.iid"
    args = [*spec.args, ("PIP_FIND_LINKS", WHEELS_IN_BUILD), ("PIP_NO_INDEX", "1")]
    start = time.monotonic()
    # --layers: buildah's layer cache (off by default); --pull=never: the base is local, nothing else is.
    bud = ["bud", "--isolation", "chroot", "--network", "host", "--layers", "--pull=never", "--force-rm"]
    bud += ["-f", str(DOCKER / spec.dockerfile), "-t", spec.ref, "--iidfile", str(iidfile)]
    bud += ["-v", f"{wheels}:{WHEELS_IN_BUILD}:ro", *(f"--build-arg={k}={v}" for k, v in args)]
    _buildah(*bud, str(context), log_file=cache_dir() / "logs" / f"{spec.short}.log")
    timings["bud_s"] = round(time.monotonic() - start, 1)
    return iidfile.read_text().strip()


# ---------------------------------------------------------------------------------- the OCI layout


def _image_id(ref: str) -> str:
    """The ID (sha256:<hex>) of `ref` in buildah's storage, or "" when it is not there."""
    with contextlib.suppress(ImageError, IndexError):
        found = _buildah("images", "--no-trunc", "--format", "{{.ID}}", ref).splitlines()[0]
        return "sha256:" + found.removeprefix("sha256:")
    return ""


def _chain_id(diff_ids: list[str]) -> str:
    """The chain ID of the top layer: the name containerd gives the snapshot of an unpacked image."""
    chain = diff_ids[0]
    for diff in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {diff}".encode()).hexdigest()
    return chain


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _push(spec: Spec, image_id: str) -> tuple[str, list[tuple[str, int]], str]:
    """Copy the image out of buildah's storage into the cache's OCI layout, layers uncompressed:
    (manifest digest, layers, chain ID). skopeo, not `buildah push`: buildah 1.28 gzips every layer for
    an `oci:` destination whatever --disable-compression says (and again on every push), while skopeo
    keeps them as they are and skips the blobs the layout has, so after a change in `clusterfit/` only
    the new layers are written (seconds, not the 80 s of reading 6 GB)."""
    storage = f"containers-storage:[overlay@{cache_dir() / 'storage'}+{_runroot()}]@{image_id.removeprefix('sha256:')}"
    copy = ["skopeo", "copy", "--quiet", "--remove-signatures", "--dest-oci-accept-uncompressed-layers"]
    _run([*copy, storage, f"oci:{_layout()}:{spec.short}"])
    index = _read_json(_layout() / "index.json")
    (entry,) = [m for m in index["manifests"] if m.get("annotations", {}).get(OCI_REF_NAME) == spec.short]
    manifest = _read_json(_blob(entry["digest"]))
    config = _read_json(_blob(manifest["config"]["digest"]))
    layers = [(layer["digest"], int(layer["size"])) for layer in manifest["layers"]]
    if manifest["config"]["digest"] != image_id:
        raise ImageError(f"{spec.ref}: copied config {manifest['config']['digest']}, built {image_id}")
    if [d for d, _ in layers] != config["rootfs"]["diff_ids"]:
        raise ImageError(f"{spec.ref}: copied layers are not the uncompressed ones: {manifest['layers']}")
    return entry["digest"], layers, _chain_id(config["rootfs"]["diff_ids"])


def _collect_garbage() -> None:
    """Drop from the layout what no image's state refers to: index entries of earlier builds (skopeo
    keeps a replaced entry, nameless) and their blobs."""
    states = cached().values()
    index_path = _layout() / "index.json"
    index = _read_json(index_path)
    manifests = {s.manifest for s in states}
    index["manifests"] = [m for m in index["manifests"] if m["digest"] in manifests]
    partial = index_path.with_suffix(".partial")
    partial.write_text(json.dumps(index))
    os.replace(partial, index_path)
    keep = {digest for s in states for digest in (s.manifest, s.image_id, *(d for d, _ in s.layers))}
    for blob in _blob("sha256:0").parent.iterdir():
        if f"sha256:{blob.name}" not in keep:
            blob.unlink()


# ------------------------------------------------------------------------------------------- build


def _read_state(spec: Spec) -> Built | None:
    try:
        state = Built(**_read_json(_state_path(spec)))
    except (OSError, ValueError, TypeError):
        return None
    state.layers = [(d, s) for d, s in state.layers]
    return state


def _write_state(built: Built) -> None:
    path = _state_path(spec_of(built.name))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({**asdict(built), "cached": False}, indent=1) + "\n")
    os.replace(partial, path)


def _blobs_present(state: Built) -> bool:
    """Are the image's manifest, config and layers all in the OCI layout?"""
    blobs = [(state.manifest, None), (state.image_id, None), *state.layers]
    return all(_blob(d).is_file() and (size is None or _blob(d).stat().st_size == size) for d, size in blobs)


def _make(spec: Spec, built: dict[str, Built], force: bool, log: Callable[[str], None]) -> Built:
    """The image from the cache when its key matches, else built (buildah reuses its layer cache) and
    pushed into the OCI layout."""
    context, context_hash = _stage_context(spec) if spec.kind == "dockerfile" else (None, "")
    key = _key(spec, built, context_hash)
    state = _read_state(spec)
    if not force and state and state.key == key and _blobs_present(state):
        state.cached = True
        return state
    timings: dict[str, float] = {}
    start = time.monotonic()
    # Built before but its blobs are gone from the layout: copy it again, do not rebuild it.
    in_storage = state is not None and not force and state.key == key and _image_id(spec.ref) == state.image_id
    image_id = state.image_id if state and in_storage else ""
    if not image_id:
        log(f"{spec.short}: building {spec.ref}")
        if context is not None:
            image_id = _build_dockerfile(spec, timings, context)
        else:
            builder = {"rootfs": _build_rootfs, "pause": _build_pause, "tools": _build_tools}[spec.kind]
            image_id = builder(spec, built, timings)
        image_id = "sha256:" + image_id.removeprefix("sha256:")
        timings["build_s"] = round(time.monotonic() - start, 1)
    start = time.monotonic()
    manifest, layers, chain_id = _push(spec, image_id)
    timings["push_s"] = round(time.monotonic() - start, 1)
    size = sum(s for _, s in layers)
    result = Built(spec.short, spec.ref, key, image_id, manifest, layers, chain_id, size, timings)
    _write_state(result)
    log(f"{spec.short}: built {spec.ref}, {size / 2**20:.0f} MiB, {timings}")
    return result


def build(
    names: Iterable[str] | None = None, *, force: bool = False, log: Callable[[str], None] = _log
) -> dict[str, Built]:
    """Build, or take from the cache, the named images (default: all) and the base they need; each ends
    up in buildah's storage and in the cache's blob store. {short name: Built}."""
    for program in ("buildah", "skopeo", "debootstrap", "gcc"):
        _check_program(program)
    built: dict[str, Built] = {}
    with _locked():
        _prepare_storage()
        for spec in _with_dependencies(names):
            built[spec.short] = _make(spec, built, force, log)
        if any(not b.cached for b in built.values()):
            # Images that lost their name to a rebuild, the layers only they used, their blobs.
            _buildah("rmi", "--prune")
            _collect_garbage()
    return built


def cached() -> dict[str, Built]:
    """The state of every image built so far (nothing checked, nothing built)."""
    return {short: state for short in ALL if (state := _read_state(SPECS[short]))}


def prune(*, everything: bool = False) -> None:
    """Drop image layers that no image name uses; everything: buildah's storage, the OCI layout and the
    state too (the wheelhouse stays)."""
    with _locked():
        _prepare_storage()
        if not everything:
            _buildah("rmi", "--prune")
            return
        _buildah("rmi", "--all", "--force")
        for sub in ("storage", "oci", "archives", "state", "work"):
            _rmtree(cache_dir() / sub)


# ---------------------------------------------------------------------------------- tar streams


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, path: Path | None = None) -> None:
    """One regular file into a tar stream, from bytes or from a file."""
    info = tarfile.TarInfo(name)
    info.mode, info.mtime = 0o644, CONTEXT_MTIME
    if path is not None:
        info.size = path.stat().st_size
        with path.open("rb") as f:
            tar.addfile(info, f)
    else:
        assert data is not None
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


@contextlib.contextmanager
def _tar_stream(out: IO[bytes]) -> Iterator[tarfile.TarFile]:
    """A tar writer onto a stream (a pipe: no seeking), in large blocks: the layers are gigabytes."""
    with tarfile.open(fileobj=out, mode="w|", bufsize=COPY_BUFFER) as tar:
        tar.copybufsize = COPY_BUFFER  # type: ignore[attr-defined]  # set by TarFile.__init__, not in the stubs
        yield tar


def write_docker_archive(state: Built, out: IO[bytes]) -> None:
    """The image as a docker-archive (docker save's format: manifest.json naming it by its reference,
    its config and uncompressed layers), written to a stream; `ctr images import` reads it and names
    the image the way the kubelet looks it up."""
    hexes = [d.removeprefix("sha256:") for d, _ in state.layers]
    config = f"{state.image_id.removeprefix('sha256:')}.json"
    manifest = [{"Config": config, "RepoTags": [state.ref], "Layers": [f"{h}.tar" for h in hexes]}]
    with _tar_stream(out) as tar:
        _add(tar, "manifest.json", json.dumps(manifest).encode())
        _add(tar, config, path=_blob(state.image_id))
        for digest in dict.fromkeys(d for d, _ in state.layers):  # a layer may repeat (empty ones)
            _add(tar, f"{digest.removeprefix('sha256:')}.tar", path=_blob(digest))


def write_oci_update(state: Built, name: str, have: set[str], out: IO[bytes]) -> None:
    """The image as an OCI layout tar that names it `name` and leaves out the blobs in `have` (the
    ones containerd already holds), written to a stream."""
    manifest_size = _blob(state.manifest).stat().st_size
    entry = {"mediaType": OCI_MANIFEST, "digest": state.manifest, "size": manifest_size}
    index = {"schemaVersion": 2, "manifests": [{**entry, "annotations": {CONTAINERD_NAME: name}}]}
    with _tar_stream(out) as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(tar, "index.json", json.dumps(index).encode())
        layers = [d for d in dict.fromkeys(d for d, _ in state.layers) if d not in have]
        for digest in [state.manifest, state.image_id, *layers]:
            _add(tar, f"blobs/sha256/{digest.removeprefix('sha256:')}", path=_blob(digest))


def export_archive(name: str, path: Path | None = None) -> Path:
    """A docker-archive file of a built image (default: <cache>/archives/<short>.tar), for
    `ctr -n k8s.io images import FILE` or `docker load`; rewritten only when the image changed."""
    state = _read_state(spec_of(name))
    if state is None or not _blobs_present(state):
        raise ImageError(f"{name} is not built: run `python -m tests.infra.images build {name}`")
    path = path or cache_dir() / "archives" / f"{state.name}.tar"
    stamp = path.with_name(f".{path.name}.id")
    if path.is_file() and stamp.is_file() and stamp.read_text() == state.image_id:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with _locked(shared=True), partial.open("wb") as out:
        write_docker_archive(state, out)
    os.replace(partial, path)
    stamp.write_text(state.image_id)
    return path


# ------------------------------------------------------------------------------------------ import


@dataclass
class Containerd:
    """A running containerd, as `ctr` reaches it: socket, namespace and the snapshotter to unpack for
    (None: containerd's default)."""

    address: str
    namespace: str = DEFAULT_NAMESPACE
    snapshotter: str | None = None

    def ctr(self, *args: str, timeout: float = 900) -> str:
        """`ctr` against it: stdout, or ImageError."""
        return _run(["ctr", "--address", self.address, "--namespace", self.namespace, *args], timeout=timeout)

    def images(self) -> dict[str, str]:
        """{image name: target digest}."""
        rows = [line.split() for line in self.ctr("images", "ls").splitlines()[1:]]
        return {row[0]: row[2] for row in rows if len(row) >= 3}

    def image_id(self, target: str) -> str:
        """The config digest (image ID) of an image's target: a manifest, or an index holding one."""
        document = json.loads(self.ctr("content", "get", target))
        if "manifests" in document:
            document = json.loads(self.ctr("content", "get", document["manifests"][0]["digest"]))
        return str(document["config"]["digest"])

    def unpacked(self, chain_id: str) -> bool:
        """Does the snapshotter hold this layer chain (the image is unpacked)?"""
        args = ["snapshots", *(["--snapshotter", self.snapshotter] if self.snapshotter else []), "info", chain_id]
        try:
            self.ctr(*args, timeout=60)
        except ImageError:
            return False
        return True

    def blobs(self) -> set[str]:
        """Digests of every blob in the content store."""
        return set(self.ctr("content", "ls", "--quiet").split())

    def load(self, write: Callable[[IO[bytes]], None]) -> None:
        """`ctr images import -` (and unpack) of the tar stream that `write` writes."""
        _check_program("ctr")
        argv = ["ctr", "--address", self.address, "--namespace", self.namespace, "images", "import"]
        argv += [*(["--snapshotter", self.snapshotter] if self.snapshotter else []), "-"]
        with tempfile.TemporaryFile() as output:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT)
            assert process.stdin is not None
            try:
                write(process.stdin)
                process.stdin.close()
            except BrokenPipeError:
                pass  # ctr gave up: its exit status and output say why
            finally:
                returncode = process.wait()
            if returncode:
                output.seek(0)
                message = output.read().decode(errors="replace")[-3000:]
                raise ImageError(f"{' '.join(argv)} exited {returncode}:\n{message}")


def containerd_name(ref: str, names: Iterable[str]) -> str | None:
    """Which of containerd's image names is `ref`: the same string, or, for a reference without a
    domain (the kubelet passes `clusterfit/clusterfit:0.1.0-cpu`), that reference behind the domain that
    containerd's import and the kubelet normalize it to (Docker Hub's)."""
    names = list(names)
    if ref in names:
        return ref
    first = ref.split("/")[0]
    if "." in first or ":" in first or first == "localhost":
        return None
    for name in names:
        domain, _, rest = name.partition("/")
        if "." in domain and rest in (ref, f"library/{ref}"):
            return name
    return None


def _import_one(target: Containerd, state: Built, present: dict[str, str], force: bool) -> str:
    """Import one image unless the target has it: "" when it had it, else how it was sent."""
    name = containerd_name(state.ref, present)
    same = name is not None and not force and target.image_id(present[name]) == state.image_id
    if same and target.unpacked(state.chain_id):
        return ""
    if name is None or force:
        # Only a docker-archive gets the name normalized, as the kubelet will ask for it.
        target.load(functools.partial(write_docker_archive, state))
        return "whole"
    target.load(functools.partial(write_oci_update, state, name, target.blobs()))
    return "changed blobs"


def import_images(
    containerd_address: str,
    names: Iterable[str] | None = None,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    snapshotter: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = _log,
) -> dict[str, str]:
    """Import the named images (default: all; built first when they changed) into the containerd at
    `containerd_address`, unpacked for `snapshotter` (containerd's default when None). An image that
    containerd holds under its name with the same image ID, unpacked, is left alone; an older one under
    that name gets only the blobs containerd lacks. {short name: containerd's name for it}."""
    wanted = [spec_of(n).short for n in (ALL if names is None else names)]
    built = build(wanted, log=log)
    target = Containerd(containerd_address, namespace, snapshotter)
    out = {}
    with _locked(shared=True):
        present = target.images()
        for short in wanted:
            state, start = built[short], time.monotonic()
            how = _import_one(target, state, present, force)
            if how:
                present = target.images()
            name = containerd_name(state.ref, present)
            if name is None or target.image_id(present[name]) != state.image_id:
                raise ImageError(f"{state.ref}: imported, yet containerd has no image {state.image_id} by that name")
            out[short] = name
            if how:
                log(f"{short}: imported ({how}) as {name} in {time.monotonic() - start:.1f}s")
    return out


# ------------------------------------------------- a throwaway containerd, to check the images


class ScratchContainerd(Containerd):
    """A containerd of its own (config, root, state and socket in one folder; no CRI plugin) to import
    images into and run them with `ctr run`, as a check. Needs root, containerd and runc.

        with ScratchContainerd() as ctrd:
            names = import_images(ctrd.address, ["pause"])
            ctrd.run(names["pause"], "/pause", "-v")
    """

    def __init__(self, folder: Path | None = None) -> None:
        folder = Path(folder or tempfile.mkdtemp(prefix="ctrd-", dir="/var/tmp"))
        super().__init__(str(folder / "containerd.sock"))
        self.folder = folder
        self._process: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        f = self.folder
        return (
            f'version = 2\nroot = "{f}/root"\nstate = "{f}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            f'[debug]\n  address = ""\n[plugins."io.containerd.internal.v1.opt"]\n  path = "{f}/opt"\n'
        )

    def start(self, timeout: float = 60) -> None:
        """Start containerd and wait until it answers."""
        for program in ("containerd", "ctr", "runc"):
            _check_program(program)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "config.toml").write_text(self._config())
        argv = ["containerd", "--config", str(self.folder / "config.toml")]
        with (self.folder / "containerd.log").open("wb") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._process = process
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ImageError(f"containerd exited {process.returncode}: {self.log_tail()}")
            if Path(self.address).exists():
                with contextlib.suppress(ImageError):
                    self.ctr("version", timeout=10)
                    return
            time.sleep(0.2)
        raise ImageError(f"containerd did not answer on {self.address} within {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.folder / "containerd.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def run(
        self, image: str, *argv: str, options: Iterable[str] = (), timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """`ctr run --rm [options] image [argv]` with the image's config (user, env, workdir); argv, when
        given, replaces entrypoint and command alike (ctr 1.6 has no --entrypoint). Not checked: the
        caller looks at returncode, stdout and stderr."""
        ctr = ["ctr", "--address", self.address, "--namespace", self.namespace]
        cid = f"check-{os.getpid()}-{time.monotonic_ns()}"
        return subprocess.run(
            [*ctr, "run", "--rm", *options, image, cid, *argv], capture_output=True, text=True, timeout=timeout
        )

    def stop(self, remove: bool = True) -> None:
        """Stop containerd; with `remove`, delete its folder (unmounting what a killed task left)."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None
        if remove:
            _rmtree(self.folder)

    def __enter__(self) -> ScratchContainerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------- CLI


def _print_table(states: dict[str, Built]) -> None:
    for short, s in states.items():
        print(f"{short:<11} {s.ref:<42} {s.image_id[7:19]} {s.size / 2**20:>7.0f} MiB  {json.dumps(s.timings)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.infra.images", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build what changed (default: every image)")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache matches")
    p = sub.add_parser("import", help="import into a containerd (building what changed first)")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--address", required=True, help="containerd's socket")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--snapshotter", default=None, help="containerd's default when not given")
    p.add_argument("--force", action="store_true", help="import whole even when containerd has the image")
    p = sub.add_parser("export", help="docker-archive files (building what changed first)")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--dir", type=Path, default=None, help="default: <cache>/archives")
    sub.add_parser("list", help="the images in the cache")
    p = sub.add_parser("prune", help="drop layers no image name uses")
    p.add_argument("--all", action="store_true", help="drop buildah's storage, the OCI layout and the state")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            _print_table(build(args.names or None, force=args.force))
        elif args.command == "import":
            target = {"namespace": args.namespace, "snapshotter": args.snapshotter, "force": args.force}
            refs = import_images(args.address, args.names or None, **target)
            for short, name in refs.items():
                print(f"{short:<11} {name}")
        elif args.command == "export":
            for short in build(args.names or None):
                if not args.names or short in {spec_of(n).short for n in args.names}:
                    print(export_archive(short, args.dir / f"{short}.tar" if args.dir else None))
        elif args.command == "list":
            _print_table(cached())
        else:
            prune(everything=args.all)
    except ImageError as error:
        print(f"images: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
