"""Precomputed ControlNet residuals (controlnet-prep mode=residuals) and adapter mode's controlnet_reroute=precompute:
the file format and its checks, idempotent resumable precompute, and training that swaps them in for the ControlNet."""

import json
import logging
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from nemo_controlnet.data.residuals import (
    META_KEY,
    ResidualMismatch,
    ResidualStage,
    read_manifest,
    read_residuals,
    residual_path,
)
from nemo_controlnet.data.tarshards import shard_samples
from nemo_controlnet.data.transforms import normalize_batch
from nemo_controlnet.data.webdataset import SkipCounter, collate
from nemo_controlnet.prep.job import PrepJob, run_prep
from nemo_controlnet.training.module import ControlNetModule
from nemo_controlnet.training.run import research_options, train
from tests.conftest import compose_train
from tests.test_adapters import _adapter_cfg, _residual_shapes_of_the_unet
from tests.test_prep import prep_cfg

K = 2


def residual_cfg(out, inp, pretrained, *overrides):
    return prep_cfg("mode=residuals", "model=tiny", f"residuals.controlnet={pretrained}", f"residuals.input={inp}",
                    "resolution=64", f"residuals.num_timesteps={K}", f"out_dir={out}", *overrides)  # fmt: skip


@pytest.fixture(scope="module")
def residuals(tmp_path_factory, shapes_dir, pretrained_controlnet):
    """Residuals of every training sample of the shapes dataset (4 shards of 16)."""
    out = tmp_path_factory.mktemp("residuals") / "out"
    summary = run_prep(residual_cfg(out, shapes_dir / "train", pretrained_controlnet))
    return out, summary


def _module(train_cfg, pretrained, residual_dir, *overrides):
    cfg = _adapter_cfg(train_cfg, pretrained, "controlnet_reroute=precompute", f"residuals.dir={residual_dir}",
                       *overrides)  # fmt: skip
    module = ControlNetModule(cfg.model, cfg.optim, adapter_cfg=cfg.adapter, controlnet_cfg=cfg.controlnet,
                              research=research_options(cfg), seed=int(cfg.seed))  # fmt: skip
    module.residuals.place(torch.device("cpu"))
    return cfg, module


class Keys:
    """A stand-in sample decoder: the key, a caption, a hint."""

    epoch, notes, keep_meta = 0, None, False

    def __call__(self, raw):
        return {"key": raw["__key__"], "caption": "a caption", "hint": torch.zeros(3, 64, 64, dtype=torch.uint8)}


