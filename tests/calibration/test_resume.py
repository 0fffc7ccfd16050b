"""Resumable calibration (calibration/resume.py): a run killed, crashed or cancelled and started again
with the same settings ends with the states and report of an uninterrupted run (CPU, tiny experts)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
from wan_w4a4.calibration import (
    CalibrationCancelled,
    CalibrationConfig,
    CalibrationError,
    calibrate,
    resume,
    synthetic_items,
)
from wan_w4a4.kernels import format as fmt

# Two blocks, one per pass: a kill can land inside a pass, between passes, and in either expert.
# The name is the command line's (CLI_FLAGS), so that the in-process reference serves the killed CLI runs too.
FAST = {"steps": 6, "bins": 2, "rank": 8, "alphas": (0.5,), "clip_grid": (1.0, 0.9, 0.8), "rows_per_bin": 32,
        "blocks_per_pass": 1, "name": "tiny"}
CLI_FLAGS = ["--items", "1", "--frames", "5", "--height", "32", "--width", "32", "--text-tokens", "8",
             "--steps", "6", "--bins", "2", "--rank", "8", "--alphas", "0.5", "--clip-grid", "1,0.9,0.8",
             "--rows-per-bin", "32", "--blocks-per-pass", "1", "--cpu", "--name", "tiny"]
TIMINGS = ("seconds", "capture_s", "quantize_s", "resources")


def _header_and_data(path) -> tuple[dict, bytes]:
    """(safetensors header as JSON, the data bytes after it). safetensors writes the header's
    ``__metadata__`` in a different key order in each process, so the file bytes of two identical
    states may differ only there; everything else must be equal byte for byte."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def assert_same_result(a_dir, b_dir, name):
    for expert in ("high", "low"):
        ha, da = _header_and_data(a_dir / f"{name}_{expert}.safetensors")
        hb, db = _header_and_data(b_dir / f"{name}_{expert}.safetensors")
        assert ha == hb, expert
        assert da == db, expert

    def numbers(path):
        def strip(d):
            if isinstance(d, dict):
                return {k: strip(v) for k, v in d.items() if k not in TIMINGS}
            return [strip(x) for x in d] if isinstance(d, list) else d
        data = json.loads(path.read_text())
        data.pop("states"), data["config"].pop("out_dir")
        return strip(data)

    assert numbers(a_dir / f"{name}_report.json") == numbers(b_dir / f"{name}_report.json")


def assert_not_states(work_dir):
    """The work folder's files are never W4A4 states: not listed by ComfyUI's model-folder scan (hidden
    folders included, by suffix) and refused by the state loader."""
    import folder_paths
    listed = folder_paths.filter_files_extensions(folder_paths.recursive_search(str(work_dir.parent))[0],
                                                  {fmt.SUFFIX})
    assert not [f for f in listed if work_dir.name in f]
    files = [p for p in work_dir.iterdir() if p.name != "lock"]
    assert any(p.name.endswith(resume.WORK_SUFFIX) for p in files)
    for p in files:
        with pytest.raises(fmt.W4A4FormatError):
            fmt.load_state(p)
        as_state = work_dir.parent / "renamed.safetensors"  # even under a state's name: not a W4A4 header
        as_state.write_bytes(p.read_bytes())
        with pytest.raises(fmt.W4A4FormatError):
            fmt.load_state(as_state)
        as_state.unlink()


# --- without ComfyUI -------------------------------------------------------------------------

def test_items_digest_sees_every_input():
    items = synthetic_items(1, frames=5, height=32, width=32, text_tokens=8, text_dim=64)
    base = resume.items_digest(items)
    assert resume.items_digest(synthetic_items(1, frames=5, height=32, width=32, text_tokens=8, text_dim=64)) == base
    items[0].positive[0][1]["concat_latent_image"][0, 0, 0, 0, 0] += 1e-3
    assert resume.items_digest(items) != base
    other = synthetic_items(1, frames=5, height=32, width=32, text_tokens=8, text_dim=64)
    other[0].seed = 7
    assert resume.items_digest(other) != base


def test_key_differences_name_the_setting():
    a = resume.run_key(CalibrationConfig(rank=8), [])
    b = resume.run_key(CalibrationConfig(rank=16, out_dir="elsewhere", overwrite=True), [])
    assert resume._differences(a, b) == ["config.rank: 8 then, 16 now"]  # out_dir, overwrite: not keyed


