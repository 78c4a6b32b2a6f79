"""Tiny random models and baselines that the tests and the experiments both build.

The tests check the library on these models, and ``experiments/tools/method_outputs.py`` records
every method's outputs on the same models to prove a refactor changes nothing, so each model is
defined once, here. Nothing else in the package imports this module; the model libraries (timm,
open_clip, transformers) are imported by the function that needs them.
"""
import torch

from .interfaces import Plan, ViTMethod


def random_images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    """``[batch, 3, 32, 32]`` random-normal images, the input size of every tiny model here."""
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- timm


def tiny_vit(**kwargs):
    """A small random timm ViT (32x32 input, 64 patches, 4 blocks) for fast structural tests."""
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=48, depth=4, num_heads=3)
    cfg.update(kwargs)
    torch.manual_seed(0)
    return VisionTransformer(**cfg).eval()


class RandomPrune(ViTMethod):
    """Pruning uniformly random reducible tokens: the floor a token scorer must beat. Seeded per
    (``seed``, block); ``r=`` another method's schedule compares the two at equal tokens.
    Register it to use it: ``vitcompress.methods.REGISTRY[RandomPrune.name] = RandomPrune()``."""

    name = "random_prune"
    kind = "prune"
    defaults = {"seed": 0}

    def max_remove(self, tokens, layer, num_layers, options):
        return tokens - 1

    def plan(self, signals, remove, options):
        B, T = signals.metric.shape[:2]
        g = torch.Generator().manual_seed(int(options["seed"]) * 1000 + signals.layer)
        keep = torch.rand(B, T, generator=g).argsort(dim=1)[:, : T - remove]
        return Plan(keep=keep.sort(dim=1).values.to(signals.metric.device))


# --------------------------------------------------------------------------- open_clip

OPEN_CLIP_VISION = dict(image_size=32, patch_size=4, width=32, layers=4, head_width=16, mlp_ratio=2.0)
OPEN_CLIP_TEXT = dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=2)
#: image-tower variants: each a different pooling or block the adapter must follow
OPEN_CLIP_VARIANTS = {
    "tok": dict(),
    "layerscale": dict(ls_init_value=0.1),
    "avg": dict(pool_type="avg"),
    "final_ln_after_pool": dict(pool_type="avg", final_ln_after_pool=True),
    "custom_block": dict(qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True, scale_fc=True),
    "attn_pool": dict(attentional_pool=True, attn_pooler_queries=8, attn_pooler_heads=2),
}


def tiny_clip(**vision):
    """A small random open_clip ``CLIP`` (the image tower of :data:`OPEN_CLIP_VISION` updated by ``vision``)."""
    from open_clip.model import CLIP

    torch.manual_seed(0)
    return CLIP(16, dict(OPEN_CLIP_VISION, **vision), OPEN_CLIP_TEXT).eval()


# --------------------------------------------------------------------------- DETR (transformers)

DETR_D_MODEL, DETR_FFN, DETR_HEADS, DETR_LABELS = 32, 64, 4, 3


def detr_config(**kwargs):
    """A tiny DETR: a 2-stage HF ResNet backbone (stride 8, 16 channels), 32-dim transformer."""
    import transformers

    cfg = dict(backbone_config=transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                         out_features=["stage2"]),
               use_timm_backbone=False, use_pretrained_backbone=False, d_model=DETR_D_MODEL, encoder_layers=6,
               decoder_layers=2, encoder_ffn_dim=DETR_FFN, decoder_ffn_dim=DETR_FFN,
               encoder_attention_heads=DETR_HEADS, decoder_attention_heads=DETR_HEADS, num_queries=10,
               num_labels=DETR_LABELS)
    cfg.update(kwargs)
    return transformers.DetrConfig(**cfg)


def tiny_detr(cls=None, seed=0, **kwargs):
    """A random ``DetrForObjectDetection`` (or ``cls``) of :func:`detr_config` (``kwargs`` update it)."""
    import transformers

    torch.manual_seed(seed)
    return (cls or transformers.DetrForObjectDetection)(detr_config(**kwargs)).eval()


def random_scorer_head(seed=1):
    """A Focus-DETR foreground scorer head with random weights, for the tiny DETR."""
    from .methods.focus_detr import FocusScorer

    torch.manual_seed(seed)
    return FocusScorer(DETR_D_MODEL).eval()


