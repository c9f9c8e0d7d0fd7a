"""Sa2VA, Qwen-VL family, as the sa2va-dpo tiny checkpoint ships it (remote code).

Written by sa2va-dpo with the public surface of the release's `Sa2VAChatModelQwen`
(Sa2VA "codebase v2", Qwen2.5-VL and Qwen3-VL checkpoints):
  children  `model` (transformers' own Qwen-VL for conditional generation), `grounding_encoder`
            (the SAM2 wrapper of sam2.py), `text_hidden_fcs` (Linear, ReLU, Linear to 256, Dropout);
  inference `predict_forward(image=..., text=..., processor=...)`: the image goes to the VLM
            through qwen_vl_utils + the processor (min/max pixels), and, resized to SAM2's input
            size, to SAM2; greedy generation with hidden states; each [SEG]'s last-layer state
            (the step whose input is [SEG]) -> text_hidden_fcs -> SAM2's video path -> bilinear to
            the image size -> sigmoid > 0.5.
It keeps the release's quirks on purpose, so that the suite is tested against them: `__init__`
never calls `post_init()`, the module imports `qwen_vl_utils` at top level, and sam2.py's video
path hard-codes CUDA. sa2va-dpo writes this file for Qwen2.5-VL and, with the class names
swapped, for Qwen3-VL.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from qwen_vl_utils import process_vision_info
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.modeling_utils import PreTrainedModel

from .configuration_sa2va_chat import Sa2VAChatConfigQwen
from .sam2 import SAM2


class DirectResize:
    """Resize an RGB uint8 array to target x target (aspect not kept), PIL's default filter."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        pil = Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGB")
        return np.array(pil.resize((self.target_length, self.target_length)))


def get_seg_hidden_states(hidden_states, output_ids, seg_id):
    """Rows of hidden_states (one per input position) whose input token is [SEG]; output_ids are
    the inputs of the last len(output_ids) positions."""
    is_seg = output_ids == seg_id
    if len(is_seg) == 0:
        return hidden_states[:0]
    return hidden_states[-len(is_seg):][is_seg]


class Sa2VAChatModelQwen(PreTrainedModel):
    config_class = Sa2VAChatConfigQwen
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    _no_split_modules = ["Qwen2_5_VLDecoderLayer", "SAM2"]
    supports_gradient_checkpointing = True

    def __init__(self, config: Sa2VAChatConfigQwen, model=None, use_flash_attn=True):
        super().__init__(config)
        # The release fixes the pixel range here; the tiny checkpoint may narrow it in config.json.
        self.min_pixels = int(getattr(config, "min_pixels", None) or 512 * 28 * 28)
        self.max_pixels = int(getattr(config, "max_pixels", None) or 2048 * 28 * 28)
        self.torch_dtype = torch.bfloat16
        self.model = model if model is not None else Qwen2_5_VLForConditionalGeneration(config)
        self.model._tied_weights_keys = None

        self.grounding_encoder = SAM2(getattr(config, "sam2_config", None))
        self.extra_image_processor = DirectResize(self.grounding_encoder.sam2_model.image_size)
        hidden = config.text_config.hidden_size
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, self.grounding_encoder.hidden_dim), nn.Dropout(0.0),
        )
        # like the release, __init__ ends without calling post_init

    @property
    def lm_head(self):
        return self.model.lm_head

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def _grounding_pixels(self, frames):
        """(frames, 3, S, S) SAM2 input: resized straight, normalised by the grounding encoder,
        in self.torch_dtype (bfloat16) as the release does; sam2.py moves it to the GPU."""
        out = []
        for frame in frames:
            resized = self.extra_image_processor.apply_image(np.array(frame.convert("RGB")))
            pixels = torch.from_numpy(resized).permute(2, 0, 1).contiguous().to(self.torch_dtype)
            out.append(self.grounding_encoder.preprocess_image(pixels))
        return torch.stack(out).to(self.torch_dtype)

    def predict_forward(self, image=None, video=None, text=None, past_text="", mask_prompts=None,
                        tokenizer=None, processor=None):
        assert processor is not None, "predict_forward of the Qwen-VL family needs processor="
        self.processor = processor
        self.seg_token_idx = processor.tokenizer.convert_tokens_to_ids("[SEG]")
        text = text.replace("<image>", "")

        if image is None and video is None:
            content = [{"type": "text", "text": past_text + text}]
            frames = []
        else:
            frames = list(video) if video is not None else [image]
            content = [{"type": "image", "image": frame} for frame in frames[:5]]
            content.append({"type": "text", "text": text})
        messages = [{"role": "user", "content": content}]
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if frames:
            image_inputs, video_inputs = process_vision_info(messages)
            mm_inputs = processor(text=[prompt], images=image_inputs, videos=video_inputs, padding=True,
                                  return_tensors="pt", min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        else:
            mm_inputs = processor(text=[prompt], images=None, videos=None, padding=True, return_tensors="pt")
        mm_inputs = mm_inputs.to(self.device)

        out = self.model.generate(**mm_inputs, max_new_tokens=2048, do_sample=False,
                                  output_hidden_states=True, return_dict_in_generate=True)
        new_tokens = out.sequences[0][mm_inputs.input_ids.shape[1]:]
        prediction = processor.batch_decode([new_tokens], skip_special_tokens=False)[0].strip()
        if not frames:
            return {"prediction": prediction, "prediction_masks": []}

        # One row per input position: the prompt (first step), then each generated token fed back.
        last_hidden = torch.cat([step[-1][0] for step in out.hidden_states], dim=0)
        seg_hidden = get_seg_hidden_states(last_hidden, out.sequences[0][:-1], seg_id=self.seg_token_idx)
        masks = []
        width, height = frames[0].size
        g_pixel_values = self._grounding_pixels(frames)
        for seg_embed in self.text_hidden_fcs(seg_hidden):
            sam_states = self.grounding_encoder.get_sam2_embeddings(g_pixel_values)
            logits = self.grounding_encoder.language_embd_inference(sam_states, [seg_embed[None]] * len(frames))
            logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
            masks.append((logits[:, 0].sigmoid() > 0.5).cpu().numpy())
        return {"prediction": prediction, "prediction_masks": masks}
