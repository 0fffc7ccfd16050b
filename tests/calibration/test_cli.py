"""``python -m wan_w4a4 calibrate`` end to end on tiny checkpoints, in a subprocess (CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from fp8_scaled_lib import write_fp8_scaled

from wan_w4a4.kernels import format as fmt

FAST_FLAGS = ["--items", "1", "--frames", "5", "--height", "32", "--width", "32", "--text-tokens", "8",
              "--steps", "6", "--bins", "2", "--rank", "8", "--alphas", "0.5", "--clip-grid", "1,0.9,0.8",
              "--rows-per-bin", "32", "--cpu"]


def _run(args, comfyui, timeout=300):
    env = dict(os.environ, COMFYUI_PATH=str(comfyui), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "wan_w4a4", "calibrate", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow  # a new Python process importing torch
def test_help_needs_no_comfyui():
    out = subprocess.run([sys.executable, "-m", "wan_w4a4", "calibrate", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--high", "--low", "--out", "--overwrite", "--clip-policy", "--blocks-per-pass", "--keep",
                 "--boundary", "--handover-step"):
        assert flag in out.stdout


@pytest.mark.comfyui
@pytest.mark.slow  # a calibration in a new process that imports ComfyUI
def test_cli_end_to_end_and_refuses_overwrite(comfyui, tiny_wan_checkpoints, tmp_path):
    """From ComfyUI's fp8_scaled versions of the tiny experts (test_resume and test_dataset run the command
    line to the end on the BF16 files): it loads the experts as UNETLoader does (inside inference mode), so
    ComfyUI 0.33 can sample its fp8_scaled layers, and the states record that source."""
    ck = {e: write_fp8_scaled(tiny_wan_checkpoints[e], tmp_path / "experts" / f"{tiny_wan_checkpoints[e].stem}_fp8_scaled"
                                                                            f".safetensors") for e in ("high", "low")}
    out_dir = tmp_path / "out"
    # hand-over by step: 4 of 6 at shift 8 (t = 1000, 975.7, 941.3, 888.9 | 800.5, 616.0), where t >= 900 gives 3
    args = ["--high", str(ck["high"]), "--low", str(ck["low"]), "--out", str(out_dir), "--name", "tiny", *FAST_FLAGS,
            "--handover-step", "4"]
    out = _run(args, comfyui)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"high: {out_dir / 'tiny_high.safetensors'}" in out.stdout
    for expert in ("high", "low"):
        layers, meta = fmt.load_state(out_dir / f"tiny_{expert}.safetensors")
        assert len(layers) == 20 and meta.expert == expert and meta.num_bins == 2
        assert (meta.handover["by"], meta.handover["high_steps"], meta.handover["steps"]) == ("step", 4, 6)
        assert 800.5 < meta.bin_edges[-1 if expert == "high" else 0] < 888.9
        assert meta.source == {"kind": "fp8_scaled", "weight_dtype": "float8_e4m3fn"}
    report = json.loads((out_dir / "tiny_report.json").read_text())
    assert report["config"]["rank"] == 8 and report["config"]["clip_grid"] == [1.0, 0.9, 0.8]
    assert "calibrate: 100%" in out.stderr  # the tqdm bar

    before = (out_dir / "tiny_high.safetensors").stat().st_mtime_ns
    again = _run(args, comfyui)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr and "--overwrite" in again.stderr
    assert (out_dir / "tiny_high.safetensors").stat().st_mtime_ns == before


def test_cli_bad_input(tmp_path, capsys):
    """Rejected before ComfyUI starts (in-process: nothing here reaches ComfyUI)."""
    from wan_w4a4.__main__ import main
    ck = tmp_path / "ck.safetensors"
    ck.write_bytes(b"")
    base = ["calibrate", "--low", str(ck), "--out", str(tmp_path / "out")]
    assert main([*base, "--high", str(tmp_path / "missing.safetensors")]) == 2
    assert "--high" in capsys.readouterr().err
    assert main([*base, "--high", str(ck), "--bins", "0"]) == 2
    assert "bins must be" in capsys.readouterr().err
    assert main([*base, "--high", str(ck), "--items", "0"]) == 2
    assert "--items must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse rejects an unknown policy
        main([*base, "--high", str(ck), "--clip-policy", "per_layer"])
    assert main([*base, "--high", str(ck), "--steps", "20", "--handover-step", "20"]) == 2
    assert "handover_step must be None (hand over at the boundary) or a step in 1..steps-1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one hand-over: a boundary or a step, not both
        main([*base, "--high", str(ck), "--boundary", "875", "--handover-step", "10"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_handover_option_reaches_the_config(tmp_path):
    import argparse
    from wan_w4a4.apps.calibrate import add_arguments, config_from_args
    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--high", "h", "--low", "l", "--out", str(tmp_path)]
    by_step = config_from_args(p.parse_args([*base, "--steps", "20", "--shift", "5", "--handover-step", "10"]))
    assert (by_step.handover_step, by_step.steps, by_step.shift, by_step.scheduler) == (10, 20, 5.0, "simple")
    by_t = config_from_args(p.parse_args([*base, "--boundary", "875"]))
    assert (by_t.handover_step, by_t.boundary) == (None, 875.0)


@pytest.mark.comfyui
def test_minimodel_items_are_wan_i2v_items(comfy_nodes):
    from wan_w4a4.apps.calibrate import minimodel_items
    items = minimodel_items(2, frames=5, seed=3)
    assert [it.seed for it in items] == [3, 4]
    for it in items:
        assert it.latent.shape == (1, 16, 2, 16, 16)
        extra = it.positive[0][1]
        assert extra["concat_latent_image"].shape == (1, 16, 2, 16, 16)
        assert extra["concat_mask"][0, 0, 0].max() == 0 and extra["concat_mask"][0, 0, 1].min() == 1
        assert it.positive[0][0].shape[-1] == 4096
    assert not torch.equal(items[0].positive[0][0], items[1].positive[0][0])  # different captions


def _subparsers():
    import argparse
    from wan_w4a4.__main__ import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_has_help_and_shows_its_default():
    for command in ("calibrate", "demo"):
        p = _subparsers()[command]
        formatter = p._get_formatter()
        for action in p._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{command} {action.option_strings}: no help text"
            if action.default is not None and action.nargs != 0:  # a value with a default: say it
                assert "default" in formatter._get_help_string(action), f"{command} {action.option_strings}"
    calibrate_help = " ".join(_subparsers()["calibrate"].format_help().split())
    assert "(default: on)" in calibrate_help and "(default: 0,0.1,0.2" in calibrate_help


def test_frames_default_follows_the_source():
    from wan_w4a4.apps.calibrate import RANDOM_FRAMES, frames_for
    from wan_w4a4.minimodel import data
    args = _subparsers()["calibrate"].parse_args(["--high", "h", "--low", "l", "--out", "o", "--source", "minimodel"])
    assert args.frames is None and frames_for(args.source, args.frames) == data.FRAMES == 17
    assert frames_for("random", None) == RANDOM_FRAMES == 33
    assert frames_for("minimodel", 5) == 5


@pytest.mark.parametrize("command,module", [("calibrate", "wan_w4a4.apps.calibrate"),
                                            ("demo", "wan_w4a4.apps.demo")])
def test_threads_option_sets_torch_threads_for_the_run(command, module, monkeypatch, tmp_path):
    import importlib
    from wan_w4a4.__main__ import main
    seen = []
    monkeypatch.setattr(importlib.import_module(module), "_run", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    extra = ["--high", "h", "--low", "l", "--out", str(tmp_path)] if command == "calibrate" else []
    assert main([command, *extra, "--threads", "3"]) == 0
    assert seen == [3] and torch.get_num_threads() == before


_TWO_SIGTERMS = """
import os, signal, sys, threading
from wan_w4a4.apps.calibrate import _sigterm_stops
from wan_w4a4.calibration.distributed import DistributedError, World