# --------------------------------------------------------------------------- LLaVA (transformers)

LLAVA_IMAGE_TOKEN, LLAVA_VIDEO_TOKEN = 99, 98
LLAVA_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
                    patch_size=4, projection_dim=16)
LLAVA_PATCHES = 64  # 8 x 8 patches per crop
LLAVA_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=2048, pad_token_id=0)
LLAVA_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def ramp_scorer(frames, question):
    """A QuoTA scorer whose yes-probability grows with the frame index."""
    return torch.linspace(0.1, 1.0, frames.shape[0])


#: (model kind, method, options) of every LLaVA case
LLAVA_CASES = [("llava", "tokencorr", {}), ("llava", "quota", dict(keep=0.5, scorer=ramp_scorer)),
               ("next", "tokencorr", {}), ("next_video", "tokencorr", {}),
               ("next_video", "quota", dict(keep=0.5, scorer=ramp_scorer)),
               ("onevision", "quota", dict(keep=0.4, scorer=ramp_scorer)),
               ("llava", "tome", dict(r=4)), ("llava", "pitome", dict(keep=0.8)),
               ("llava", "zero_tprune", dict(keep=0.8))]


def tiny_llava(kind, **vision):
    """A random LLaVA-1.5 (``"llava"``), LLaVA-NeXT (``"next"``), NeXT-Video (``"next_video"``) or
    OneVision (``"onevision"``), its CLIP tower :data:`LLAVA_VISION` updated by ``vision``."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextVideoConfig,
                              LlavaNextVideoForConditionalGeneration, LlavaOnevisionConfig,
                              LlavaOnevisionForConditionalGeneration)

    torch.manual_seed(0)
    common = dict(vision_config=CLIPVisionConfig(**dict(LLAVA_VISION, **vision)), text_config=LlamaConfig(**LLAVA_TEXT),
                  image_token_index=LLAVA_IMAGE_TOKEN)
    if kind == "llava":
        return LlavaForConditionalGeneration(LlavaConfig(**common)).eval()
    if kind == "next":
        return LlavaNextForConditionalGeneration(LlavaNextConfig(**common, image_grid_pinpoints=LLAVA_PINPOINTS)).eval()
    if kind == "next_video":
        return LlavaNextVideoForConditionalGeneration(LlavaNextVideoConfig(
            **common, video_token_index=LLAVA_VIDEO_TOKEN, image_grid_pinpoints=LLAVA_PINPOINTS)).eval()
    return LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        **common, video_token_index=LLAVA_VIDEO_TOKEN, image_grid_pinpoints=LLAVA_PINPOINTS,
        vision_feature_select_strategy="default")).eval()


def noise_and_flat(shape):
    """Two images: random noise, and one constant colour."""
    torch.manual_seed(1)
    return torch.stack([torch.randn(shape), torch.full(shape, 0.4)])


def half_flat(shape):
    """Two different images, each half constant colour and half noise: partial tokencorr budgets."""
    torch.manual_seed(3)
    images = torch.full((2,) + shape, 0.4)
    images[..., 16:, :] = torch.randn(images[..., 16:, :].shape)
    return images


def left_padded(rows):
    """Token-id rows -> ``(input_ids, attention_mask)`` padded on the left with id 0, as a batch of
    prompts of different lengths is fed to a decoder."""
    longest = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (longest - len(r)) + r for r in rows])
    mask = (torch.arange(longest)[None] >= torch.tensor([longest - len(r) for r in rows])[:, None]).long()
    return ids, mask


def llava_inputs(model, kind, images=noise_and_flat):
    """A batch of two prompts whose placeholder counts match what the uncompressed model produces."""
    if kind == "llava":
        px = images((3, 32, 32))
        counts = [LLAVA_PATCHES, LLAVA_PATCHES]
        kw = dict(pixel_values=px)
    else:
        px = images((5, 3, 32, 32))
        sizes = torch.tensor([[40, 60], [64, 64]])
        with torch.no_grad():
            counts = [f.shape[0] for f in model.model.get_image_features(px, sizes).pooler_output]
        kw = dict(pixel_values=px, image_sizes=sizes)
    rows = [[1, 5] + [LLAVA_IMAGE_TOKEN] * counts[0] + [7, 8], [1, 6] + [LLAVA_IMAGE_TOKEN] * counts[1] + [9]]
    if kind in ("next_video", "onevision"):
        torch.manual_seed(2)
        kw["pixel_values_videos"] = torch.randn(2, 4, 3, 32, 32)
        with torch.no_grad():
            per_video = model.model.get_video_features(kw["pixel_values_videos"]).pooler_output.shape[1]
        rows = [r + [3] + [LLAVA_VIDEO_TOKEN] * per_video + [4] for r in rows]
    ids, mask = left_padded(rows)
    return dict(input_ids=ids, attention_mask=mask, **kw)


# --------------------------------------------------------------------------- LLaVA checkpoint (lmms-eval)

#: the words of :func:`tiny_llava_checkpoint`'s tokenizer; the other ids up to the LLaVA vocabulary are fillers
LLAVA_WORDS = "USER ASSISTANT : what is shown in the picture ? a an cat dog red blue yes no .".split()
LLAVA_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                       "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'video' %}<video>"
                       "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
                       "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def tiny_llava_checkpoint(directory, kind="llava"):
    """Save the random LLaVA-1.5 (``kind="llava"``) or NeXT-Video (``"next_video"``) of :func:`tiny_llava` with a
    processor built offline (a word-level tokenizer whose ``<image>`` / ``<video>`` are :data:`LLAVA_IMAGE_TOKEN` /
    :data:`LLAVA_VIDEO_TOKEN`, 32x32 image and video processors, a chat template) to ``directory``, as
    ``save_pretrained`` does for a hub checkpoint; returns ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextVideoProcessor,
                              LlavaNextVideoVideoProcessor, LlavaProcessor, PreTrainedTokenizerFast)

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: 4 + i for i, w in enumerate(LLAVA_WORDS)})
    specials = {"<image>": LLAVA_IMAGE_TOKEN, "<video>": LLAVA_VIDEO_TOKEN}
    vocab.update({f"w{i}": i for i in range(len(vocab), LLAVA_TEXT["vocab_size"]) if i not in specials.values()})
    vocab.update(specials)
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>",
                                        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    size = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    common = dict(tokenizer=tokenizer, patch_size=LLAVA_VISION["patch_size"], vision_feature_select_strategy="default",
                  num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    if kind == "llava":
        processor = LlavaProcessor(image_processor=CLIPImageProcessor(**size), **common)
    else:
        processor = LlavaNextVideoProcessor(image_processor=LlavaNextImageProcessor(image_grid_pinpoints=LLAVA_PINPOINTS,
                                                                                    **size),
                                            video_processor=LlavaNextVideoVideoProcessor(**size), **common)
    tiny_llava(kind).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- Qwen-VL (transformers)

QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN, QWEN_VISION_START, QWEN_VISION_END = 99, 98, 97, 96
QWEN_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1]))
QWEN_PATCH, QWEN_MERGE = 4, 2
#: the vision tower of each version (patch 4, 2 x 2 merge, frames in pairs): Qwen2.5-VL's windows are
#: 2 x 2 merged tokens with the last layer global; Qwen3-VL hands layers 0 and 1 to DeepStack
QWEN_VISION = {
    "qwen2": dict(depth=3, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=QWEN_PATCH),
    "qwen2_5": dict(depth=3, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2,
                    patch_size=QWEN_PATCH, window_size=16, fullatt_block_indexes=[2]),
    "qwen3": dict(depth=3, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2,
                  patch_size=QWEN_PATCH, num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
}
QWEN_KINDS = tuple(QWEN_VISION)


def tiny_qwen_vl(kind, layers=2):
    """A random Qwen2-VL (``"qwen2"``), Qwen2.5-VL (``"qwen2_5"``) or Qwen3-VL (``"qwen3"``) with a
    ``layers``-deep language model."""
    import transformers

    torch.manual_seed(0)
    name = {"qwen2": "Qwen2VL", "qwen2_5": "Qwen2_5_VL", "qwen3": "Qwen3VL"}[kind]
    rope = dict(QWEN_TEXT["rope_parameters"], **(dict(mrope_interleaved=True) if kind == "qwen3" else {}))
    text = dict(QWEN_TEXT, rope_parameters=rope, num_hidden_layers=layers)
    config = getattr(transformers, f"{name}Config")(
        vision_config=QWEN_VISION[kind], text_config=text, image_token_id=QWEN_IMAGE_TOKEN,
        video_token_id=QWEN_VIDEO_TOKEN, vision_start_token_id=QWEN_VISION_START, vision_end_token_id=QWEN_VISION_END)
    return getattr(transformers, f"{name}ForConditionalGeneration")(config).eval()


def qwen_processors():
    """transformers' Qwen2-VL image and video processors at the tiny models' patch and merge sizes."""
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    sizes = dict(patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=2, min_pixels=16,
                 max_pixels=64 * 64)
    return Qwen2VLImageProcessor(**sizes), Qwen2VLVideoProcessor(**sizes, cap_pixels_per_frame=False)


def qwen_images():
    """Two images of different sizes (32 x 48 and 32 x 32 pixels), each flat on the left and noise
    on the right (Qwen2.5-VL's attention windows cut across the two)."""
    torch.manual_seed(3)
    images = [torch.full((3, 32, 48), 0.4), torch.full((3, 32, 32), 0.6)]
    for image in images:
        image[:, :, 24:] = torch.rand(image[:, :, 24:].shape)
    return images


def qwen_vl_inputs(model, kind, images=True, video=True):
    """A left-padded batch of two prompts, each with its own image (of different sizes) and, with
    ``video``, a 4-frame video (2 frame groups); the placeholders as the processor writes them
    (Qwen3-VL: each frame group in its own run after a timestamp token)."""
    image_processor, video_processor = qwen_processors()
    kw, rows = {}, [[1, 5], [1, 6]]
    if images:
        px = image_processor(qwen_images(), return_tensors="pt", do_rescale=False)
        kw.update(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        for row, (t, h, w) in zip(rows, px["image_grid_thw"].tolist()):
            row += [QWEN_VISION_START] + [QWEN_IMAGE_TOKEN] * (t * h * w // QWEN_MERGE ** 2) + [QWEN_VISION_END, 7]
    if video:
        torch.manual_seed(2)
        clips = [torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 24)]
        vx = video_processor(videos=clips, return_tensors="pt", do_rescale=False, do_sample_frames=False)
        kw.update(pixel_values_videos=vx["pixel_values_videos"], video_grid_thw=vx["video_grid_thw"])
        for row, (t, h, w) in zip(rows, vx["video_grid_thw"].tolist()):
            frame = [QWEN_VIDEO_TOKEN] * (h * w // QWEN_MERGE ** 2)
            if kind == "qwen3":
                for group in range(t):
                    row += [20 + group, QWEN_VISION_START] + frame + [QWEN_VISION_END]
            else:
                row += [QWEN_VISION_START] + frame * t + [QWEN_VISION_END]
    rows[0] += [8, 9]
    rows[1] += [10]
    ids, mask = left_padded(rows)
    types = (ids == QWEN_IMAGE_TOKEN).int() + 2 * (ids == QWEN_VIDEO_TOKEN).int()
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, **kw)


# --------------------------------------------------------------------------- VisionZip / CDPruner on LLaVA

LLAVA_CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                       max_position_embeddings=16, bos_token_id=98, eos_token_id=99, pad_token_id=0)


def tiny_llava_576():
    """A random LLaVA-1.5 with its tower's shape (24 x 24 patches, 24 layers) and a language model
    256 wide: CDPruner's kernel (the projected tokens' cosine similarity) then has rank 256, enough
    for the paper's 64 / 128 / 192 tokens (a greedy DPP cannot pick more tokens than that rank)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(**dict(LLAVA_VISION, image_size=96, num_hidden_layers=24)),
        text_config=LlamaConfig(**dict(LLAVA_TEXT, hidden_size=256, intermediate_size=256)),
        image_token_index=LLAVA_IMAGE_TOKEN)).eval()


LLAVA_NEXT_576_PINPOINTS = [[96, 192], [192, 96], [192, 192]]


def tiny_llava_next_576():
    """A random LLaVA-NeXT whose crops have LLaVA's tower shape (24 x 24 patches, 24 layers)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(LlavaNextConfig(
        vision_config=CLIPVisionConfig(**dict(LLAVA_VISION, image_size=96, num_hidden_layers=24)),
        text_config=LlamaConfig(**LLAVA_TEXT), image_token_index=LLAVA_IMAGE_TOKEN,
        image_grid_pinpoints=LLAVA_NEXT_576_PINPOINTS)).eval()


