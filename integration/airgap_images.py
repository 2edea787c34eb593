"""Prepares what the compose stack needs on a machine that cannot pull images: a Debian bookworm
base image made by debootstrap (from the machine's own Debian mirror) and `docker import`, and
the wheelhouses the Dockerfiles install from instead of the package index.

    python integration/airgap_images.py [--gpu] [--only base|wheels]
    docker-compose -f compose.yaml -f compose.airgap.yaml up -d --build

Run it as root (debootstrap) with Python 3.11, the Python of the images (Debian bookworm's and
python:3.11-slim's), so that the wheels it builds or downloads are theirs. The wheelhouses go to
integration/wheelhouse/<image>/, where each Dockerfile looks (the default of its WHEELHOUSE build
argument); an image whose folder holds wheels installs from them alone. Nothing here needs a
certificate inside an image: the host downloads, the images only read files.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("airgap_images")

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / "integration" / "wheelhouse"
# The tags compose.airgap.yaml (and compose.gpu.yaml's PAGODA_CUDA_BASE_IMAGE) name.
BASE_IMAGE = "pagoda-local/bookworm-python:12"
DEV_BASE_IMAGE = "pagoda-local/bookworm-python-dev:12"
# python3-venv: the Dockerfiles install into /opt/venv (Debian's Python refuses system-wide pip).
BASE_PACKAGES = ["python3", "python3-venv"]
# Triton compiles its launchers at run time: a C compiler and Python's headers (the CUDA image).
DEV_PACKAGES = [*BASE_PACKAGES, "gcc", "libc6-dev", "python3-dev"]
FALLBACK_MIRROR = "http://deb.debian.org/debian"
IMAGE_PYTHON = (3, 11)
# torch pinned in every environment: unpinned, it resolves to a multi-GB CUDA build. PyPI has
# only the CUDA build of 2.13.0; `torch==2.13.0` takes 2.13.0+cpu wherever one is offered (PyTorch's
# CPU wheels, found through its index page, or a find-links folder of pip's configuration), and
# `===2.13.0` matches the plain version alone: PyPI's CUDA build.
CPU_TORCH = ["--find-links", "https://download.pytorch.org/whl/cpu/torch/", "torch==2.13.0"]
CUDA_TORCH = "torch===2.13.0"
FASTCHAT_REQUIREMENTS = ROOT / "integration" / "fastchat-requirements.txt"
OPEN_WEBUI_REQUIREMENTS = ROOT / "integration" / "open-webui-requirements.txt"


@dataclass(frozen=True)
class Wheelhouse:
    name: str  # its folder under integration/wheelhouse/, named after the image
    requirements: list[str]  # what `pip wheel` gets on this host
    # What the Dockerfile installs, as the image's pip sees it (integration/ is at /integration).
    image_requirements: list[str]
    gpu: bool = False


WHEELHOUSES = [
    # setuptools: the Dockerfile builds Pagoda from its source, without build isolation's index.
    Wheelhouse("pagoda", [*CPU_TORCH, f"{ROOT}[fastchat]", "setuptools>=69"],
               ["torch==2.13.0", "pagoda[fastchat]", "setuptools>=69"]),
    Wheelhouse("fastchat", [*CPU_TORCH, "-r", str(FASTCHAT_REQUIREMENTS)],
               ["torch==2.13.0", "-r", f"/integration/{FASTCHAT_REQUIREMENTS.name}"]),
    Wheelhouse("open-webui", [*CPU_TORCH, "-r", str(OPEN_WEBUI_REQUIREMENTS)],
               ["torch==2.13.0", "-r", f"/integration/{OPEN_WEBUI_REQUIREMENTS.name}"]),
    Wheelhouse("pagoda-cuda", [CUDA_TORCH, f"{ROOT}[gpu,fastchat]", "setuptools>=69"],
               [CUDA_TORCH, "pagoda[gpu,fastchat]", "setuptools>=69"], gpu=True),
]
# pip resolves for the Python it runs on: this host's 3.11.x may skip a dependency that the
# image's 3.11.y needs (an environment marker: redis needs async-timeout below 3.11.3, and Debian
# bookworm has 3.11.2), or take a release that needs a newer 3.11 than the image's (soupsieve
# 4.1 wants 3.11.5). A dry run in the image finds each gap; one is closed per round.
MAX_COMPLETION_ROUNDS = 10
MISSING = re.compile(r"No matching distribution found for ([^;\s]+)")
WRONG_PYTHON = re.compile(r"Package '([^']+)' requires a different Python: (\S+) not in")
# Written into a wheelhouse once it installs in the image: the digest of what it was made for.
COMPLETE_STAMP = ".complete"


@dataclass(frozen=True)
class Gap:
    """What the image's pip found missing in a wheelhouse."""

    requirement: str
    image_python: str | None = None  # set when the wheelhouse's release is too new for it


