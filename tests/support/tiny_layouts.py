"""Tiny random-weight models with the exact module names of SD1.5, SDXL and FLUX.1.

Real weights cannot be downloaded here, so tests build the real architectures with every
depth kept (same number of blocks, layers and attention modules, hence the same tensor names)
and only the widths shrunk. Anything that works by name (base detection, LDM key conversion,
LoRA formats, coverage) is then exercised on the real layouts in seconds.
"""

from __future__ import annotations

import torch

SD15_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 8), cross_attention_dim=64,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16), sample_size=64,
)
FLUX_VAE = dict(VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def clip_text(hidden: int = 32, layers: int = 12, projection: int | None = None):
    """A CLIP text encoder with real depth (12 for CLIP-L, 32 for OpenCLIP bigG) and tiny width."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # CLIP's real vocabulary, so the real tokenizer (diffgraph.clip_bpe) can drive a render
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or hidden,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def sd15_components(seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    return dict(unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**VAE), text_encoder=clip_text(32, 12))


def sdxl_components(seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    return dict(unet=UNet2DConditionModel(**SDXL_UNET), vae=AutoencoderKL(**VAE), text_encoder=clip_text(32, 12),
                text_encoder_2=clip_text(32, 32, projection=32))


def flux_components(seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    torch.manual_seed(seed)
    return dict(transformer=FluxTransformer2DModel(**FLUX_TRANSFORMER), vae=AutoencoderKL(**FLUX_VAE))
