"""A tiny Qwen3-VL pair, its processor and a data set of generated images, built on the spot for the image-text tests.

Nothing is downloaded: shapes of colours are drawn with PIL and saved as PNG files, the questions ask for a
shape's colour, and the privileged input is the shape's box with its label in Qwen3-VL's grounding format
(`dopd.hints.box_hint`, 0-1000 coordinates). The tokenizer is a word-level `tokenizers` model whose vocabulary is
every piece of the data's text (digits one by one, so a changed box is a changed token), with the special tokens
the Qwen3-VL processor expects; the image processor is transformers' default Qwen2-VL one with 8-pixel patches and
a small pixel budget. Models are `Qwen3VLForConditionalGeneration` from a tiny `Qwen3VLConfig`.

transformers' Qwen3-VL processor needs torchvision to load (its video processor), which this machine lacks:
`local_processor` assembles the same processor from the saved tokenizer and image processor, and
`processor_loader(monkeypatch)` makes `AutoProcessor.from_pretrained` use it.
"""

from __future__ import annotations

import json
import os
import random

from dopd.hints import box_hint

SPECIAL = ["<pad>", "<eos>", "<unk>"]
VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ' : ' }}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant :' }}{% endif %}"
)
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}
SHAPES = ("square", "circle")
SIZE = (48, 40)  # width, height: 6 x 5 patches of 8 pixels, 6 image tokens after the 2 x 2 merge
PATCH = 8


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )


def build_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = ["user", "assistant", ":", "what", "colour", "is", "the", "?", "a", "of", "shape", "it", "."]
    words += list(COLOURS) + list(SHAPES) + [str(d) for d in range(10)]
    words += [
        piece for piece, _ in _pre_tokenizer().pre_tokenize_str(box_hint([1, 2, 3, 4], "x", SIZE, coords="norm1000"))
    ]
    words += [
        piece
        for piece, _ in _pre_tokenizer().pre_tokenize_str(
            "Relevant objects in the image (bounding boxes x1, y1, x2, y2):"
        )
    ]
    vocab = {}
    for token in SPECIAL + words:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = _pre_tokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": VISION})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=PATCH, temporal_patch_size=2, merge_size=2, min_pixels=16 * 16, max_pixels=64 * 64
    )


def _processor(tokenizer, images):
    import transformers
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_processing_utils import VideoProcessorMixin

    # Without torchvision transformers does not export the class the processor checks its video processor against.
    saved = transformers.__dict__.get("VideoProcessorMixin")
    transformers.VideoProcessorMixin = VideoProcessorMixin
    try:
        return Qwen3VLProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            video_processor=Qwen3VLVideoProcessor(),
            chat_template=CHAT_TEMPLATE,
        )
    finally:
        if saved is None:
            del transformers.VideoProcessorMixin
        else:
            transformers.VideoProcessorMixin = saved


def local_processor(path: str):
    """The processor saved in `path`, assembled from its tokenizer and image processor (no torchvision needed)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return _processor(AutoTokenizer.from_pretrained(path), Qwen2VLImageProcessorPil.from_pretrained(path))


def processor_loader(monkeypatch) -> None:
    """`AutoProcessor.from_pretrained` of a directory with a processor config gives `local_processor`."""
    from transformers import AutoProcessor

    original = AutoProcessor.from_pretrained

    def load(name, *args, **kwargs):
        if os.path.exists(os.path.join(name, "processor_config.json")):
            return local_processor(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(AutoProcessor, "from_pretrained", load)


def build_model(tokenizer, hidden: int = 32, seed: int = 0):
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION}
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=512,
            pad_token_id=0,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            patch_size=PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=hidden,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = 0
    return model


def write_pair(directory: str) -> tuple[str, str]:
    """A student (hidden 32) and a teacher (hidden 48) with their processor; returns their paths."""
    tokenizer = build_tokenizer()
    processor = _processor(tokenizer, image_processor())
    paths = []
    for name, hidden, seed in (("student", 32, 0), ("teacher", 48, 1)):
        path = os.path.join(directory, name)
        build_model(tokenizer, hidden, seed).save_pretrained(path)
        processor.save_pretrained(path)
        paths.append(path)
    return tuple(paths)


def write_images(directory: str, count: int = 6, seed: int = 0, shift: int = 0) -> str:
    """`count` PNG images with one coloured shape each, and a JSONL file of questions about them with the shape's
    box (pixels, column `boxes`) and its box-and-label privileged context. `shift` moves every box (not the
    shapes) by that many pixels to the right: the same images and questions with other privileged input."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"images-{shift}.jsonl")
    with open(path, "w") as handle:
        for number in range(count):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            x1, y1 = rng.randint(0, 20), rng.randint(0, 16)
            box = [x1, y1, x1 + 16, y1 + 16]
            image = Image.new("RGB", SIZE, (255, 255, 255))
            pen = ImageDraw.Draw(image)
            (pen.rectangle if shape == "square" else pen.ellipse)(box, fill=COLOURS[colour])
            file = os.path.join(directory, f"{number}.png")
            image.save(file)
            moved = [box[0] + shift, box[1], box[2] + shift, box[3]]
            row = {
                "image": file,
                "prompt": f"what colour is the {shape} ?",
                "boxes": moved,
                "privileged_context": box_hint(moved, shape, SIZE, coords="norm1000"),
                "answer": colour,
            }
            handle.write(json.dumps(row) + "\n")
    return path