class Unavailable(RuntimeError):
    """Something this machine lacks, said in a way that tells the user what to do."""


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    logger.info("$ %s", " ".join(argv))
    return subprocess.run(argv, check=True, **kwargs)


def check_docker() -> None:
    docker = shutil.which("docker")
    if docker is None:
        raise Unavailable("Docker is not installed here: install it (Debian: apt-get install "
                          "docker.io docker-compose), start its daemon, then run this again.")
    info = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"],
                          check=False, capture_output=True, text=True)
    if info.returncode != 0:
        raise Unavailable("Docker is installed but its daemon does not answer: start it "
                          f"(`dockerd &` as root, or `systemctl start docker`).\n{info.stderr}")
    logger.info("Docker engine %s", info.stdout.strip())


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], check=False,
                          capture_output=True).returncode == 0


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses for bookworm (deb822 or one-line sources)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
            if uris and re.search(r"^Suites:.*\bbookworm\b(?!-)", stanza, re.MULTILINE):
                return uris.group(1)
        line = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.MULTILINE)
        if line:
            return line.group(1)
    return FALLBACK_MIRROR


def build_base_image(tag: str, packages: list[str]) -> None:
    if image_exists(tag):
        logger.info("base image %s exists: kept", tag)
        return
    if shutil.which("debootstrap") is None:
        raise Unavailable("debootstrap is not installed: apt-get install debootstrap")
    mirror = debian_mirror()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pagoda-rootfs-", dir="/var/tmp") as folder:
        rootfs = Path(folder) / "rootfs"
        logger.info("debootstrap bookworm (%s) from %s ...", ", ".join(packages), mirror)
        run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
             "bookworm", str(rootfs), mirror], stdout=subprocess.DEVNULL)
        # The package lists and downloaded .debs are of no use in an image.
        for leftover in ("var/lib/apt/lists", "var/cache/apt/archives"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        logger.info("docker import -> %s", tag)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(["docker", "import", "--change", "ENV LANG=C.UTF-8", "--change",
             'CMD ["/bin/bash"]', "-", tag], stdin=tar.stdout, stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise RuntimeError(f"tar of {rootfs} failed")
    logger.info("base image %s built in %.0f s", tag, time.monotonic() - started)


def pip_wheel(folder: Path, requirements: list[str]) -> None:
    """`pip wheel` downloads what has a wheel and builds what has only a source distribution."""
    run([sys.executable, "-m", "pip", "wheel", "--progress-bar", "off", "--wheel-dir",
         str(folder), *requirements], cwd=ROOT)


def first_gap(folder: Path, requirements: list[str]) -> Gap | None:
    """A dry run of the image's pip, without a network, on the wheelhouse: what it lacks first,
    or None when everything resolves."""
    script = ("python3 -m venv /tmp/venv && /tmp/venv/bin/pip install --dry-run --no-index "
              "--disable-pip-version-check --find-links /wheels " + " ".join(
                  f"'{requirement}'" for requirement in requirements))
    checked = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "-v", f"{folder}:/wheels:ro",
         "-v", f"{ROOT / 'integration'}:/integration:ro", BASE_IMAGE, "sh", "-c", script],
        check=False, capture_output=True, text=True)
    if checked.returncode == 0:
        return None
    if missing := MISSING.search(checked.stderr):
        return Gap(missing.group(1))
    if too_new := WRONG_PYTHON.search(checked.stderr):
        return Gap(too_new.group(1), image_python=too_new.group(2))
    raise RuntimeError(f"the wheelhouse {folder} does not install in {BASE_IMAGE}:\n"
                       f"{checked.stderr[-3000:]}")


