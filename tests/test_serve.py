"""``python -m wan_w4a4 serve`` (``apps/serve.py``): its arguments, the custom-node decision (already
there / ComfyUI's extra-folder option / refusal naming the link), the missing-frontend error, the
probe against the real ComfyUI trees, and the real server started by the command."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from wan_w4a4.__main__ import build_parser
from wan_w4a4.apps import runtime, serve


def _parse(*argv):
    return build_parser(["serve"]).parse_args(["serve", *argv])


def _python(code: str, cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, check=False)


# --- arguments -------------------------------------------------------------------------------------

def test_arguments_after_double_dash_go_to_main_py_unchanged():
    args = _parse("--comfyui", "/some/ComfyUI", "--", "--cpu", "--port", "8199", "--comfyui", "x", "--", "y")
    assert args.comfyui == Path("/some/ComfyUI")
    assert serve._main_args(args) == ["--cpu", "--port", "8199", "--comfyui", "x", "--", "y"]
    assert serve._main_args(_parse()) == []


def test_help_says_where_main_py_arguments_go(capsys):
    from wan_w4a4.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "after -- goes to ComfyUI's main.py unchanged" in out and "serve -- --cpu --port 8199" in out


def test_main_py_options_without_double_dash_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        _parse("--cpu")
    assert e.value.code == 2
    assert "unrecognized arguments: --cpu" in capsys.readouterr().err


def test_serve_imports_no_torch_before_main_py(tmp_path):
    # main.py must choose its CUDA allocator before torch is imported; the other commands' options import it
    r = _python("""
        import sys
        import wan_w4a4.apps.serve as s
        s.run = lambda args: 0 if "torch" not in sys.modules else 3
        from wan_w4a4.__main__ import main
        sys.exit(main(["serve", "--", "--cpu"]))
    """, tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])


# --- the custom-node decision ----------------------------------------------------------------------

def _probe(dirs, extra: bool) -> serve.Probe:
    return serve.Probe(stand_ins={}, custom_node_dirs=tuple(map(str, dirs)), extra_custom_nodes=extra,
                       frontend_package_needed=False)


def test_pack_already_a_custom_node_needs_nothing(tmp_path):
    custom = tmp_path / "custom_nodes"
    custom.mkdir()
    (custom / "AnyName").symlink_to(runtime.REPO_ROOT, target_is_directory=True)
    (custom / "other_pack").mkdir()
    assert serve.pack_links([custom], runtime.REPO_ROOT) == [custom / "AnyName"]
    assert serve.custom_node_args(_probe([custom], extra=False), tmp_path / "x.yaml") == []


def test_pack_elsewhere_goes_through_the_extra_paths_option(tmp_path):
    custom = tmp_path / "custom_nodes"
    (custom / "other_pack").mkdir(parents=True)
    yaml = tmp_path / "extra.yaml"
    assert serve.custom_node_args(_probe([custom], extra=True), yaml) == ["--extra-model-paths-config", str(yaml)]
    assert list(custom.iterdir()) == [custom / "other_pack"]  # the user's folder is left as it was


def test_without_the_option_it_refuses_and_names_the_link(tmp_path):
    custom = tmp_path / "custom_nodes"
    custom.mkdir()
    with pytest.raises(serve.ServeError) as e:
        serve.custom_node_args(_probe([custom], extra=False), tmp_path / "x.yaml")
    assert f"ln -s {runtime.REPO_ROOT} {custom / 'ComfyUI-WanW4A4'}" in str(e.value)
    assert list(custom.iterdir()) == []


def test_extra_config_names_a_folder_holding_only_the_pack(tmp_path):
    yaml = serve._write_extra_config(tmp_path, runtime.REPO_ROOT)
    custom = tmp_path / "custom_nodes"
    assert [p.name for p in custom.iterdir()] == ["ComfyUI-WanW4A4"]
    assert (custom / "ComfyUI-WanW4A4").resolve() == runtime.REPO_ROOT.resolve()
    assert json.dumps(str(custom)) in yaml.read_text()


# --- the frontend package --------------------------------------------------------------------------

def test_required_pins_reads_comfyui_packages():
    text = "torch\ncomfyui-frontend-package==1.49.6\ncomfyui-workflow-templates==0.11.44  # x\nnumpy>=1.25\n"
    assert serve.required_pins(text) == {"comfyui-frontend-package": "1.49.6",
                                         "comfyui-workflow-templates": "0.11.44"}


@pytest.mark.comfyui
def test_missing_frontend_names_the_pinned_pip_command(comfyui):
    line = next(l for l in (comfyui / "requirements.txt").read_text().splitlines()
                if l.startswith("comfyui-frontend-package=="))
    msg = serve.frontend_error(comfyui, installed=lambda name: None)
    assert f"-m pip install {line.strip()}" in msg and "--front-end-root" in msg
    assert serve.frontend_error(comfyui, installed=lambda name: "1.0") is None
    # a pinned package already installed is not asked for again
    msg = serve.frontend_error(comfyui, installed=lambda n: None if n == "comfyui-frontend-package" else "1")
    assert f"-m pip install {line.strip()}\n" in msg


def test_pins_other_than_installed_give_a_warning_with_the_pip_command(tmp_path):
    (tmp_path / "requirements.txt").write_text("comfyui-frontend-package==1.27.10\n"
                                                "comfyui-workflow-templates==0.1.95\ncomfyui-embedded-docs==0.2.6\n")
    have = {"comfyui-frontend-package": "1.27.10", "comfyui-workflow-templates": "0.11.44"}
    msg = serve.pin_warning(tmp_path, installed=have.get)
    assert "comfyui-workflow-templates 0.11.44 (pinned: 0.1.95)" in msg
    assert msg.endswith("-m pip install comfyui-workflow-templates==0.1.95")  # not installed: not asked for
    assert serve.pin_warning(tmp_path, installed={"comfyui-frontend-package": "1.27.10"}.get) is None


def _frontend_installed() -> bool:
    try:
        metadata.version("comfyui-frontend-package")
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.comfyui
@pytest.mark.skipif(_frontend_installed(), reason="comfyui-frontend-package is installed here")
def test_serve_stops_before_starting_without_the_frontend(comfyui, tmp_path):
    r = _python(f"""
        import sys
        from wan_w4a4.__main__ import main
        sys.exit(main(["serve", "--comfyui", {str(comfyui)!r}, "--", "--cpu", "--port", "1"]))
    """, tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "comfyui-frontend-package is not installed" in r.stderr
    assert "starting" not in r.stderr and "Starting server" not in r.stderr + r.stdout


# --- the probe, against the real tree --------------------------------------------------------------

@pytest.mark.comfyui
def test_probe_detects_the_extra_custom_node_folder_and_main_py_options(comfyui, tmp_path):
    yaml = serve._write_extra_config(tmp_path, runtime.REPO_ROOT)
    base = tmp_path / "base"
    found = serve.probe(comfyui, ["--cpu", "--base-directory", str(base)], yaml, tmp_path / "custom_nodes")
    assert found.extra_custom_nodes  # both supported ComfyUI versions take a custom_nodes entry
    assert found.custom_node_dirs == (str((base / "custom_nodes").resolve()),)
    assert found.frontend_package_needed
    for package in ("torchvision", "torchaudio"):
        try:
            metadata.version(package)
        except metadata.PackageNotFoundError:
            assert found.stand_ins[package] == "not installed"
    front = serve.probe(comfyui, ["--front-end-root", str(tmp_path)], yaml, tmp_path / "custom_nodes")
    assert not front.frontend_package_needed
    assert front.custom_node_dirs == (str((comfyui / "custom_nodes").resolve()),)
    with pytest.raises(serve.HelpShown, match="--extra-model-paths-config"):  # `serve -- --help`
        serve.probe(comfyui, ["--help"], yaml, tmp_path / "custom_nodes")
    with pytest.raises(serve.ServeError, match="--no-such-option"):
        serve.probe(comfyui, ["--no-such-option"], yaml, tmp_path / "custom_nodes")


# --- the real server -------------------------------------------------------------------------------

@pytest.mark.comfyui
@pytest.mark.slow  # a ComfyUI server start (30-40 s on a 2-core CPU)
def test_serve_starts_main_py_with_the_pack(comfyui, tmp_path, launch_comfy_server, free_port):
    base = tmp_path / "comfy"
    (base / "custom_nodes").mkdir(parents=True)  # main.py lists it at start; the pack is not in it
    frontend = tmp_path / "frontend"  # empty: no frontend package needed (CI has none)
    frontend.mkdir()
    cmd = [sys.executable, "-m", "wan_w4a4", "serve", "--comfyui", str(comfyui), "--",
           "--cpu", "--listen", "127.0.0.1", "--port", str(free_port), "--base-directory", str(base),
           "--disable-auto-launch", "--disable-api-nodes", "--front-end-root", str(frontend),
           "--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}"]
    tree_nodes = sorted(os.listdir(comfyui / "custom_nodes"))
    with launch_comfy_server(cmd, tmp_path, base, tmp_path / "server.log", free_port) as server:
        info = server.request("/object_info")
        log = server.log()
    ours = {name for name, spec in info.items() if spec.get("python_module") == "custom_nodes.ComfyUI-WanW4A4"}
    assert {"WanW4A4ApplyState", "WanW4A4LoadModel", "WanW4A4Calibrate"} <= ours, log[-4000:]
    assert "adding it through --extra-model-paths-config" in log
    assert ("stand-ins for" in log) or ("no stand-ins" in log)
    assert "IMPORT FAILED" not in "\n".join(l for l in log.splitlines() if "ComfyUI-WanW4A4" in l), log[-4000:]
    assert sorted(os.listdir(comfyui / "custom_nodes")) == tree_nodes  # the tree is not changed
    folder = re.search(r"--extra-model-paths-config (\S+)/extra_model_paths\.yaml", log).group(1)
    assert server.proc.returncode is not None and not Path(folder).exists()  # removed on SIGTERM
