"""Shared fixtures: a real ComfyUI (in-process and as a headless server) and tiny Wan checkpoints.

ComfyUI is located by ``wan_w4a4.apps.runtime.find_comfyui`` (``COMFYUI_PATH``, the pack's parent
folders, ``~/ComfyUI``). Without one, every test that needs it is skipped with a reason starting
"ComfyUI not found" (``.ci/run`` fails when any is). Tests marked ``gpu`` are skipped without CUDA
and Triton. Where torchvision or torchaudio does not import, ``runtime.init_comfyui`` and
``runtime.server_command`` put stand-ins in their place (``runtime.install_stand_ins``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from wan_w4a4.minimodel.arch import TINY, WanArch, write_wan_checkpoint
from wan_w4a4.apps import runtime

TESTS_DIR = Path(__file__).resolve().parent
TEST_CUSTOM_NODES = TESTS_DIR / "comfy_custom_nodes"
BENCHMARKS_DIR = TESTS_DIR.parent / "benchmarks"
SERVER_START_TIMEOUT_S = 120


# --- torch threads ---------------------------------------------------------------------------

def pytest_configure(config):
    """One torch thread for the run and, through the environment, for the processes it starts (CLI runs,
    servers, benchmark children): the tensors here are tiny, and on a busy 2-core machine two threads made
    test_chunking, test_calibration_set and test_calibrate_node together 6x slower (117 s against 19 s on
    one). An OMP_NUM_THREADS set by the caller is kept."""
    import torch

    _TORCH_THREADS["default"] = torch.get_num_threads()
    if "OMP_NUM_THREADS" in os.environ:
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)


_TORCH_THREADS: dict = {}  # "default": torch's own thread count, before pytest_configure


@pytest.fixture
def torch_default_threads():
    """torch's own thread count inside the test (the one it had before ``pytest_configure``), for a
    test whose bound was measured with it."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(_TORCH_THREADS.get("default", n))
    yield
    torch.set_num_threads(n)


# --- markers ---------------------------------------------------------------------------------

def gpu_skip_reason() -> str | None:
    """None when a CUDA GPU and Triton are usable, else why not."""
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("triton") is None:
        return "needs Triton (not installed)"
    return None


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None:
        reason = gpu_skip_reason()
        if reason:
            pytest.skip(reason)
    if item.get_closest_marker("comfyui") is not None and runtime.find_comfyui() is None:
        pytest.skip(runtime.not_found_message())


# --- ComfyUI in-process ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def benchmark_module():
    """``benchmark_module("mini_motion")``: a script of ``benchmarks/``, imported as running it imports it
    (``benchmarks/`` on the path, so that it finds ``_checkout`` and its sibling scripts)."""
    def load(name: str):
        sys.path.insert(0, str(BENCHMARKS_DIR))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(BENCHMARKS_DIR))
    return load


@pytest.fixture(scope="session")
def comfyui() -> Path:
    """The ComfyUI source tree; skips the test (one line saying how to enable it) when none."""
    path = runtime.find_comfyui()
    if path is None:
        pytest.skip(runtime.not_found_message())
    return path


@pytest.fixture(scope="session")
def comfy_base_dir(tmp_path_factory) -> Path:
    """The in-process ComfyUI's base directory (models/, input/, output/ ...), private to the run."""
    return tmp_path_factory.mktemp("comfy_base")


@pytest.fixture(scope="session")
def comfy_nodes(comfyui, comfy_base_dir):
    """ComfyUI initialised in this process on the CPU; its ``nodes`` module."""
    return runtime.init_comfyui(comfyui, cpu=True, base_directory=comfy_base_dir)


@pytest.fixture(scope="session")
def wan_checkpoint_factory():
    """``make(models_dir, name, seed, arch=TINY) -> Path``: a random Wan2.2-I2V-shaped checkpoint
    in ``models_dir/diffusion_models``, which ComfyUI's UNETLoader detects as Wan."""
    def make(models_dir, name: str, seed: int, arch: WanArch = TINY) -> Path:
        return write_wan_checkpoint(Path(models_dir) / "diffusion_models" / name, arch, seed=seed)
    return make