def close_gap(folder: Path, gap: Gap) -> None:
    if gap.image_python is None:
        pip_wheel(folder, [gap.requirement])
        return
    # The newest release that the image's Python accepts, in place of the one it refuses.
    project = re.sub(r"[-_.]+", "_", gap.requirement).lower()
    for wheel in folder.glob("*.whl"):
        if wheel.name.lower().startswith(f"{project}-"):
            wheel.unlink()
    run([sys.executable, "-m", "pip", "download", "--progress-bar", "off", "--no-deps",
         "--only-binary=:all:", "--python-version", gap.image_python, "--dest", str(folder),
         gap.requirement], cwd=ROOT)


def requirements_digest(wheelhouse: Wheelhouse) -> str:
    """What a wheelhouse was made for: its requirements, the files they name, the Python."""
    texts = [*wheelhouse.requirements, sys.version]
    texts += [Path(name).read_text() for name in wheelhouse.requirements if Path(name).is_file()]
    texts.append((ROOT / "pyproject.toml").read_text())
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def fill_wheelhouse(wheelhouse: Wheelhouse) -> None:
    folder = WHEELHOUSE / wheelhouse.name
    stamp = folder / COMPLETE_STAMP
    if stamp.is_file() and stamp.read_text() == requirements_digest(wheelhouse):
        logger.info("wheelhouse %s is complete for its requirements: kept", wheelhouse.name)
        return
    stamp.unlink(missing_ok=True)
    if sys.version_info[:2] != IMAGE_PYTHON:
        raise Unavailable(f"wheels must be made with Python {'.'.join(map(str, IMAGE_PYTHON))}"
                          f" (the images' Python), not {sys.version.split()[0]}")
    started = time.monotonic()
    logger.info("wheelhouse %s ...", wheelhouse.name)
    pip_wheel(folder, wheelhouse.requirements)
    for _ in range(MAX_COMPLETION_ROUNDS):
        gap = first_gap(folder, wheelhouse.image_requirements)
        if gap is None:
            break
        logger.info("wheelhouse %s: for the image's Python %s", wheelhouse.name,
                    f"{gap.requirement} must be older (Python {gap.image_python})"
                    if gap.image_python else f"also needs {gap.requirement}")
        close_gap(folder, gap)
    else:
        raise RuntimeError(f"wheelhouse {wheelhouse.name}: still incomplete after "
                           f"{MAX_COMPLETION_ROUNDS} rounds")
    # The Dockerfiles build Pagoda from the source in their context: a wheel of it would go stale.
    for stale in folder.glob("pagoda-*.whl"):
        stale.unlink()
    stamp.write_text(requirements_digest(wheelhouse))
    wheels = list(folder.glob("*.whl"))
    size = sum(wheel.stat().st_size for wheel in wheels)
    logger.info("wheelhouse %s: %d wheels, %.0f MiB, checked in %s, in %.0f s", wheelhouse.name,
                len(wheels), size / 2**20, BASE_IMAGE, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true",
                        help="also the CUDA image's base (with gcc) and wheelhouse (~4 GB)")
    parser.add_argument("--only", choices=("base", "wheels"),
                        help="prepare only the base images or only the wheelhouses")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        check_docker()  # the wheelhouses are checked in the base image
        if args.only != "wheels":
            build_base_image(BASE_IMAGE, BASE_PACKAGES)
            if args.gpu:
                build_base_image(DEV_BASE_IMAGE, DEV_PACKAGES)
        if args.only != "base":
            for wheelhouse in WHEELHOUSES:
                if args.gpu or not wheelhouse.gpu:
                    fill_wheelhouse(wheelhouse)
    except Unavailable as missing:
        logger.error("%s", missing)
        return 2
    logger.info("ready: docker-compose -f compose.yaml -f compose.airgap.yaml up -d --build")
    return 0


if __name__ == "__main__":
    sys.exit(main())
