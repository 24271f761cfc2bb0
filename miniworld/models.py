"""The toy-size Stable Diffusion the mini world is made of: configs, tokenizer and assembly.

Every part is a stock diffusers/transformers class (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, CLIPTokenizer, a standard scheduler), so whatever DiffGraph does to these
models (LoRA loading, checkpoint merging, rendering) is what it does to real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LATENT_SIZE = 8
TEXT_DIM = 16
MAX_TOKENS = 77

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=8,
    norm_num_groups=16,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
)
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=TEXT_DIM,
    intermediate_size=64,
    num_hidden_layers=4,  # 2 layers bound colours to the wrong noun about 30% of the time
    num_attention_heads=2,
    max_position_embeddings=MAX_TOKENS,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=TEXT_DIM,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
)


def clip_bpe_files(out_dir: Path) -> tuple[Path, Path]:
    """Write CLIP's vocab.json and merges.txt (the real CLIP BPE, built offline)."""
    from diffgraph.clip_bpe import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_path, merges_path


def build_tokenizer(work_dir: Path):
    """A real CLIPTokenizer over CLIP's BPE, built offline."""
    from transformers import CLIPTokenizer

    vocab_path, merges_path = clip_bpe_files(work_dir)
    # transformers 5 takes vocab= and merges= (vocab_file= would be ignored silently)
    vocab = json.loads(vocab_path.read_text())
    merges = [tuple(line.split()) for line in merges_path.read_text().splitlines()[1:] if line]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    return tok


def new_components(seed: int = 0) -> dict:
    """Fresh, randomly initialised components (the starting point of the build)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return dict(
        unet=UNet2DConditionModel(**UNET_CONFIG),
        vae=AutoencoderKL(**VAE_CONFIG),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)),
        scheduler=DDPMScheduler(**SCHEDULER_CONFIG, clip_sample=False),
    )


def assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler=None):
    """A StableDiffusionPipeline around the given parts, with the sampler used for rendering."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    sched = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG) if scheduler is None else scheduler
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def load_base_pipeline(path: Path, device: str = "cpu"):
    """Load a mini-world pipeline (a diffusers folder) offline, in float32 for the CPU."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
