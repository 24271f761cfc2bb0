"""Tiny random-weight stand-ins of the five real metric models, laid out as their downloads are.

Every model is built with the class its real checkpoint comes from (or a line-by-line
transcription of it where that class cannot be installed here), shrunk through its config, and
saved with the real file names, key layouts and folder layouts: Hub-repo folders under a
weights dir, PickScore in a Hugging Face cache, single files flat. ``RealSuite`` loads them
from disk like the real weights (DIFFGRAPH_METRICS_DIR = ``weights``, HF_HOME = ``hf_home``),
so calibration with the real suite runs offline in seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from diffgraph.tools.scoring import preprocess


def _jitter(module: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Perturb every parameter so LayerNorms, biases and embeddings all carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _clip_config(act: str, eos: int):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=act, eos_token_id=eos,
                         bos_token_id=49406, pad_token_id=1, projection_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14, hidden_act=act, projection_dim=16),
        projection_dim=16)


def _save_hf_clip(directory: Path, act: str, eos: int, seed: int, tokenizer=None) -> None:
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(_clip_config(act, eos)).eval()
    _jitter(model, seed)
    model.save_pretrained(directory)  # config.json + model.safetensors, as on the Hub
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)  # vocab.json, merges.txt, tokenizer.json, tokenizer_config.json
        (directory / "preprocessor_config.json").write_text(json.dumps({
            "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "image_mean": list(preprocess.OPENAI_MEAN), "image_std": list(preprocess.OPENAI_STD),
            "resample": 3, "size": 224, "feature_extractor_type": "CLIPFeatureExtractor"}))


class AestheticMLP(nn.Module):
    """improved-aesthetic-predictor's MLP (a LightningModule there; the layers are identical)."""

    def __init__(self, input_size):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


