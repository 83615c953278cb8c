"""controlnet-init (the original repo's tool_add_control): an SD checkpoint, as a diffusers directory or
one original-layout file, -> a ControlNet initialised from its UNet, in diffusers format and in the
original ``control_model.*`` layout; a checkpoint that is not an SD UNet is refused, naming what is missing."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel
from safetensors import safe_open
from safetensors.torch import save_file

from nemo_controlnet.config import ConfigError
from nemo_controlnet.io import UserError
from nemo_controlnet.models.formats import ORIGINAL_PREFIX, load_original_controlnet, original_controlnet_key
from nemo_controlnet.models.init_controlnet import init_controlnet
from nemo_controlnet.models.single_file import original_unet_state
from nemo_controlnet.models.stack import build_stack
from tests.conftest import compose_train

SCRIPT = Path(sys.executable).parent / "controlnet-init"  # the console script, as a user runs it
ENCODER = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.", "add_embedding.")
ZERO_CONVS = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")


def _init(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([str(SCRIPT), *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_unet():
    """The tiny model's UNet as training builds it (seeded), its weights moved off the seeded init so
    that a load falling back to random init would show."""
    unet = build_stack(compose_train(["model=tiny"]).model).unet
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return unet.eval()


def _check_initialised(controlnet: ControlNetModel, unet) -> None:
    """What tool_add_control makes: every encoder weight the UNet's, every zero convolution zero."""
    ours, theirs = controlnet.state_dict(), unet.state_dict()
    encoder = [k for k in ours if k.startswith(ENCODER)]
    assert encoder and len(encoder) == len([k for k in theirs if k.startswith(ENCODER)])
    for key in encoder:
        assert torch.equal(ours[key], theirs[key]), key
    zero = [k for k in ours if k.startswith(ZERO_CONVS)]
    assert len(zero) == 2 * (len(controlnet.controlnet_down_blocks) + 2)  # weight and bias of each
    for key in zero:
        assert not ours[key].any(), key
    hint = [k for k in ours if k.startswith("controlnet_cond_embedding.") and not k.startswith(ZERO_CONVS)]
    assert hint and all(ours[k].any() for k in hint if k.endswith("weight"))  # diffusers' random init
    assert set(ours) == {*encoder, *zero, *hint}