def test_residual_shapes(residuals, tmp_path, caplog):
    out, _ = residuals
    manifest = read_manifest(out)
    # Per scale, the skip the UNet's decoder takes (conv_in, each down block's outputs), then its mid block's.
    tiny = compose_train([])
    module = ControlNetModule(tiny.model, tiny.optim)
    inputs = {"noisy_latents": torch.randn(1, 4, 8, 8), "timesteps": torch.tensor([1]),
              "encoder_hidden_states": torch.randn(1, 77, 32)}  # fmt: skip
    unet_shapes = [list(s[1:]) for s in _residual_shapes_of_the_unet(module.unet, inputs)]
    assert list(manifest["shapes"].values()) == unet_shapes and manifest["num_scales"] == len(unet_shapes)
    assert list(manifest["shapes"])[-1] == "mid" and manifest["latent_shape"] == [4, 8, 8]

    # [C,H,W] (as written) and [1,C,H,W] (a leading batch of one) both load and batch to [B,C,H,W].
    keys = manifest["samples"][:2]
    root = tmp_path / "mixed"
    root.mkdir()
    shutil.copy(out / "manifest.json", root / "manifest.json")
    shutil.copy(residual_path(out, keys[0]), residual_path(root, keys[0]))
    tensors, metadata = load_file(residual_path(out, keys[1])), _metadata(residual_path(out, keys[1]))
    batched = {k: v[None] if k.split(".")[0] in ("cond", "uncond", "noise") else v for k, v in tensors.items()}
    save_file(batched, residual_path(root, keys[1]), metadata=metadata)
    stage = ResidualStage(Keys(), root, read_manifest(root))
    batch = collate([stage({"__key__": k}) for k in keys])
    assert batch["residual_state"] == ["hit", "hit"]
    for name, shape in manifest["shapes"].items():
        assert tuple(batch[f"residual_{name}"].shape) == (2, *shape)
    assert tuple(batch["residual_noise"].shape) == (2, 4, 8, 8) and batch["residual_timestep"].shape == (2,)

    # A wrong shape or a missing scale: an error naming the file, the scale and both shapes ...
    wrong = dict(tensors)
    for b in ("cond", "uncond"):
        for k in range(K):
            wrong[f"{b}.{k}.down_1"] = torch.zeros(5, 8, 8, dtype=torch.float16)
            del wrong[f"{b}.{k}.mid"]
    save_file(wrong, residual_path(root, keys[1]), metadata=metadata)
    with pytest.raises(ResidualMismatch, match=rf"{keys[1]}_residuals.safetensors: .*scales .*expected .*mid"):
        stage({"__key__": keys[1]})
    wrong.update({f"{b}.{k}.mid": tensors[f"{b}.{k}.mid"] for b in ("cond", "uncond") for k in range(K)})
    save_file(wrong, residual_path(root, keys[1]), metadata=metadata)
    expected = tuple(manifest["shapes"]["down_1"])
    with pytest.raises(ResidualMismatch, match=rf"{keys[1]}_residuals.safetensors: scale down_1 has shape "
                                               rf"\(5, 8, 8\), expected \({expected[0]}, 8, 8\)"):  # fmt: skip
        stage({"__key__": keys[1]})
    # ... or, with residuals.on_mismatch=on_the_fly, a logged miss the mode computes (zeros until then).
    lenient = ResidualStage(Keys(), root, read_manifest(root), on_mismatch="on_the_fly")
    with caplog.at_level(logging.WARNING, logger="nemo_controlnet.data.residuals"):
        missed = collate([lenient({"__key__": k}) for k in (*keys, "not-there")])
    assert missed["residual_state"] == ["hit", "miss", "miss"]
    assert (
        "scale down_1 has shape" in caplog.text and "not-there_residuals.safetensors: no residual file" in caplog.text
    )
    assert missed["residual_down_1"][1:].abs().sum() == 0


def _files(root):
    return {
        p.relative_to(root): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".prep-logs" not in str(p)
    }


def test_precompute_idempotence(residuals, shapes_dir, pretrained_controlnet, tmp_path):
    out, summary = residuals
    assert summary["written"] == 64 and summary["kept"] == 0 and summary["complete"]
    again = tmp_path / "again"
    first = run_prep(residual_cfg(again, shapes_dir / "train", pretrained_controlnet))
    assert first["written"] == 64
    assert _files(again) == _files(out)  # a second run from scratch: the same bytes, manifest included
    # A rerun skips every file that exists and verifies; a missing or damaged one is made again, identically.
    keys = read_manifest(again)["samples"]
    residual_path(again, keys[0]).unlink()
    residual_path(again, keys[1]).write_bytes(residual_path(again, keys[1]).read_bytes()[:100])
    mtime = residual_path(again, keys[2]).stat().st_mtime_ns
    rerun = run_prep(residual_cfg(again, shapes_dir / "train", pretrained_controlnet))
    assert rerun["written"] == 2 and rerun["kept"] == 62
    assert residual_path(again, keys[2]).stat().st_mtime_ns == mtime
    assert _files(again) == _files(out)


