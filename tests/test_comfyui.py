"""Both ControlNet exports load in ComfyUI's own loader with no missing or unexpected keys.

ComfyUI's core is not on PyPI; the pinned, yanked ``comfyui==0.0.1`` (hiddenswitch's installable
ComfyUI, June 2024) ships the ``comfy`` package, whose ``comfy.controlnet.load_controlnet`` is
ComfyUI's SD/SDXL ControlNet path. It is installed once per machine (``pip --no-deps --target``,
cached under ``~/.cache/nemo_controlnet-tests``) and run in a subprocess, so its import-time shims
and ``sys.path`` never reach this process. Without a package index the tests skip.

``load_controlnet`` reports missing keys only as ``logging.warning("missing controlnet keys: ...")``,
unexpected ones as ``logging.debug("unexpected controlnet keys: ...")`` and unconverted diffusers keys
as ``logging.warning("leftover keys: ...")``: the driver captures the root logger at DEBUG. ComfyUI
recognises architectures by their shapes: full-size SD 1.5 (either layout), and SDXL-like files in
the original layout whose hint encoder has its hard-coded widths (16, 32, 96, 256); the tiny SD
test configs match none, so SD 1.x is checked at full size (built once per module, ~361M parameters).
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel
from hydra.utils import instantiate
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nemo_controlnet.models.controlnet import controlnet_config
from nemo_controlnet.models.formats import export_controlnet, export_original_controlnet
from tests.conftest import compose_train

PINS = ("comfyui==0.0.1", "ConfigArgParse==1.9.0", "einops==0.8.2")
HINT_WIDTHS = (16, 32, 96, 256)  # ComfyUI's cldm.ControlNet hard-codes its hint encoder's widths
RESULT = "COMFYUI_RESULT "

# A diffusers ControlNet tensor -> its ComfyUI (ldm) name, written out here rather than taken from
# formats.py, so that the value checks do not lean on the mapping they check.
CHECKED = {
    "controlnet_down_blocks.0.weight": "zero_convs.0.0.weight",  # the first zero convolution
    "controlnet_mid_block.weight": "middle_block_out.0.weight",
    "controlnet_cond_embedding.conv_in.weight": "input_hint_block.0.weight",  # the hint encoder's first conv
    "controlnet_cond_embedding.conv_out.weight": "input_hint_block.14.weight",
    "conv_in.weight": "input_blocks.0.0.weight",
}
SDXL_CHECKED = {**CHECKED, "add_embedding.linear_1.weight": "label_emb.0.0.weight"}

# Run with the venv's interpreter: ComfyUI's install is appended to sys.path, after site-packages, so
# our torch/transformers/safetensors are the ones used. Reads its jobs as JSON on stdin; prints one
# RESULT line of JSON: per job the class, label_emb, the loader's messages, the model's keys with a
# fingerprint of each tensor (its shape, then, unless the job says "sums": false, its float64 sum and
# absolute sum), and writes the tensors the job names to its "out" file.
DRIVER = r"""
import json, logging, os, sys, types
spec = json.load(sys.stdin)
sys.path.append(spec["target"])
sys.argv = sys.argv[:1]  # comfy.cli_args parses the command line on import
import transformers
transformers.SpecialTokensMixin = getattr(transformers, "SpecialTokensMixin", object)  # gone in transformers 5
sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))  # imported, unused by the loader
import comfy.controlnet
import torch
from safetensors.torch import save_file