def _check_original_file(path: Path, controlnet: ControlNetModel) -> None:
    """The original layout: control_model.* keys, each holding the diffusers weight of its name."""
    lpb, blocks = controlnet.config.layers_per_block, len(controlnet.controlnet_cond_embedding.blocks)
    state = controlnet.state_dict()
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert keys == {ORIGINAL_PREFIX + original_controlnet_key(k, lpb, blocks) for k in state}
        for key, value in state.items():
            assert torch.equal(f.get_tensor(ORIGINAL_PREFIX + original_controlnet_key(key, lpb, blocks)), value), key
    assert {"control_model.input_blocks.0.0.weight", "control_model.zero_convs.0.0.weight",
            "control_model.middle_block_out.0.weight", "control_model.input_hint_block.14.weight"} <= keys  # fmt: skip
    loaded = load_original_controlnet(path, dict(controlnet.config))  # and our reader gives it back
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_init_from_a_diffusers_directory_and_from_a_single_file(tmp_path, tiny_unet):
    tiny_unet.save_pretrained(tmp_path / "sd" / "unet")  # a pipeline directory's unet/
    single = tmp_path / "sd.safetensors"
    save_file({**original_unet_state(tiny_unet), "first_stage_model.decoder.conv_in.weight": torch.ones(1)},
              str(single))  # fmt: skip
    # A diffusers base brings its UNet config; model= (default sd15) gives the hint encoder's widths.
    for base, out, extra, widths in ((tmp_path / "sd", tmp_path / "from_dir", [], [16, 32, 96, 256]),
                                     (single, tmp_path / "from_file", ["model=tiny"], [8, 16, 16, 32])):  # fmt: skip
        proc = _init(f"base={base}", f"out={out}", *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        controlnet = ControlNetModel.from_pretrained(out / "controlnet", local_files_only=True)
        assert controlnet.config.conditioning_channels == 3
        assert list(controlnet.config.conditioning_embedding_out_channels) == widths
        _check_initialised(controlnet, tiny_unet)
        assert (out / "controlnet" / "SHA256SUMS").is_file() and (out / "controlnet" / "nemo_controlnet.json").is_file()
        _check_original_file(out / f"control_{out.name}.safetensors", controlnet)
    # Initialised the same from either form of the same UNet (the hint encoders differ: other widths).
    a = ControlNetModel.from_pretrained(tmp_path / "from_dir" / "controlnet").state_dict()
    b = ControlNetModel.from_pretrained(tmp_path / "from_file" / "controlnet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(ENCODER))


def test_init_in_the_library_hint_channels_dtype_and_a_unet_directory(tmp_path, tiny_unet):
    tiny_unet.save_pretrained(tmp_path / "unet")  # a UNet directory itself
    cfg = compose_train(["model=tiny"]).model
    written = init_controlnet(tmp_path / "unet", tmp_path / "out", cfg, hint_channels=1, dtype="fp16")
    with safe_open(str(written["controlnet"] / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    controlnet = ControlNetModel.from_pretrained(written["controlnet"], torch_dtype=torch.float16)
    assert controlnet.config.conditioning_channels == 1
    _check_initialised(controlnet, tiny_unet.half())
    tiny_unet.float()
    _check_original_file(written["original"], controlnet)
    with safe_open(str(written["original"]), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    # An existing output is never replaced unasked (out= may be a training run_dir).
    with pytest.raises(UserError, match=r"out: .*out/controlnet already exists: choose another out, or overwrite=true"):
        init_controlnet(tmp_path / "unet", tmp_path / "out", cfg, original=False)
    init_controlnet(tmp_path / "unet", tmp_path / "out", cfg, original=False, overwrite=True)  # fp32, replaced
    with safe_open(str(written["controlnet"] / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_init_from_an_sdxl_single_file(tmp_path):
    """SDXL: the add embedding (pooled text + time ids) is copied too, and written as label_emb.0.*."""
    cfg = compose_train(["model=tiny_sdxl"]).model
    unet = build_stack(cfg).unet
    save_file(original_unet_state(unet), str(tmp_path / "sdxl.safetensors"))
    written = init_controlnet(tmp_path / "sdxl.safetensors", tmp_path / "out", cfg)
    controlnet = ControlNetModel.from_pretrained(written["controlnet"])
    assert controlnet.config.addition_embed_type == "text_time"
    _check_initialised(controlnet, unet)
    assert any(k.startswith("add_embedding.") for k in controlnet.state_dict())
    _check_original_file(written["original"], controlnet)
    with safe_open(str(written["original"]), "pt") as f:
        assert "control_model.label_emb.0.0.weight" in f.keys()


def test_a_file_that_is_not_an_sd_unet_is_refused_naming_what_is_missing(tmp_path, tiny_unet):
    g = torch.Generator().manual_seed(0)
    save_file({"encoder.layer.0.weight": torch.randn(4, 4, generator=g), "head.bias": torch.randn(4, generator=g)},
              str(tmp_path / "random.safetensors"))  # fmt: skip
    proc = _init(f"base={tmp_path / 'random.safetensors'}", f"out={tmp_path / 'out'}", "model=tiny", cwd=tmp_path)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("controlnet-init: error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "no Stable Diffusion UNet of model=tiny in" in errors[0] and "random.safetensors" in errors[0]
    assert "missing all 208 UNet weights: model.diffusion_model.input_blocks.0.0.weight, " in errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "controlnet").exists()

    cfg = compose_train(["model=tiny"]).model
    state = original_unet_state(tiny_unet)  # one weight short, one of another shape: both named
    del state["model.diffusion_model.middle_block.2.out_layers.3.bias"]
    state["model.diffusion_model.input_blocks.1.1.proj_in.weight"] = torch.zeros(32, 32)
    save_file(state, str(tmp_path / "short.safetensors"))
    with pytest.raises(UserError, match=r"missing 1 of the 208 UNet weights: model\.diffusion_model\.middle_block"
                                        r"\.2\.out_layers\.3\.bias; 1 with other shapes: .*proj_in\.weight "
                                        r"\(file \(32, 32\), model=tiny \(32, 32, 1, 1\)\)"):  # fmt: skip
        init_controlnet(tmp_path / "short.safetensors", tmp_path / "out", cfg)
    # A released model's file under another model= config: the refusal says which one it looks like.
    state = original_unet_state(tiny_unet)
    state["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(320, 1024)
    save_file(state, str(tmp_path / "sd2ish.safetensors"))
    with pytest.raises(UserError, match="looks like model=sd21: add model=sd21"):
        init_controlnet(tmp_path / "sd2ish.safetensors", tmp_path / "out", cfg)
    # diffusers' weights file handed in alone: pass its directory.
    save_file(tiny_unet.state_dict(), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(UserError, match="keys are diffusers'.*pass the directory"):
        init_controlnet(tmp_path / "diffusion_pytorch_model.safetensors", tmp_path / "out", cfg)


def test_directories_that_hold_no_sd_unet_are_refused(tmp_path):
    cfg = compose_train(["model=tiny"]).model
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty has no unet/config.json"):
        init_controlnet(tmp_path / "empty", tmp_path / "out", cfg)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(UserError, match=r"is a AutoencoderKL, not a UNet2DConditionModel"):
        init_controlnet(tmp_path / "vae", tmp_path / "out", cfg)
    (tmp_path / "sd" / "unet").mkdir(parents=True)  # a config and no weights
    (tmp_path / "sd" / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(UserError, match=r"cannot load the UNet in .*unet"):
        init_controlnet(tmp_path / "sd", tmp_path / "out", cfg)
    with pytest.raises(FileNotFoundError, match="base='.*nope': no such file or directory"):
        init_controlnet(tmp_path / "nope", tmp_path / "out", cfg)
    local = compose_train(["model=local_diffusers", "model.path=/x"]).model
    (tmp_path / "f.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"out_channels=\[16, 32\]: the original single-file layout needs 4"):
        init_controlnet(tmp_path / "nope", tmp_path / "out", compose_train(["model=toy"]).model)  # before any read
    with pytest.raises(ConfigError, match="model=local_diffusers reads a diffusers directory"):
        init_controlnet(tmp_path / "f.safetensors", tmp_path / "out", local)
    with pytest.raises(UserError, match=r"base: cannot read .*f\.safetensors as weights"):
        init_controlnet(tmp_path / "f.safetensors", tmp_path / "out", cfg)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickled_checkpoint_is_read_weights_only(tmp_path, tiny_unet, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_train(["model=tiny"]).model
    good = tmp_path / "sd.ckpt"  # an original .ckpt as SD shipped it: {"state_dict": ..., "global_step": N}
    torch.save({"state_dict": original_unet_state(tiny_unet), "global_step": 1}, good)
    written = init_controlnet(good, tmp_path / "out", cfg, original=False)
    _check_initialised(ControlNetModel.from_pretrained(written["controlnet"]), tiny_unet)

    state = original_unet_state(tiny_unet)
    torch.save({"state_dict": {**state, "callback": _Exploit()}}, tmp_path / "evil.ckpt")
    with open(tmp_path / "evil_legacy.pt", "wb") as f:  # a plain (non-zip) pickle, as old checkpoints are
        pickle.dump({"state_dict": _Exploit()}, f)
    for name in ("evil.ckpt", "evil_legacy.pt"):
        with pytest.raises(UserError, match=rf"base: .*{name} refused by weights-only loading"):
            init_controlnet(tmp_path / name, tmp_path / "out2", cfg)
        assert not (tmp_path / "pwned").exists()
    proc = _init(f"base={tmp_path / 'evil.ckpt'}", f"out={tmp_path / 'out3'}", "model=tiny", cwd=tmp_path)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("controlnet-init: error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "evil.ckpt refused by weights-only loading" in errors[0]
    assert not (tmp_path / "pwned").exists()


def test_a_controlnet_from_init_trains(tmp_path, train_cfg):
    """controlnet-train starts from it (model.control_stage_config.pretrained=) over the same base."""
    from nemo_controlnet.training.run import train

    unet = build_stack(compose_train(["model=tiny"]).model).unet  # the base the training config builds
    unet.save_pretrained(tmp_path / "sd" / "unet")
    written = init_controlnet(tmp_path / "sd", tmp_path / "init", compose_train(["model=tiny"]).model)
    trainer, module = train(train_cfg(f"model.control_stage_config.pretrained={written['controlnet']}",
                                      "trainer.max_steps=2", "data.batch_size=2"))  # fmt: skip
    assert trainer.global_step == 2
    trained = module.controlnet.state_dict()
    start = ControlNetModel.from_pretrained(written["controlnet"]).state_dict()
    assert not all(torch.equal(trained[k].cpu(), start[k]) for k in start)  # it learned from there
    assert any(trained[k].any() for k in trained if k.startswith("controlnet_mid_block."))  # zero convs moved
