"""SAM2 grounding encoder of the sa2va-dpo tiny Sa2VA checkpoint (remote code).

Self-contained: imports torch, numpy and transformers only, never the `sa2va` package, so a
checkpoint folder works on its own like the real release.

It mirrors the public surface of the SAM2 copy that ships with Sa2VA (`SAM2Base`,
`SAM2VideoPredictor`, `forward_image`, `_prepare_backbone_features`, `_forward_sam_heads`,
`propagate_in_video`, `PositionEmbeddingSine` ...). Differences from the release:
  * the sizes come from `sam2_config` (a dict in config.json) instead of a hard-coded Hiera-L,
    so one file builds the tiny model and the real shapes;
  * the Hiera trunk + FPN neck is transformers' `Sam2VisionModel` and the mask decoder is
    transformers' `Sam2MaskDecoder` (same architecture as the SAM2 ones, different key names);
  * memory attention / memory encoder / object-pointer projection are small real modules that
    exist for surface fidelity; single-frame inference does not use them.
Like the release, the video path hard-codes CUDA (`init_state`'s devices, `.cuda()` in
`_get_image_feature`) and autocasts for CUDA only in `language_embd_inference`: a loader must
repair the first on CPU (sa2va-dpo does it in sa2va/compat.py, on the loaded object).

Exactly five decorators in this file (a separate tool strips them by parsing):
`PositionEmbeddingSine.encode_boxes/encode_points/forward` (`@torch.no_grad()`) and
`SAM2VideoPredictor.propagate_in_video_preflight/propagate_in_video` (`@torch.inference_mode()`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam2.configuration_sam2 import (
    Sam2HieraDetConfig,
    Sam2MaskDecoderConfig,
    Sam2VisionConfig,
)
from transformers.models.sam2.modeling_sam2 import Sam2MaskDecoder, Sam2VisionModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The SAM2 Hiera-L grounding encoder of every real Sa2VA size, written as our sam2_config.
HIERA_L_SAM2_CONFIG = {
    "image_size": 1024,
    "hidden_dim": 256,
    "mem_dim": 64,
    "trunk": {
        "embed_dim": 144,
        "num_heads": 2,
        "stages": [2, 6, 36, 4],
        "global_att_blocks": [23, 33, 43],
        "window_spec": [8, 4, 16, 8],
        "window_pos_embed_bkg_spatial_size": [7, 7],
    },
    "fpn_top_down_levels": [2, 3],
    "num_feature_levels": 3,
    "mask_decoder": {
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "mlp_dim": 2048,
        "iou_head_depth": 3,
        "iou_head_hidden_dim": 256,
        "num_multimask_outputs": 3,
    },
    "prompt_encoder": {"mask_in_chans": 16},
    "memory_attention": {"num_layers": 4, "dim_feedforward": 2048, "num_heads": 1},
    "memory_encoder": {"fuser_layers": 2},
    "obj_ptr_proj_layers": 3,
    "multimask_output_in_sam": True,
}


def _full_sam2_config(cfg: dict | None) -> dict:
    """Fill missing keys of a sam2_config dict from the Hiera-L defaults (one level deep)."""
    out = {}
    cfg = dict(cfg or {})
    for key, default in HIERA_L_SAM2_CONFIG.items():
        value = cfg.pop(key, None)
        if isinstance(default, dict):
            merged = dict(default)
            merged.update(value or {})
            out[key] = merged
        else:
            out[key] = default if value is None else value
    out.update(cfg)  # unknown keys are kept (and ignored)
    return out


def _set_attn(config, name: str = "sdpa") -> None:
    try:
        config._attn_implementation = name
    except Exception:  # older/newer configs may guard this attribute; the default is fine
        pass


# ----------------------------------------------------------------------------- position encodings


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine position encoding of a feature map (DETR style, normalised coordinates)."""

    def __init__(self, num_pos_feats: int, temperature: int = 10000, normalize: bool = True, scale: float | None = None):
        super().__init__()
        if num_pos_feats % 2 != 0:
            raise ValueError("PositionEmbeddingSine needs an even number of features")
        self.num_pos_feats = num_pos_feats // 2
        self.temperature = temperature
        self.normalize = normalize
        if scale is not None and not normalize:
            raise ValueError("normalize must be True when scale is given")
        self.scale = 2 * math.pi if scale is None else scale

    def _dim_t(self, device, dtype=torch.float32) -> torch.Tensor:
        idx = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        return (self.temperature ** (2 * torch.div(idx, 2, rounding_mode="floor") / self.num_pos_feats)).to(dtype)

    def _interleave(self, v: torch.Tensor) -> torch.Tensor:
        # (..., F) -> sin of even features and cos of odd features, interleaved back to (..., F)
        return torch.stack((v[..., 0::2].sin(), v[..., 1::2].cos()), dim=-1).flatten(-2)

    def _encode_xy(self, x: torch.Tensor, y: torch.Tensor):
        # x, y: flat tensors of normalised coordinates in [0, 1]
        dim_t = self._dim_t(x.device)
        pos_x = self._interleave(x.float()[:, None] * self.scale / dim_t)
        pos_y = self._interleave(y.float()[:, None] * self.scale / dim_t)
        return pos_x, pos_y

    @torch.no_grad()
    def encode_boxes(self, x, y, w, h):
        pos_x, pos_y = self._encode_xy(x, y)
        return torch.cat((pos_y, pos_x, h[:, None].float(), w[:, None].float()), dim=1)

    @torch.no_grad()
    def encode_points(self, x, y, labels):
        (bx, nx), (by, ny), (bl, nl) = x.shape, y.shape, labels.shape
        if not (bx == by == bl and nx == ny == nl):
            raise ValueError("encode_points: x, y and labels must have the same (B, N) shape")
        pos_x, pos_y = self._encode_xy(x.flatten(), y.flatten())
        pos_x = pos_x.reshape(bx, nx, -1)
        pos_y = pos_y.reshape(by, ny, -1)
        return torch.cat((pos_y, pos_x, labels[:, :, None].float()), dim=2)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        device = x.device
        # the encoding does not depend on the batch: compute it once and expand
        y_embed = torch.arange(1, h + 1, dtype=torch.float32, device=device)[None, :, None].expand(1, h, w)
        x_embed = torch.arange(1, w + 1, dtype=torch.float32, device=device)[None, None, :].expand(1, h, w)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (h + eps) * self.scale
            x_embed = x_embed / (w + eps) * self.scale
        dim_t = self._dim_t(device)
        pos_x = self._interleave(x_embed[..., None] / dim_t)
        pos_y = self._interleave(y_embed[..., None] / dim_t)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)
        return pos.expand(b, -1, -1, -1)


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier position encoding of the SAM prompt encoder."""

    def __init__(self, num_pos_feats: int = 128, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = 2 * coords - 1
        coords = coords.to(self.positional_encoding_gaussian_matrix.dtype) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        dtype = self.positional_encoding_gaussian_matrix.dtype
        y = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        grid = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)
        return self._pe_encoding(grid).permute(2, 0, 1)  # C x H x W

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        coords = coords_input.clone().float()
        coords[..., 0] = coords[..., 0] / image_size[1]
        coords[..., 1] = coords[..., 1] / image_size[0]
        return self._pe_encoding(coords)


# ----------------------------------------------------------------------------- small building blocks


class LayerNorm2d(nn.Module):
    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class Attention(nn.Module):
    """Multi-head attention with optional down-projection and a key/value input size of its own."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, kv_in_dim: int | None = None):
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        kv_in_dim = kv_in_dim or embedding_dim
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(kv_in_dim, self.internal_dim)
        self.v_proj = nn.Linear(kv_in_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


# ----------------------------------------------------------------------------- image encoder


class ImageEncoder(nn.Module):
    """Hiera trunk + FPN neck (transformers' Sam2VisionModel) returning SAM2's backbone dict."""

    def __init__(self, vision_config: Sam2VisionConfig, d_model: int = 256):
        super().__init__()
        self.trunk_fpn = Sam2VisionModel(vision_config)
        self.position_encoding = PositionEmbeddingSine(d_model)

    def forward(self, sample: torch.Tensor) -> dict:
        out = self.trunk_fpn(pixel_values=sample)
        features = list(out.fpn_hidden_states)  # highest resolution first (strides 4, 8, 16)
        pos = [self.position_encoding(x).to(x.dtype) for x in features]
        return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}


