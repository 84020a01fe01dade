"""Scorers: pixel statistics against closed forms and known orders; every neural scorer built tiny with random
weights in its real architecture, saved in its public checkpoint format, loaded back through build_scorer and
checked against the underlying model computing the published formula directly."""
from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors.torch import save_file
from torch import nn

from prefcurate.curation.scorers import SCORERS, CheckpointFormatError, MissingWeightsError, build_scorer
from prefcurate.curation.scorers.pixel import colourfulness, exposure_quality, laplacian_variance, named_colours


TINY_ARCH = "prefcurate-tiny-vit"
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
PROMPTS = ["a red kite by the sea", "a blue car on a quiet street", "a red kite by the sea"]


def _images(n: int = 3, size: int = 40, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    cfg_dir = tmp_path_factory.mktemp("open_clip_cfg")
    (cfg_dir / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_dir)
    return TINY_ARCH


def _tiny_open_clip(seed: int):
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=None)
    return model.eval(), preprocess


def _open_clip_cosine(model, preprocess, images, prompts) -> torch.Tensor:
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(im) for im in images]))
        text = model.encode_text(open_clip.get_tokenizer(TINY_ARCH)(prompts))
    return (image / image.norm(dim=-1, keepdim=True) * (text / text.norm(dim=-1, keepdim=True))).sum(-1)


