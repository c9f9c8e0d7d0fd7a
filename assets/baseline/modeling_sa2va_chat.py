"""Sa2VA chat model of the sa2va-dpo tiny checkpoint (remote code, self-contained).

The public surface follows the Sa2VA Hugging Face release: named children `vision_model`,
`language_model`, `mlp1`, `grounding_encoder`, `text_hidden_fcs`; `img_context_token_id`
starting as None; `extract_feature`; `predict_forward`. The building blocks are transformers'
own InternVL vision tower and Qwen2 LLM (1B/4B family), or our InternLM2 remote code
(modeling_internlm2.py, the 8B/26B family, with the release's quirks), so the real shapes are one
config away.
Unlike the release, `predict_forward` runs on any device (it never calls `.cuda()` and keeps
the model's dtype).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.models.internvl.modeling_internvl import InternVLVisionModel
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

from .configuration_sa2va_chat import SUPPORTED_LLM_ARCHITECTURES, Sa2VAChatConfig
from .modeling_internlm2 import InternLM2ForCausalLM
from .sam2 import SAM2TrainRunner

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
SEG_TOKEN = "[SEG]"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TEMPLATES = {
    "qwen_chat": {
        "SYSTEM": "<|im_start|>system\n{system}<|im_end|>\n",
        "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "SUFFIX": "<|im_end|>",
        "STOP_WORDS": ["<|im_end|>", "<|endoftext|>"],
    },
    "phi3_chat": {
        "SYSTEM": "<|system|>\n{system}<|end|>\n",
        "INSTRUCTION": "<|user|>\n{input}<|end|>\n<|assistant|>\n",
        "SUFFIX": "<|end|>",
        "STOP_WORDS": ["<|end|>"],
    },
    "internlm2_chat": {
        "SYSTEM": "<|im_start|>system\n{system}<|im_end|>\n",
        "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "SUFFIX": "<|im_end|>",
        "STOP_WORDS": ["<|im_end|>"],
    },
}


# ----------------------------------------------------------------------------- image tiling (InternVL)


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    """Pick the tile grid whose aspect ratio is closest; on a tie prefer the larger grid when the
    image has more than half the grid's pixel area (InternVL's rule)."""
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for cols, rows in target_ratios:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_preprocess(image: Image.Image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    """Split an image into 1..max_num tiles of image_size (plus a thumbnail when > 1 tile)."""
    width, height = image.size
    ratios = sorted(
        {
            (i, j)
            for n in range(min_num, max_num + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_num <= i * j <= max_num
        },
        key=lambda r: r[0] * r[1],
    )
    cols, rows = find_closest_aspect_ratio(width / height, ratios, width, height, image_size)
    target_w, target_h = image_size * cols, image_size * rows
    resized = image.resize((target_w, target_h), Image.BICUBIC)
    tiles = []
    for idx in range(cols * rows):
        x0 = (idx % cols) * image_size
        y0 = (idx // cols) * image_size
        tiles.append(resized.crop((x0, y0, x0 + image_size, y0 + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    return tiles


def image_to_tensor(tile: Image.Image, image_size: int) -> torch.Tensor:
    """Bicubic resize to image_size, to [0, 1], ImageNet mean/std."""
    tile = tile.convert("RGB")
    if tile.size != (image_size, image_size):
        tile = tile.resize((image_size, image_size), Image.BICUBIC)
    return TF.normalize(TF.to_tensor(tile), IMAGENET_MEAN, IMAGENET_STD)


def get_seg_hidden_states(hidden_states: torch.Tensor, output_ids: torch.Tensor, seg_id: int) -> torch.Tensor:
    seg_mask = output_ids == seg_id
    n_out = len(seg_mask)
    if n_out == 0:
        return hidden_states[0:0]
    return hidden_states[-n_out:][seg_mask]


def _as_int(v) -> int:
    if isinstance(v, (list, tuple)):
        return int(v[0])
    return int(v)


# ----------------------------------------------------------------------------- the model


class Sa2VAChatModel(PreTrainedModel):
    config_class = Sa2VAChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    _no_split_modules = ["InternVLVisionLayer", "Qwen2DecoderLayer", "InternLM2DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    supports_gradient_checkpointing = True

    def __init__(self, config: Sa2VAChatConfig, vision_model=None, language_model=None):
        super().__init__(config)
        vcfg = config.vision_config
        image_size = config.force_image_size or _as_int(vcfg.image_size)
        self.image_size = int(image_size)
        self.patch_size = _as_int(vcfg.patch_size)
        self.select_layer = config.select_layer
        self.template = config.template
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.llm_arch_name = config.llm_config.architectures[0]

        self.vision_model = vision_model if vision_model is not None else InternVLVisionModel(vcfg)
        if language_model is not None:
            self.language_model = language_model
        elif self.llm_arch_name == "Qwen2ForCausalLM":
            self.language_model = Qwen2ForCausalLM(config.llm_config)
        elif self.llm_arch_name == "InternLM2ForCausalLM":
            self.language_model = InternLM2ForCausalLM(config.llm_config)
        else:
            raise NotImplementedError(
                f"{self.llm_arch_name} is not implemented in this tiny Sa2VA code "
                f"(supported: {', '.join(SUPPORTED_LLM_ARCHITECTURES)})"
            )

        vit_hidden_size = vcfg.hidden_size
        llm_hidden_size = config.llm_config.hidden_size
        scale = int(1 / self.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(vit_hidden_size * scale),
            nn.Linear(vit_hidden_size * scale, llm_hidden_size),
            nn.GELU(),
            nn.Linear(llm_hidden_size, llm_hidden_size),
        )
        self.img_context_token_id = None
        self.grounding_encoder = SAM2TrainRunner(config.sam2_config)
        out_dim = self.grounding_encoder.hidden_dim
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(llm_hidden_size, llm_hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(llm_hidden_size, out_dim),
            nn.Dropout(0.0),
        )
        self.seg_token_idx = None
        self.init_prediction_config = False
        self._count = 0
        self.post_init()

    # -- weights init (used for from_config builds and for keys missing from a checkpoint) --
    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm) or "LayerNorm" in type(module).__name__ or "RMSNorm" in type(module).__name__:
            if getattr(module, "weight", None) is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif type(module).__name__ == "PositionEmbeddingRandom":
            nn.init.normal_(module.positional_encoding_gaussian_matrix, mean=0.0, std=module.scale)
        elif type(module).__name__ in ("SAM2Base", "SAM2VideoPredictor"):
            nn.init.trunc_normal_(module.no_mem_embed, std=0.02)

    @property
    def num_image_token(self) -> int:
        return int((self.image_size // self.patch_size) ** 2 * (self.downsample_ratio**2))

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    # -- vision --------------------------------------------------------------------------
    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        n, w, h, c = x.shape
        # fold pairs of columns into channels, then pairs of rows
        x = x.reshape(n, w, int(h * scale_factor), int(c / scale_factor))
        x = x.permute(0, 2, 1, 3).contiguous()
        x = x.reshape(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
        if self.ps_version != "v1":
            x = x.permute(0, 2, 1, 3).contiguous()  # v2: back to (rows, cols)
        return x

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.vision_model.embeddings.patch_embeddings.projection.weight.dtype)
        if self.select_layer == -1:
            vit_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        else:
            vit_embeds = self.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        vit_embeds = vit_embeds[:, 1:, :]  # drop CLS
        side = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], side, side, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)

    def _splice_image_embeds(self, input_ids, inputs_embeds, vit_embeds):
        if self.img_context_token_id is None:
            raise ValueError("img_context_token_id is None: set it from the tokenizer (<IMG_CONTEXT>)")
        b, n, c = inputs_embeds.shape
        flat = inputs_embeds.reshape(b * n, c)
        selected = input_ids.reshape(b * n) == self.img_context_token_id
        vit = vit_embeds.reshape(-1, c).to(flat.dtype)
        if int(selected.sum()) != vit.shape[0]:
            raise ValueError(
                f"the prompt holds {int(selected.sum())} <IMG_CONTEXT> tokens but the images give {vit.shape[0]} embeddings"
            )
        flat = flat.clone()
        flat[selected] = vit
        return flat.reshape(b, n, c)

    def forward(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        image_flags=None,
        past_key_values=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        """Teacher-forced LLM forward with the image features spliced in (InternVL style)."""
        inputs_embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            if image_flags is not None:
                pixel_values = pixel_values[image_flags.reshape(-1) == 1]
            vit_embeds = self.extract_feature(pixel_values)
            inputs_embeds = self._splice_image_embeds(input_ids, inputs_embeds, vit_embeds)
        lm_kwargs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "labels": labels, "return_dict": True}
        optional = {
            "position_ids": position_ids,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
            "output_attentions": output_attentions,
            "output_hidden_states": output_hidden_states,
        }
        lm_kwargs.update({k: v for k, v in optional.items() if v is not None})
        return self.language_model(**lm_kwargs)  # a CausalLMOutputWithPast

    @torch.no_grad()
    def generate(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        visual_features=None,
        generation_config=None,
        output_hidden_states=None,
        return_dict=None,
        **generate_kwargs,
    ):
        inputs_embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None or visual_features is not None:
            vit_embeds = visual_features if visual_features is not None else self.extract_feature(pixel_values)
            inputs_embeds = self._splice_image_embeds(input_ids, inputs_embeds, vit_embeds)
        if generation_config is not None:
            generation_config = copy.deepcopy(generation_config)
            generation_config.output_hidden_states = bool(output_hidden_states)
            generation_config.return_dict_in_generate = True
            return self.language_model.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                generation_config=generation_config, **generate_kwargs,
            )
        return self.language_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            output_hidden_states=bool(output_hidden_states),
            return_dict_in_generate=True,
            **generate_kwargs,
        )

    # -- inference -----------------------------------------------------------------------
    def preparing_for_generation(self, tokenizer, max_new_tokens: int = 2048):
        template = TEMPLATES.get(self.template)
        if template is None:
            raise ValueError(f"unknown template {self.template!r} (known: {', '.join(TEMPLATES)})")
        self.tokenizer = tokenizer
        stop_ids = []
        for word in template["STOP_WORDS"]:
            tid = tokenizer.convert_tokens_to_ids(word)
            if tid is not None and tid != tokenizer.unk_token_id:
                stop_ids.append(int(tid))
        if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in stop_ids:
            stop_ids.append(int(tokenizer.eos_token_id))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        self.gen_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=stop_ids,
            pad_token_id=int(pad),
        )
        self.template_dict = template
        self.seg_token_idx = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
        self.init_prediction_config = True

    def predict_forward(self, image=None, video=None, text=None, past_text="", mask_prompts=None, tokenizer=None):
        if tokenizer is None:
            raise ValueError("predict_forward needs the tokenizer")
        if not self.init_prediction_config or getattr(self, "tokenizer", None) is not tokenizer:
            self.preparing_for_generation(tokenizer)
        if self.img_context_token_id is None:
            self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        if mask_prompts is not None:
            raise NotImplementedError("visual prompts (mask_prompts) are not supported by this tiny Sa2VA code")
        text = text or ""
        device = self.mlp1[1].weight.device
        dtype = self.mlp1[1].weight.dtype

        if video is not None:
            frames = [f.convert("RGB") for f in video]
        elif image is not None:
            frames = [image.convert("RGB")]
        else:
            frames = []

        input_text = ""
        pixel_values = None
        g_pixel_values = None
        ori_w = ori_h = None
        if frames:
            ori_w, ori_h = frames[0].size
            cfg = self.config
            tiles_per_frame = []
            pv = []
            for frame in frames:
                if video is None and cfg.dynamic_image_size:
                    tiles = dynamic_preprocess(frame, cfg.min_dynamic_patch, cfg.max_dynamic_patch, self.image_size, cfg.use_thumbnail)
                else:
                    tiles = [frame]
                pv += [image_to_tensor(t, self.image_size) for t in tiles]
                tiles_per_frame.append(len(tiles))
            pixel_values = torch.stack(pv).to(device=device, dtype=dtype)
            sam_size = self.grounding_encoder.sam2_model.image_size
            g = []
            for frame in frames:
                arr = np.asarray(frame.resize((sam_size, sam_size), Image.BILINEAR), dtype=np.float32)
                g.append(self.grounding_encoder.preprocess_image(torch.from_numpy(arr.copy()).permute(2, 0, 1)))
            g_pixel_values = torch.stack(g).to(device=device, dtype=dtype)

            image_token_str = "".join(
                f"{IMG_START_TOKEN}{IMG_CONTEXT_TOKEN * (self.num_image_token * n)}{IMG_END_TOKEN}\n" for n in tiles_per_frame
            ).strip()
            if "<image>" not in text and not past_text:
                text = "<image>\n" + text
            text = text.replace("<image>", image_token_str)

        input_text += self.template_dict["INSTRUCTION"].format(input=text, round=1, bot_name="BOT")
        input_text = past_text + input_text
        ids = tokenizer.encode(input_text, add_special_tokens=False)
        input_ids = torch.tensor(ids, device=device)[None]
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)

        out = self.generate(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=self.gen_config,
            output_hidden_states=True,
        )
        sequences = out.sequences[0]
        prediction = tokenizer.decode(sequences, skip_special_tokens=False).strip()

        # last-layer hidden state at every position: prompt, then each generated token fed back
        last_hidden = torch.cat([step[-1][0] for step in out.hidden_states], dim=0)
        seg_hidden = get_seg_hidden_states(last_hidden, sequences[:-1], seg_id=self.seg_token_idx)
        masks = []
        if len(seg_hidden) == 0 or g_pixel_values is None:
            return {"prediction": prediction, "prediction_masks": masks}
        seg_embeds = self.text_hidden_fcs(seg_hidden.to(dtype))
        for seg_embed in seg_embeds:
            state = self.grounding_encoder.get_sam2_embeddings(g_pixel_values)
            logits = self.grounding_encoder.language_embd_inference(state, [seg_embed[None]] * len(frames))
            logits = F.interpolate(logits.float(), size=(ori_h, ori_w), mode="bilinear", align_corners=False)
            masks.append((logits[:, 0].sigmoid() > 0.5).cpu().numpy())
        return {"prediction": prediction, "prediction_masks": masks}
