"""Random-weight twins of SD1.5, SDXL and Sana, built offline.

Each twin uses the real pipeline class and keeps the block structure that names the hook points
(`down_blocks.i.attentions.j...attn1`, `mid_block`, `transformer_blocks.i.attn2`), so layer
subsets such as the paper's SD1.5 layers resolve on the twin exactly as on the real model. Only
widths, depths inside a block, and resolution shrink.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SanaPipeline,
    SanaTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
)

from icm_lab.models.tokenizers import byte_tokenizer, clip_tokenizer

SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _clip_text(hidden: int, projection: int | None = None) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(latent_factor_blocks: int = 4) -> AutoencoderKL:
    """4 blocks give the SD family's 8x spatial compression, with 4 latent channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,) * latent_factor_blocks,
        down_block_types=("DownEncoderBlock2D",) * latent_factor_blocks,
        up_block_types=("UpDecoderBlock2D",) * latent_factor_blocks,
        layers_per_block=1,
        norm_num_groups=4,
    )


def _sd15_unet(sample_size: int, channels: tuple[int, ...], cross_attention_dim: int,
               attention_head_dim: int, norm_num_groups: int = 32) -> UNet2DConditionModel:
    """SD1.5's layout: 3 cross-attention down blocks + 1 plain, 2 layers each, mid block with
    attention, 1 plain + 3 cross-attention up blocks: 16 attn1 and 16 attn2 layers."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=channels,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    )


def _sd15_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel,
                   unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sd15(seed: int = 0) -> StableDiffusionPipeline:
    """SD1.5's block structure and names at tiny widths, 64 px."""
    torch.manual_seed(seed)
    unet = _sd15_unet(8, (16, 16, 32, 32), cross_attention_dim=32, attention_head_dim=4,
                      norm_num_groups=8)
    return _sd15_pipeline(_vae(), _clip_text(32), unet)


def _sdxl_unet(sample_size: int, channels: tuple[int, ...], depths: tuple[int, ...],
               head_dims: tuple[int, ...], time_dim: int, class_dim: int, cross_dim: int,
               **options: int) -> UNet2DConditionModel:
    """SDXL's UNet layout: a plain first down block, then cross-attention blocks with `depths`
    transformer layers, `text_time` conditioning."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=channels,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=depths,
        attention_head_dim=head_dims,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=class_dim,
        cross_attention_dim=cross_dim,
        **options,
    )


def tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL's layout: plain first down block, then cross-attention blocks with several
    transformer layers, `text_time` conditioning and two CLIP text encoders."""
    torch.manual_seed(seed)
    hidden_1, hidden_2, time_dim = 32, 32, 8
    unet = _sdxl_unet(8, (16, 32, 32), (1, 2, 2), (2, 4, 4), time_dim,
                      6 * time_dim + hidden_2, hidden_1 + hidden_2, norm_num_groups=8)
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_clip_text(hidden_1),
        text_encoder_2=_clip_text(hidden_2, projection=hidden_2),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        force_zeros_for_empty_prompt=True,
    )


def tiny_sana(seed: int = 0) -> SanaPipeline:
    """Sana's layout: a flat stack of transformer blocks whose attn1 is linear attention, a DC-AE
    autoencoder, a Gemma-2 text encoder and a flow-matching scheduler."""
    torch.manual_seed(seed)
    text_width = 16
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=text_width,
        sample_size=16,
    )
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    tokenizer = byte_tokenizer()
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def sd15_random(seed: int = 0) -> StableDiffusionPipeline:
    """SD1.5 at full size with random weights: for timing on a GPU, never for images."""
    torch.manual_seed(seed)
    unet = _sd15_unet(64, (320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
    return _sd15_pipeline(_full_vae(512), CLIPTextModel(CLIPTextConfig(**CLIP_L)), unet)


# CLIP ViT-L/14's text tower: SD1.5's text encoder and SDXL's first.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
              bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def _full_vae(sample_size: int, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """The SD/SDXL autoencoder at full size."""
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def sdxl_random(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL base at full size (stabilityai/stable-diffusion-xl-base-1.0's configs) with random
    weights: 2.6 B UNet parameters, CLIP ViT-L and OpenCLIP bigG text encoders."""
    torch.manual_seed(seed)
    unet = _sdxl_unet(128, (320, 640, 1280), (1, 2, 10), (5, 10, 20), 256, 2816, 2048)
    vae = _full_vae(sample_size=1024, scaling_factor=0.13025)
    text = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    ))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER), force_zeros_for_empty_prompt=True,
    )


def sana_random(seed: int = 0) -> SanaPipeline:
    """Sana 1600M at 1,024 px (Efficient-Large-Model/Sana_1600M_1024px's configs) with random
    weights: the 20-block transformer, the DC-AE f32c32 autoencoder and a Gemma-2 2B text
    encoder. Its tokenizer is the byte-level stand-in (Gemma's vocabulary is not on the machine);
    the ids fall inside Gemma's 256,000-row embedding, so shapes and costs are the real ones."""
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32,
        num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112,
        cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, sample_size=32,
        patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
    )
    heavy = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    vae = AutoencoderDC(
        in_channels=3, latent_channels=32, attention_head_dim=32,
        encoder_block_types=heavy, decoder_block_types=heavy,
        encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        upsample_block_type="interpolate", downsample_block_type="Conv",
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
        decoder_act_fns=("relu",) * 3 + ("silu",) * 3, scaling_factor=0.41407,
    )
    tokenizer = byte_tokenizer(max_length=300)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
    ))
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                        transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


BUILDERS = {
    "tiny_sd15": tiny_sd15,
    "tiny_sdxl": tiny_sdxl,
    "tiny_sana": tiny_sana,
    "sd15_random": sd15_random,
    "sdxl_random": sdxl_random,
    "sana_random": sana_random,
}


def build_random(name: str, seed: int = 0) -> DiffusionPipeline:
    """A random-weight pipeline by builder name (`model.build`)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model.build {name!r}; valid: {sorted(BUILDERS)}")
    return BUILDERS[name](seed)
