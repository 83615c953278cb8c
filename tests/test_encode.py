"""controlnet-prep mode=encode: cached latents and text embeddings, and training on them."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from diffusers import AutoencoderKL
from PIL import Image

from tests.conftest import compose_train
from nemo_controlnet.data.datamodule import make_decoder
from nemo_controlnet.prep.encode import member_bytes
from nemo_controlnet.prep.job import run_prep
from nemo_controlnet.data.transforms import ResizeCrop, normalize_batch
from nemo_controlnet.data.webdataset import collate
from nemo_controlnet.training.module import ControlNetModule
from nemo_controlnet.training.run import train
from tests.test_prep import prep_cfg


def write_wide_shards(root, num_shards=2, per_shard=3):
    """Shards of 96x64 images with hints: encoding must center-crop both the same way."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in range(num_shards):
        with wds.TarWriter(str(root / f"in-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                image = rng.integers(0, 255, (64, 96, 3), np.uint8)
                hint = np.zeros((64, 96), np.uint8)
                hint[:, 10 + 7 * i] = 255  # a vertical line whose column the crop must shift
                sink.write({"__key__": f"s{s}-{i}", "jpg": png(image), "png": png(hint), "txt": f"caption {s} {i}"})
    return root


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def read(out):
    manifest = json.loads((out / "manifest.json").read_text())
    samples = [s for shard in manifest["shards"] for s in wds.WebDataset(str(out / shard["name"]), shardshuffle=False)]
    return manifest, samples


def encode(out, inp, *overrides):
    return run_prep(prep_cfg("mode=encode", "model=tiny", f"encode.input={inp}", f"out_dir={out}", "resolution=64",
                             "encode.batch_size=2", *overrides))  # fmt: skip


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    inp = write_wide_shards(root / "in")
    summary = encode(root / "out", inp)
    return inp, root / "out", summary


def test_encoded_shards_hold_the_encoders_outputs_of_the_center_crop(encoded):
    inp, out, summary = encoded
    manifest, samples = read(out)
    assert summary["written"] == 6 and manifest["complete"] and manifest["num_shards"] == 2
    cfg = compose_train(["model.proportion_empty_prompts=0"])
    module = ControlNetModule(cfg.model, cfg.optim)
    assert manifest["params"]["encoded"]["fingerprint"] == module.encoder_fingerprint
    originals = {s["__key__"]: s for s in wds.WebDataset(str(inp / "in-{000000..000001}.tar"), shardshuffle=False)}
    geometry = ResizeCrop.center(96, 64, 64)
    for s in samples:
        original = originals[s["__key__"]]
        image = geometry.apply(np.asarray(Image.open(io.BytesIO(original["jpg"])).convert("RGB")))
        hint = geometry.apply(np.asarray(Image.open(io.BytesIO(original["png"]))), "hint")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), hint)  # the same crop as the image
        assert json.loads(s["json"])["sdxl"] == {"original_size": [64, 96], "crop_top_left": [0, 16]}
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            params = module.vae.encode(pixels).latent_dist.parameters[0]
            text, _ = module.encode_prompts([original["txt"].decode()])
        latent = torch.from_numpy(np.load(io.BytesIO(s["latent.npy"])))
        assert latent.dtype == torch.float16 and latent.shape == params.shape == (8, 8, 8)
        torch.testing.assert_close(latent.float(), params, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(torch.from_numpy(np.load(io.BytesIO(s["text.npy"]))).float(), text[0],
                                   atol=2e-3, rtol=2e-3)  # fmt: skip


def test_cached_batches_give_the_online_loss(encoded):
    inp, out, _ = encoded
    cfg = compose_train(["model.proportion_empty_prompts=0.5", "data.resolution=64"])
    module = ControlNetModule(cfg.model, cfg.optim)

    def first_shard(folder, cached):
        raw = wds.tarfile_samples([{"url": str(sorted(folder.glob("*.tar"))[0])}])
        return normalize_batch(collate([make_decoder(cfg.data, 3, cached=cached)(dict(r)) for r in raw]))

    online, cached = first_shard(inp, False), first_shard(out, True)  # online: the unencoded input
    assert "image" not in cached and cached["latent_dist"].shape == (3, 8, 8, 8)
    assert torch.equal(online["hint"], cached["hint"]) and online["caption"] == cached["caption"]
    for seed in range(3):  # the same draws: posterior sample, caption dropout, noise, timesteps
        torch.manual_seed(seed)
        loss_online = module.diffusion_loss(online)
        torch.manual_seed(seed)
        loss_cached = module.diffusion_loss(cached)
        torch.testing.assert_close(loss_cached, loss_online, rtol=1e-2, atol=1e-4)


def test_training_on_encoded_shards_never_runs_the_vae_encoder(train_cfg, encoded, monkeypatch):
    _, out, _ = encoded

    def refuse(*args, **kwargs):
        raise AssertionError("the VAE encoder ran despite cached latents")

    monkeypatch.setattr(AutoencoderKL, "encode", refuse)
    trainer, _ = train(train_cfg(f"data.shards={out}", "trainer.max_steps=2", "data.batch_size=2"))
    assert trainer.global_step == 2


@pytest.mark.parametrize(
    "override, words",
    [
        ("data.augment.hflip=0.5", "data.augment.crop=center, data.augment.hflip=0.5"),
        ("data.augment.crop=random", "data.augment.crop=random"),
        ("data.resolution=32", "data.resolution=32"),
        ("data.hint.on_the_fly=true", "data.hint.on_the_fly=true"),
        ("model.seed=1", "encoder fingerprint"),
    ],
)
def test_encoded_shards_refuse_what_would_misalign_them(train_cfg, encoded, override, words):
    _, out, _ = encoded
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(".", r"\.")):
        train(train_cfg(f"data.shards={out}", override))