def _write_open_clip_dir(model, directory: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {
        "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "open_clip_model.safetensors")


class RefMLP(nn.Module):  # the public aesthetic / ImageReward head layout, written out independently
    def __init__(self, d: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


# ---- pixel scorers --------------------------------------------------------------------------------------

def test_laplacian_variance_closed_form():
    grey = np.zeros((3, 4))
    grey[1, 1] = 1.0  # interior Laplacians: (1,1) = -4, (1,2) = +1 -> mean -1.5, variance 6.25
    assert laplacian_variance(grey) == pytest.approx(6.25)
    with pytest.raises(ValueError, match="3x3"):
        laplacian_variance(np.zeros((2, 5)))


def test_sharpness_blurred_below_sharp():
    checker = Image.fromarray((np.indices((64, 64)).sum(0) // 4 % 2 * 255).astype(np.uint8)).convert("RGB")
    blurred = [checker.filter(ImageFilter.GaussianBlur(r)) for r in (0.8, 2.0)]
    s = build_scorer("sharpness").score([checker, *blurred])
    assert s.dtype == np.float64 and s[0] > s[1] > s[2] > 0


def test_colourfulness_closed_form():
    grey = Image.new("RGB", (8, 8), (90, 90, 90))
    red = Image.new("RGB", (8, 8), (255, 0, 0))  # rg = 255, yb = 127.5, no spread -> 0.3·hypot(255, 127.5)
    s = build_scorer("colourfulness").score([grey, red])
    assert s[0] == pytest.approx(0.0, abs=1e-9) and s[1] == pytest.approx(0.3 * np.hypot(255, 127.5))
    assert colourfulness(np.asarray(red, dtype=float) / 255) == pytest.approx(s[1])


def test_exposure_prefers_well_exposed():
    rng = np.random.default_rng(0)
    mid = Image.fromarray(rng.integers(100, 156, (32, 32, 3), dtype=np.uint8))
    bright = Image.fromarray(np.clip(np.asarray(mid, dtype=int) + 90, 0, 255).astype(np.uint8))
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    s = build_scorer("exposure").score([mid, bright, white])
    assert s[0] > s[1] > s[2]
    assert s[2] == pytest.approx(-1.5)  # luma 1: -|1 - 0.5| - 100 % clipped
    assert exposure_quality(np.full((4, 4, 3), 0.5)) == pytest.approx(0.0)


def test_prompt_colour_named_colour_scores_higher():
    canvas = np.full((64, 64, 3), 120, dtype=np.uint8)
    red_img, green_img = canvas.copy(), canvas.copy()
    red_img[16:48, 16:48] = (215, 40, 40)  # 25 % of the pixels exactly palette red (> the 20 % region)
    green_img[16:48, 16:48] = (45, 170, 65)
    scorer = build_scorer("prompt_colour")
    s = scorer.score([Image.fromarray(red_img), Image.fromarray(green_img)], ["a red kite", "a red kite"])
    grey_to_red = np.linalg.norm(np.subtract((120, 120, 120), (215, 40, 40))) / 255
    assert s[0] == pytest.approx(0.0, abs=1e-12)
    assert s[1] == pytest.approx(-min(grey_to_red, np.linalg.norm(np.subtract((45, 170, 65), (215, 40, 40))) / 255))
    assert scorer.score([Image.fromarray(green_img)], ["A GREEN chair"])[0] == pytest.approx(0.0, abs=1e-12)
    # two named colours: mean of the two distances (red present, blue absent)
    grey_to_blue = np.linalg.norm(np.subtract((120, 120, 120), (45, 85, 215))) / 255
    assert scorer.score([Image.fromarray(red_img)], ["red and blue"])[0] == pytest.approx(-grey_to_blue / 2)
    assert scorer.score([Image.fromarray(red_img)], ["a chair in a studio"])[0] == 0.0  # no colour: neutral
    big = Image.fromarray(red_img).resize((512, 512), Image.Resampling.NEAREST)  # scored on a 128 px copy
    assert scorer.score([big], ["a red kite"])[0] == pytest.approx(0.0, abs=1e-6)
    assert named_colours("a gray cat and a Red hat, red again") == ["grey", "red"]


def test_pixel_scorer_input_checks():
    with pytest.raises(ValueError, match="prompt"):
        build_scorer("prompt_colour").score(_images(2))
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        build_scorer("sharpness").score(_images(2), ["x"])


# ---- registry and weights discovery ----------------------------------------------------------------------

def test_unknown_scorer_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: aesthetic, clip, colourfulness"):
        build_scorer("pickscorez")


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_scorer_builds_or_names_its_missing_file(name, tmp_path):
    pixel = {"sharpness", "colourfulness", "exposure", "prompt_colour"}
    if name in pixel:
        scorer = build_scorer(name, weights_dir=tmp_path)
        assert scorer.name == name and len(scorer.score(_images(2), ["a red kite"] * 2)) == 2
        return
    with pytest.raises(ValueError, match="needs weights"):
        build_scorer(name)
    with pytest.raises(MissingWeightsError) as err:
        build_scorer(name, weights_dir=tmp_path)
    expected = {"hpsv2": ("HPS_v2_compressed.pt", "xswu/HPSv2"), "hpsv2.1": ("HPS_v2.1_compressed.pt", "xswu/HPSv2"),
                "pickscore": ("PickScore_v1", "yuvalkirstain/PickScore_v1"),
                "clip": ("open_clip_config.json", "timm/vit_large_patch14_clip_224.openai"),
                "aesthetic": ("sac+logos+ava1-l14-linearMSE.pth", "improved-aesthetic-predictor"),
                "imagereward": ("ImageReward.pt", "THUDM/ImageReward")}[name]
    assert all(part in str(err.value) for part in expected)


class NotATensor:  # torch.load(weights_only=True) refuses arbitrary classes
    pass


@pytest.mark.parametrize("content", ["garbage", "pickle", "wrong_keys"])
def test_corrupt_checkpoint_is_a_clear_error(content, tmp_path, tiny_arch):
    path = tmp_path / "HPS_v2_compressed.pt"
    if content == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif content == "pickle":
        torch.save({"state_dict": NotATensor()}, path)
    else:
        torch.save({"state_dict": {"visual.nonsense": torch.zeros(3)}}, path)
    with pytest.raises(CheckpointFormatError, match="HPS_v2_compressed.pt"):
        build_scorer("hpsv2", weights_dir=tmp_path, arch=tiny_arch)


# ---- open_clip family ------------------------------------------------------------------------------------

def test_hpsv2_matches_direct_cosine_and_versions_differ(tmp_path, tiny_arch):
    model, preprocess = _tiny_open_clip(seed=1)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}  # DataParallel prefix, as in the release
    torch.save({"state_dict": sd}, tmp_path / "HPS_v2_compressed.pt")
    other, _ = _tiny_open_clip(seed=2)
    torch.save({"state_dict": other.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    images = _images()
    scorer = build_scorer("hpsv2", weights_dir=tmp_path, arch=tiny_arch, batch_size=2)
    expected = _open_clip_cosine(model, preprocess, images, PROMPTS).double().numpy()
    np.testing.assert_allclose(scorer.score(images, PROMPTS), expected, rtol=1e-5, atol=1e-6)
    assert set(scorer._text_cache) == set(PROMPTS)  # each distinct prompt encoded once
    v21 = build_scorer("hpsv2.1", weights_dir=tmp_path, arch=tiny_arch)
    np.testing.assert_allclose(v21.score(images, PROMPTS),
                               _open_clip_cosine(other, preprocess, images, PROMPTS).numpy(), rtol=1e-5, atol=1e-6)
    assert scorer.version != v21.version and scorer.version.startswith("hpsv2-code")


def test_batched_score_tensors_equals_one_by_one_and_transform_pickles(tmp_path, tiny_arch):
    model, _ = _tiny_open_clip(seed=3)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "HPS_v2_compressed.pt")
    scorer = build_scorer("hpsv2", weights_dir=tmp_path, arch=tiny_arch, batch_size=4)
    images, prompts = _images(5, seed=4), [f"prompt {i % 2}" for i in range(5)]
    transform = pickle.loads(pickle.dumps(scorer.image_transform))  # what a worker process would get
    pixels = torch.stack([transform(im) for im in images])
    assert torch.equal(pixels[0], scorer.preprocess(images[0]))
    batched = scorer.score_tensors(pixels, prompts)
    single = np.array([scorer.score_tensors(pixels[i:i + 1], prompts[i:i + 1])[0] for i in range(5)])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        scorer.score_tensors(pixels[0], prompts[:1])


def test_clip_score_local_dir_and_state_dict_file(tmp_path, tiny_arch):
    model, preprocess = _tiny_open_clip(seed=5)
    _write_open_clip_dir(model, tmp_path / "vit_large_patch14_clip_224.openai")
    images = _images(seed=6)
    expected = (100 * _open_clip_cosine(model, preprocess, images, PROMPTS)).clamp(min=0).numpy()
    from_dir = build_scorer("clip", weights_dir=tmp_path)
    np.testing.assert_allclose(from_dir.score(images, PROMPTS), expected, rtol=1e-5, atol=1e-4)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    from_file = build_scorer("clip", arch=tiny_arch, checkpoint=tmp_path / "tiny.pt")
    np.testing.assert_allclose(from_file.score(images, PROMPTS), expected, rtol=1e-5, atol=1e-4)


def test_aesthetic_matches_mlp_on_normalised_embedding(tmp_path, tiny_arch):
    model, preprocess = _tiny_open_clip(seed=7)
    _write_open_clip_dir(model, tmp_path / "vit_large_patch14_clip_224.openai")
    torch.manual_seed(8)
    head = RefMLP(TINY_CFG["embed_dim"]).eval()
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    images = _images(seed=9)
    with torch.no_grad():
        emb = model.encode_image(torch.stack([preprocess(im) for im in images]))
        expected = head.layers(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1).numpy()
    scorer = build_scorer("aesthetic", weights_dir=tmp_path)
    assert not scorer.uses_prompt
    np.testing.assert_allclose(scorer.score(images), expected, rtol=1e-5, atol=1e-6)
    torch.save({"layers.0.weight": torch.zeros(1024, 7)}, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(CheckpointFormatError, match="32-d"):
        build_scorer("aesthetic", weights_dir=tmp_path)


# ---- PickScore (transformers CLIPModel) --------------------------------------------------------------------

def _write_clip_tokenizer(directory: Path) -> None:
    """HF CLIP tokenizer files from the BPE table shipped inside open_clip (docs/environment.md §6)."""
    bpe = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(open_clip.tokenizer.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))


def test_pickscore_matches_clipmodel_logits(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    torch.manual_seed(10)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                     "num_hidden_layers": 2, "max_position_embeddings": 77, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"image_size": 32, "patch_size": 16, "hidden_size": 32, "intermediate_size": 37,
                       "num_attention_heads": 4, "num_hidden_layers": 2}, projection_dim=16)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path / "PickScore_v1")
    processor_dir = tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    _write_clip_tokenizer(processor_dir)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(processor_dir)
    tokenizer = CLIPTokenizer.from_pretrained(processor_dir)
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    images = _images(seed=11)
    text = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                    pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    expected = out.logits_per_image.diagonal().numpy()  # exp(logit_scale) · cosine, per (image_i, prompt_i)
    scorer = build_scorer("pickscore", weights_dir=tmp_path, batch_size=2)
    np.testing.assert_allclose(scorer.score(images, PROMPTS), expected, rtol=1e-5, atol=1e-5)
    (tmp_path / "PickScore_v1" / "model.safetensors").write_bytes(b"garbage" * 20)
    with pytest.raises(CheckpointFormatError, match="PickScore_v1"):
        build_scorer("pickscore", weights_dir=tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_path_close_to_cpu(tmp_path, tiny_arch):
    model, _ = _tiny_open_clip(seed=12)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "HPS_v2_compressed.pt")
    images = _images(seed=13)
    cpu = build_scorer("hpsv2", weights_dir=tmp_path, arch=tiny_arch).score(images, PROMPTS)
    gpu = build_scorer("hpsv2", weights_dir=tmp_path, arch=tiny_arch, device="cuda").score(images, PROMPTS)
    np.testing.assert_allclose(gpu, cpu, atol=2e-2)


# ---- ImageReward (BLIP on transformers' Blip classes) ------------------------------------------------------

def _blip_vit_reference(sd: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """BLIP's ViT (timm layout: fused qkv, pre-norm blocks, LayerNorm eps 1e-6) from raw checkpoint tensors."""
    w = sd["patch_embed.proj.weight"]
    x = F.conv2d(pixels, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], dim=1) + sd["pos_embed"]
    b, n, d = x.shape
    ln = lambda t, name: F.layer_norm(t, (d,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)  # noqa: E731
    for i in range(sum(k.endswith("attn.qkv.weight") for k in sd)):
        p = f"blocks.{i}."
        qkv = F.linear(ln(x, p + "norm1"), sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (d // heads) ** -0.5).softmax(-1)
        mixed = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(mixed, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return ln(x, "norm")


def test_imagereward_matches_blip_reference(tmp_path):
    from torchvision import transforms
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel
    words = "a red kite by the sea blue car on quiet street".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words) | set("bcdefghijklmnopqrstuvwxyz"))]
    (tmp_path / "bert-base-uncased").mkdir()
    (tmp_path / "bert-base-uncased" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    med = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": len(vocab) + 2, "hidden_size": 32,
           "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 40,
           "hidden_act": "gelu", "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1,
           "attention_probs_dropout_prob": 0.1, "pad_token_id": 0, "type_vocab_size": 2, "encoder_width": 768,
           "add_cross_attention": True}
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(14)
    width, depth, patch, size = 128, 2, 16, 32  # head width 64 -> 2 heads
    rnd = lambda *shape: 0.05 * torch.randn(*shape)  # noqa: E731
    vit = {"cls_token": rnd(1, 1, width), "pos_embed": rnd(1, (size // patch) ** 2 + 1, width),
           "patch_embed.proj.weight": rnd(width, 3, patch, patch), "patch_embed.proj.bias": rnd(width),
           "norm.weight": 1 + rnd(width), "norm.bias": rnd(width)}
    for i in range(depth):
        p = f"blocks.{i}."
        vit |= {p + "norm1.weight": 1 + rnd(width), p + "norm1.bias": rnd(width), p + "norm2.weight": 1 + rnd(width),
                p + "norm2.bias": rnd(width), p + "attn.qkv.weight": rnd(3 * width, width),
                p + "attn.qkv.bias": rnd(3 * width), p + "attn.proj.weight": rnd(width, width),
                p + "attn.proj.bias": rnd(width), p + "mlp.fc1.weight": rnd(4 * width, width),
                p + "mlp.fc1.bias": rnd(4 * width), p + "mlp.fc2.weight": rnd(width, 4 * width),
                p + "mlp.fc2.bias": rnd(width)}
    text = BlipTextModel(BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=32, encoder_hidden_size=width, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40, pad_token_id=0),
        add_pooling_layer=False).eval()
    head = RefMLP(32).eval()
    ckpt = {f"blip.visual_encoder.{k}": v for k, v in vit.items()}
    ckpt |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    ckpt["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # saved by BLIP's med.py
    ckpt |= {"blip.vision_proj.weight": rnd(256, width), "blip.text_proj.weight": rnd(256, 32)}  # unused upstream
    ckpt |= {f"mlp.{k}": v for k, v in head.state_dict().items()}
    torch.save(ckpt, tmp_path / "ImageReward.pt")

    images = _images(seed=15)
    transform = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(size), transforms.ToTensor(),
                                    transforms.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)])
    tokens = BertTokenizer.from_pretrained(tmp_path / "bert-base-uncased")(
        PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (3, 35) and tokens["input_ids"][0, 1] == vocab.index("a")
    with torch.no_grad():
        image_tokens = _blip_vit_reference(vit, torch.stack([transform(im) for im in images]), heads=2)
        cls = text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                   encoder_hidden_states=image_tokens,
                   encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
        expected = ((head.layers(cls).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072).numpy()
    scorer = build_scorer("imagereward", weights_dir=tmp_path, batch_size=2)
    np.testing.assert_allclose(scorer.score(images, PROMPTS), expected, rtol=1e-4, atol=1e-5)
    del ckpt["blip.visual_encoder.blocks.1.mlp.fc2.bias"]
    torch.save(ckpt, tmp_path / "ImageReward.pt")
    with pytest.raises(CheckpointFormatError, match="missing keys"):
        build_scorer("imagereward", weights_dir=tmp_path)
