"""`make toy-model`: train the toy world's text-to-image pipeline and its CLIP from one seed.

    python -m icm_lab.tools.toy_train [--out DIR] [--seed 0] [--scale 1.0]

Three phases, each on the same rendered dataset:
1. AutoencoderKL, 32x32 images <-> 4x8x8 latents (reconstruction + a light KL term);
2. the CLIP text encoder and the UNet together, with the epsilon-prediction loss of SD1.5's noise
   schedule, caption dropout for classifier-free guidance and an EMA of the weights;
3. a small open_clip model (`icm-toy-clip`), contrastively, on clean images and on their VAE
   reconstructions, so it reads generated images as well as rendered ones.

The result is a `StableDiffusionPipeline` saved with `save_pretrained` (float16 on disk, a few
MB) and an open_clip checkpoint, both loaded by `model=toy` through the same code as real models.
Runs are deterministic for a given seed, device and thread count.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

import icm_lab.models.clip  # noqa: F401  (registers the icm-toy-clip config with open_clip)
from icm_lab.io.files import atomic, write_json
from icm_lab.models.tiny import SD_SCHEDULER
from icm_lab.models.tokenizers import clip_tokenizer
from icm_lab.toy import world

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).resolve().parent.parent / "toy" / "weights"
CLIP_MODEL = "icm-toy-clip"
MAX_TOKENS = 16  # captions are at most 8 tokens; SD's 77 would only pad


@dataclass
class Settings:
    seed: int = 0
    n_images: int = 60_000
    vae_steps: int = 1_500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 7_000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1  # unconditional samples, for classifier-free guidance
    ema_decay: float = 0.999
    clip_steps: int = 2_500
    clip_batch: int = 128
    clip_lr: float = 1e-3

    def scaled(self, scale: float) -> Settings:
        """The same recipe with every step count (and the dataset) multiplied by `scale`."""
        return Settings(**{**asdict(self), **{
            k: max(2, int(getattr(self, k) * scale))
            for k in ("n_images", "vae_steps", "unet_steps", "clip_steps")
        }})


# --- architectures ---------------------------------------------------------------------------

def build_vae() -> AutoencoderKL:
    """Three blocks, two downsamplings: 32x32x3 -> 8x8x4."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=world.IMAGE_SIZE,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def build_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407,
    ))


def build_unet() -> UNet2DConditionModel:
    """Self- and cross-attention at 8x8, 4x4 and 2x2 and in the mid block: 10 attn1 + 10 attn2."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64, attention_head_dim=4,
    )


# --- training --------------------------------------------------------------------------------

def _schedule(step: int, total: int, warmup: int = 200) -> float:
    """Linear warmup, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimizer(params, lr: float, total: int) -> tuple[torch.optim.Optimizer, object]:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total))