def test_encode_resumes_and_refuses_another_model(encoded):
    inp, out, _ = encoded
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert encode(out, inp)["written"] == 0  # complete shards are not redone
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    with pytest.raises(ValueError, match="encoded"):
        encode(out, inp, "model.seed=5")
    with pytest.raises(ValueError, match="mode=encode needs model="):
        run_prep(prep_cfg("mode=encode", f"encode.input={inp}", f"out_dir={out}", "resolution=64"))


def test_sdxl_encodes_pooled_embeddings_and_trains_on_them(train_cfg, tmp_path):
    inp = write_wide_shards(tmp_path / "in", num_shards=1, per_shard=2)
    encode(tmp_path / "out", inp, "model=tiny_sdxl")
    _, samples = read(tmp_path / "out")
    pooled = np.load(io.BytesIO(samples[0]["pooled.npy"]))
    assert pooled.shape == (32,) and np.load(io.BytesIO(samples[0]["text.npy"])).shape[-1] == 32 + 48
    decoder = make_decoder(compose_train(["data.resolution=64"]).data, 3, cached=True)
    batch = collate([decoder(dict(s)) for s in samples])
    assert batch["pooled_text_embeds"].shape == (2, 32)  # projection_dim
    assert batch["original_size"].tolist() == [[64, 96]] * 2 and batch["crop_top_left"].tolist() == [[0, 16]] * 2
    trainer, _ = train(train_cfg("model=tiny_sdxl", f"data.shards={tmp_path / 'out'}", "trainer.max_steps=1",
                                 "data.batch_size=2"))  # fmt: skip
    assert trainer.global_step == 1


@pytest.mark.parametrize("model,text_shape,pooled_width", [("tiny_sd3", (77 + 16, 64), 64),
                                                          ("tiny_flux", (16, 64), 32)])  # fmt: skip
