"""Tiny random-weight vision-language checkpoints (HF format, built with transformers' own
configs, image processors and — where they load without torchvision — processors), and the
transformers reference run they are checked against.

Families: llava (CLIP 28x28 -> 16 patch tokens, Llama), qwen2_vl / qwen2_5_vl (native
resolution, 28..112-pixel sides -> 1..16 merged tokens, M-RoPE), idefics3 / smolvlm (SigLIP,
28-pixel tiles of up to 56-pixel images -> 4 tokens a tile, 5 tiles at most).
"""
from __future__ import annotations

import numpy as np
import torch

KINDS = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm")

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096)

LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

QWEN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")

IDEFICS_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

# what a user writes for one image in a plain prompt
PLACEHOLDER = {"llava": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "idefics3": "<image>", "smolvlm": "<image>"}


def _randomize(model, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") or name.endswith("ln_q.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.15)


def build_tiny_vlm(kind: str, path: str, tokenizer_dir: str, seed: int = 0) -> str:
    import transformers as T
    tok = T.AutoTokenizer.from_pretrained(tokenizer_dir)
    if kind == "llava":
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        text = dict(TEXT, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, image_size=28, patch_size=7)
        cfg = T.LlavaConfig(vision_config=vision, text_config=T.LlamaConfig(**text),
                            image_token_index=tok.convert_tokens_to_ids("<image>"))
        model_cls = T.LlavaForConditionalGeneration
        ip = T.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        tok.chat_template = LLAVA_TEMPLATE
        processor = T.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=7,
                                     vision_feature_select_strategy="default",
                                     num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    elif kind in ("qwen2_vl", "qwen2_5_vl"):
        tok.add_special_tokens({"additional_special_tokens": [
            "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>",
                                                         "<|image_pad|>", "<|video_pad|>")}
        text = dict(TEXT, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                     "mrope_section": [2, 3, 3]})
        common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                      vision_start_token_id=ids["<|vision_start|>"],
                      vision_end_token_id=ids["<|vision_end|>"])
        if kind == "qwen2_vl":
            vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
            cfg = T.Qwen2VLConfig(text_config=text, vision_config=vision, **common)
            model_cls = T.Qwen2VLForConditionalGeneration
        else:
            vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                          fullatt_block_indexes=[2])
            cfg = T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
            model_cls = T.Qwen2_5_VLForConditionalGeneration
        ip = T.Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28 * 16)
        tok.chat_template = QWEN_TEMPLATE
        processor = None  # Qwen2VLProcessor needs torchvision's video processor
    elif kind in ("idefics3", "smolvlm"):
        rowcol = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
        tok.add_special_tokens({"additional_special_tokens": [
            "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *rowcol]})
        text = dict(TEXT, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      image_size=28, patch_size=7)
        C = T.Idefics3Config if kind == "idefics3" else T.SmolVLMConfig
        cfg = C(text_config=text, vision_config=vision, scale_factor=2,
                image_token_id=tok.convert_tokens_to_ids("<image>"))
        model_cls = T.Idefics3ForConditionalGeneration if kind == "idefics3" else T.SmolVLMForConditionalGeneration
        IP = T.Idefics3ImageProcessorPil if kind == "idefics3" else T.SmolVLMImageProcessorPil
        ip = IP(size={"longest_edge": 56}, max_image_size={"longest_edge": 28})
        tok.chat_template = IDEFICS_TEMPLATE
        processor = (T.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4,
                                         chat_template=IDEFICS_TEMPLATE) if kind == "idefics3" else None)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    else:
        ip.save_pretrained(path)
        if kind == "smolvlm":
            import json
            import os
            with open(os.path.join(path, "processor_config.json"), "w") as f:
                json.dump({"image_seq_len": 4, "processor_class": "SmolVLMProcessor"}, f)
    return path


def random_image(w: int, h: int, seed: int):
    from PIL import Image
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def hf_model(path: str):
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def hf_inputs(kind: str, path: str, ids: list[int], images: list) -> dict:
    """transformers' model inputs for a prompt already expanded to `ids` (checked against the
    family's own processor where it loads), from its own image processor."""
    import transformers as T
    ip = T.AutoImageProcessor.from_pretrained(path)
    x = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if not images:
        return x
    if kind == "llava":
        x["pixel_values"] = torch.tensor(np.asarray(ip(images, return_tensors="np")["pixel_values"]))
    elif kind in ("qwen2_vl", "qwen2_5_vl"):
        out = ip(images, return_tensors="np")
        x["pixel_values"] = torch.tensor(np.asarray(out["pixel_values"]))
        x["image_grid_thw"] = torch.tensor(np.asarray(out["image_grid_thw"]))
        cfg = T.AutoConfig.from_pretrained(path)
        x["mm_token_type_ids"] = (x["input_ids"] == cfg.image_token_id).int()
    else:
        out = ip([images], return_tensors="np")
        x["pixel_values"] = torch.tensor(np.asarray(out["pixel_values"]))
        x["pixel_attention_mask"] = torch.tensor(np.asarray(out["pixel_attention_mask"]))
    return x


def hf_processor_ids(kind: str, path: str, text: str, images: list) -> list[int] | None:
    """The family's transformers processor's token ids for (text, images), where it loads."""
    if kind not in ("llava", "idefics3"):
        return None
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(path)
    return proc(text=[text], images=images or None, return_tensors="np")["input_ids"][0].tolist()


@torch.no_grad()
def hf_greedy(model, inputs: dict, n_new: int):
    out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                         pad_token_id=0)
    n = inputs["input_ids"].shape[1]
    return out.sequences[0, n:].tolist(), [torch.log_softmax(l[0].float(), -1) for l in out.logits]


def check_against_hf(kind: str, path: str, llm, cases: list[tuple[str, list]], n_new: int = 8,
                     top: int = 5, atol: float = 1e-4, hf=None) -> list:
    """Run `cases` (prompt text with PLACEHOLDER per image, images) through pagoda in one batch
    and each through transformers alone: greedy tokens equal, top-`top` logprobs within atol.
    Where the family's transformers processor loads, the expanded prompt ids must equal its."""
    from pagoda import SamplingParams
    hf = hf or hf_model(path)
    prompts = [{"prompt": text, "multi_modal_data": {"image": imgs}} if imgs else text
               for text, imgs in cases]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True,
                                                logprobs=top), use_tqdm=False)
    for (text, imgs), out in zip(cases, outs):
        ids = out.prompt_token_ids
        ref_ids = hf_processor_ids(kind, path, text, imgs)
        if ref_ids is not None:
            assert ids == ref_ids, f"{kind}: prompt ids differ from transformers' processor"
        ref_toks, ref_lps = hf_greedy(hf, hf_inputs(kind, path, ids, imgs), n_new)
        got = out.outputs[0]
        assert got.token_ids == ref_toks, f"{kind} {text!r}: {got.token_ids} != {ref_toks}"
        for step, (pos_lp, ref) in enumerate(zip(got.logprobs, ref_lps)):
            ref_top = torch.topk(ref, top)
            for tid, v in zip(ref_top.indices.tolist(), ref_top.values.tolist()):
                assert tid in pos_lp, f"{kind} step {step}: reference top-{top} token {tid} missing"
                assert abs(pos_lp[tid].logprob - v) <= atol, \
                    f"{kind} step {step} token {tid}: {pos_lp[tid].logprob} vs {v}"
    return outs


def cases_for(kind: str) -> list[tuple[str, list]]:
    """A batch mixing a text-only prompt, one image, two images of different sizes in one
    prompt, and wide / tall / small images."""
    ph = PLACEHOLDER[kind]
    return [
        ("Tell me a story about a dog", []),
        (f"Describe {ph} briefly.", [random_image(56, 56, 1)]),
        (f"Compare {ph} with {ph}: which is brighter?", [random_image(40, 60, 2), random_image(90, 50, 3)]),
        (f"{ph} What is this wide picture?", [random_image(110, 30, 4)]),
        (f"A tall one: {ph}", [random_image(20, 100, 5)]),
        (f"tiny {ph} end", [random_image(12, 9, 6)]),
    ]