def llava_next_576_inputs(model):
    """Two prompts with one image each, 90 x 190 (a 1 x 2 crop grid) and 192 x 192 (2 x 2)."""
    pixels = torch.randn(2, 5, 3, 96, 96, generator=torch.Generator().manual_seed(13))
    sizes = torch.tensor([[90, 190], [192, 192]])
    with torch.no_grad():
        counts = [f.shape[0] for f in model.model.get_image_features(pixels, sizes).pooler_output]
    rows = [[1, 5] + [LLAVA_IMAGE_TOKEN] * counts[0] + [7, 8], [1, 6] + [LLAVA_IMAGE_TOKEN] * counts[1] + [9]]
    ids, mask = left_padded(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)


def char_tokenizer(text, return_tensors="pt"):
    """A stand-in CLIP tokenizer: BOS, one id per character, EOS (:data:`LLAVA_CLIP_TEXT`'s ids), unpadded."""
    from transformers import BatchEncoding

    ids = [[98] + [2 + ord(ch) % 90 for ch in t] + [99] for t in text]
    return BatchEncoding({"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), len(ids[0]),
                                                                                         dtype=torch.long)})


def tiny_llava_clip(model):
    """A random CLIP model whose vision tower is ``model``'s (a tiny LLaVA's), as the tower's own
    checkpoint would be: what CDPruner's ``clip=`` takes."""
    from transformers import CLIPConfig, CLIPModel

    vision = model.config.vision_config
    torch.manual_seed(5)
    clip = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=LLAVA_CLIP_TEXT,
                                projection_dim=vision.projection_dim)).eval()
    tower = model.model.vision_tower
    clip.vision_model.load_state_dict(getattr(tower, "vision_model", tower).state_dict())
    return clip