def test_transformer_families_cache_t5_embeddings_in_shards_under_the_size_limit(train_cfg, tmp_path, model,
                                                                                 text_shape, pooled_width):  # fmt: skip
    """The family's text embeddings (SD3: CLIP-L, CLIP-G and T5 states; Flux: T5 states, CLIP pooled) are
    cached; an input shard is split so every output shard stays under encode.max_shard_mb, the manifest
    lists every part, and training reads them."""
    from nemo_controlnet.models.families import family_for

    inp = write_wide_shards(tmp_path / "in", num_shards=2, per_shard=3)
    encode(tmp_path / "whole", inp, f"model={model}", "encode.max_shard_mb=null")  # one shard per input
    largest = max(member_bytes(s) for s in read(tmp_path / "whole")[1])
    limit_mb = (2 * largest + tarfile.RECORDSIZE) / 2**20  # two samples a part, not three
    encode(tmp_path / "out", inp, f"model={model}", f"encode.max_shard_mb={limit_mb}")
    manifest, samples = read(tmp_path / "out")
    names = [s["name"] for s in manifest["shards"]]
    assert len(names) == 4 and any(n.endswith(".p01.tar") for n in names)
    assert sum(s["num_samples"] for s in manifest["shards"]) == len(samples) == 6
    assert all((tmp_path / "out" / n).stat().st_size <= limit_mb * 2**20 for n in names)
    assert sorted(s["__key__"] for s in samples) == sorted(f"s{s}-{i}" for s in range(2) for i in range(3))

    model_cfg = compose_train([f"model={model}"]).model
    family = family_for(model_cfg)
    stack = family.build_stack(model_cfg)
    with torch.no_grad():
        states, pooled = family.encode_text(stack, [samples[0]["txt"].decode()])
    cached = np.load(io.BytesIO(samples[0]["text.npy"]))
    assert cached.shape == text_shape == tuple(states.shape[1:])
    assert np.load(io.BytesIO(samples[0]["pooled.npy"])).shape == (pooled_width,)
    np.testing.assert_allclose(cached, states[0].numpy(), atol=2e-3, rtol=2e-3)  # float16
    cached_pooled = np.load(io.BytesIO(samples[0]["pooled.npy"]))
    np.testing.assert_allclose(cached_pooled, pooled[0].numpy(), atol=2e-3, rtol=2e-3)

    # a second run over the same output writes nothing; training reads the parts through the manifest
    again = encode(tmp_path / "out", inp, f"model={model}", f"encode.max_shard_mb={limit_mb}")
    assert again["written"] == 0
    trainer, _ = train(train_cfg(f"model={model}", f"data.shards={tmp_path / 'out' / 'manifest.json'}",
                                 "trainer.max_steps=1", "data.batch_size=2"))  # fmt: skip
    assert trainer.global_step == 1


@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl", "tiny_sd3", "tiny_flux"])
def test_released_text_encoders_change_no_step_and_no_validation_image(train_cfg, tmp_path, model):
    """On cached text embeddings the text encoders are dropped before fit (perf.release_text_encoders, the
    default): caption dropout swaps in the same empty prompt and the validation grids come out pixel for
    pixel as with the encoders kept, for every family's pipeline (SDXL's zeroed negative, SD3's three
    encoders, Flux's guidance without a negative)."""
    inp = write_wide_shards(tmp_path / "in", num_shards=1, per_shard=4)
    encode(tmp_path / "out", inp, f"model={model}")
    runs = {}
    for release in (True, False):
        trainer, module = train(train_cfg(
            f"model={model}", f"data.shards={tmp_path / 'out'}", f"run_dir={tmp_path / f'run_{release}'}",
            "trainer.max_steps=2", "data.batch_size=2", "validation.every_n_steps=2",
            "model.proportion_empty_prompts=0.75", f"perf.release_text_encoders={release}", "export.enabled=false",
        ))  # fmt: skip
        assert trainer.global_step == 2
        runs[release] = module
    released, kept = runs[True], runs[False]
    assert released.text_encoder is None and released.text_encoder_2 is None
    assert not any("text_encoder" in name for name, _ in released.named_parameters())
    assert kept.text_encoder is not None and kept._empty_prompt is not None  # dropout happened, lazily encoded
    with pytest.raises(RuntimeError, match="perf.release_text_encoders"):
        released.encode_prompts(["a caption"])
    trained = released.trainable_named_parameters()
    assert trained.keys() == kept.trainable_named_parameters().keys()
    for name, param in kept.trainable_named_parameters().items():
        torch.testing.assert_close(trained[name], param, rtol=0, atol=0, msg=name)
    for step in (0, 2):
        released_grid, kept_grid = (np.asarray(Image.open(tmp_path / f"run_{r}" / "samples" / f"step_{step:07d}.png"))
                                    for r in (True, False))  # fmt: skip
        np.testing.assert_array_equal(released_grid, kept_grid)


