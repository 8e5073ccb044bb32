"""Images for vision-language students and teachers (docs/method.md, "Setting": the prompt plus an image;
"Privileged input": a bounding box with its label), selected by `data.image_column`.

Every pass reads the row's image: the rollout and the deployed student the image as it is, the privileged student
and the teacher the same image (or, with `data.draw_box`, a copy with the row's boxes drawn on it) beside the
privileged text, which `dopd hints --form boxes` writes in the model family's grounding format. Prompts are rendered
with an image part and tokenized by the model's processor, so the image placeholder tokens are expanded once, when
the data is loaded; the pixels are made again for each micro-batch by the image processor (a 25K-row data set does
not fit in memory as pixels). Completions are appended to the expanded prompts exactly as in the text path, so the
scoring positions are the same code. Problems are found before training: an image that cannot be opened, a box
outside its image, a processor without an image processor.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError, DataConfig

# The placeholder tokens of the Qwen-VL families: a student must never sample them (the model would look for image
# features that do not exist when the completion is scored).
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")


# ------------------------------------------------------------------------------------------------ images


def load_image(value: Any, column: str, row: int):
    """An RGB PIL image from a path, a URL, a `datasets` image dict ({"bytes", "path"}) or a PIL image."""
    from PIL import Image

    where = f"row {row} of data.image_column = {column!r}"
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, (str, dict)):
            source = value.get("path") if isinstance(value, dict) else value
            if not source:
                raise ValueError("no path and no bytes")
            if source.startswith(("http://", "https://")):
                import urllib.request

                with urllib.request.urlopen(source, timeout=60) as response:
                    image = Image.open(io.BytesIO(response.read()))
            else:
                image = Image.open(source)
        else:
            raise ValueError(f"a {type(value).__name__} is not an image (give a path, a URL or an image)")
        image.load()
        return image.convert("RGB")
    except ConfigError:
        raise
    except Exception as error:  # PIL, the file system and urllib raise many types for an unreadable image
        shown = value if isinstance(value, str) else type(value).__name__
        raise ConfigError(
            f"the image in {where} ({shown}) could not be opened: {type(error).__name__}: {error}"
        ) from None


def pixel_boxes(value: Any) -> list[list[float]]:
    """Pixel boxes [x1, y1, x2, y2] from one box, a list of boxes, or {"bbox"/"bbox_2d": box, ...} dicts (the
    `boxes` column `dopd hints --form boxes` reads)."""
    if isinstance(value, dict):
        value = [value]
    if value and not isinstance(value[0], (list, tuple, dict)):
        value = [value]
    boxes = []
    for item in value or []:
        box = item.get("bbox_2d", item.get("bbox")) if isinstance(item, dict) else item
        if box is None or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            raise ValueError(f"box {box!r} is not four numbers [x1, y1, x2, y2]")
        boxes.append([float(v) for v in box])
    return boxes


def check_boxes(boxes: list[list[float]], size: tuple[int, int], column: str, row: int) -> None:
    """Every box inside its (width, height) image, corners ordered."""
    width, height = size
    for x1, y1, x2, y2 in boxes:
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise ConfigError(
                f"row {row} of data.box_column = {column!r}: box {[x1, y1, x2, y2]} lies outside its {width}x{height} "
                "image (boxes are pixel [x1, y1, x2, y2] with 0 <= x1 < x2 <= width, 0 <= y1 < y2 <= height); fix "
                "or drop the row"
            )


def draw_boxes(image, boxes: list[list[float]]):
    """A copy of `image` with each box outlined in red."""
    from PIL import ImageDraw

    drawn = image.copy()
    pen = ImageDraw.Draw(drawn)
    width = max(1, min(image.size) // 100)
    for box in boxes:
        pen.rectangle(box, outline=(255, 0, 0), width=width)
    return drawn


# ---------------------------------------------------------------------------------------------- prompts


def with_image(prompt: str | list[dict]) -> list[dict]:
    """Chat messages whose first user turn holds an image part (before its text); an image part already there stays."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    messages = [dict(message) for message in prompt]
    parts = [part for m in messages if not isinstance(m.get("content"), str) for part in m["content"]]
    if any(part.get("type") == "image" for part in parts):
        return messages
    for message in messages:
        if message.get("role") == "user":
            content = message["content"]
            text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            message["content"] = [{"type": "image"}, *text]
            return messages
    raise ValueError("a chat prompt needs a message with role 'user' to carry the image")