def llava_prompts(model, pixel_values):
    """LLaVA-1.5 prompts of different lengths, one image each, for ``pixel_values[B, 3, H, W]``."""
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    rows = [[1] + [5 + b] * b + [LLAVA_IMAGE_TOKEN] * patches + [7, 8] for b in range(pixel_values.shape[0])]
    ids, mask = left_padded(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)


# --------------------------------------------------------------------------- LLaVA, deeper language model (fastv, pyramiddrop)


def tiny_llava_lm(kind="llava", layers=8, kv_heads=2, attn="sdpa"):
    """:func:`tiny_llava` with a ``layers``-deep language model (``kv_heads`` key/value heads) and
    the given attention implementation: room for drops after layer 2 and at quarter depths."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration)

    torch.manual_seed(0)
    text = LlamaConfig(**dict(LLAVA_TEXT, num_hidden_layers=layers, num_key_value_heads=kv_heads))
    common = dict(vision_config=CLIPVisionConfig(**LLAVA_VISION), text_config=text, image_token_index=LLAVA_IMAGE_TOKEN)
    if kind == "llava":
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
    else:
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(**common, image_grid_pinpoints=LLAVA_PINPOINTS))
    model.set_attn_implementation(attn)
    return model.eval()


# --------------------------------------------------------------------------- InternVL (transformers)

INTERNVL_IMAGE_TOKEN, INTERNVL_IMG_START, INTERNVL_IMG_END = 99, 97, 96
INTERNVL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
                       patch_size=4)
INTERNVL_TILE_TOKENS = 16  # 8 x 8 patches per tile, 2 x 2 patches per token after the pixel shuffle


def tiny_internvl(**vision):
    """A random ``InternVLForConditionalGeneration`` (InternViT tower :data:`INTERNVL_VISION` updated by
    ``vision``, a Qwen2 language model; the text of :data:`LLAVA_TEXT`)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    torch.manual_seed(0)
    return InternVLForConditionalGeneration(InternVLConfig(
        vision_config=InternVLVisionConfig(**dict(INTERNVL_VISION, **vision)), text_config=Qwen2Config(**LLAVA_TEXT),
        image_token_id=INTERNVL_IMAGE_TOKEN, image_seq_length=INTERNVL_TILE_TOKENS)).eval()