try:
    with _sigterm_stops(World(rank=0, size=2)):
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun stops the run...
        signal.pthread_kill(threading.get_ident(), 0)  # (let the handler run here)
        sys.exit("not stopped")
except DistributedError as e:
    os.kill(os.getpid(), signal.SIGTERM)  # ...and may say so twice while this process unwinds
    print(e, file=sys.stderr)
    sys.exit(2)
"""


_FAILED_COLLECTIVE_THEN_SIGTERM = """
import os, signal, sys
from wan_w4a4.apps.calibrate import _sigterm_stops
from wan_w4a4.calibration.distributed import DistributedError, World

try:
    with _sigterm_stops(World(rank=0, size=2)):
        raise DistributedError("rank 0 of 2: another process of the run died")  # the collective failed...
except DistributedError as e:
    os.kill(os.getpid(), signal.SIGTERM)  # ...and torchrun's SIGTERM comes before the message is out
    print(e, file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.slow  # a new Python process importing torch
def test_sigterm_after_a_failed_collective_does_not_kill_a_rank_before_it_says_why():
    """The other race of the same CI test: rank 0's collective failed first (the peer was killed), its error left
    the block, and torchrun's SIGTERM arrived before the CLI printed it (rank 0 died by SIGTERM, no message)."""
    out = subprocess.run([sys.executable, "-c", _FAILED_COLLECTIVE_THEN_SIGTERM], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "another process of the run died" in out.stderr


@pytest.mark.slow  # a new Python process importing torch
def test_a_second_sigterm_does_not_kill_a_rank_before_it_says_why():
    """torchrun can send SIGTERM more than once; the second must not end the process before its error is out
    (a CI run lost rank 0's message that way: it died by SIGTERM after the first had been handled)."""
    out = subprocess.run([sys.executable, "-c", _TWO_SIGTERMS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "rank 0 of 2: stopped by SIGTERM" in out.stderr
