"""The step cache's two decoder networks: a full step that also returns the UNet's deep features,
and a shallow step that reuses them (DeepCache's scheme, on unCLIP's decoder UNet).

Between neighbouring denoising steps the deep, low-resolution part of a UNet changes slowly; the
shallow branch at full resolution (conv_in, the first down block, the last up block, the output
head) follows the input closely. So a full step keeps the hidden state that enters the last up
block, and the next N-1 steps recompute only the shallow branch and feed it that kept state in
place of everything deeper. The full step is the diffusers UNet's own forward, untouched: a
forward pre-hook on the last up block reads its input. The shallow step calls the same modules
the forward calls, in the same order, for the first and last levels only.

The cached features travel as an ordinary network output and input (`deep_features`), so every
backend runs the pair like any other two networks and an export has two graphs per cached UNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unclip.specs import NetworkSpec, TensorSpec

FEATURES = "deep_features"
CACHED = ("decoder_full", "decoder_shallow")  # the pair's network names, as backends and artifacts list them


def feature_channels(unet: nn.Module) -> int:
    """Channels of the state that enters the last up block: the second-to-last up block's output."""
    channels = unet.config.block_out_channels
    if len(channels) < 2:
        raise ValueError("a UNet with one level has no deep part to cache")
    return channels[1]


def _embeddings(unet: nn.Module, sample, timestep, class_labels, encoder_hidden_states):
    """The time embedding and processed context, as UNet2DConditionModel.forward makes them."""
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs={})
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                               added_cond_kwargs={})
    return emb, encoder_hidden_states


def _block(block: nn.Module, emb, encoder_hidden_states, attention_mask, **kwargs):
    if getattr(block, "has_cross_attention", False):
        return block(temb=emb, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                     **kwargs)
    return block(temb=emb, **kwargs)


def shallow_forward(unet: nn.Module, sample, timestep, class_labels, encoder_hidden_states, attention_mask,
                    deep_features) -> torch.Tensor:
    """The UNet's output with everything below its first level replaced by `deep_features`."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    mask = (1 - attention_mask.to(sample.dtype)) * -10000.0
    mask = mask.unsqueeze(1)
    emb, context = _embeddings(unet, sample, timestep, class_labels, encoder_hidden_states)
    h = unet.conv_in(sample)
    _, res = _block(unet.down_blocks[0], emb, context, mask, hidden_states=h)
    last = unet.up_blocks[-1]
    skips = ((h,) + tuple(res))[:len(last.resnets)]
    h = _block(last, emb, context, mask, hidden_states=deep_features, res_hidden_states_tuple=skips)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


class DecoderFull(nn.Module):
    """The decoder's full step: (model_output, deep_features)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder  # unclip.models.networks.Decoder: the same weights, not a copy

    def forward(self, sample, timestep, decoder_hidden, decoder_time_embeds, text_mask):
        kept = {}

        def keep(module, args, kwargs):
            kept["features"] = kwargs["hidden_states"]

        handle = self.decoder.net.up_blocks[-1].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            out = self.decoder(sample, timestep, decoder_hidden, decoder_time_embeds, text_mask)
        finally:
            handle.remove()
        return out, kept["features"]


class DecoderShallow(nn.Module):
    """The decoder's shallow step: model_output from the shallow branch and a full step's features."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, sample, timestep, decoder_hidden, decoder_time_embeds, text_mask, deep_features):
        mask = F.pad(text_mask, (self.decoder.extra_tokens, 0), value=True)
        timestep = timestep.expand(sample.shape[0]) if timestep.dim() == 0 else timestep
        return shallow_forward(self.decoder.net, sample, timestep, decoder_time_embeds, decoder_hidden, mask,
                               deep_features.to(sample.dtype))


def cached_specs(decoder: NetworkSpec, channels: int) -> dict[str, NetworkSpec]:
    """The pair's specs, from the decoder's: the features are at the decoder's resolution."""
    sample = decoder.inputs[0]
    features = TensorSpec(FEATURES, "float32", ("batch", channels, *sample.shape[2:]))
    return {"decoder_full": NetworkSpec("decoder_full", decoder.inputs, (*decoder.outputs, features)),
            "decoder_shallow": NetworkSpec("decoder_shallow", (*decoder.inputs, features), decoder.outputs)}


def cached_adapters(decoder: nn.Module) -> dict[str, nn.Module]:
    return {"decoder_full": DecoderFull(decoder), "decoder_shallow": DecoderShallow(decoder)}


def schedule(steps: int, every: int) -> list[str]:
    """The decoder network of each step: a full step every `every` steps (the first one full), shallow
    steps in between; every=1 is the plain decoder, uncached."""
    if every <= 1:
        return ["decoder"] * steps
    return ["decoder_full" if i % every == 0 else "decoder_shallow" for i in range(steps)]
