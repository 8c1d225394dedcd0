"""Thin adapters that give each diffusers/transformers network the named tensors of its spec.

The same adapters serve the torch backend and the ONNX exporter, so both see one signature:
positional arguments in spec order, outputs in spec order. No network code is forked here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from unclip.models.components import UnclipComponents
from unclip.specs import ModelDims


class TextEncoder(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.net = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(input_ids)
        return out.text_embeds, out.last_hidden_state


class ImageEncoder(nn.Module):
    """CLIP's image tower: its projected embedding as transformers returns it (a model that decodes
    from L2-normalised embeddings has the pipeline normalise it, see ImagePreprocess)."""

    def __init__(self, image_encoder: nn.Module):
        super().__init__()
        self.net = image_encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=pixel_values).image_embeds


class Prior(nn.Module):
    def __init__(self, prior: nn.Module):
        super().__init__()
        self.net = prior

    def forward(self, sample, timestep, text_embeds, text_hidden, text_mask) -> torch.Tensor:
        return self.net(sample, timestep=timestep, proj_embedding=text_embeds,
                        encoder_hidden_states=text_hidden, attention_mask=text_mask,
                        ).predicted_image_embedding


class TextProj(nn.Module):
    """Rows flagged unconditional get the learned classifier-free-guidance embedding in place of
    the image embedding, which is what diffusers does by concatenation when guidance is on."""

    def __init__(self, text_proj: nn.Module):
        super().__init__()
        self.net = text_proj

    def forward(self, image_embeds, unconditional, text_embeds, text_hidden):
        cfg = self.net.learned_classifier_free_guidance_embeddings.to(image_embeds.dtype)
        image_embeds = torch.where(unconditional[:, None], cfg[None, :], image_embeds)
        return self.net(image_embeddings=image_embeds, prompt_embeds=text_embeds,
                        text_encoder_hidden_states=text_hidden, do_classifier_free_guidance=False)


class Decoder(nn.Module):
    def __init__(self, decoder: nn.Module, extra_tokens: int):
        super().__init__()
        self.net = decoder
        self.extra_tokens = extra_tokens

    def forward(self, sample, timestep, decoder_hidden, decoder_time_embeds, text_mask):
        # The extra CLIP tokens in front of the text tokens are always attended to.
        mask = F.pad(text_mask, (self.extra_tokens, 0), value=True)
        return self.net(sample=sample, timestep=timestep, encoder_hidden_states=decoder_hidden,
                        class_labels=decoder_time_embeds, attention_mask=mask).sample


class SuperRes(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.net = unet

    def forward(self, sample, timestep, image_lowres) -> torch.Tensor:
        return self.net(sample=torch.cat([sample, image_lowres], dim=1), timestep=timestep).sample


def adapters(components: UnclipComponents) -> dict[str, nn.Module]:
    """One adapter per network the model has, in the spec table's order."""
    extra = components.text_proj.config.clip_extra_context_tokens
    wrap = {"text_encoder": TextEncoder, "image_encoder": ImageEncoder, "prior": Prior, "text_proj": TextProj,
            "decoder": lambda net: Decoder(net, extra), "super_res_first": SuperRes,
            "super_res_last": SuperRes}
    return {name: wrap[name](net) for name, net in components.networks().items()}


def model_dims(components: UnclipComponents) -> ModelDims:
    te, proj = components.text_encoder.config, components.text_proj.config
    dec, sr = components.decoder.config, components.super_res_first.config
    image = components.image_encoder
    return ModelDims(
        clip_dim=proj.clip_embeddings_dim,
        text_len=components.tokenizer.model_max_length,
        text_vocab=te.vocab_size,
        extra_tokens=proj.clip_extra_context_tokens,
        decoder_cross_dim=proj.cross_attention_dim,
        decoder_time_dim=proj.time_embed_dim,
        decoder_size=dec.sample_size,
        decoder_channels=dec.in_channels,
        super_res_size=sr.sample_size,
        image_size=None if image is None else image.config.image_size,
        has_prior=components.prior is not None,
    )
