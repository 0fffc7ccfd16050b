"""Against a headless ComfyUI server that loads this pack from custom_nodes/: an API-format
two-expert graph with the W4A4 nodes, and the example workflows (node types, links, listing)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from wan_w4a4.kernels import numerics as nm
from wan_w4a4.apps.runtime import REPO_ROOT
from wan_w4a4.nodes.example_inputs import shipped_inputs

from api_graphs import two_expert_graph

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]  # a server: ComfyUI started in a new process

WORKFLOWS = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # frontend-only node types
STEPS, CFG, SHIFT, SEED = 4, 3.5, 8.0, 7


def graph(w4a4: bool) -> dict:
    # 4 steps at shift 8: t = 1000, 960 | 889, 727 -> the high expert takes 2 (t >= 900)
    g = two_expert_graph("w4a4" if w4a4 else "bf16", seed=SEED, steps=STEPS, cfg=CFG, shift=SHIFT, split=2)
    if w4a4:
        g["10"] = {"class_type": "WanW4A4ApplyState", "inputs": {"model": ["2", 0], "state_name": "tiny_high.safetensors"}}
        g["11"] = {"class_type": "WanW4A4ApplyState", "inputs": {"model": ["3", 0], "state_name": "tiny_low.safetensors"}}
        g["4"]["inputs"]["model"], g["5"]["inputs"]["model"] = ["10", 0], ["11", 0]
        g["12"] = {"class_type": "WanW4A4InspectState",
                   "inputs": {"state_high": "tiny_high.safetensors", "state_low": "tiny_low.safetensors"}}
    return g


def saved_latent(server, entry) -> torch.Tensor:
    from safetensors.torch import load_file
    saved = entry["outputs"]["8"]["latents"][0]
    return load_file(str(server.base_dir / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]


def test_server_runs_w4a4_graph_and_loads_example_workflows(comfy_server, wan_checkpoint_factory, env):
    """One server (the session's, shared with the smoke test) for both checks."""
    run_w4a4_graph(comfy_server, wan_checkpoint_factory, env)
    try:
        check_example_workflows(comfy_server)
    finally:
        stop_queued_work(comfy_server)


def stop_queued_work(server, timeout: float = 120.0) -> None:
    """Clears the queue and interrupts the prompt running: the example workflows are queued only to see
    ComfyUI accept them, and the next test's prompt on this shared server must not wait behind the mini
    workflow's calibration. ComfyUI clears the interrupt flag when the next prompt starts."""
    server.request("/queue", {"clear": True})
    server.request("/interrupt", {})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = server.request("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"the server still runs a prompt {timeout} s after /interrupt:\n{server.log()[-3000:]}")


def run_w4a4_graph(comfy_server, wan_checkpoint_factory, env):
    for expert, seed in (("high", 1), ("low", 2)):  # the experts env's states were made from
        wan_checkpoint_factory(comfy_server.models_dir, f"tiny_wan_{expert}.safetensors", seed=seed)
        dst = comfy_server.models_dir / "w4a4"
        dst.mkdir(exist_ok=True)
        shutil.copy(env.w4a4_dir / f"tiny_{expert}.safetensors", dst)

    # A file whose header is valid JSON but not an object: listed by name, it once made both nodes vanish
    # from /object_info. It is left out of the lists (and logged), the real states stay.
    hostile = comfy_server.models_dir / "w4a4" / "hostile.safetensors"
    hostile.write_bytes(len(b"[1]").to_bytes(8, "little") + b"[1]")
    info = comfy_server.request("/object_info/WanW4A4ApplyState")["WanW4A4ApplyState"]
    assert info["category"] == "WanW4A4" and info["display_name"] == "Apply W4A4 state"
    assert "tiny_high.safetensors" in info["input"]["required"]["state_name"][0]
    assert "hostile.safetensors" not in info["input"]["required"]["state_name"][0]
    load = comfy_server.request("/object_info/WanW4A4LoadModel")["WanW4A4LoadModel"]
    assert "hostile.safetensors" not in load["input"]["required"]["ckpt_name"][0]

    w4a4 = comfy_server.run_prompt(graph(True))
    bf16 = comfy_server.run_prompt(graph(False))
    out, ref = saved_latent(comfy_server, w4a4), saved_latent(comfy_server, bf16)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert nm.sqnr_db(ref, out) > 20.0  # the same floor as the in-process test
    summary = "".join(w4a4["outputs"]["12"]["text"])
    assert "high expert - tiny_high.safetensors" in summary and "low expert - tiny_low.safetensors" in summary
    log = comfy_server.log()
    assert "IMPORT FAILED" not in "\n".join(l for l in log.splitlines() if "ComfyUI-WanW4A4" in l), log[-3000:]


def queue_errors(server, prompt) -> dict:
    """POST /prompt; returns ComfyUI's node_errors ({} when the prompt was accepted)."""
    import urllib.error
    import urllib.request
    req = urllib.request.Request(server.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            json.loads(resp.read())
            return {}
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        assert body.get("node_errors"), body
        return body["node_errors"]


def check_workflow(wf: dict, object_info: dict, name: str) -> None:
    """Node types exist; every link joins existing nodes' slots consistently; types agree."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), f"{name}: duplicate node ids"
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(l[0] for l in wf["links"])
    for n in wf["nodes"]:
        t = n["type"]
        assert t in UI_ONLY or t in object_info, f"{name}: node {n['id']} has unknown type {t!r}"
        if t in object_info and n.get("mode", 0) != 4:
            check_outputs(n, object_info[t], name)
    links = {l[0]: l for l in wf["links"]}
    assert len(links) == len(wf["links"]), f"{name}: duplicate link ids"
    for lid, o, os_, t, ts, typ in wf["links"]:
        src, dst = nodes.get(o), nodes.get(t)
        assert src is not None and dst is not None, f"{name}: link {lid} joins missing nodes"
        assert lid in (src["outputs"][os_].get("links") or []), f"{name}: link {lid} not on its source slot"
        assert dst["inputs"][ts]["link"] == lid, f"{name}: link {lid} not on its target slot"
        assert typ == src["outputs"][os_]["type"], f"{name}: link {lid} type {typ}"
        want = dst["inputs"][ts]["type"]
        assert want in ("*", typ) or typ in want.split(","), f"{name}: link {lid} {typ} -> {want}"
    for n in wf["nodes"]:
        for i, inp in enumerate(n.get("inputs", [])):
            if inp.get("link") is not None:
                assert links[inp["link"]][3:5] == [n["id"], i], f"{name}: node {n['id']} input {i}"
        for o in n.get("outputs", []):
            for lid in o.get("links") or []:
                assert links[lid][1] == n["id"], f"{name}: node {n['id']} output link {lid}"


def check_outputs(n: dict, spec: dict, name: str) -> None:
    """A node's output slots against the running ComfyUI's definition. One workflow serves several
    ComfyUI versions, and nodes gain outputs (SaveVideo's VIDEO and PreviewAny's STRING in 0.33): the
    slots the definition has must agree in type, the slots it lacks must be unlinked; slots the
    workflow lacks are added by the frontend when it loads the workflow."""
    outs, types = n.get("outputs", []), spec["output"]
    for i, (o, typ) in enumerate(zip(outs, types)):
        typ = "COMBO" if isinstance(typ, list) else typ
        assert o["type"] in ("*", typ) or typ == "*", (
            f"{name}: node {n['id']} ({n['type']}) output {i}: {o['type']} != {typ}")
    extra = outs[len(types):]
    assert not any(o.get("links") for o in extra), (
        f"{name}: node {n['id']} ({n['type']}) links outputs {[o['name'] for o in extra]} this ComfyUI does not have")


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "COMFY_DYNAMICCOMBO_V3"}
# Model files a workflow may name that a fresh ComfyUI lacks; not "image": the pack copies the workflows'
# start picture into the input folder (nodes/example_inputs.py).
FILE_INPUTS = {"unet_name", "clip_name", "vae_name", "state_name", "ckpt_name", "lora_name"}


def ui_to_api(wf: dict, object_info: dict) -> dict:
    """The API-format prompt the frontend would queue for a UI-format workflow (active nodes only)."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {l[0]: l for l in wf["links"]}
    prompt = {}
    for n in wf["nodes"]:
        if n["type"] in UI_ONLY or n.get("mode", 0) != 0:
            continue
        spec = object_info[n["type"]]["input"]
        order = object_info[n["type"]].get("input_order", {})
        names = [*order.get("required", spec.get("required", {})), *order.get("optional", spec.get("optional", {}))]
        linked = {i["name"]: links[i["link"]] for i in n.get("inputs", []) if i.get("link") is not None}
        inputs, values = {}, list(n.get("widgets_values") or [])
        for name in names:
            cfg = spec.get("required", {}).get(name) or spec.get("optional", {}).get(name)
            typ, opts = cfg[0], (cfg[1] if len(cfg) > 1 else {})
            is_widget = isinstance(typ, list) or (typ in WIDGET_TYPES and not opts.get("forceInput"))
            if name in linked:
                src = linked[name]
                if nodes[src[1]].get("mode", 0) == 0:
                    inputs[name] = [str(src[1]), src[2]]
            if is_widget:
                if not values and name in spec.get("optional", {}):
                    continue  # an optional widget newer than the workflow (CreateVideo's bit_depth): its default
                value = values.pop(0)
                if name not in linked:
                    inputs[name] = value
                if typ == "INT" and (name in ("seed", "noise_seed") or opts.get("control_after_generate")):
                    values.pop(0)  # the frontend's control_after_generate widget
                if opts.get("image_upload"):
                    values.pop(0)  # the frontend's upload button ("image")
        assert not values, f"node {n['id']} ({n['type']}): {len(values)} widget values left over: {values}"
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def check_example_workflows(comfy_server):
    assert {p.name for p in WORKFLOWS} >= {"wan22_i2v_14b_w4a4.json", "wan22_i2v_w4a4_calibrate.json"}
    object_info = comfy_server.request("/object_info")
    # the Load Image list the frontend checks a workflow's file against, in a server started on a fresh base
    listed = object_info["LoadImage"]["input"]["required"]["image"][0]
    assert {p.name for p in shipped_inputs()} <= set(listed), listed
    for path in WORKFLOWS:
        wf = json.loads(path.read_text())
        check_workflow(wf, object_info, path.name)
        types = {n["type"] for n in wf["nodes"]}
        assert types & {"WanW4A4ApplyState", "WanW4A4Calibrate", "WanW4A4LoadModel"}, path.name
        assert types & {"Note", "MarkdownNote"}, f"{path.name} has no note telling which files go where"
        # Queued as the frontend would: ComfyUI's validation may only miss the model files (not the image).
        prompt = ui_to_api(wf, object_info)
        errors = queue_errors(comfy_server, prompt)
        if path.name.startswith("wan22_mini"):
            assert not errors, errors  # everything it needs ships with the pack
        for node_id, err in errors.items():
            for e in err["errors"]:
                name = e.get("extra_info", {}).get("input_name")
                assert e["type"] == "value_not_in_list" and name in FILE_INPUTS, (path.name, node_id, e)
    listed = comfy_server.request("/workflow_templates")
    ours = next(v for k, v in listed.items() if Path(k).name == "ComfyUI-WanW4A4")
    assert sorted(ours) == sorted(p.stem for p in WORKFLOWS)