# BLIP's models/vit.py (timm's ViT), transcribed without timm/fairscale: same names, same maths.
class BlipMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class BlipAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3, bias=True), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class BlipBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), BlipAttention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), BlipMlp(dim, dim * 4)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class BlipVisionTransformer(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, embed_dim))
        self.blocks = nn.ModuleList([BlipBlock(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed[:, :x.size(1), :]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


MED_CONFIG = {  # ImageReward's med_config.json, shrunk (vocab: BERT's 30522 + [DEC] + [ENC])
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
    "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
    "encoder_width": 128, "add_cross_attention": True,
}


class BlipPretrain(nn.Module):
    """ImageReward's trimmed BLIP_Pretrain: visual_encoder, text_encoder, vision_proj, text_proj.

    The text encoder is BLIP's med.py BertModel(add_pooling_layer=False); transformers'
    BlipTextModel is its port with the same module names (med.py keeps ``position_ids`` as a
    persistent buffer, so the real checkpoint carries it: added when saving)."""

    def __init__(self):
        from transformers import BlipTextConfig, BlipTextModel

        super().__init__()
        self.visual_encoder = BlipVisionTransformer(img_size=64, patch_size=16, embed_dim=128, depth=2, num_heads=2)  # 64-wide heads, as ViT-L
        c = MED_CONFIG
        cfg = BlipTextConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], encoder_hidden_size=c["encoder_width"],
                             intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
                             num_attention_heads=c["num_attention_heads"], max_position_embeddings=c["max_position_embeddings"],
                             layer_norm_eps=c["layer_norm_eps"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             is_decoder=True)
        cfg._attn_implementation = "eager"
        self.text_encoder = BlipTextModel(cfg, add_pooling_layer=False)
        self.vision_proj, self.text_proj = nn.Linear(128, 32), nn.Linear(64, 32)


class ImageRewardRef(nn.Module):
    def __init__(self):
        super().__init__()
        self.blip = BlipPretrain()
        self.mlp = AestheticMLP(64)  # ImageReward's MLP(768) is the same Sequential
        self.mean, self.std = 0.16717362830052426, 1.0333394966054072

    @torch.no_grad()
    def reward(self, pixels, input_ids):
        """ImageReward.score for one prompt, the text given without padding."""
        image_embeds = self.blip.visual_encoder(pixels)
        out = self.blip.text_encoder(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     encoder_hidden_states=image_embeds,
                                     encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
                                     is_decoder=False)
        return ((self.mlp(out.last_hidden_state[:, 0, :].float()) - self.mean) / self.std).squeeze(-1)


# open_clip's real CLIP class, in a subprocess: open_clip's package __init__ and utils import
# torchvision (which must not be installed), so the package shell is created without running its
# __init__ and utils gets the one name it imports from torchvision (used only for ResNets).
_OPEN_CLIP = textwrap.dedent("""
    import sys, types, importlib.util, torch
    tv, ops, misc = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc"))
    class FrozenBatchNorm2d(torch.nn.Module):
        pass
    misc.FrozenBatchNorm2d = FrozenBatchNorm2d
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc, "transformers": None})
    sys.modules["ftfy"] = types.SimpleNamespace(fix_text=lambda s: s)  # not installed; identity on ASCII prompts
    spec = importlib.util.find_spec("open_clip")
    pkg = types.ModuleType("open_clip"); pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["open_clip"] = pkg
    from open_clip.model import CLIP
    from open_clip.tokenizer import SimpleTokenizer
    out_file, inputs_file = sys.argv[1], sys.argv[2]
    torch.manual_seed(3)
    # ViT-H-14's shape (80-wide vision heads, 64-wide text heads, GELU), shrunk
    model = CLIP(embed_dim=24, vision_cfg=dict(image_size=56, layers=2, width=160, head_width=80, patch_size=14),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model = model.half()  # "compressed": the released file holds fp16 weights
    torch.save({"state_dict": model.state_dict()}, out_file)
    model = model.float()
    inputs = torch.load(inputs_file, weights_only=True)
    tokenize = SimpleTokenizer()  # what hpsv2's get_tokenizer('ViT-H-14') returns
    ids, ids2 = tokenize(inputs["prompts"], context_length=77), tokenize(inputs["prompts2"], context_length=77)
    with torch.no_grad():
        img = model.encode_image(inputs["pixels"], normalize=True)
        txt = model.encode_text(ids, normalize=True)
        txt2 = model.encode_text(ids2, normalize=True)
    torch.save({"hps": (img * txt).sum(-1), "hps2": (img * txt2).sum(-1), "ids": ids}, inputs_file + ".out")
""")


def images_for_scoring() -> list[Image.Image]:
    """Three images of different sizes and modes, with structure (gradients + a square)."""
    out = []
    for i, (w, h, mode) in enumerate([(80, 64, "RGB"), (64, 96, "RGBA"), (70, 70, "L")]):
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        rgb = torch.stack([xx, yy, (xx + yy) / 2 * (i + 1) % 1.0]) * 255
        rgb[:, h // 4: h // 2, w // 4: w // 2] = torch.tensor([30.0 * i, 200.0, 90.0]).view(3, 1, 1)
        im = Image.fromarray(rgb.permute(1, 2, 0).to(torch.uint8).numpy(), "RGB")
        out.append(im.convert(mode))
    return out



def build_metric_weights(root: Path, images: list[Image.Image] | None = None, prompts=("a red cube",),
                         prompts2=("a green sphere",)) -> dict:
    """The five models under ``root``; returns the weights dir, the HF home and the reference
    values tests compare against (HPS scores of ``images`` for ``prompts``/``prompts2``
    computed by open_clip itself, the ImageReward and aesthetic modules, CLIP's tokenizer)."""
    images = images or images_for_scoring()[:len(prompts)]
    wd, hf_home = root / "weights", root / "hf_home"
    clip_tok = preprocess.clip_tokenizer(None)  # CLIP's BPE, 49408 tokens

    # CLIP ViT-L/14, laid out as the Hub repo openai/clip-vit-large-patch14 (quick_gelu, eos_token_id=2)
    _save_hf_clip(wd / "openai/clip-vit-large-patch14", "quick_gelu", 2, seed=1, tokenizer=clip_tok)
    # PickScore_v1 (ViT-H/14, GELU) in an HF cache; its processor comes from the LAION repo
    snap = hf_home / "hub/models--yuvalkirstain--PickScore_v1/snapshots/0123456789abcdef"
    _save_hf_clip(snap, "gelu", 49407, seed=2)
    (snap.parents[1] / "refs").mkdir(parents=True)
    (snap.parents[1] / "refs/main").write_text("0123456789abcdef")
    laion = wd / "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    laion.mkdir(parents=True)
    clip_tok.save_pretrained(laion)

    # LAION aesthetic predictor v2: the bare .pth, flat in the weights dir
    torch.manual_seed(4)
    aesthetic = AestheticMLP(16)
    _jitter(aesthetic, 4)
    torch.save(aesthetic.state_dict(), wd / "sac+logos+ava1-l14-linearMSE.pth")

    # ImageReward: THUDM/ImageReward/{ImageReward.pt, med_config.json} + bert-base-uncased's vocab
    torch.manual_seed(5)
    ir = ImageRewardRef().eval()
    _jitter(ir, 5)
    sd = ir.state_dict()
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(MED_CONFIG["max_position_embeddings"])[None]
    (wd / "THUDM/ImageReward").mkdir(parents=True)
    torch.save(sd, wd / "THUDM/ImageReward/ImageReward.pt")
    (wd / "THUDM/ImageReward/med_config.json").write_text(json.dumps(MED_CONFIG))
    bert = wd / "bert-base-uncased"
    bert.mkdir()
    shutil.copy(preprocess.packaged_bert_uncased_vocab_dir() / "vocab.txt", bert / "vocab.txt")
    (bert / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))

    # HPSv2.1: open_clip's CLIP, saved by open_clip as {"state_dict": ...}, and its reference scores
    inputs = root / "hps_inputs.pt"
    torch.save({"pixels": preprocess.batch(images, "hpsv2", 56), "prompts": list(prompts), "prompts2": list(prompts2)},
               inputs)
    (wd / "xswu/HPSv2").mkdir(parents=True)
    run = subprocess.run([sys.executable, "-c", _OPEN_CLIP, str(wd / "xswu/HPSv2/HPS_v2.1_compressed.pt"), str(inputs)],
                         capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    hps_ref = torch.load(str(inputs) + ".out", weights_only=True)

    return dict(wd=wd, hf_home=hf_home, ir=ir, aesthetic=aesthetic, hps_ref=hps_ref, clip_tok=clip_tok)
