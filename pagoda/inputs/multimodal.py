"""Images -> what the engine core needs: the prompt with each image's placeholder expanded, and
per image its processor outputs, placeholder range and content hash (`MultiModalFeature`).

The pixels are prepared by the model's own transformers image processor (PIL backend; the
torchvision one where installed), a list of images per call, split back into each image's
outputs, which stand alone (the encoder cache and the prefix cache key on them). What a
placeholder expands to is the family's (as its transformers processor writes it):
- LLaVA: `<image>` x patches (CLS dropped with the "default" feature strategy);
- Qwen2-VL / Qwen2.5-VL: `<|image_pad|>` x (grid t*h*w / 4), between the template's
  `<|vision_start|>` and `<|vision_end|>`;
- Idefics3 / SmolVLM: per tile `<fake_token_around_image><row_i_col_j>` + image_seq_len
  `<image>`, then the global tile (transformers' get_image_prompt_string).

The steps are split so the API server can run each where it belongs: `process_images` (CPU
heavy: a worker pool), `expand_text` (string work), tokenizing (the tokenizer's thread), then
`features` (locating each image's placeholders in the token ids).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from pagoda.engine.messages import MultiModalFeature, Tensor


@dataclass
class ImageItem:
    """One image after the image processor: its outputs, and its prompt expansion."""
    data: dict[str, np.ndarray]
    num_embeds: int
    replacement: str                  # the text its placeholder becomes
    identifier: str


def _wire(a: np.ndarray, dtype: Optional[str]) -> Tensor:
    """Float outputs in the engine's dtype when they cross a process boundary (the tower casts
    its input to it anyway, and half the bytes travel); bfloat16 as torch writes it."""
    if a.dtype.kind == "f" and dtype in ("bfloat16", "float16"):
        if dtype == "float16":
            return Tensor.of(a.astype(np.float16))
        import torch
        b = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16)
        return Tensor("bfloat16", list(a.shape), b.view(torch.int16).numpy().tobytes())
    return Tensor.of(a)


def image_hash(image) -> str:
    """An image's identity for the encoder and prefix caches: its decoded pixels (what the
    engine's one image processor turns into the same outputs every time), 8x fewer bytes
    than the processed floats."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}|{image.size}|".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class _Family:
    """How one model family's image processor outputs split into images and what each
    image's placeholder expands to."""
    image_token = "<image>"

    def __init__(self, config, tokenizer, processor_config: dict):
        self.config = config
        self.tokenizer = tokenizer
        self.processor_config = processor_config

    def run(self, image_processor, image) -> dict[str, np.ndarray]:
        return self.run_batch(image_processor, [image])[0]

    def run_batch(self, image_processor, images: list) -> list[dict[str, np.ndarray]]:
        """Each image's outputs from one processor call over all of them: the torchvision
        processors cost mostly per call (~2 ms an image in batches against tens one by one)."""
        out = image_processor(images, return_tensors="np")
        return [{k: np.asarray(v)[i] for k, v in out.items()} for i in range(len(images))]

    def num_embeds(self, data: dict) -> int:
        raise NotImplementedError

    def replacement(self, data: dict, num_embeds: int) -> str:
        return self.image_token * num_embeds


class _Llava(_Family):
    def __init__(self, config, tokenizer, processor_config):
        super().__init__(config, tokenizer, processor_config)
        self.image_token = processor_config.get("image_token") or "<image>"

    def num_embeds(self, data):
        h, w = data["pixel_values"].shape[-2:]
        p = self.config.vision_config.patch_size
        return (h // p) * (w // p) + (self.config.vision_feature_select_strategy == "full")


class _Qwen2VL(_Family):
    image_token = "<|image_pad|>"

    def run_batch(self, image_processor, images):
        # the patches of all images in one array, image i's are the next prod(grid_thw[i]) rows
        out = image_processor(images, return_tensors="np")
        pixels, grids = np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])
        ends = np.cumsum(np.prod(grids, axis=1))
        return [{"pixel_values": pixels[end - int(np.prod(g)):end], "image_grid_thw": g[None]}
                for g, end in zip(grids, ends)]

    def num_embeds(self, data):
        merge = self.config.vision_config.spatial_merge_size
        return int(np.prod(data["image_grid_thw"])) // merge ** 2