@pytest.mark.parametrize("model", ["tiny_sd3", "tiny_flux"])
def test_transformer_families_cache_the_hint_posterior_and_never_run_the_vae_encoder(train_cfg, tmp_path, model,
                                                                                      monkeypatch):  # fmt: skip
    """SD3 and Flux ControlNets take the hint VAE-encoded: mode=encode caches its posterior as training reads
    the hint (model.hint_channels, one channel repeated to three), a cached batch gives the online loss with
    the same draws, training never runs the VAE encoder, and another hint_channels is refused by name."""
    inp = write_wide_shards(tmp_path / "in", num_shards=1, per_shard=3)
    encode(tmp_path / "out", inp, f"model={model}", "model.hint_channels=1")
    manifest, samples = read(tmp_path / "out")
    assert manifest["params"]["encoded"]["hint_latent_channels"] == 1
    assert all("hint_latent.npy" in s for s in samples)

    cfg = compose_train([f"model={model}", "model.hint_channels=1", "data.resolution=64",
                         "model.proportion_empty_prompts=0"])  # fmt: skip
    module = ControlNetModule(cfg.model, cfg.optim)
    cached = normalize_batch(collate([make_decoder(cfg.data, 1, cached=True)(dict(s)) for s in samples]))
    assert cached["hint"].shape == (3, 1, 64, 64) and cached["hint"].unique().tolist() == [0.0, 1.0]
    with torch.no_grad():
        expected = module.vae.encode(cached["hint"].expand(-1, 3, -1, -1) * 2 - 1).latent_dist.parameters
    assert cached["hint_latent_dist"].dtype == torch.float16 and cached["hint_latent_dist"].shape == expected.shape
    torch.testing.assert_close(cached["hint_latent_dist"].float(), expected, atol=2e-3, rtol=2e-3)
    online = {k: v for k, v in cached.items() if k != "hint_latent_dist"}  # the hint VAE-encoded in the step
    for seed in range(2):
        torch.manual_seed(seed)
        loss_cached = module.diffusion_loss(dict(cached))
        torch.manual_seed(seed)
        loss_online = module.diffusion_loss(dict(online))
        torch.testing.assert_close(loss_cached, loss_online, rtol=1e-2, atol=1e-4)

    def refuse(*args, **kwargs):
        raise AssertionError("the VAE encoder ran despite cached image and hint latents")

    monkeypatch.setattr(AutoencoderKL, "encode", refuse)
    common = (f"model={model}", f"data.shards={tmp_path / 'out'}", "trainer.max_steps=2", "data.batch_size=2",
              "validation.num_samples=0")  # sampling VAE-encodes its control image; the step must not
    trainer, _ = train(train_cfg(*common, "model.hint_channels=1"))
    assert trainer.global_step == 2
    with pytest.raises(ValueError, match=r"model\.hint_channels=3, but .* at 1 channel"):
        train(train_cfg(*common, "model.hint_channels=3"))