class Catch(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []
    def emit(self, record):
        self.messages.append(record.getMessage())

catch = Catch()
root = logging.getLogger()
root.addHandler(catch)
root.setLevel(logging.DEBUG)
results = []
for job in spec["jobs"]:
    catch.messages.clear()
    root.setLevel(logging.DEBUG)
    cn = comfy.controlnet.load_controlnet(job["path"])
    model = getattr(cn, "control_model", None)
    sd = model.state_dict() if model is not None else {}
    pick = lambda kind: [m for m in catch.messages if m.startswith(kind)]
    results.append({
        "class": type(cn).__name__,
        "model_class": type(model).__name__,
        "label_emb": hasattr(model, "label_emb"),
        "missing": pick("missing controlnet keys"),
        "unexpected": pick("unexpected controlnet keys"),
        "leftover": pick("leftover keys"),
        "tensors": {
            k: [list(v.shape)] + ([v.sum(dtype=torch.float64).item(), v.abs().sum(dtype=torch.float64).item()]
                                  if job.get("sums", True) else [])
            for k, v in sd.items()
        },
    })
    if job.get("out"):
        save_file({k: sd[k].float().contiguous() for k in job["keys"]}, job["out"])
print(spec["marker"] + json.dumps(results), flush=True)
"""


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nemo_controlnet-tests"


@pytest.fixture(scope="module")
def comfyui() -> Path:
    """ComfyUI's ``comfy`` package, installed once per machine and reused: a complete install has a
    ``.pins`` stamp, written before the directory takes its name, so a failed one is never reused."""
    target = _cache_root() / "comfyui-0.0.1"
    stamp = " ".join(PINS)
    if (target / ".pins").is_file() and (target / ".pins").read_text() == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".comfyui-", dir=target.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
               "--no-input", "--retries", "1", "--timeout", "30", "--target", str(tmp), *PINS]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"cannot install ComfyUI's loader ({stamp}): {(proc.stderr or proc.stdout).strip()[-600:]}")
        (tmp / ".pins").write_text(stamp)
        tmp.chmod(0o755)  # mkdtemp's 0700
        shutil.rmtree(target, ignore_errors=True)  # an install of other pins
        try:
            tmp.rename(target)
        except OSError:  # another run installed it meanwhile
            if not (target / ".pins").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _comfy_load(comfyui: Path, workdir: Path, jobs: list[dict]) -> list[dict]:
    """``comfy.controlnet.load_controlnet`` on each job's path, in one subprocess."""
    env = {**os.environ, "COMFYUI_CPU": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    spec = json.dumps({"target": str(comfyui), "marker": RESULT, "jobs": jobs})
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER], input=spec, cwd=workdir, env=env, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    assert proc.returncode == 0 and lines, f"ComfyUI's loader failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len(RESULT) :])


def _assert_clean(result: dict, what: str) -> None:
    """The check of the promise: ComfyUI built its ControlNet and reported no key it lacked or left over."""
    assert result["class"] == "ControlNet" and result["model_class"] == "ControlNet", f"{what}: {result['class']}"
    problems = result["missing"] + result["unexpected"] + result["leftover"]
    assert not problems, f"{what}: ComfyUI reports " + "; ".join(p[:600] for p in problems)


def _fingerprints(path: Path) -> dict[str, list]:
    """The fingerprints the driver reports, of an original-format file's tensors, by ldm name."""
    with safe_open(str(path), "pt") as f:
        return {
            k.removeprefix("control_model."): [
                list(t.shape),
                t.sum(dtype=torch.float64).item(),
                t.abs().sum(dtype=torch.float64).item(),
            ]
            for k in f.keys()
            for t in (f.get_tensor(k),)
        }


def _assert_same_tensors(result: dict, path: Path, what: str) -> None:
    """Every tensor of the original-format file is in ComfyUI's model under its name, with its values
    (shape and sums; float64 sums may differ in the last bits with the summation order)."""
    ours = _fingerprints(path)
    theirs = result["tensors"]
    assert theirs.keys() == ours.keys(), f"{what}: {sorted(theirs.keys() ^ ours.keys())[:10]}"
    for key, (shape, total, absolute) in ours.items():
        shape2, total2, absolute2 = theirs[key]
        assert shape2 == shape, (what, key, shape2, shape)
        assert math.isclose(absolute2, absolute, rel_tol=1e-9, abs_tol=1e-6), (what, key, absolute2, absolute)
        assert math.isclose(total2, total, rel_tol=1e-9, abs_tol=1e-6 + 1e-12 * absolute), (what, key, total2, total)


def _randomize_(controlnet: ControlNetModel, names) -> None:
    """Random values where init leaves zeros (zero convolutions), so equal weights mean something."""
    params = dict(controlnet.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].normal_(0, 0.02)


@pytest.fixture(scope="module")
def sd15_exports(tmp_path_factory):
    """Full-size SD 1.5 ControlNet (random init; the UNet built on the meta device, only for its
    config), exported once in both layouts; the ~2 GB of exports are removed after the module."""
    out = tmp_path_factory.mktemp("comfyui_sd15")
    cfg = compose_train(["model=sd15"])
    with torch.device("meta"):
        unet = instantiate(cfg.model.unet_config)
    widths = tuple(cfg.model.control_stage_config.conditioning_embedding_out_channels)
    assert widths == HINT_WIDTHS
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_config(controlnet_config(unet, 3, widths)).eval()
    _randomize_(controlnet, CHECKED)
    expected = {name: controlnet.state_dict()[name].detach().clone() for name in CHECKED}
    original = export_original_controlnet(controlnet, out / "control_sd15.safetensors", dtype="fp16")
    diffusers_dir = export_controlnet(controlnet, out / "diffusers", {"global_step": 1})
    del controlnet
    yield {"original": original, "diffusers": diffusers_dir / "diffusion_pytorch_model.safetensors",
           "expected": expected}  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)


