"""Score network: the guided-diffusion-style UNet used by the official GFDM code.

State-dict keys, shapes and function match the official network, so official
checkpoints load with ``strict=True``:

* GroupNorm with 8 groups, computed in float32 whatever the activation dtype;
* attention on the *legacy* head order (heads split after q/k/v are packed
  per head) unless ``use_new_attention_order``;
* ``attention_resolutions`` are down-sampling rates ``ds`` (1, 2, 4, ...), not
  pixel sizes;
* sinusoidal timestep embedding (cos first, then sin) of ``model_channels``
  features, then a two-layer MLP to ``4 * model_channels``; a class embedding
  ``label_emb`` is added when ``num_classes`` is set.

Fast paths that do not change the state dict: ``use_sdpa`` routes attention
through ``scaled_dot_product_attention`` (same numbers up to rounding),
channels_last and autocast work as is (see ``gfdm_fast.models.fast``).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 8  # official GroupNorm32 uses 8 groups here, not guided diffusion's 32


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 and cast back, as the official network does."""

    def forward(self, x):
        dt = torch.promote_types(x.dtype, torch.float32)   # float64 stays float64 (reference runs)
        return F.group_norm(x.to(dt), self.num_groups, self.weight.to(dt), self.bias.to(dt),
                            self.eps).to(x.dtype)


def normalization(channels):
    return GroupNorm32(GROUPS, channels)


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal features [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half) (guided diffusion)."""
    half = dim // 2
    dt = torch.promote_types(timesteps.dtype, torch.float32)   # float32 as official; float64 stays
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=dt, device=timesteps.device) / half)
    args = timesteps.to(dt)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepBlock(nn.Module):
    """A module whose forward also takes the timestep embedding."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands the embedding to the children that take one."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2, then (optionally) a 3x3 convolution named ``conv``."""

    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (or 2x2 average pooling) named ``op``."""

    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            assert self.out_channels == channels
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the embedding (added, or as scale/shift after the norm)."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, up=False, down=False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        if self.updown:
            norm_act, conv = self.in_layers[:-1], self.in_layers[-1]
            h = conv(self.h_upd(norm_act(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all H*W positions; ``qkv``/``proj_out`` are 1x1 convolutions.

    Head order: legacy (default) packs [q_h, k_h, v_h] per head along the
    channel axis; the new order packs [q_1..q_H, k_1..k_H, v_1..v_H].
    ``use_sdpa`` computes the same softmax(q k^T / sqrt(d)) v with
    ``scaled_dot_product_attention``; the legacy path scales q and k by
    d^-1/4 each and takes the softmax in float32, as the official code does.
    """

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_new_attention_order=False,
                 use_sdpa=False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            assert channels % num_head_channels == 0, (channels, num_head_channels)
            self.num_heads = channels // num_head_channels
        assert channels % self.num_heads == 0, (channels, self.num_heads)
        self.use_new_attention_order = use_new_attention_order
        self.use_sdpa = use_sdpa
        self.norm = normalization(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def _split_heads(self, qkv):
        """(B, 3C, T) -> q, k, v each (B, heads, d, T), honouring the head order."""
        b, _, t = qkv.shape
        d = self.channels // self.num_heads
        if self.use_new_attention_order:
            qkv = qkv.reshape(b, 3, self.num_heads, d, t)
            return qkv[:, 0], qkv[:, 1], qkv[:, 2]
        qkv = qkv.reshape(b, self.num_heads, 3, d, t)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def forward(self, x):
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3 * c, height * width)
        q, k, v = self._split_heads(qkv)
        if self.use_sdpa:
            a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                               v.transpose(-1, -2))   # (B, heads, T, d)
            a = a.transpose(-1, -2)
        else:
            scale = (c // self.num_heads) ** -0.25
            w = torch.einsum("bhct,bhcs->bhts", q * scale, k * scale)
            w = torch.softmax(w.to(torch.promote_types(w.dtype, torch.float32)), dim=-1).to(w.dtype)
            a = torch.einsum("bhts,bhcs->bhct", w, v)
        h = self.proj_out(a.reshape(b, c, height, width))
        return x + h


def zero_module(module):
    for p in module.parameters():
        p.detach().zero_()
    return module


class UNetModel(nn.Module):
    """The official score network; ``forward(x, timesteps, y=None)`` returns the epsilon prediction.

    ``timesteps`` are network times (the official code feeds ``999 t``), shape
    (B,) or (B, 1). Constructor arguments keep the official names;
    ``use_checkpoint`` and ``use_fp16`` are accepted for compatibility and
    ignored (use autocast instead of a half-precision copy of the weights).
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0.0, channel_mult=(1, 2, 4, 8), conv_resample=True,
                 dims=2, num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=1,
                 num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False,
                 resblock_updown=False, use_new_attention_order=False, use_sdpa=False):
        super().__init__()
        # Constructor arguments, for checkpoints (see ``gfdm_fast.checkpoint``).
        self.config_kwargs = dict(
            image_size=image_size, in_channels=in_channels, model_channels=model_channels,
            out_channels=out_channels, num_res_blocks=num_res_blocks,
            attention_resolutions=list(attention_resolutions), dropout=dropout,
            channel_mult=list(channel_mult), num_classes=num_classes, num_heads=num_heads,
            num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order)
        if dims != 2:
            raise ValueError(f"only 2-d images are supported (dims={dims})")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(ch_in, ch_out, **kw):
            return ResBlock(ch_in, emb_dim, dropout, out_channels=ch_out,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(ch, heads):
            return AttentionBlock(ch, heads, num_head_channels, use_new_attention_order, use_sdpa)

        ch = first_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(first_ch, out_channels, 3, padding=1)))

    @property
    def use_sdpa(self):
        return all(m.use_sdpa for m in self.modules() if isinstance(m, AttentionBlock))

    @use_sdpa.setter
    def use_sdpa(self, enabled):
        for m in self.modules():
            if isinstance(m, AttentionBlock):
                m.use_sdpa = bool(enabled)

    def forward(self, x, timesteps, y=None):
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass labels y exactly when the model is class-conditional "
                             f"(num_classes={self.num_classes})")
        t_emb = timestep_embedding(timesteps.reshape(-1), self.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y.reshape(-1))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
