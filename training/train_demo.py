"""Train the built-in demo model: a small but genuine unCLIP on the shapes world.

    python -m training.train_demo --out unclip/models/demo --work .demo-train

Stages, in order: CLIP (text + image towers, contrastive), prior (text -> CLIP image
embedding), decoder at 32x32 (image embedding through text_proj + text tokens, guidance
dropout; predicts x0), super-resolution 32 -> 64 (predicts x0). Seeded and resumable: each stage
checkpoints to --work, and a rerun continues where it stopped. The networks are the same
diffusers/transformers classes the engine loads, saved in the same checkpoint layout.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from unclip.engine.scheduler import cosine_betas
from unclip.models.components import PRESET_SCHEDULERS, UnclipComponents, build_network
from unclip.models.networks import Decoder, TextProj
from unclip.models.shapes import all_combinations, random_scene, render, training_combinations
from unclip.models.tokenizer import write_tokenizer


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    text_len: int = 24  # captions are ~10 tokens; a short context keeps every network cheap
    clip_dim: int = 64
    clip_steps: int = 1000
    prior_steps: int = 1500
    decoder_steps: int = 3800
    super_res_steps: int = 1500
    clip_batch: int = 128
    prior_batch: int = 64
    decoder_batch: int = 32
    super_res_batch: int = 16
    # (16, 32, 64) trained 5500 steps drew blurred shapes; wider costs 0.67 s/step vs 0.31 (2 threads)
    decoder_channels: tuple[int, int, int] = (32, 64, 96)
    super_res_crop: int = 32  # the super-res UNet is convolutional: train on crops, run on whole images
    # DALL-E 2 blurs the first upsampler's low-res input in training; so here (largest Gaussian
    # sigma, 64 px pixels): the decoder's soft corners then come back sharp
    super_res_blur: float = 1.5
    lr: float = 1e-3  # CLIP and prior
    diffusion_lr: float = 5e-4  # decoder and super-resolution UNets
    ema_decay: float = 0.995  # the shipped prior/decoder/super-res weights are this moving average
    unconditional_p: float = 0.1  # guidance dropout: image embedding and text both dropped
    text_drop_p: float = 0.3  # decoder only: caption dropped, image embedding kept (DALL-E 2 drops 50%)


STAGES = ("clip", "prior", "decoder", "super_res")


def network_configs(r: Recipe, special: dict[str, int]) -> dict[str, dict]:
    clip_text = dict(vocab_size=special["size"], hidden_size=r.clip_dim, intermediate_size=4 * r.clip_dim,
                     num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=r.text_len,
                     projection_dim=r.clip_dim, bos_token_id=special["bos_token_id"],
                     eos_token_id=special["eos_token_id"], pad_token_id=special["pad_token_id"])
    # Channel counts are small for a 2-core CPU budget; norm groups of 8 allow 16 channels.
    super_res = dict(sample_size=64, layers_per_block=1, block_out_channels=[16, 32, 32],
                     down_block_types=["ResnetDownsampleBlock2D"] * 3,
                     up_block_types=["ResnetUpsampleBlock2D"] * 3, in_channels=6, out_channels=3,
                     add_attention=False, norm_num_groups=8)
    return {
        "text_encoder": clip_text,
        "image_encoder": dict(image_size=32, patch_size=4, num_channels=3, hidden_size=r.clip_dim,
                              intermediate_size=4 * r.clip_dim, num_hidden_layers=3, num_attention_heads=4,
                              projection_dim=r.clip_dim),
        "prior": dict(num_attention_heads=4, attention_head_dim=32, num_layers=4, embedding_dim=r.clip_dim,
                      num_embeddings=r.text_len, additional_embeddings=4),
        "text_proj": dict(clip_extra_context_tokens=4, clip_embeddings_dim=r.clip_dim,
                          time_embed_dim=4 * r.decoder_channels[0], cross_attention_dim=64),
        "decoder": dict(sample_size=32, layers_per_block=1, block_out_channels=list(r.decoder_channels),
                        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                                          "SimpleCrossAttnDownBlock2D"],
                        up_block_types=["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                                        "ResnetUpsampleBlock2D"],
                        mid_block_type="UNetMidBlock2DSimpleCrossAttn", in_channels=3, out_channels=6,
                        cross_attention_dim=64, class_embed_type="identity", attention_head_dim=16,
                        resnet_time_scale_shift="scale_shift", norm_num_groups=8),
        "super_res_first": super_res,
        "super_res_last": dict(super_res),
    }


def build_image_encoder(config: dict) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))


# -- data ------------------------------------------------------------------------------------


class ShapesData:
    """Seeded batches: images at 64 and 32 px in [-1, 1], and caption indices."""

    def __init__(self, seed: int):
        self.seed = seed
        self.combinations = training_combinations()
        self.captions = [f"a {c} {s} on a {b} background" for c, s, b in all_combinations()]
        self.caption_index = {c: i for i, c in enumerate(self.captions)}

    def batch(self, stage: int, step: int, size: int, big: bool = False):
        """(64 px images or None, 32 px images, caption indices)."""
        rng = np.random.default_rng([self.seed, stage, step])
        scenes = [random_scene(rng, self.combinations) for _ in range(size)]

        def images(resolution: int) -> torch.Tensor:
            x = np.stack([render(s, resolution) for s in scenes])
            return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1

        ids = torch.tensor([self.caption_index[s.caption] for s in scenes])
        return (images(64) if big else None), images(32), ids


def _blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (sigma 0: unchanged), edges replicated."""
    b, c, h, w = images.shape
    radius = 4
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [b*c, 2r+1]
    out = F.pad(images.reshape(1, b * c, h, w), [radius] * 4, mode="replicate")
    out = F.conv2d(out, kernel[:, None, None, :], groups=b * c)
    out = F.conv2d(out, kernel[:, None, :, None], groups=b * c)
    return out.reshape(b, c, h, w)