def _to_unit(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float [n, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(vae: AutoencoderKL, images: np.ndarray, s: Settings, device: torch.device,
              gen: torch.Generator) -> list[float]:
    optimizer, lr = _optimizer(vae.parameters(), s.vae_lr, s.vae_steps)
    losses = []
    for _ in tqdm(range(s.vae_steps), desc="vae", mininterval=5):
        idx = torch.randint(len(images), (s.vae_batch,), generator=gen)
        x = _to_unit(images[idx.numpy()], device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + s.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: np.ndarray, device: torch.device,
               batch: int = 500) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Latent means and stds of every image, and every image's reconstruction (uint8)."""
    means, stds, recons = [], [], []
    for start in range(0, len(images), batch):
        dist = vae.encode(_to_unit(images[start:start + batch], device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        recon = vae.decode(dist.mean).sample
        recons.append(((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu())
    return torch.cat(means), torch.cat(stds), torch.cat(recons).numpy()


def train_denoiser(text_encoder: CLIPTextModel, unet: UNet2DConditionModel, latents: torch.Tensor,
                   latent_std: torch.Tensor, tokens: torch.Tensor, s: Settings,
                   gen: torch.Generator) -> list[float]:
    """`latents` are already scaled to unit variance; `tokens[i]` is image i's caption."""
    # The same betas the DDIM sampler is configured with: the schedule SD1.5 was trained on.
    noise_schedule = DDPMScheduler.from_config(DDIMScheduler(**SD_SCHEDULER).config)
    empty = tokens[-1]  # the last row holds the empty caption
    # The token table stays at its random init: 49k rows, of which the world uses about 15.
    text_encoder.get_input_embeddings().requires_grad_(False)
    params = _trainable(text_encoder, unet)
    optimizer, lr = _optimizer(params, s.unet_lr, s.unet_steps)
    ema = EMAModel(params, decay=s.ema_decay)
    device, n = latents.device, len(latents)
    losses = []
    for _ in tqdm(range(s.unet_steps), desc="unet", mininterval=10):
        # Every random draw comes from one CPU generator: the same stream on any device.
        idx = torch.randint(n, (s.unet_batch,), generator=gen)
        shape = (s.unet_batch, *latents.shape[1:])
        x0 = latents[idx] + latent_std[idx] * torch.randn(shape, generator=gen).to(device)
        drop = torch.rand(s.unet_batch, generator=gen) < s.caption_dropout
        ids = torch.where(drop[:, None], empty, tokens[idx]).to(device)
        noise = torch.randn(shape, generator=gen).to(device)
        t = torch.randint(1000, (s.unet_batch,), generator=gen).to(device)
        noisy = noise_schedule.add_noise(x0, noise, t)
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr.step()
        ema.step(params)
        losses.append(loss.item())
    ema.copy_to(params)  # ship the averaged weights
    return losses


def _trainable(*modules: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def clip_captions(scenes: list[world.Scene], rng: np.random.Generator) -> list[str]:
    """Full captions half the time, otherwise with each attribute dropped at random."""
    out = []
    for scene in scenes:
        keep_color, keep_size = (True, True) if rng.random() < 0.5 else rng.random(2) < 0.5
        prefix = world.PREFIXES[rng.integers(len(world.PREFIXES))]
        out.append(world.caption(scene.shape, scene.color if keep_color else None,
                                 scene.size if keep_size else None, prefix))
    return out


def train_clip(model: open_clip.CLIP, images: np.ndarray, recons: np.ndarray,
               scenes: list[world.Scene], s: Settings, device: torch.device,
               gen: torch.Generator, rng: np.random.Generator) -> list[float]:
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=device)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=device)[:, None, None]
    loss_fn = open_clip.ClipLoss()
    model.token_embedding.requires_grad_(False)  # as for the pipeline's text encoder
    optimizer, lr = _optimizer(_trainable(model), s.clip_lr, s.clip_steps)
    losses = []
    for _ in tqdm(range(s.clip_steps), desc="clip", mininterval=5):
        idx = torch.randint(len(images), (s.clip_batch,), generator=gen).numpy()
        source = np.where((rng.random(len(idx)) < 0.5)[:, None, None, None],
                          recons[idx], images[idx])
        x = (torch.from_numpy(source).to(device).permute(0, 3, 1, 2).float() / 255 - mean) / std
        text = tokenizer(clip_captions([scenes[i] for i in idx], rng)).to(device)
        image_features, text_features, scale = model(x, text)
        loss = loss_fn(image_features, text_features, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
    return losses


# --- the whole recipe ------------------------------------------------------------------------

def train(out: Path, s: Settings, device: torch.device) -> dict:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.manual_seed(s.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    images, scenes = world.dataset(s.n_images, seed=s.seed)
    timings["render_s"] = time.perf_counter() - clock

    vae = build_vae().to(device)
    clock = time.perf_counter()
    vae_losses = train_vae(vae, images, s, device, gen)
    vae.eval()
    means, stds, recons = encode_all(vae, images, device)
    # Scale sampled latents to about unit variance, as SD's 0.18215 does for its VAE.
    scaling = float(1 / (means + stds * torch.randn(means.shape, generator=gen)).std())
    vae.register_to_config(scaling_factor=scaling)
    timings["vae_s"] = time.perf_counter() - clock

    tokenizer = clip_tokenizer(model_max_length=MAX_TOKENS)
    captions = sorted({scene.caption for scene in scenes})
    table = tokenizer(captions + [""], padding="max_length", max_length=MAX_TOKENS,
                      return_tensors="pt").input_ids
    row = {c: i for i, c in enumerate(captions)}
    tokens = torch.cat([table[[row[sc.caption] for sc in scenes]], table[-1:]])
    text_encoder, unet = build_text_encoder().to(device), build_unet().to(device)
    clock = time.perf_counter()
    unet_losses = train_denoiser(
        text_encoder, unet, means * scaling, stds * scaling, tokens, s, gen)
    timings["unet_s"] = time.perf_counter() - clock

    clip = open_clip.create_model(CLIP_MODEL, device=device)
    clock = time.perf_counter()
    clip_losses = train_clip(clip, images, recons, scenes, s, device, gen, rng)
    timings["clip_s"] = time.perf_counter() - clock

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.to(dtype=torch.float16).save_pretrained(out / "pipeline")
    with atomic(out / "clip.safetensors") as tmp:
        save_file({k: v.half().contiguous() for k, v in clip.state_dict().items()}, tmp)
    report = {
        "settings": asdict(s), "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "timings": timings, "scaling_factor": scaling,
        "final_loss": {name: float(np.mean(losses[-200:])) for name, losses in
                       (("vae", vae_losses), ("unet", unet_losses), ("clip", clip_losses))},
    }
    write_json(out / "training.json", report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every step count and the dataset size (quick trials)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    report = train(args.out, Settings(seed=args.seed).scaled(args.scale), device)
    print(json.dumps(report["timings"] | report["final_loss"], indent=2))
    print(f"toy world weights written to {args.out}")


if __name__ == "__main__":
    main()