def test_precompute_manifest(residuals, shapes_dir, pretrained_controlnet, train_cfg, tmp_path, caplog):
    out, _ = residuals
    manifest = read_manifest(out)
    every_key = [s["__key__"] for s in shard_samples(sorted(map(str, (shapes_dir / "train").glob("*.tar"))),
                                                        SkipCounter())]  # fmt: skip
    assert manifest["samples"] == sorted(every_key) and len(every_key) == 64 and manifest["complete"]
    assert manifest["num_timesteps"] == K and manifest["after_augmentation"] is False and manifest["crop"] == "center"
    assert manifest["resolution"] == 64 and manifest["dtype"] == "float16" and manifest["control_scale"] == 1.0
    cfg, module = _module(train_cfg, pretrained_controlnet, out)
    assert manifest["base_fingerprint"] == module.base_fingerprint
    assert manifest["controlnet_fingerprint"] == module.training_mode.controlnet_fingerprint
    meta = json.loads(_metadata(residual_path(out, every_key[0]))[META_KEY])
    assert meta["key"] == every_key[0] and meta["num_timesteps"] == K and len(meta["scales"]) == manifest["num_scales"]

    # A cancelled run keeps its files and says it is incomplete; the resumed run's manifest lists every sample.
    inp = tmp_path / "in"
    inp.mkdir()
    for shard in sorted((shapes_dir / "train").glob("*.tar"))[:2]:
        shutil.copy(shard, inp / shard.name)
    part = tmp_path / "part"
    job = PrepJob(residual_cfg(part, inp, pretrained_controlnet), progress=lambda p: p.units_done == 1 and job.cancel())
    cancelled = job.run()
    assert cancelled["cancelled"] and not read_manifest(part)["complete"] and len(read_manifest(part)["samples"]) == 16
    resumed = run_prep(residual_cfg(part, inp, pretrained_controlnet))
    assert resumed["kept"] == 16 and resumed["written"] == 16
    assert read_manifest(part)["complete"] and len(read_manifest(part)["samples"]) == 32

    # Training refuses residuals of another ControlNet, base, resolution, or with augmentation they did not see.
    other = tmp_path / "other"
    other.mkdir()
    module.research.residuals.dir = str(other)
    for field, words in (("controlnet_fingerprint", "residuals of ControlNet 0000, but this run's ControlNet is"),
                         ("base_fingerprint", "residuals made over base model 0000")):  # fmt: skip
        (other / "manifest.json").write_text(json.dumps({**manifest, field: "0000"}))
        with pytest.raises(ValueError, match=words):
            module.training_mode.residual_stage(module, cfg.data)
    (other / "manifest.json").write_text(json.dumps(manifest))
    refusals = [("data.augment.hflip=0.5", "after_augmentation=false"), ("data.augment.crop=random", "one center crop"),
                ("data.resolution=128", "made at 64 px")]  # fmt: skip
    for override, words in refusals:
        with pytest.raises(ValueError, match=words):
            changed = OmegaConf.merge(cfg.data, OmegaConf.from_dotlist([override.removeprefix("data.")]))
            module.training_mode.residual_stage(module, changed)
    # ... and a manifest whose scales differ from the ControlNet's: named, or (on_the_fly) every step computes them.
    (other / "manifest.json").write_text(json.dumps({**manifest, "shapes": {**manifest["shapes"], "mid": [1, 2, 2]}}))
    with pytest.raises(ValueError, match=r"manifest.json: scale mid has shape \[1, 2, 2\], but this ControlNet gives"):
        module.training_mode.residual_stage(module, cfg.data)
    module.research.residuals.on_mismatch = "on_the_fly"
    with caplog.at_level(logging.WARNING):
        assert module.training_mode.residual_stage(module, cfg.data) is None
    assert "every step computes the residuals" in caplog.text


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_swap_correctness(residuals, shapes_dir, pretrained_controlnet, train_cfg):
    """The adapter module's prediction with stored residuals (and the stored latents, timestep, noise) equals the
    one with the ControlNet run now on the same input, for the caption's (conditional) and the empty caption's
    (unconditional, as classifier-free guidance samples it) residuals."""
    from nemo_controlnet.prep.residuals import read_sample

    out, _ = residuals
    cfg, module = _module(train_cfg, pretrained_controlnet, out)
    for p in module.unet.parameters():  # as if the LoRA had trained
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    manifest = read_manifest(out)
    shard = sorted((shapes_dir / "train").glob("*.tar"))[0]
    pcfg = residual_cfg(out, shard, pretrained_controlnet)
    from hydra.utils import instantiate

    raws = list(shard_samples([str(shard)], SkipCounter()))[:2]
    samples = [read_sample(r, pcfg, instantiate(pcfg.hint), 3) for r in raws]
    for branch in ("cond", "uncond"):
        rows = [
            read_residuals(residual_path(out, s["key"]), k, branch, manifest["shapes"]) for k, s in enumerate(samples)
        ]
        captions = [s["caption"] if branch == "cond" else "" for s in samples]
        batch = normalize_batch({**collate(rows), "hint": torch.stack([s["hint"] for s in samples]),
                                 "caption": captions, "residual_state": ["hit", "hit"]})  # fmt: skip
        latents = batch["residual_latents"].float()
        cond = module.family.conditioning(module, batch, module.text_conditioning(batch, False), latents)
        mode = module.training_mode
        with torch.no_grad():
            noisy, timesteps, target = mode.noise(module, batch, latents)
            stored = mode.control_residuals(module, batch, noisy, timesteps, cond)
            pred = module.family.denoise(module.unet, noisy, timesteps, cond, stored)
            live_batch = {k: v for k, v in batch.items() if not k.startswith("residual_")}
            live = mode.control_residuals(module, live_batch, noisy, timesteps, cond)
            expected = module.family.denoise(module.unet, noisy, timesteps, cond, live)
        torch.testing.assert_close(target, batch["residual_noise"].float())  # epsilon: the stored noise
        for got, ref in zip((*stored[0], stored[1]), (*live[0], live[1]), strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-2, atol=2e-3)  # stored in float16
        torch.testing.assert_close(pred, expected, rtol=1e-2, atol=2e-3)
        assert not torch.allclose(stored[1], torch.zeros_like(stored[1]))


