"""The torch modules behind the registered encoders that timm does not provide as-is.

- :class:`ResNet50Trunc`: CLAM's ResNet-50 cut after ``layer3``.
- :class:`ClsMeanTokens`: Virchow's embedding, ``concat(CLS, mean of patch tokens)``.
- :class:`AttentionalPooler` and :class:`ConchVision`: CONCH's image tower (a timm ViT trunk,
  one learned query attending over all tokens, a LayerNorm).
- :class:`ConvStem`: CTransPath's convolutional patch embedding for timm's Swin Transformer.

Module and parameter names follow the published checkpoints, so their state dicts load
without renaming (see ``extract/encoders.py`` for the key maps of the others).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResNet50Trunc", "ClsMeanTokens", "AttentionalPooler", "ConchVision", "ConvStem"]


class ResNet50Trunc(nn.Module):
    """torchvision ResNet-50 up to and including ``layer3``, then global average pooling.

    The submodules keep torchvision's names (``conv1, bn1, relu, maxpool, layer1..3``), so a
    full torchvision ``resnet50`` state dict loads once ``layer4.*``/``fc.*`` are dropped.
    Output: ``[B, 1024]`` (layer3 has 1024 channels at stride 16).
    """

    feature_dim = 1024

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet50

        base = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = base.conv1, base.bn1, base.relu, base.maxpool
        self.layer1, self.layer2, self.layer3 = base.layer1, base.layer2, base.layer3
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


class ClsMeanTokens(nn.Module):
    """``[B, 3, S, S] -> [B, 2 * D]``: the class token next to the mean of the patch tokens.

    Virchow's published embedding. ``trunk.forward_features`` returns ``[B, P + N, D]`` with
    ``P = trunk.num_prefix_tokens`` (class token, then registers); registers are in neither half.
    """

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.skip = int(trunk.num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, self.skip:].mean(dim=1)], dim=-1)


class AttentionalPooler(nn.Module):
    """Learned queries attending over a token sequence (CoCa / CONCH).

    ``x [B, N, context_dim] -> [B, n_queries, d_model]``. Keys and values are the LayerNormed
    tokens (``ln_k``), queries the LayerNormed learned ``query`` (``ln_q``); the attention is
    ``nn.MultiheadAttention`` with separate key/value widths, whose parameter names
    (``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``, ``in_proj_bias``, ``out_proj``)
    are those of the CONCH checkpoints.
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.ln_k(x)
        queries = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(queries, keys, keys, need_weights=False)[0]


class ConchVision(nn.Module):
    """CONCH's image embedding before the contrastive projection: ``[B, 3, S, S] -> [B, d_model]``.

    ``trunk`` (a timm ViT) gives all tokens after its final norm, ``attn_pool_contrast`` pools
    them with one query, ``ln_contrast`` normalises the result (``encode_image(proj_contrast=False,
    normalize=False)`` in CONCH's terms).
    """

    def __init__(self, trunk: nn.Module, d_model: int, n_head: int = 8):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(d_model, int(trunk.num_features), n_head, n_queries=1)
        self.ln_contrast = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 conv-BN-ReLU, a 1x1 conv, a norm.

    ``[B, 3, H, W] -> [B, H/4, W/4, embed_dim]`` (NHWC, what timm's Swin stages take). Channel
    widths ``3 -> E/8 -> E/4 -> E``; submodule names (``proj.0 ... proj.6``, ``norm``) are those
    of the published checkpoint. Accepts the keyword arguments timm's Swin passes to its
    ``embed_layer``.
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None,
                 strict_img_size=True, output_fmt="NHWC", **factory):
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ValueError(f"ConvStem needs patch_size 4 and embed_dim divisible by 8; got {patch_size}, {embed_dim}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = size
        self.patch_size = (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        factory = {k: v for k, v in factory.items() if k in ("device", "dtype")}
        layers, width_in, width_out = [], in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(width_in, width_out, 3, stride=2, padding=1, bias=False, **factory),
                       nn.BatchNorm2d(width_out, **factory), nn.ReLU(inplace=True)]
            width_in, width_out = width_out, width_out * 2
        layers.append(nn.Conv2d(width_in, embed_dim, kernel_size=1, **factory))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim, **factory) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))