# -- the stages --------------------------------------------------------------------------------


class Trainer:
    def __init__(self, recipe: Recipe, work: Path):
        from transformers import CLIPTokenizer

        self.r = recipe
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        special = write_tokenizer(work / "tokenizer", max_length=recipe.text_len)
        self.tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
        self.configs = network_configs(recipe, special)
        torch.manual_seed(recipe.seed)
        self.nets = {name: build_network(name, cfg) for name, cfg in self.configs.items()
                     if name != "image_encoder"}
        self.nets["image_encoder"] = build_image_encoder(self.configs["image_encoder"])
        self.data = ShapesData(recipe.seed)
        enc = self.tokenizer(self.data.captions + [""], padding="max_length", max_length=recipe.text_len,
                             truncation=True, return_tensors="pt")
        self.ids, self.mask = enc.input_ids, enc.attention_mask.bool()
        betas = cosine_betas(1000)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.times: dict[str, float] = {}

    # Checkpoints hold everything needed to continue: weights, optimiser, step, elapsed time.
    def _load(self, stage: str, modules: list[str], opt: torch.optim.Optimizer | None) -> int:
        path = self.work / f"{stage}.pt"
        if not path.exists():
            return 0
        state = torch.load(path, weights_only=False)
        for name in modules:
            self.nets[name].load_state_dict(state["nets"][name])
        if opt is not None and "opt" in state:
            opt.load_state_dict(state["opt"])
        for avg, saved in zip(self.ema, state.get("ema", []), strict=False):
            avg.copy_(saved)
        self.times[stage] = state.get("seconds", 0.0)
        return state["step"]

    def _save(self, stage: str, modules: list[str], opt: torch.optim.Optimizer, step: int, seconds: float):
        state = {"nets": {n: self.nets[n].state_dict() for n in modules}, "opt": opt.state_dict(),
                 "ema": self.ema, "step": step, "seconds": seconds}
        tmp = self.work / f".{stage}.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.work / f"{stage}.pt")

    def _run(self, stage: str, modules: list[str], steps: int, loss_fn, lr: float, ema: bool = False) -> None:
        # the prior's CLIP statistics are measured, not learned
        params = [p for n in modules for name, p in self.nets[n].named_parameters()
                  if name not in ("clip_mean", "clip_std")]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.ema = [p.detach().clone() for p in params] if ema else []
        start = self._load(stage, modules, opt)
        seconds = self.times.get(stage, 0.0)
        if start >= steps:
            self._finish(modules, params)
            return
        for n in modules:
            self.nets[n].train()
        for p in params:
            p.requires_grad_(True)
        warmup = 100
        bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, file=sys.stderr)
        t0 = time.perf_counter()
        for step in bar:
            # linear warm-up, then cosine decay to 10 %
            frac = step / steps
            scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            loss = loss_fn(STAGES.index(stage), step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(self.r.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for avg, p in zip(self.ema, params, strict=False):
                    avg.lerp_(p, 1 - decay)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % 250 == 0 or step + 1 == steps:
                self._save(stage, modules, opt, step + 1, seconds + time.perf_counter() - t0)
        self.times[stage] = seconds + time.perf_counter() - t0
        self._finish(modules, params)

    def _finish(self, modules: list[str], params: list[torch.Tensor]) -> None:
        """Freeze the stage's networks, holding the moving-average weights if there are any."""
        with torch.no_grad():
            for avg, p in zip(self.ema, params, strict=False):  # no averages: CLIP
                p.copy_(avg)
        for n in modules:
            self.nets[n].eval().requires_grad_(False)

    def _text(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.nets["text_encoder"](self.ids[idx])
        return out.text_embeds, out.last_hidden_state, self.mask[idx]

    def _image_embeds(self, small: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.nets["image_encoder"](pixel_values=small).image_embeds, dim=-1)

    # CLIP: symmetric contrastive loss; identical captions in a batch are all positives.
    def clip_loss(self, stage: int, step: int) -> torch.Tensor:
        _, small, idx = self.data.batch(stage, step, self.r.clip_batch)
        text = F.normalize(self._text(idx)[0], dim=-1)
        image = self._image_embeds(small)
        logits = image @ text.T * self.logit_scale.exp()
        targets = (idx[:, None] == idx[None, :]).float()
        targets = targets / targets.sum(1, keepdim=True)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    def train_clip(self) -> None:
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.nets["logit_scale"] = torch.nn.ParameterList([self.logit_scale])
        self._run("clip", ["text_encoder", "image_encoder", "logit_scale"], self.r.clip_steps,
                  self.clip_loss, self.r.lr)

    def _noised(self, x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        ab = self.alphas_cumprod[t].view(-1, *[1] * (x0.dim() - 1))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, eps

    def _drop(self, idx: torch.Tensor, p: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace captions by "" (the last row of self.ids) with probability p."""
        drop = torch.rand(idx.shape[0], generator=g) < p
        return torch.where(drop, torch.full_like(idx, len(self.data.captions)), idx), drop

    # Prior: predicts the (standardised) CLIP image embedding x0 from the noised one and the text.
    def prior_loss(self, stage: int, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.r.seed * 1_000_003 + stage * 100_003 + step)
        _, small, idx = self.data.batch(stage, step, self.r.prior_batch)
        prior = self.nets["prior"]
        with torch.no_grad():
            x0 = (self._image_embeds(small) - prior.clip_mean) / prior.clip_std
            idx, _ = self._drop(idx, self.r.unconditional_p, g)
            text_embeds, hidden, mask = self._text(idx)
        xt, t, _ = self._noised(x0, g)
        pred = prior(xt, timestep=t, proj_embedding=text_embeds, encoder_hidden_states=hidden,
                     attention_mask=mask).predicted_image_embedding
        return F.mse_loss(pred, x0)

    def train_prior(self) -> None:
        prior = self.nets["prior"]
        if not (self.work / "prior.pt").exists():  # CLIP statistics standardise the prior's space
            with torch.no_grad():
                embeds = torch.cat([self._image_embeds(self.data.batch(9, i, 256)[1]) for i in range(8)])
                prior.clip_mean.copy_(embeds.mean(0, keepdim=True))
                prior.clip_std.copy_(embeds.std(0, keepdim=True).clamp(min=1e-3))
        self._run("prior", ["prior"], self.r.prior_steps, self.prior_loss, self.r.lr, ema=True)

    # Decoder: predicts the clean image x0 (the scheduler's prediction_type "sample"). Epsilon
    # prediction was measured first: at the noisy steps that decide the colours its x0 estimate is
    # the epsilon error over sqrt(alpha_bar), and a 5500-step decoder given the true CLIP embedding
    # of a rendered scene still drew red as orange and black as green. The variance channels
    # (diffusers' UnCLIPPipeline needs them: learned_range) are trained to -1, the low end of the
    # range, which is the DDPM posterior variance: variance trained by the variational bound gave
    # grey, speckled images at the default 25 sampling steps while the posterior variance gave the
    # right colours (measured on a 1000-step pilot).
    def decoder_loss(self, stage: int, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.r.seed * 1_000_003 + stage * 100_003 + step)
        _, small, idx = self.data.batch(stage, step, self.r.decoder_batch)
        b = small.shape[0]
        with torch.no_grad():
            image_embeds = self._image_embeds(small)
            unconditional = torch.rand(b, generator=g) < self.r.unconditional_p
            text_drop = unconditional | (torch.rand(b, generator=g) < self.r.text_drop_p)
            idx = torch.where(text_drop, torch.full_like(idx, len(self.data.captions)), idx)
            text_embeds, hidden, mask = self._text(idx)
        decoder_hidden, time_embeds = self.text_proj(image_embeds, unconditional, text_embeds, hidden)
        xt, t, _ = self._noised(small, g)
        out = self.decoder(xt, t, decoder_hidden, time_embeds, mask)
        x0_pred, v = out[:, :3], out[:, 3:]
        return F.mse_loss(x0_pred, small) + F.mse_loss(v, torch.full_like(v, -1.0))

    def train_decoder(self) -> None:
        self.text_proj = TextProj(self.nets["text_proj"])
        self.decoder = Decoder(self.nets["decoder"], extra_tokens=4)
        self._run("decoder", ["text_proj", "decoder"], self.r.decoder_steps, self.decoder_loss,
                  self.r.diffusion_lr, ema=True)

    # Super-resolution: predicts the clean 64 px image (prediction_type "sample", as the decoder)
    # given the bicubic-upsampled 32 px image, blurred by a random amount and lightly noised, so it
    # learns to draw crisp shapes from the decoder's softer ones. With epsilon prediction its 7
    # sampling steps shifted the decoder's colours (red on blue came out orange on teal).
    def super_res_loss(self, stage: int, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.r.seed * 1_000_003 + stage * 100_003 + step)
        big, small, _ = self.data.batch(stage, step, self.r.super_res_batch, big=True)
        lowres = F.interpolate(small, size=[64, 64], mode="bicubic", align_corners=False, antialias=True)
        lowres = _blur(lowres, self.r.super_res_blur * torch.rand(big.shape[0], generator=g))
        c = self.r.super_res_crop
        top, left = (int(v) for v in torch.randint(0, 64 - c + 1, (2,), generator=g))
        big, lowres = big[..., top:top + c, left:left + c], lowres[..., top:top + c, left:left + c]
        lowres = lowres + 0.05 * torch.rand(big.shape[0], 1, 1, 1, generator=g) * torch.randn(
            lowres.shape, generator=g)
        xt, t, _ = self._noised(big, g)
        out = self.nets["super_res_first"](torch.cat([xt, lowres], 1), t).sample
        return F.mse_loss(out, big)

    def train_super_res(self) -> None:
        self._run("super_res", ["super_res_first"], self.r.super_res_steps, self.super_res_loss,
                  self.r.diffusion_lr, ema=True)
        # one network for every step, the last included (Karlo trains a separate last-step net)
        self.nets["super_res_last"].load_state_dict(self.nets["super_res_first"].state_dict())

    def components(self) -> UnclipComponents:
        nets = {n: self.nets[n].eval().requires_grad_(False) for n in
                ("text_encoder", "prior", "text_proj", "decoder", "super_res_first", "super_res_last")}
        schedulers = dict(PRESET_SCHEDULERS)
        for name in ("decoder_scheduler", "super_res_scheduler"):  # both UNets predict x0 (see above)
            schedulers[name] = replace(schedulers[name], prediction_type="sample")
        return UnclipComponents(tokenizer=self.tokenizer, schedulers=schedulers, name="demo", **nets)


def save_model(trainer: Trainer, out: Path, command: str, started: float) -> None:
    from safetensors.torch import save_file

    from unclip.models.checkpoint import save_components

    out = out.resolve()
    tmp = Path(tempfile.mkdtemp(prefix=".demo.", dir=out.parent)) / "model"
    save_components(trainer.components(), tmp)
    enc = trainer.nets["image_encoder"]
    (tmp / "image_encoder").mkdir()
    enc.config.to_json_file(tmp / "image_encoder" / "config.json")
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()},
              tmp / "image_encoder" / "model.safetensors", metadata={"format": "pt"})
    # CLIP saw 32 px renders in rgb / 127.5 - 1 (ShapesData): the 2x2 mean of a 64 px image, and
    # L2-normalised embeddings (_image_embeds), which the prior and decoder were trained on
    (tmp / "image_encoder" / "preprocess.json").write_text(json.dumps(
        {"size": 32, "crop": 32, "resample": "area", "mean": [0.5] * 3, "std": [0.5] * 3, "rescale": 1 / 255,
         "normalize_embeds": True}, indent=2) + "\n")
    index = json.loads((tmp / "model_index.json").read_text())
    index["image_encoder"] = ["transformers", "CLIPVisionModelWithProjection"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    log = {"command": command, "recipe": asdict(trainer.r),
           "seconds_per_stage": {k: round(v, 1) for k, v in trainer.times.items()},
           "wall_seconds_this_run": round(time.time() - started, 1),
           "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "python": platform.python_version(), "torch": torch.__version__},
           "date": time.strftime("%Y-%m-%d", time.gmtime())}
    (tmp / "training_log.json").write_text(json.dumps(log, indent=2))
    # written after training (validation, evaluation, card): a retrained model keeps them until redone
    keep = [p for p in ("MODEL_CARD.md", "evaluation.json", "sampler_defaults.json") if (out / p).exists()]
    for name in keep:
        shutil.copy(out / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    shutil.rmtree(tmp.parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("unclip/models/demo"))
    parser.add_argument("--work", type=Path, default=Path(".demo-train"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    # One thread: on 2 shared cores, two OpenMP threads contending with other work ran 10x slower.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    base = Recipe(seed=args.seed)
    recipe = Recipe(**{**asdict(base), **{f"{s}_steps": max(1, int(getattr(base, f"{s}_steps") * args.scale))
                                          for s in STAGES}})
    torch.manual_seed(recipe.seed)
    trainer = Trainer(recipe, args.work)
    trainer.train_clip()
    trainer.train_prior()
    trainer.train_decoder()
    trainer.train_super_res()
    save_model(trainer, args.out, "python -m training.train_demo " + " ".join(argv or sys.argv[1:]), started)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