def test_precomputed_training_run(residuals, pretrained_controlnet, train_cfg, monkeypatch, caplog):
    """Never runs the ControlNet or the VAE. A real 2-step run through the training command's path with
    controlnet_reroute=precompute: the residuals come
    from the files (one ControlNet call at start: the shape check), the latents too; the LoRA trains."""
    from diffusers import AutoencoderKL

    from nemo_controlnet.models.adapters import ControlResiduals

    out, _ = residuals
    cfg = _adapter_cfg(train_cfg, pretrained_controlnet, "controlnet_reroute=precompute", f"residuals.dir={out}",
                       "trainer.max_steps=2", "validation.num_samples=0", "adapter.lr=1e-2",
                       "model.proportion_empty_prompts=0.5")  # fmt: skip
    calls = []
    real_call = ControlResiduals.__call__
    monkeypatch.setattr(ControlResiduals, "__call__", lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))

    def refuse(*args, **kwargs):
        raise AssertionError("the VAE encoder ran")

    monkeypatch.setattr(AutoencoderKL, "encode", refuse)
    with caplog.at_level(logging.DEBUG, logger="nemo_controlnet.training.modes.adapter"):
        trainer, module = train(cfg)
    assert calls == [1]  # the start's shape check only
    # per batch, not per sample: the 2 steps (and the FLOPs count's pass over the first batch)
    assert caplog.text.count("residual cache: 4 hit(s), 0 miss(es) in a batch of 4") >= 2
    lora_b = [p for n, p in module.unet.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)


def test_precompute_refuses_augmentation_at_the_start_of_training(residuals, pretrained_controlnet, train_cfg):
    out, _ = residuals
    cfg = _adapter_cfg(train_cfg, pretrained_controlnet, "controlnet_reroute=precompute", f"residuals.dir={out}",
                       "trainer.max_steps=1", "validation.num_samples=0", "data.augment.hflip=0.5")  # fmt: skip
    with pytest.raises(ValueError, match="data.augment.hflip=0.5.*after_augmentation=false"):
        train(cfg)


def test_precompute_over_encoded_shards_releases_the_text_encoders(pretrained_controlnet, train_cfg, shapes_dir,
                                                                    tmp_path):  # fmt: skip
    """Precomputed residuals over shards with cached latents and text embeddings: the text encoders are
    released before fit, and the store's shape check at the start takes the empty prompt encoded before."""
    from tests.test_encode import encode

    encode(tmp_path / "encoded", sorted((shapes_dir / "train").glob("*.tar"))[0])
    run_prep(residual_cfg(tmp_path / "residuals", tmp_path / "encoded", pretrained_controlnet))
    cfg = _adapter_cfg(train_cfg, pretrained_controlnet, "controlnet_reroute=precompute",
                       f"residuals.dir={tmp_path / 'residuals'}", f"data.shards={tmp_path / 'encoded'}",
                       "trainer.max_steps=2", "validation.num_samples=0", "data.hint.on_the_fly=false",
                       "model.proportion_empty_prompts=0.5")  # fmt: skip
    trainer, module = train(cfg)
    assert trainer.global_step == 2 and module.text_encoder is None