def test_lock_refuses_a_live_owner_and_takes_a_dead_ones(tmp_path):
    cfg = CalibrationConfig(out_dir=str(tmp_path), name="x")
    key = resume.run_key(cfg, [])
    lock = resume.work_path(cfg) / "lock"
    lock.parent.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{live.pid} {resume.socket.gethostname()}")
        with pytest.raises(resume.WorkFolderBusy, match=rf"process {live.pid}.*delete {lock}"):
            resume.WorkFolder.open(cfg, key)
        assert lock.read_text().startswith(str(live.pid))
    finally:
        live.kill()
        live.wait()
    work = resume.WorkFolder.open(cfg, key)  # the owner is dead now: a stale lock
    assert lock.read_text().split()[0] == str(os.getpid())
    with pytest.raises(resume.WorkFolderBusy):  # and ours holds while we run
        resume.WorkFolder.open(cfg, key)
    work.close(remove=True)
    assert not lock.parent.exists()


# --- the pipeline, in process --------------------------------------------------------------

def _items(n=1):
    return synthetic_items(n, frames=5, height=32, width=32, text_tokens=8)


@pytest.fixture(scope="module")
def models(comfy_nodes, tiny_wan_checkpoints):
    import comfy.sd
    return {e: comfy.sd.load_diffusion_model(str(tiny_wan_checkpoints[e])) for e in ("high", "low")}


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests run (conftest): CPU sums depend on the thread count
    try:
        calibrate(models["high"], models["low"], _items(), CalibrationConfig(**FAST, out_dir=str(out)))
    finally:
        torch.set_num_threads(n)
    return out


def _cancel_after(n):
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > n
    return cancel


def _layer_files(work):
    return sorted(p.name for p in work.glob(f"*.layer.*{resume.WORK_SUFFIX}"))


