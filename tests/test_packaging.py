"""The release wheel: one abi3 build that installs and chats on every CPython the project supports."""

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import ROOT

# Release builds from scratch: the wheel (linked with zig) and the sdist's, each a few minutes on 2 cores.
pytestmark = pytest.mark.timeout(1800)

# The oldest supported CPython and the newest; the one running the tests is covered by the rest.
OTHER_PYTHONS = ("python3.9", "python3.13")



def find_python(name: str):
    """An interpreter that runs: on the PATH, or installed by pyenv without being selected."""
    candidates = [shutil.which(name)] + sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{name[6:]}*/bin/{name}")))
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "--version"], capture_output=True, timeout=30).returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheels")
    # What a release publishes: a manylinux2014 wheel (glibc 2.17 and later), linked with zig (ziglang,
    # from PyPI) so that this machine's newer glibc leaves no newer symbol in it; stripped.
    # maturin runs `python3 -m ziglang` for zig: this environment's python3 comes first on the PATH.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    build = subprocess.run([sys.executable, "-m", "maturin", "build", "--release", "--zig", "--compatibility", "manylinux2014",
                            "--strip", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    assert build.returncode == 0, build.stderr[-3000:]
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_is_abi3_for_python_3_9_and_later_and_manylinux(wheel):
    assert "-cp39-abi3-" in wheel.name, wheel.name
    assert "manylinux_2_17_x86_64" in wheel.name or not wheel.name.endswith("x86_64.whl"), wheel.name
    assert wheel.stat().st_size < 5_000_000, f"{wheel.stat().st_size} bytes: not stripped?"


def test_the_sdist_builds_and_installs_in_a_fresh_environment(tmp_path):
    """The source distribution has everything a build needs (here: with Rust, as pip builds it)."""
    out = tmp_path / "sdist"
    built = subprocess.run([sys.executable, "-m", "maturin", "sdist", "--out", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (sdist,) = out.glob("p2pchat-*.tar.gz")
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=120)
    bin_dir = env_dir / ("Scripts" if sys.platform == "win32" else "bin")
    # Its own build directory, so it shares no compiled state with the checkout's target/.
    env = dict(os.environ, CARGO_TARGET_DIR=str(tmp_path / "target"))
    pip = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(sdist)], capture_output=True, text=True,
                         timeout=1800, env=env)
    assert pip.returncode == 0, pip.stderr[-3000:]
    chat = subprocess.run([str(bin_dir / "python"), str(ROOT / "tests" / "wheel_smoke.py")], capture_output=True, text=True,
                          timeout=60)
    assert chat.returncode == 0 and chat.stdout.startswith("hello from 3."), chat.stderr[-2000:]


def test_the_wheel_ships_no_benchmark_helpers(wheel):
    """The benchmark's load generators (cargo feature `bench`) stay out of what users install."""
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        (library,) = [name for name in archive.namelist() if "_core" in name and name.endswith(".so")]
        binary = archive.read(library)
    assert b"_bench_fanout" not in binary and b"_BenchRawLinks" not in binary
    assert b"default_data_dir" in binary, "a function the wheel does have is found the same way"


def test_the_wheel_carries_its_license_and_says_it_is_typed(wheel):
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
        licenses = [name for name in names if ".dist-info/" in name and name.rsplit("/", 1)[-1] == "LICENSE"]
        assert licenses, f"no LICENSE in the wheel's metadata: {names}"
        assert "Permission is hereby granted" in archive.read(licenses[0]).decode()
    assert "Classifier: License :: OSI Approved :: MIT License" in text
    assert "Classifier: Typing :: Typed" in text
    # What the tests need (tests/requirements.txt) is not offered to users as an extra.
    assert "Provides-Extra" not in text and "Requires-Dist: pytest" not in text, text
    assert any(name.endswith("p2pchat/py.typed") for name in names), "the stubs are marked as typed"


@pytest.mark.parametrize("python", OTHER_PYTHONS)
def test_the_wheel_installs_and_chats_on_another_cpython(wheel, python, tmp_path):
    interpreter = find_python(python)
    if interpreter is None:
        pytest.skip(f"{python} is not installed here")
    env_dir = tmp_path / "venv"
    created = subprocess.run([interpreter, "-m", "venv", str(env_dir)], capture_output=True, text=True, timeout=120)
    if created.returncode != 0:
        pytest.skip(f"{python} cannot create a virtual environment: {created.stderr.strip()[-200:]}")
    bin_dir = env_dir / ("Scripts" if sys.platform == "win32" else "bin")
    # As on a machine without Rust: no cargo or rustc to be found, so nothing can be built from source.
    without_rust = {k: v for k, v in os.environ.items() if not k.startswith(("CARGO", "RUSTUP"))}
    without_rust["PATH"] = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                                           if not (Path(d) / "cargo").exists() and not (Path(d) / "rustc").exists())
    pip = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--only-binary", ":all:", str(wheel)],
                         capture_output=True, text=True, timeout=300, env=without_rust)
    assert pip.returncode == 0, pip.stderr[-2000:]
    chat = subprocess.run([str(bin_dir / "python"), str(ROOT / "tests" / "wheel_smoke.py")], capture_output=True, text=True,
                          timeout=60, env=without_rust)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.startswith("hello from 3."), chat.stdout
    version = subprocess.run([str(bin_dir / "p2pchat"), "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.strip().startswith("p2pchat "), version