def _tiny_sdxl_controlnet() -> ControlNetModel:
    cfg = compose_train(["model=tiny_sdxl"])
    torch.manual_seed(0)
    unet = instantiate(cfg.model.unet_config)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_WIDTHS)
    with torch.no_grad():  # trained-looking weights: the zero convolutions must not hide a wrong mapping
        for p in controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return controlnet.eval()


def test_sd15_exports_load_in_comfyui_with_no_missing_or_unexpected_keys(comfyui, sd15_exports, tmp_path):
    jobs = [
        {
            "path": str(sd15_exports[layout]),
            "out": str(tmp_path / f"{layout}.safetensors"),
            "keys": list(CHECKED.values()),
            "sums": layout == "original",  # the diffusers layout's model: its names and shapes
        }
        for layout in ("original", "diffusers")
    ]
    original, diffusers = _comfy_load(comfyui, tmp_path, jobs)
    for result, layout in ((original, "original fp16 file"), (diffusers, "diffusers directory")):
        _assert_clean(result, f"SD 1.5 {layout}")
        assert not result["label_emb"]
    _assert_same_tensors(original, sd15_exports["original"], "SD 1.5 original fp16 file")
    # Read from the diffusers layout (ComfyUI converts its names itself), the model is the same.
    assert {k: v[0] for k, v in diffusers["tensors"].items()} == {k: v[0] for k, v in original["tensors"].items()}
    loaded = {layout: load_file(job["out"]) for layout, job in zip(("original", "diffusers"), jobs)}
    for ours, theirs in CHECKED.items():
        value = sd15_exports["expected"][ours]
        assert value.abs().max() > 0, ours
        assert torch.equal(loaded["diffusers"][theirs], value), theirs
        assert torch.equal(loaded["original"][theirs], value.half().float()), theirs  # fp16 export, exactly


def test_sdxl_original_export_loads_in_comfyui_with_its_add_embedding(comfyui, tmp_path):
    controlnet = _tiny_sdxl_controlnet()
    path = export_original_controlnet(controlnet, tmp_path / "control_sdxl.safetensors", dtype="fp32")
    (result,) = _comfy_load(comfyui, tmp_path, [{"path": str(path), "out": str(tmp_path / "comfy.safetensors"),
                                                 "keys": list(SDXL_CHECKED.values())}])  # fmt: skip
    _assert_clean(result, "tiny SDXL original file")
    assert result["label_emb"], "ComfyUI built no label_emb: it did not take the file for an SDXL ControlNet"
    _assert_same_tensors(result, path, "tiny SDXL original file")
    loaded = load_file(tmp_path / "comfy.safetensors")
    for ours, theirs in SDXL_CHECKED.items():
        assert torch.equal(loaded[theirs], controlnet.state_dict()[ours]), theirs
    assert "comfy" not in sys.modules  # ComfyUI and its shims stayed in the subprocess


def test_the_comfyui_check_names_a_missing_and_an_unexpected_tensor(comfyui, tmp_path):
    """The negative control: the same check, on a copy of the SDXL file with one tensor dropped and
    one bogus tensor added, fails, and ComfyUI's messages name both."""
    path = export_original_controlnet(_tiny_sdxl_controlnet(), tmp_path / "control_sdxl.safetensors", dtype="fp32")
    dropped, bogus = "control_model.zero_convs.1.0.bias", "control_model.bogus_block.0.weight"
    state = load_file(path)
    del state[dropped]
    state[bogus] = torch.zeros(4)
    save_file(state, str(tmp_path / "broken.safetensors"))
    (result,) = _comfy_load(comfyui, tmp_path, [{"path": str(tmp_path / "broken.safetensors")}])
    assert result["class"] == "ControlNet" and result["label_emb"]
    assert len(result["missing"]) == 1 and f"'{dropped}'" in result["missing"][0], result["missing"]
    assert len(result["unexpected"]) == 1 and f"'{bogus}'" in result["unexpected"][0], result["unexpected"]
    with pytest.raises(AssertionError, match=r"missing controlnet keys.*unexpected controlnet keys"):
        _assert_clean(result, "broken tiny SDXL file")