class _Idefics3(_Family):
    def __init__(self, config, tokenizer, processor_config):
        super().__init__(config, tokenizer, processor_config)
        vc = config.vision_config
        self.seq_len = int(processor_config.get("image_seq_len") or
                           (vc.image_size // vc.patch_size) ** 2 // config.scale_factor ** 2)
        self.image_token = getattr(tokenizer, "image_token", None) or "<image>"
        self.fake_token = getattr(tokenizer, "fake_image_token", None) or "<fake_token_around_image>"
        self.global_token = getattr(tokenizer, "global_image_token", None) or "<global-img>"

    def run_batch(self, image_processor, images):  # tiles per image: one call each
        return [self.run(image_processor, im) for im in images]

    def run(self, image_processor, image):
        out = image_processor([[image]], return_row_col_info=True, return_tensors="np")
        data = {"pixel_values": np.asarray(out["pixel_values"])[0]}
        if "pixel_attention_mask" in out:
            data["pixel_attention_mask"] = np.asarray(out["pixel_attention_mask"])[0]
        data["rows_cols"] = np.array([out["rows"][0][0], out["cols"][0][0]], dtype=np.int64)
        return data

    def num_embeds(self, data):
        return data["pixel_values"].shape[0] * self.seq_len

    def replacement(self, data, num_embeds):
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string
        rows, cols = (int(v) for v in data["rows_cols"])
        return get_image_prompt_string(rows, cols, self.seq_len, self.fake_token, self.image_token,
                                       self.global_token)


_FAMILIES = {
    "LlavaForConditionalGeneration": _Llava,
    "Qwen2VLForConditionalGeneration": _Qwen2VL,
    "Qwen2_5_VLForConditionalGeneration": _Qwen2VL,
    "Idefics3ForConditionalGeneration": _Idefics3,
    "SmolVLMForConditionalGeneration": _Idefics3,
}


class MultiModalProcessor:
    def __init__(self, model_config, tokenizer, image_processor, processor_config: dict,
                 limits: Optional[dict] = None, max_image_pixels: Optional[int] = None,
                 wire_dtype: Optional[str] = None):
        mm = model_config.mm_hf_config
        family = _FAMILIES.get(model_config.architecture)
        if family is None:
            raise ValueError(f"--model: {model_config.architecture} has no image preprocessing")
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.family = family(mm, tokenizer, processor_config)
        self.image_token = self.family.image_token
        self.image_token_id = int(mm.image_token_id)
        self.limit = (limits or {}).get("image")
        self.max_image_pixels = max_image_pixels
        self.wire_dtype = wire_dtype  # the engine's dtype when outputs go to another process

    @classmethod
    def for_model(cls, src, model_config, tokenizer, args,
                  wire_dtype: Optional[str] = None) -> Optional["MultiModalProcessor"]:
        """The processor of a vision-language model (None for text-only models); wire_dtype:
        the engine's dtype when the engine core runs in another process."""
        if not model_config.is_multimodal:
            return None
        import json
        import os
        from pagoda.worker.loader import load_image_processor
        ip = load_image_processor(src, args.trust_remote_code, args.mm_processor_kwargs)
        proc_cfg = {}
        path = os.path.join(src.config_dir, "processor_config.json")
        if os.path.exists(path):
            with open(path) as f:
                proc_cfg = json.load(f)
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = processor_chat_template(src.config_dir)
        return cls(model_config, tokenizer, ip, proc_cfg, args.limit_mm_per_prompt, args.max_image_pixels,
                   wire_dtype)

    # -- checks ---------------------------------------------------------------------------
    def check_count(self, n: int, field: str = "multi_modal_data") -> None:
        if self.limit is not None and n > self.limit:
            raise ValueError(f"{field}: {n} images in one prompt, but --limit-mm-per-prompt allows "
                             f"{self.limit}")

    def check_image(self, image, field: str = "multi_modal_data") -> None:
        w, h = image.size
        if self.max_image_pixels is not None and w * h > self.max_image_pixels:
            raise ValueError(f"{field}: image of {w}x{h} = {w * h} pixels exceeds --max-image-pixels "
                             f"{self.max_image_pixels}")

    # -- steps ----------------------------------------------------------------------------
    def process_images(self, images: list) -> list[ImageItem]:
        """The image processor's outputs per image (PIL images), in the engine's dtype."""
        rgb = []
        for im in images:
            self.check_image(im)
            rgb.append(im.convert("RGB") if im.mode != "RGB" else im)
        items = []
        for im, data in zip(rgb, self.family.run_batch(self.image_processor, rgb) if rgb else []):
            n = self.family.num_embeds(data)
            items.append(ImageItem(data, n, self.family.replacement(data, n), image_hash(im)))
        return items

    def expand_text(self, text: str, items: list[ImageItem], field: str = "prompt") -> str:
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(items):
            raise ValueError(f"{field}: {len(parts) - 1} image placeholder(s) {self.image_token!r} for "
                             f"{len(items)} image(s)")
        out = [parts[0]]
        for item, rest in zip(items, parts[1:]):
            out += [item.replacement, rest]
        return "".join(out)

    def expand_ids(self, ids: list[int], items: list[ImageItem],
                   tokenize: Callable[[str], list[int]], field: str = "prompt") -> list[int]:
        """Token-id prompts: one placeholder id per image is expanded (as its replacement text
        tokenizes); prompts already expanded are kept."""
        tok = self.image_token_id
        count = sum(1 for t in ids if t == tok)
        if count == sum(it.num_embeds for it in items):
            return list(ids)
        if count != len(items):
            raise ValueError(f"{field}: {count} image token(s) (id {tok}) for {len(items)} image(s); "
                             "give one per image, or each image's expansion in full")
        out, k = [], 0
        for t in ids:
            if t == tok:
                out += tokenize(items[k].replacement)
                k += 1
            else:
                out.append(t)
        return out

    def features(self, ids: list[int], items: list[ImageItem], field: str = "prompt") -> list[MultiModalFeature]:
        """Each image's placeholder range in the token ids: the next num_embeds image tokens."""
        pos = np.flatnonzero(np.asarray(ids) == self.image_token_id)
        need = sum(it.num_embeds for it in items)
        if len(pos) != need:
            raise ValueError(f"{field}: {len(pos)} image tokens after expansion, {need} expected "
                             "(does the text contain the image token itself?)")
        dtype = self.wire_dtype
        feats, k = [], 0
        for it in items:
            first, last = int(pos[k]), int(pos[k + it.num_embeds - 1])
            k += it.num_embeds
            feats.append(MultiModalFeature(it.identifier, first, last - first + 1, it.num_embeds,
                                           {key: _wire(v, dtype) for key, v in it.data.items()
                                            if key != "rows_cols"}))
        return feats

    def process(self, prompt, images: list, add_special_tokens: bool = True,
                field: str = "prompt", items: Optional[list[ImageItem]] = None,
                ) -> tuple[Optional[str], list[int], list[MultiModalFeature]]:
        """All steps in one go (the offline path): (text, token ids, features). items: the
        images already through process_images (LLM.generate runs that in a pool)."""
        self.check_count(len(images), "multi_modal_data")
        if items is None:
            items = self.process_images(images)
        if isinstance(prompt, str):
            text = self.expand_text(prompt, items, field)
            ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
        else:
            text = None
            ids = self.expand_ids(list(prompt), items, lambda s: list(
                self.tokenizer(s, add_special_tokens=False).input_ids), field)
        return text, ids, self.features(ids, items, field)


def processor_chat_template(config_dir: str) -> Optional[str]:
    """A processor's chat template (chat_template.jinja, or chat_template.json as older
    checkpoints save it), for tokenizers that come without one."""
    import json
    import os
    path = os.path.join(config_dir, "chat_template.jinja")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(config_dir, "chat_template.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("chat_template")
    return None


def image_list(data: Any) -> list:
    """multi_modal_data["image"]: one PIL image or a list of them."""
    from PIL import Image
    images = data if isinstance(data, (list, tuple)) else [data]
    for im in images:
        if not isinstance(im, Image.Image):
            raise ValueError(f"multi_modal_data: images must be PIL images, got {type(im).__name__}")
    return list(images)