def internvl_tiles(tiles, seed):
    """``tiles`` random 32 px tiles, each constant colour above a row that depends on the seed and noise
    below it (partial tokencorr budgets that differ per tile)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((tiles, 3, 32, 32), 0.3)
    for t in range(tiles):
        start = 4 * int(torch.randint(1, 7, (1,), generator=g))
        out[t, :, start:] = torch.randn(out[t, :, start:].shape, generator=g)
    return out


def internvl_inputs(images=((3,), (1, 5)), frames=False, seed=0):
    """A left-padded batch laid out as InternVL's processor writes it: per row, its images' tile
    counts (an image of more than one tile ends with its thumbnail); each image ``<img>`` +
    ``16 * tiles`` image tokens + ``</img>``. ``frames``: each one-tile image is a video frame, with
    ``Frame i:`` text (two tokens) before it."""
    rows, pixels = [], []
    for r, row_images in enumerate(images):
        row = [1, 5 + r]
        for i, tiles in enumerate(row_images):
            row += ([11, 12 + i] if frames else []) + [INTERNVL_IMG_START] + [INTERNVL_IMAGE_TOKEN] * (
                INTERNVL_TILE_TOKENS * tiles) + [INTERNVL_IMG_END]
            pixels.append(internvl_tiles(tiles, seed + 10 * r + i))
        rows.append(row + [7, 8 + r])
    ids, mask = left_padded(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pixels))


# --------------------------------------------------------------------------- Qwen-VL / InternVL checkpoints (lmms-eval)

#: the chat template of :func:`tiny_vlm_checkpoint`: each family's image and video placeholders, as its processor expands
VLM_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                     "{% if c['type'] == 'image' %}IMAGE{% elif c['type'] == 'video' %}VIDEO"
                     "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
                     "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def tiny_vlm_checkpoint(directory, family="qwen2"):
    """Save the random Qwen2-VL / Qwen2.5-VL (``family="qwen2"`` / ``"qwen2_5"``, :func:`tiny_qwen_vl`) or InternVL
    (``"internvl"``, :func:`tiny_internvl`) with a processor built offline (a word-level tokenizer with the family's
    special tokens at the tiny config's ids, the family's image and video processors at the tiny sizes, a chat
    template) to ``directory``, as ``save_pretrained`` does for a hub checkpoint; returns ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if family == "internvl":
        from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

        specials = {"context_image_token": ("<IMG_CONTEXT>", INTERNVL_IMAGE_TOKEN),
                    "start_image_token": ("<img>", INTERNVL_IMG_START), "end_image_token": ("</img>", INTERNVL_IMG_END),
                    "video_token": ("<video>", 98)}
        places = {"IMAGE": "<IMG_CONTEXT>", "VIDEO": "<video>"}  # as InternVL's hub chat templates write them
        vocab_size, model = LLAVA_TEXT["vocab_size"], tiny_internvl()
    else:
        specials = {"image_token": ("<|image_pad|>", QWEN_IMAGE_TOKEN),
                    "video_token": ("<|video_pad|>", QWEN_VIDEO_TOKEN),
                    "vision_start_token": ("<|vision_start|>", QWEN_VISION_START),
                    "vision_end_token": ("<|vision_end|>", QWEN_VISION_END)}
        places = {"IMAGE": "<|vision_start|><|image_pad|><|vision_end|>",
                  "VIDEO": "<|vision_start|><|video_pad|><|vision_end|>"}
        vocab_size, model = QWEN_TEXT["vocab_size"], tiny_qwen_vl(family)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: 4 + i for i, w in enumerate(LLAVA_WORDS)})
    taken = {i for _, i in specials.values()}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size) if i not in taken})
    vocab.update(dict(specials.values()))
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>",
                                        extra_special_tokens={name: token for name, (token, _) in specials.items()})
    template = VLM_CHAT_TEMPLATE.replace("IMAGE", places["IMAGE"]).replace("VIDEO", places["VIDEO"])
    if family == "internvl":
        size = dict(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4)
        processor = InternVLProcessor(image_processor=GotOcr2ImageProcessor(**size), tokenizer=tokenizer,
                                      video_processor=InternVLVideoProcessor(size={"height": 32, "width": 32}),
                                      image_seq_length=INTERNVL_TILE_TOKENS, chat_template=template)
    else:
        from transformers import Qwen2VLProcessor

        image_processor, video_processor = qwen_processors()
        processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     video_processor=video_processor, chat_template=template)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- InternVL, deeper language model (fastv)