@pytest.mark.slow  # calibrations (and the module's reference run)
@pytest.mark.comfyui
def test_cancel_keeps_the_work_and_the_next_run_resumes(models, reference, tmp_path, caplog):
    cfg = CalibrationConfig(**FAST, out_dir=str(tmp_path))
    work = resume.work_path(cfg)
    # polls: 3 high sampling steps, 10 layers of block 1 (the last block's pass runs first), 3 steps again,
    # then block 0's layers
    with pytest.raises(CalibrationCancelled):
        calibrate(models["high"], models["low"], _items(), cfg, cancel=_cancel_after(3 + 10 + 3 + 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == [work.name]  # no state, no report
    assert len(_layer_files(work)) == 14 and not (work / "lock").exists()
    assert_not_states(work)

    # a damaged layer file is discarded and its layer quantized again
    damaged = work / [f for f in _layer_files(work) if ".blocks.0." in f][-1]  # one of the unfinished pass's
    damaged.write_bytes(damaged.read_bytes()[:-100])
    caplog.set_level("INFO", logger="wan_w4a4")
    calibrate(models["high"], models["low"], _items(), cfg)
    assert f"{damaged}: discarded" in caplog.text and "reused 3 layers" in caplog.text
    assert "pass 1/2: its 10 layers were finished in an earlier run" in caplog.text
    assert not work.exists()
    assert_same_result(reference, tmp_path, cfg.name)


@pytest.mark.slow  # calibrations (and the module's reference run)
@pytest.mark.comfyui
def test_other_settings_items_or_models_are_refused_until_restart(models, reference, tmp_path):
    cfg = CalibrationConfig(**FAST, out_dir=str(tmp_path))
    work = resume.work_path(cfg)
    with pytest.raises(CalibrationCancelled):
        calibrate(models["high"], models["low"], _items(), cfg, cancel=_cancel_after(3 + 4))
    saved = _layer_files(work)
    assert len(saved) == 4

    other = CalibrationConfig(**{**FAST, "rank": 4}, out_dir=str(tmp_path))
    with pytest.raises(CalibrationError, match=rf"{work} holds an interrupted calibration .*config\.rank: 8 then, "
                                               rf"4 now.*pass --restart .*or delete the folder {work}"):
        calibrate(models["high"], models["low"], _items(), other)
    with pytest.raises(CalibrationError, match="the calibration items"):
        calibrate(models["high"], models["low"], _items(2), cfg)
    with pytest.raises(CalibrationError, match=r"another high-noise model.*high expert\.fingerprint"):
        calibrate(models["low"], models["high"], _items(), cfg)
    assert _layer_files(work) == saved and not (work / "lock").exists()  # nothing lost, nothing locked

    calibrate(models["high"], models["low"], _items(), other, restart=True)
    assert not work.exists()
    a = fmt.load_state(other.state_path("high"))[0]
    assert {p.rank for p in a.values()} == {4}


@pytest.mark.comfyui
def test_damaged_manifest_is_a_clear_error(models, tmp_path):
    cfg = CalibrationConfig(**FAST, out_dir=str(tmp_path))
    with pytest.raises(CalibrationCancelled):
        calibrate(models["high"], models["low"], _items(), cfg, cancel=_cancel_after(3 + 2))
    manifest = resume.work_path(cfg) / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"rank": 8', '"rank": 9'))
    with pytest.raises(CalibrationError, match=rf"{manifest}: damaged .*--restart"):
        calibrate(models["high"], models["low"], _items(), cfg)


# --- the command line, killed with SIGKILL at several points --------------------------------

def _cli(args, comfyui, kill_after=None):
    env = dict(os.environ, COMFYUI_PATH=str(comfyui), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop(resume.KILL_ENV, None)
    if kill_after:
        env[resume.KILL_ENV] = kill_after
    return subprocess.run([sys.executable, "-m", "wan_w4a4", "calibrate", *args], env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def _cli_in_process(args, comfyui) -> tuple[int, str]:
    """The same command line in this process, where ComfyUI is initialised already (a new process would only
    add its import): for the runs that are not killed. (exit code, stderr); one torch thread, as ``_cli``."""
    from wan_w4a4.__main__ import main

    assert resume.KILL_ENV not in os.environ
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["calibrate", *args, "--comfyui", str(comfyui), "--threads", "1"])
    return code, err.getvalue()


@pytest.mark.comfyui
@pytest.mark.slow  # four calibrations in new processes that import ComfyUI
def test_killed_runs_resume_to_the_uninterrupted_result(comfyui, tiny_wan_checkpoints, reference, tmp_path, caplog):
    """The uninterrupted result is ``reference``, the in-process run of the same settings that the cancel
    tests compare with (one process importing ComfyUI fewer); the killed and resumed command-line runs
    must end with it byte for byte. The runs that are killed (SIGKILL) are new processes; the refused one
    and the last one are the same command line called in this process."""
    ck = tiny_wan_checkpoints
    out = tmp_path / "out"
    base = ["--high", str(ck["high"]), "--low", str(ck["low"]), *CLI_FLAGS, "--out", str(out)]
    work = out / ".tiny.w4a4-work"

    # 0. a run with another rank, killed: the next run with the first settings is refused until --restart
    r = _cli([*base, "--rank", "4"], comfyui, "layer:2")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    code, err = _cli_in_process(base, comfyui)
    assert code == 2 and "config.rank: 4 then, 8 now" in err and "--restart" in err
    # 1. --restart discards that work; killed in the high expert's second pass, after 13 of its 20 layers
    r = _cli([*base, "--restart"], comfyui, "layer:13")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert len(_layer_files(work)) == 13 and sorted(p.name for p in out.iterdir()) == [work.name]
    assert (work / "lock").exists()  # left by the dead process: stale, taken over below
    assert_not_states(work)
    # 2. resumed: the high expert ends (7 more layers), then killed in the low expert's first pass
    r = _cli(base, comfyui, "layer:12")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert "reused 3 layers" in r.stderr and (work / f"high.done{resume.WORK_SUFFIX}").exists()
    assert len(_layer_files(work)) == 25
    # 3. killed while the low expert samples (the finished high expert is not sampled again)
    r = _cli(base, comfyui, "step:2")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert "high expert: finished in an earlier run; reusing its 20 layers and output latents" in r.stderr
    # 4. to the end: the uninterrupted run's result, and the work folder is gone
    caplog.set_level(logging.INFO, logger="wan_w4a4")
    code, err = _cli_in_process(base, comfyui)
    assert code == 0, err[-3000:]
    assert "low expert, pass 1/2: reused 5 layers" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["tiny_high.safetensors", "tiny_low.safetensors",
                                                      "tiny_report.json"]
    assert_same_result(reference, out, "tiny")