# ----------------------------------------------------------------------------- prompt encoder


class PromptEncoder(nn.Module):
    """SAM prompt encoder: points/boxes -> sparse tokens, mask -> dense map (no mask -> no_mask_embed)."""

    def __init__(self, embed_dim: int, image_embedding_size: tuple[int, int], input_image_size: tuple[int, int], mask_in_chans: int = 16):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.num_point_embeddings = 4  # positive / negative point, two box corners
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel centres
        if pad:
            points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        emb = emb.to(self.not_a_point_embed.weight.dtype)
        emb = torch.where((labels == -1)[..., None], torch.zeros_like(emb) + self.not_a_point_embed.weight, emb)
        for i in range(self.num_point_embeddings):
            emb = emb + (labels == i)[..., None].to(emb.dtype) * self.point_embeddings[i].weight
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        coords = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(coords, self.input_image_size).to(self.point_embeddings[2].weight.dtype)
        emb[:, 0, :] = emb[:, 0, :] + self.point_embeddings[2].weight
        emb[:, 1, :] = emb[:, 1, :] + self.point_embeddings[3].weight
        return emb

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        return self.mask_downscaling(masks)

    def forward(self, points=None, boxes=None, masks=None):
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        weight = self.no_mask_embed.weight
        sparse = torch.empty((bs, 0, self.embed_dim), device=weight.device, dtype=weight.dtype)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense


# ----------------------------------------------------------------------------- memory parts (surface fidelity)


class MemoryAttentionLayer(nn.Module):
    def __init__(self, d_model: int, mem_dim: int, dim_feedforward: int, num_heads: int):
        super().__init__()
        self.self_attn = Attention(d_model, num_heads)
        self.cross_attn_image = Attention(d_model, num_heads, kv_in_dim=mem_dim)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, query_pos=None, pos=None):
        q = self.norm1(tgt)
        q = q if query_pos is None else q + query_pos
        tgt = tgt + self.self_attn(q, q, self.norm1(tgt))
        q = self.norm2(tgt)
        k = memory if pos is None else memory + pos
        tgt = tgt + self.cross_attn_image(q if query_pos is None else q + query_pos, k, memory)
        tgt = tgt + self.linear2(F.relu(self.linear1(self.norm3(tgt))))
        return tgt


class MemoryAttention(nn.Module):
    def __init__(self, d_model: int, mem_dim: int, num_layers: int, dim_feedforward: int, num_heads: int):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(MemoryAttentionLayer(d_model, mem_dim, dim_feedforward, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, curr, memory, curr_pos=None, memory_pos=None):
        # curr: (HW, B, C), memory: (M, B, mem_dim) as in SAM2; batch-first inside
        out = curr.transpose(0, 1)
        mem = memory.transpose(0, 1)
        qp = None if curr_pos is None else curr_pos.transpose(0, 1)
        mp = None if memory_pos is None else memory_pos.transpose(0, 1)
        for layer in self.layers:
            out = layer(out, mem, qp, mp)
        return self.norm(out).transpose(0, 1)


class MemoryEncoder(nn.Module):
    def __init__(self, d_model: int, mem_dim: int, fuser_layers: int = 2):
        super().__init__()
        chans = [1, 4, 16, 64, 256]
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1), LayerNorm2d(cout), nn.GELU()]
        layers.append(nn.Conv2d(chans[-1], d_model, kernel_size=1))
        self.mask_downsampler = nn.Sequential(*layers)
        self.pix_feat_proj = nn.Conv2d(d_model, d_model, kernel_size=1)
        fuser = []
        for _ in range(fuser_layers):
            fuser += [nn.Conv2d(d_model, d_model, kernel_size=7, padding=3, groups=d_model), LayerNorm2d(d_model), nn.Conv2d(d_model, d_model, kernel_size=1), nn.GELU()]
        self.fuser = nn.Sequential(*fuser)
        self.position_encoding = PositionEmbeddingSine(mem_dim)
        self.out_proj = nn.Conv2d(d_model, mem_dim, kernel_size=1)

    def forward(self, pix_feat: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool = False) -> dict:
        if not skip_mask_sigmoid:
            masks = torch.sigmoid(masks)
        m = self.mask_downsampler(masks)
        m = F.interpolate(m, size=pix_feat.shape[-2:], mode="bilinear", align_corners=False)
        x = self.out_proj(self.fuser(self.pix_feat_proj(pix_feat) + m))
        return {"vision_features": x, "vision_pos_enc": [self.position_encoding(x).to(x.dtype)]}