def load_processor(name: str, trust_remote_code: bool):
    """The model's `AutoProcessor`; one clear error when it cannot load or has no image processor."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ImportError as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(
            f"the processor of {name} could not be loaded ({first}); image models need torchvision for their "
            "video processor: pip install torchvision"
        ) from None
    except Exception as error:
        raise ConfigError(
            f"the processor {name} could not be loaded (model.tokenizer / model.student): {error}"
        ) from None
    if getattr(processor, "image_processor", None) is None:
        raise ConfigError(
            f"{name} has no image processor (AutoProcessor gave a {type(processor).__name__}); data.image_column "
            "needs a vision-language model whose directory holds its processor files (processor_config.json or "
            "preprocessor_config.json)"
        )
    tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


# ----------------------------------------------------------------------------------------------- rows


@dataclass
class ImageRows:
    """The image (as stored: path, URL, bytes dict) and the pixel boxes of each data set row. The images stay in
    the data set (memory-mapped Arrow) and are read when a pass needs them."""

    sources: Any  # the data set's image column, read row by row
    boxes: list[list[list[float]] | None]
    column: str
    draw_box: bool

    @staticmethod
    def from_dataset(dataset, config: DataConfig) -> ImageRows:
        column = config.image_column
        if column not in dataset.column_names:
            raise ConfigError(
                f"data.image_column = {column!r} is not a column of {config.path}; its columns are "
                f"{', '.join(dataset.column_names)}"
            )
        feature = dataset.features.get(column)
        if type(feature).__name__ == "Image":  # keep bytes or paths, not every image decoded in memory
            import datasets

            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        boxes: list = [None] * len(dataset)
        if config.box_column:
            if config.box_column not in dataset.column_names:
                raise ConfigError(
                    f"data.box_column = {config.box_column!r} is not a column of {config.path}; its columns are "
                    f"{', '.join(dataset.column_names)}"
                )
            boxes = []
            for row, value in enumerate(dataset[config.box_column]):
                try:
                    boxes.append(pixel_boxes(value))
                except ValueError as error:
                    raise ConfigError(f"row {row} of data.box_column = {config.box_column!r}: {error}") from None
        return ImageRows(dataset.select_columns([column]), boxes, column, config.draw_box)

    def image(self, row: int):
        return load_image(self.sources[row][self.column], self.column, row)

    def checked(self, row: int, column: str):
        """The row's image, its boxes checked against it."""
        image = self.image(row)
        if self.boxes[row] is not None:
            check_boxes(self.boxes[row], image.size, column, row)
        return image

    def privileged(self, image, row: int):
        """What the privileged passes see: the image, with the row's boxes drawn when `data.draw_box` is set."""
        return draw_boxes(image, self.boxes[row]) if self.draw_box and self.boxes[row] else image

    def subset(self, keep: list[int]) -> ImageRows:
        return ImageRows(self.sources.select(keep), [self.boxes[i] for i in keep], self.column, self.draw_box)


def encode_with_image(processor, texts: list[str], image) -> list[list[int]]:
    """Token ids of rendered prompts that each hold one image placeholder, expanded for `image`."""
    encoded = processor(text=texts, images=[image] * len(texts), add_special_tokens=False)
    return [list(ids) for ids in encoded["input_ids"]]


# ------------------------------------------------------------------------------------------ model inputs


def vision_inputs(
    processor, images: list, input_ids: torch.Tensor, prompt_lengths: list[int] | None = None, left_padded: bool = False
) -> dict[str, torch.Tensor]:
    """`pixel_values`, `image_grid_thw` of one image per row and `mm_token_type_ids` (1 on the image placeholder
    tokens of the prompt, 0 elsewhere) for a batch of `input_ids` [B, L]."""
    pixels = processor.image_processor(images=images, return_tensors="pt")
    image_token = getattr(processor, "image_token_id", None)
    types = (input_ids == image_token).long() if image_token is not None else torch.zeros_like(input_ids)
    if prompt_lengths is not None and not left_padded:  # completion tokens are text whatever their id
        columns = torch.arange(input_ids.shape[1])[None, :]
        types = types * (columns < torch.tensor(prompt_lengths)[:, None]).long()
    inputs = {key: value for key, value in pixels.items() if key in ("pixel_values", "image_grid_thw")}
    inputs["mm_token_type_ids"] = types
    return inputs


def vision_token_ids(tokenizer) -> list[int]:
    """Ids of the image and video placeholder tokens the tokenizer has."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab[token] for token in VISION_TOKENS if token in vocab)


# ----------------------------------------------------------------------------------------------- models


def vision_tower(model) -> torch.nn.Module | None:
    """The vision encoder of an image-text model (`model.visual` for Qwen-VL, else `vision_tower` /
    `vision_model`), under a PEFT wrapper too."""
    for name, module in model.named_modules():
        if name.split(".")[-1] in ("visual", "vision_tower", "vision_model"):
            return module
    return None


def freeze_vision(model) -> None:
    tower = vision_tower(model)
    if tower is None:
        raise ConfigError(
            "model.freeze_vision is true but the student has no vision tower (a module named visual, vision_tower "
            "or vision_model); is model.student an image-text model?"
        )
    tower.requires_grad_(False)


# PEFT: adapters on the language model only (the vision tower's own linear layers may share names with it).
EXCLUDE_VISION = r".*(visual|vision_tower|vision_model).*"