@pytest.fixture(scope="session")
def tiny_wan_checkpoints(comfy_base_dir, wan_checkpoint_factory) -> dict:
    """A tiny high-noise and low-noise expert (different seeds) in the in-process ComfyUI's
    ``models/diffusion_models``: ``{"high": Path, "low": Path, "arch": WanArch}``."""
    models = comfy_base_dir / "models"
    return {"high": wan_checkpoint_factory(models, "tiny_wan_high.safetensors", seed=1),
            "low": wan_checkpoint_factory(models, "tiny_wan_low.safetensors", seed=2),
            "arch": TINY}


# --- ComfyUI as a headless server ------------------------------------------------------------

@dataclasses.dataclass
class ComfyServer:
    url: str
    base_dir: Path
    models_dir: Path
    log_path: Path
    proc: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, path: str, payload=None, timeout: float = 30.0):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from e

    def run_prompt(self, graph: dict, timeout: float = 120.0) -> dict:
        """POSTs an API-format graph, waits for it, returns its /history entry."""
        prompt_id = self.request("/prompt", {"prompt": graph})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.request(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") == "error" or not entry["status"]["completed"]:
                    raise AssertionError(f"prompt failed: {json.dumps(entry['status'])[:4000]}")
                return entry
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"prompt {prompt_id} not done after {timeout} s:\n{self.log()[-4000:]}")


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_server(comfyui, tmp_path: Path, *flags: str, cpu: bool = True):
    """A headless ComfyUI server (``main.py``, the real launcher) on a free loopback port, with a
    private base directory whose custom_nodes/ holds this pack (a symlink, loaded the real way) and the
    test-only nodes of tests/comfy_custom_nodes; ``cpu`` adds ``--cpu``, ``flags`` go to main.py as
    they are. Stopped on exit."""
    base = tmp_path / "comfy"
    custom = base / "custom_nodes"
    custom.mkdir(parents=True)
    (custom / "ComfyUI-WanW4A4").symlink_to(runtime.REPO_ROOT, target_is_directory=True)
    for f in TEST_CUSTOM_NODES.glob("*.py"):
        (custom / f.name).symlink_to(f)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    frontend = tmp_path / "frontend"  # empty: avoids needing the frontend package
    frontend.mkdir()
    port = _free_port()
    cmd = runtime.server_command(
        comfyui, *(("--cpu",) if cpu else ()), "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", str(base), "--disable-auto-launch", "--disable-api-nodes", "--front-end-root",
        str(frontend), "--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}", *flags)
    with launch_server(cmd, comfyui, base, tmp_path / "server.log", port) as server:
        yield server


@contextlib.contextmanager
def launch_server(cmd: list, cwd, base: Path, log_path: Path, port: int):
    """Runs ``cmd`` (a ComfyUI server on ``port`` with base directory ``base``), waits until its
    /system_stats answers (at most SERVER_START_TIMEOUT_S), yields its ``ComfyServer``; terminates it on exit."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = ComfyServer(f"http://127.0.0.1:{port}", base, base / "models", log_path, proc)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ComfyUI server exited ({proc.returncode}):\n{server.log()[-4000:]}")
            try:
                server.request("/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"ComfyUI server not up after {SERVER_START_TIMEOUT_S} s:\n"
                                         f"{server.log()[-4000:]}")
                time.sleep(0.25)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="session")
def comfy_server(comfyui, tmp_path_factory):
    """A headless CPU ComfyUI server (``start_server``), one for the session: its start (a ComfyUI
    import in a new process) is most of a server test's time. The tests using it only add files
    (identical experts under the same names, seeds 1 and 2) and post graphs; stopped at the end."""
    with start_server(comfyui, tmp_path_factory.mktemp("server")) as server:
        yield server


@pytest.fixture
def launch_comfy_server():
    """``launch(cmd, cwd, base, log_path, port)``: ``launch_server``, for a test that builds the server's
    command itself (``port``: a free loopback port, from the ``free_port`` fixture)."""
    return launch_server


@pytest.fixture
def free_port() -> int:
    return _free_port()


@pytest.fixture
def start_comfy_server(comfyui):
    """``start(tmp_path, *flags, cpu=True)``: a context manager starting ``start_server`` (GPU tests pass
    ``cpu=False`` to run ComfyUI as its launcher would on the GPU)."""
    return lambda tmp_path, *flags, cpu=True: start_server(comfyui, tmp_path, *flags, cpu=cpu)