def tiny_internvl_lm(layers=8):
    """:func:`tiny_internvl` with a ``layers``-deep Qwen2 language model (SDPA): room for drops after
    layer 2 and at quarter depths."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(InternVLConfig(
        vision_config=InternVLVisionConfig(**INTERNVL_VISION),
        text_config=Qwen2Config(**dict(LLAVA_TEXT, num_hidden_layers=layers)),
        image_token_id=INTERNVL_IMAGE_TOKEN, image_seq_length=INTERNVL_TILE_TOKENS))
    model.set_attn_implementation("sdpa")
    return model.eval()
# ---------------------------------------------------------------- LLaVA-OneVision with SigLIP (visionzip, cdpruner)

#: crops of 36 x 36 pixels, 9 x 9 patches (odd, as the released 27 x 27); grids up to 3 x 4 crops, more
#: than anyres_max_9 keeps, so the model downsamples the largest image
ONEVISION_SIGLIP_PINPOINTS = [[36, 72], [72, 36], [72, 72], [108, 144]]


def tiny_llava_onevision_siglip():
    """A random LLaVA-OneVision shaped as released: a SigLIP tower without [CLS] (4 layers, 9 x 9 patches
    per crop), the output of its last layer as features, every token of it (``"full"``)."""
    from transformers import (LlamaConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              SiglipVisionConfig)

    vision = dict(LLAVA_VISION, image_size=36)
    vision.pop("projection_dim")
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**vision), text_config=LlamaConfig(**LLAVA_TEXT),
        image_token_index=LLAVA_IMAGE_TOKEN, video_token_index=LLAVA_VIDEO_TOKEN,
        image_grid_pinpoints=ONEVISION_SIGLIP_PINPOINTS, vision_feature_layer=-1,
        vision_feature_select_strategy="full")).eval()


def onevision_siglip_inputs(model, video=True):
    """Two prompts: a 40 x 60 image (1 x 2 crop grid) and a 100 x 130 one (3 x 4, downsampled by the
    model to anyres_max_9), and with ``video`` a 4-frame video each."""
    pixels = torch.randn(2, 13, 3, 36, 36, generator=torch.Generator().manual_seed(17))
    sizes = torch.tensor([[40, 60], [100, 130]])
    kw = dict(pixel_values=pixels, image_sizes=sizes)
    with torch.no_grad():
        counts = [f.shape[0] for f in model.model.get_image_features(pixels, sizes).pooler_output]
    rows = [[1, 5] + [LLAVA_IMAGE_TOKEN] * counts[0] + [7, 8], [1, 6] + [LLAVA_IMAGE_TOKEN] * counts[1] + [9]]
    if video:
        kw["pixel_values_videos"] = torch.randn(2, 4, 3, 36, 36, generator=torch.Generator().manual_seed(18))
        with torch.no_grad():
            per_video = model.model.get_video_features(kw["pixel_values_videos"]).pooler_output.shape[1]
        rows = [r + [3] + [LLAVA_VIDEO_TOKEN] * per_video + [4] for r in rows]
    ids, mask = left_padded(rows)
    return dict(input_ids=ids, attention_mask=mask, **kw)


def projection_embeddings(patches, question):
    """A stand-in for an image-text model without a CLIP text tower: patch embeddings ``patches @ W``
    ``[crops, N, 16]`` and the question's embedding (the mean of a random table's rows for its
    characters) ``[1, 16]``, both random but fixed."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(patches.shape[-1], 16, generator=generator)
    table = torch.randn(128, 16, generator=generator)
    return patches.float() @ weight, table[[ord(ch) % 128 for ch in question]].mean(dim=0, keepdim=True)


def projection_scorer(patches, question):
    """CDPruner's ``scorer=`` from :func:`projection_embeddings`: cosine similarity ``[crops, N, 1]``."""
    image, text = projection_embeddings(patches, question)
    image = image / image.norm(dim=-1, keepdim=True)
    return image @ (text / text.norm(dim=-1, keepdim=True)).t()
def qwen_char_tokenizer(text):
    """A stand-in tokenizer for the tiny Qwen-VL models' question (CDPruner's ``embedding_scorer``): one id per
    character, below the image / video / vision ids."""
    return {"input_ids": torch.tensor([[3 + ord(ch) % 90 for ch in t] for t in text])}