# ----------------------------------------------------------------------------- SAM2


class SAM2Base(nn.Module):
    """SAM2 with the public surface of the release; sizes from a sam2_config dict."""

    def __init__(self, sam2_config: dict | None = None):
        super().__init__()
        cfg = _full_sam2_config(sam2_config)
        self.sam2_config = cfg
        self.image_size = int(cfg["image_size"])
        self.hidden_dim = int(cfg["hidden_dim"])
        self.mem_dim = int(cfg["mem_dim"])
        self.use_high_res_features_in_sam = True
        self.num_feature_levels = int(cfg["num_feature_levels"])
        self.multimask_output_in_sam = bool(cfg["multimask_output_in_sam"])
        self.multimask_min_pt_num = 0
        self.multimask_max_pt_num = 1
        self.backbone_stride = 16
        self.sam_prompt_embed_dim = self.hidden_dim
        self.sam_image_embedding_size = self.image_size // self.backbone_stride
        if self.num_feature_levels != 3:
            raise ValueError("sam2_config.num_feature_levels must be 3")
        if self.image_size % 32 != 0:
            raise ValueError("sam2_config.image_size must be a multiple of 32")

        t = cfg["trunk"]
        stages = list(t["stages"])
        dims = [int(t["embed_dim"]) * 2**i for i in range(len(stages))]
        heads = [int(t["num_heads"]) * 2**i for i in range(len(stages))]
        s = self.image_size
        trunk_config = Sam2HieraDetConfig(
            hidden_size=dims[0],
            num_attention_heads=heads[0],
            image_size=[s, s],
            blocks_per_stage=stages,
            embed_dim_per_stage=dims,
            num_attention_heads_per_stage=heads,
            window_size_per_stage=list(t["window_spec"]),
            global_attention_blocks=list(t["global_att_blocks"]),
            window_positional_embedding_background_size=list(t["window_pos_embed_bkg_spatial_size"]),
        )
        vision_config = Sam2VisionConfig(
            backbone_config=trunk_config,
            backbone_channel_list=dims[::-1],
            backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
            fpn_hidden_size=self.hidden_dim,
            fpn_top_down_levels=list(cfg["fpn_top_down_levels"]),
            num_feature_levels=self.num_feature_levels,
        )
        self.image_encoder = ImageEncoder(vision_config, d_model=self.hidden_dim)

        self.sam_prompt_encoder = PromptEncoder(
            embed_dim=self.hidden_dim,
            image_embedding_size=(self.sam_image_embedding_size, self.sam_image_embedding_size),
            input_image_size=(self.image_size, self.image_size),
            mask_in_chans=int(cfg["prompt_encoder"]["mask_in_chans"]),
        )
        md = cfg["mask_decoder"]
        decoder_config = Sam2MaskDecoderConfig(
            hidden_size=self.hidden_dim,
            mlp_dim=int(md["mlp_dim"]),
            num_hidden_layers=int(md["num_hidden_layers"]),
            num_attention_heads=int(md["num_attention_heads"]),
            num_multimask_outputs=int(md["num_multimask_outputs"]),
            iou_head_depth=int(md["iou_head_depth"]),
            iou_head_hidden_dim=int(md["iou_head_hidden_dim"]),
        )
        _set_attn(decoder_config, "sdpa")
        self.sam_mask_decoder = Sam2MaskDecoder(decoder_config)

        ma = cfg["memory_attention"]
        self.memory_attention = MemoryAttention(
            self.hidden_dim, self.mem_dim, int(ma["num_layers"]), int(ma["dim_feedforward"]), int(ma["num_heads"])
        )
        self.memory_encoder = MemoryEncoder(self.hidden_dim, self.mem_dim, int(cfg["memory_encoder"]["fuser_layers"]))
        n_ptr = int(cfg["obj_ptr_proj_layers"])
        self.obj_ptr_proj = MLP(self.hidden_dim, self.hidden_dim, self.hidden_dim, n_ptr) if n_ptr > 0 else nn.Identity()
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, self.hidden_dim))
        nn.init.trunc_normal_(self.no_mem_embed, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.no_mem_embed.device

    # -- image features ---------------------------------------------------------------
    def forward_image(self, img_batch: torch.Tensor) -> dict:
        backbone_out = self.image_encoder(img_batch)
        if self.use_high_res_features_in_sam:
            # precompute the projected level-0 and level-1 features for the mask decoder
            backbone_out["backbone_fpn"][0] = self.sam_mask_decoder.conv_s0(backbone_out["backbone_fpn"][0])
            backbone_out["backbone_fpn"][1] = self.sam_mask_decoder.conv_s1(backbone_out["backbone_fpn"][1])
        return backbone_out

    def _prepare_backbone_features(self, backbone_out: dict):
        backbone_out = backbone_out.copy()
        if len(backbone_out["backbone_fpn"]) != len(backbone_out["vision_pos_enc"]):
            raise ValueError("backbone_fpn and vision_pos_enc differ in length")
        feature_maps = backbone_out["backbone_fpn"][-self.num_feature_levels:]
        pos_maps = backbone_out["vision_pos_enc"][-self.num_feature_levels:]
        feat_sizes = [(x.shape[-2], x.shape[-1]) for x in pos_maps]
        vision_feats = [x.flatten(2).permute(2, 0, 1) for x in feature_maps]  # (HW, B, C)
        vision_pos_embeds = [x.flatten(2).permute(2, 0, 1) for x in pos_maps]
        return backbone_out, vision_feats, vision_pos_embeds, feat_sizes

    def _use_multimask(self, is_init_cond_frame: bool, point_inputs) -> bool:
        num_pts = 0 if point_inputs is None else point_inputs["point_labels"].size(1)
        return (
            self.multimask_output_in_sam
            and is_init_cond_frame
            and self.multimask_min_pt_num <= num_pts <= self.multimask_max_pt_num
        )

    # -- the heads ---------------------------------------------------------------------
    def _forward_sam_heads(
        self,
        backbone_features: torch.Tensor,
        point_inputs: dict | None = None,
        mask_inputs: torch.Tensor | None = None,
        high_res_features: list | None = None,
        multimask_output: bool = False,
        language_embd: torch.Tensor | None = None,
    ):
        b = backbone_features.size(0)
        device = backbone_features.device
        if backbone_features.size(1) != self.sam_prompt_embed_dim:
            raise ValueError(f"backbone_features must have {self.sam_prompt_embed_dim} channels")
        if backbone_features.shape[-2:] != (self.sam_image_embedding_size, self.sam_image_embedding_size):
            raise ValueError(
                f"backbone_features must be {self.sam_image_embedding_size}x{self.sam_image_embedding_size}, "
                f"got {tuple(backbone_features.shape[-2:])}"
            )
        if point_inputs is not None:
            sam_point_coords = point_inputs["point_coords"]
            sam_point_labels = point_inputs["point_labels"]
        else:
            # a single "not a point" padding point
            sam_point_coords = torch.zeros(b, 1, 2, device=device)
            sam_point_labels = -torch.ones(b, 1, dtype=torch.int32, device=device)
        if mask_inputs is not None:
            if mask_inputs.shape[-2:] != self.sam_prompt_encoder.mask_input_size:
                sam_mask_prompt = F.interpolate(
                    mask_inputs.float(), size=self.sam_prompt_encoder.mask_input_size,
                    mode="bilinear", align_corners=False, antialias=True,
                )
            else:
                sam_mask_prompt = mask_inputs
        else:
            sam_mask_prompt = None

        sparse_embeddings, dense_embeddings = self.sam_prompt_encoder(
            points=(sam_point_coords, sam_point_labels), boxes=None, masks=sam_mask_prompt
        )
        if language_embd is not None:
            # the [SEG] embeddings are extra prompt tokens: (B, N, 256)
            if language_embd.dim() == 2:
                language_embd = language_embd[:, None]
            sparse_embeddings = torch.cat([sparse_embeddings, language_embd.to(sparse_embeddings.dtype)], dim=1)

        if high_res_features is None:
            raise ValueError("high_res_features (the projected level-0 and level-1 features) are required")
        image_pe = self.sam_prompt_encoder.get_dense_pe().to(backbone_features.dtype).expand(b, -1, -1, -1)
        masks, ious, sam_output_tokens, object_score_logits = self.sam_mask_decoder(
            image_embeddings=backbone_features,
            image_positional_embeddings=image_pe,
            sparse_prompt_embeddings=sparse_embeddings[:, None],
            dense_prompt_embeddings=dense_embeddings.to(backbone_features.dtype),
            multimask_output=multimask_output,
            high_resolution_features=list(high_res_features),
        )
        low_res_multimasks = masks[:, 0].float()  # (B, K, S/4, S/4)
        ious = ious[:, 0]
        sam_output_tokens = sam_output_tokens[:, 0]
        object_score_logits = object_score_logits[:, 0]

        high_res_multimasks = F.interpolate(
            low_res_multimasks, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        sam_output_token = sam_output_tokens[:, 0]
        if multimask_output:
            best_iou_inds = torch.argmax(ious, dim=-1)
            batch_inds = torch.arange(b, device=device)
            low_res_masks = low_res_multimasks[batch_inds, best_iou_inds].unsqueeze(1)
            high_res_masks = high_res_multimasks[batch_inds, best_iou_inds].unsqueeze(1)
            if sam_output_tokens.size(1) > 1:
                sam_output_token = sam_output_tokens[batch_inds, best_iou_inds]
        else:
            low_res_masks, high_res_masks = low_res_multimasks, high_res_multimasks
        obj_ptr = self.obj_ptr_proj(sam_output_token)
        return (
            low_res_multimasks,
            high_res_multimasks,
            ious,
            low_res_masks,
            high_res_masks,
            obj_ptr,
            object_score_logits,
        )

    def forward(self, *args, **kwargs):
        raise NotImplementedError("SAM2Base is driven through forward_image / _forward_sam_heads")


class SAM2VideoPredictor(SAM2Base):
    """The inference path of Sa2VA: init_state -> add_language_embd -> propagate_in_video.

    Frames are segmented one by one from their [SEG] prompts; no memory is carried between
    frames (enough for single images, which is what this project segments)."""

    def init_state(self, images: torch.Tensor) -> dict:
        """images: (T, 3, S, S), already normalised (see SAM2TrainRunner.preprocess_image)."""
        compute_device = torch.device("cuda")  # as in the release: CUDA only
        return {
            "images": images,
            "num_frames": images.shape[0],
            "device": compute_device,
            "storage_device": compute_device,
            "cached_features": {},  # frame_idx -> (image, backbone_out), the latest frame only
            "prompts": {},  # frame_idx -> {obj_id: language_embd (1, N, C)}
            "obj_ids": [],
            "tracking_has_started": False,
        }

    def add_language_embd(self, inference_state: dict, frame_idx: int, obj_id: int, language_embd: torch.Tensor, inference: bool = False):
        """Register a [SEG] embedding (1, N, 256) as the prompt of object obj_id on frame frame_idx.
        Masks are computed by propagate_in_video."""
        if obj_id not in inference_state["obj_ids"]:
            inference_state["obj_ids"].append(obj_id)
        inference_state["prompts"].setdefault(frame_idx, {})[obj_id] = language_embd
        return frame_idx, list(inference_state["obj_ids"]), None

    def _get_image_feature(self, inference_state: dict, frame_idx: int, batch_size: int = 1):
        """(image, backbone_out, vision_feats, vision_pos_embeds, feat_sizes) of one frame."""
        image, backbone_out = inference_state["cached_features"].get(frame_idx, (None, None))
        if backbone_out is None:
            image = inference_state["images"][frame_idx].cuda().float().unsqueeze(0)  # the release's .cuda()
            backbone_out = self.forward_image(image)
            inference_state["cached_features"] = {frame_idx: (image, backbone_out)}
        return (image.expand(batch_size, -1, -1, -1),) + tuple(self._prepare_backbone_features(backbone_out))

    @torch.inference_mode()
    def propagate_in_video_preflight(self, inference_state: dict) -> None:
        inference_state["tracking_has_started"] = True
        for frame_idx in sorted(inference_state["prompts"]):
            self._get_image_feature(inference_state, frame_idx)

    @torch.inference_mode()
    def propagate_in_video(self, inference_state: dict, start_frame_idx: int | None = None, max_frame_num_to_track: int | None = None, reverse: bool = False):
        """Yield (frame_idx, obj_ids, video_res_masks) with mask logits (num_obj, 1, S, S)."""
        self.propagate_in_video_preflight(inference_state)
        n = inference_state["num_frames"]
        start = 0 if start_frame_idx is None else start_frame_idx
        end = n if max_frame_num_to_track is None else min(n, start + max_frame_num_to_track + 1)
        frames = range(start, end)
        if reverse:
            frames = reversed(range(0, start + 1))
        obj_ids = list(inference_state["obj_ids"])
        for frame_idx in frames:
            prompts = inference_state["prompts"].get(frame_idx, {})
            _, _, vision_feats, _, feat_sizes = self._get_image_feature(inference_state, frame_idx)
            high_res = [
                x.permute(1, 2, 0).reshape(x.size(1), x.size(2), *size)
                for x, size in zip(vision_feats[:-1], feat_sizes[:-1])
            ]
            pix = vision_feats[-1] + self.no_mem_embed
            pix = pix.permute(1, 2, 0).reshape(pix.size(1), self.hidden_dim, *feat_sizes[-1])
            outs = []
            for obj_id in obj_ids:
                embd = prompts.get(obj_id)
                if embd is None:
                    outs.append(torch.full((1, 1, self.image_size, self.image_size), -1024.0, device=pix.device))
                    continue
                result = self._forward_sam_heads(
                    backbone_features=pix,
                    point_inputs=None,
                    mask_inputs=None,
                    high_res_features=high_res,
                    multimask_output=self._use_multimask(True, None),
                    language_embd=embd.to(pix.dtype),
                )
                low_res_masks = result[3]
                outs.append(
                    F.interpolate(low_res_masks.float(), size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
                )
            masks = torch.cat(outs, dim=0) if outs else torch.zeros(0, 1, self.image_size, self.image_size)
            yield frame_idx, obj_ids, masks


class SAM2TrainRunner(nn.Module):
    """Sa2VA's grounding encoder: holds the SAM2 model and its image preprocessing."""

    def __init__(self, sam2_config: dict | None = None):
        super().__init__()
        self.sam2_model = SAM2VideoPredictor(sam2_config)
        self.hidden_dim = self.sam2_model.hidden_dim
        self.img_mean = tuple(IMAGENET_MEAN)
        self.img_std = tuple(IMAGENET_STD)

    def preprocess_image(self, image: torch.Tensor) -> torch.Tensor:
        """image: float (3, H, W) in 0..255 -> /255 -> ImageNet mean/std."""
        image = image / 255.0
        mean = torch.tensor(self.img_mean, dtype=image.dtype, device=image.device)[:, None, None]
        std = torch.tensor(self.img_std, dtype=image.dtype, device=image.device)[:, None, None]
        return (image - mean) / std

    def get_sam2_embeddings(self, images: torch.Tensor) -> dict:
        return self.sam2_model.init_state(images)

    def language_embd_inference(self, inference_state: dict, language_embd: list) -> torch.Tensor:
        """language_embd: per frame, a (num_obj, 256) tensor. Returns logits (frames, num_obj, S, S)."""
        num_frames = len(language_embd)
        num_obj = len(language_embd[0])
        for frame_idx in range(num_frames):
            for obj_idx in range(num_obj):
                embd = language_embd[frame_idx][obj_idx][None][None]
                self.sam2_model.add_language_embd(inference_state, frame_idx, obj_idx + 100, embd, inference=True)
        masks = []
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):  # the release's CUDA-only autocast
            for _, _, out_mask_logits in self.sam2_model.propagate_in_video(inference_state):
                masks.append(out_mask_logits[:, 0][None].float())
        return torch.cat(masks, dim=0)

    def forward(self, *args, **kwargs):
        raise NotImplementedError("use sam2_model.forward_image / _forward_sam_heads, or language_embd_inference")


# The Hugging Face release names the grounding encoder class SAM2.
SAM2 = SAM2TrainRunner
