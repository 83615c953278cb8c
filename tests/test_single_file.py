"""Stable Diffusion as one original-layout file: written by us, read by diffusers' converters with
our configs' architecture, offline; and the CLIP tokenizer from its BPE vocabulary file."""

import gzip

import pytest
import torch

from nemo_controlnet.config import ConfigError
from nemo_controlnet.models.single_file import bytes_to_unicode, clip_tokenizer_from_bpe, export_base_single_file
from nemo_controlnet.models.stack import build_stack
from tests.conftest import compose_train


def _perturbed_stack(overrides: list[str]):
    stack = build_stack(compose_train(overrides).model)
    with torch.no_grad():  # weights unlike the seeded init, so a load that fell back to it would show
        for module in (stack.unet, stack.vae, stack.text_encoder):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    return stack


def _denoise(stack, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[49406 % stack.text_encoder.config.vocab_size] * 8])
    with torch.no_grad():
        ehs = stack.text_encoder(ids)[0]
        latents = torch.randn(1, 4, 8, 8, generator=g)
        image = stack.vae.decode(latents).sample
        return torch.cat([stack.unet(latents, torch.tensor([500]), ehs).sample.flatten(), image.flatten()])


@pytest.mark.parametrize(
    "model,layout,suffix",
    [("tiny", "sd1", ".safetensors"), ("tiny", "sd1", ".ckpt"), ("tiny", "sd2", ".safetensors"),
     ("tiny_sdxl", "sdxl", ".safetensors")],
)  # fmt: skip
def test_tiny_base_round_trips_through_a_single_file(tmp_path, model, layout, suffix):
    stack = _perturbed_stack([f"model={model}"])
    path = export_base_single_file(
        stack.unet, stack.vae, stack.text_encoder, tmp_path / "base.safetensors", layout=layout,
        text_encoder_2=stack.text_encoder_2,
    )  # fmt: skip
    if suffix == ".ckpt":  # the same weights as a pickled checkpoint, read with weights_only=True
        from safetensors.torch import load_file

        torch.save({"state_dict": load_file(str(path))}, tmp_path / "base.ckpt")
        path = tmp_path / "base.ckpt"
    loaded = build_stack(compose_train([f"model={model}", f"model.checkpoint={path}"]).model)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if stack.text_encoder_2 is not None else [])
    for name in names:
        ours, theirs = getattr(stack, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(ours) == set(theirs), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    if layout != "sdxl":  # (SDXL's UNet needs its added conditions; the weights above are the proof)
        torch.testing.assert_close(_denoise(loaded), _denoise(stack), rtol=1e-5, atol=1e-5)


def _bpe(tmp_path, merges=("h e", "l l", "he ll", "hell o</w>")):
    path = tmp_path / "bpe.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return path


def test_full_size_sd15_round_trips_through_a_single_file(tmp_path):
    stack = build_stack(compose_train(["model=sd15"]).model)  # 1.07B parameters, random
    path = export_base_single_file(stack.unet, stack.vae, stack.text_encoder, tmp_path / "sd15.safetensors")
    expected = _denoise(stack)
    del stack
    with pytest.raises(Exception, match="clip-anytorch"):  # a real file needs the real vocabulary, said first
        build_stack(compose_train(["model=sd15", f"model.checkpoint={path}"]).model)
    bpe = _bpe(tmp_path)  # a stand-in vocabulary: this test is about the weights
    loaded = build_stack(compose_train(["model=sd15", f"model.checkpoint={path}", f"model.tokenizer_bpe={bpe}"]).model)
    torch.testing.assert_close(_denoise(loaded), expected, rtol=1e-5, atol=1e-4)


def test_a_missing_checkpoint_is_named_before_loading(tmp_path):
    with pytest.raises(ConfigError, match=r"model.checkpoint='.*nope.safetensors': no such file"):
        build_stack(compose_train([f"model.checkpoint={tmp_path / 'nope.safetensors'}"]).model)


def test_clip_tokenizer_from_a_bpe_file(tmp_path):
    merges = ["h e", "l l", "he ll", "hell o</w>"]
    tok = clip_tokenizer_from_bpe(str(_bpe(tmp_path, merges)), num_merges=len(merges))
    vocab = tok.get_vocab()
    assert len(vocab) == 512 + len(merges) + 2
    assert vocab["<|startoftext|>"] == 512 + len(merges) and vocab["<|endoftext|>"] == 513 + len(merges)
    by_id = sorted(vocab, key=vocab.get)
    assert by_id[:3] == list(bytes_to_unicode().values())[:3] == ["!", '"', "#"]  # CLIP's id order
    assert by_id[256] == "!</w>" and len(set(bytes_to_unicode().values())) == 256
    ids = tok("Hello").input_ids
    assert ids == [vocab["<|startoftext|>"], vocab["hello</w>"], vocab["<|endoftext|>"]]
    with pytest.raises(FileNotFoundError, match="clip-anytorch"):
        clip_tokenizer_from_bpe(str(tmp_path / "missing.txt.gz"))
