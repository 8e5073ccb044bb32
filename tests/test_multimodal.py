"""The image-text path end to end on a tiny Qwen3-VL pair: DOPD steps with images in every pass, box-and-label
privileged input that changes what the privileged passes see, a frozen vision tower, and the clear errors."""

from __future__ import annotations

import json
import os

import pytest
import tiny
import tiny_vl
import torch

from dopd.config import ConfigError, load_config
from dopd.multimodal import check_boxes, draw_boxes, load_processor, pixel_boxes, vision_tower
from dopd.routing import assign_regimes
from dopd.train import Trainer

PATCH_VALUES = 3 * 2 * tiny_vl.PATCH * tiny_vl.PATCH  # channels x temporal patch x patch x patch


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vl")
    student, teacher = tiny_vl.write_pair(str(directory))
    data = tiny_vl.write_images(str(directory / "images"))
    moved = tiny_vl.write_images(str(directory / "images"), shift=8)
    return {"student": student, "teacher": teacher, "data": data, "moved": moved, "dir": directory}


@pytest.fixture(autouse=True)
def _processor(monkeypatch):
    tiny_vl.processor_loader(monkeypatch)


def make_config(vl, out, *extra):
    return load_config(
        overrides=[
            f"model.student={vl['student']}",
            f"model.teacher={vl['teacher']}",
            f"data.path={vl['data']}",
            "data.image_column=image",
            f"logging.output_dir={out}",
            "rollout.backend=hf",
            "train.steps=2",
            "train.prompts_per_step=2",
            "train.micro_batch_size=2",
            "rollout.num_generations=2",
            "rollout.max_new_tokens=5",
            "objective.top_k=8",
            "optim.lr=1e-2",
            "logging.progress_bar=false",
            "logging.sample_every=1",
            "checkpoint.save_every=0",
            *extra,
        ]
    )


def record_vision(model, calls: list) -> torch.utils.hooks.RemovableHandle:
    """Record the pixel rows and the grid of every call of `model`'s vision tower."""
    return vision_tower(model).register_forward_hook(
        lambda module, args, kwargs, output: calls.append((args[0].shape, kwargs.get("grid_thw", args[-1]))),
        with_kwargs=True,
    )


def test_dopd_steps_with_images_in_every_pass(vl, tmp_path):
    trainer = Trainer(make_config(vl, tmp_path / "run"))
    assert trainer.processor is not None and type(trainer.inner).__name__ == "Qwen3VLForConditionalGeneration"
    tower = vision_tower(trainer.inner)
    frozen = {name: p.detach().clone() for name, p in tower.named_parameters()}
    language = {name: p.detach().clone() for name, p in trainer.inner.named_parameters() if "visual" not in name}
    assert not any(p.requires_grad for p in tower.parameters())
    student_calls, teacher_calls = [], []
    record_vision(trainer.inner, student_calls)
    record_vision(trainer.teacher, teacher_calls)
    result = trainer.run()

    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(torch.isfinite(torch.tensor(line["loss"])) and line["tokens"] > 0 for line in lines)
    assert sum(lines[-1][f"frac/{r}"] for r in ("LH", "LL", "HT", "HS")) == pytest.approx(1.0)
    # Per step: the rollout (2 prompts, one image each; generate repeats their features for the 2 samples), then per
    # micro-batch of 2 sequences the privileged student and the teacher, then the deployed student per micro-batch:
    # one image per sequence everywhere. The 48x40 image is resized to 48x32: a 4 x 6 grid of 8-pixel patches.
    two_images = (2 * 4 * 6, PATCH_VALUES)
    assert [shape for shape, _ in student_calls] == 2 * 5 * [two_images]
    assert [shape for shape, _ in teacher_calls] == 2 * 2 * [two_images]
    assert all(grid.tolist() == [[1, 4, 6]] * 2 for _, grid in student_calls + teacher_calls)
    # The vision tower is frozen by default; the language model learned.
    assert all(torch.equal(frozen[name], p) for name, p in tower.named_parameters())
    after = dict(trainer.inner.named_parameters())
    assert any(not torch.equal(language[name], after[name]) for name in language)
    assert os.path.exists(os.path.join(result.final_dir, "processor_config.json"))
    sample = json.loads(open(tmp_path / "run" / "samples.jsonl").readline())
    assert "bbox_2d" in sample["privileged_context"] and len(sample["regime"]) == len(sample["tokens"])


def _privileged_scores(vl, tmp_path, name, *extra):
    """The privileged student's and the teacher's log-probs of the same fixed completions of every prompt."""
    trainer = Trainer(make_config(vl, tmp_path / name, *extra))
    prompts = list(range(len(trainer.prompts)))
    completions = [[3, 4, 5], [6, 7]]
    from dopd.types import Rollouts

    rollouts = Rollouts([p for p in prompts for _ in range(2)], completions * len(prompts), [False] * 2 * len(prompts))
    batches = trainer.score(prompts, rollouts)
    thresholds = trainer.batch_cuts(batches).routing
    self_logprobs = torch.cat([b.self_scores.token_logprobs[b.completions.mask.bool()] for b in batches])
    teacher_logprobs = torch.cat([b.teacher_scores.token_logprobs[b.completions.mask.bool()] for b in batches])
    regimes = assign_regimes(self_logprobs, teacher_logprobs, torch.ones_like(self_logprobs), thresholds)
    return trainer, self_logprobs, teacher_logprobs, regimes


def test_the_box_changes_the_privileged_passes_and_the_routing(vl, tmp_path):
    base, self_a, teacher_a, regimes_a = _privileged_scores(vl, tmp_path, "a")
    moved, self_b, teacher_b, regimes_b = _privileged_scores(vl, tmp_path, "b", f"data.path={vl['moved']}")
    assert base.prompts.student_ids == moved.prompts.student_ids  # the deployed student sees no box
    assert base.prompts.self_ids != moved.prompts.self_ids
    assert not torch.allclose(self_a, self_b) and not torch.allclose(teacher_a, teacher_b)
    assert not torch.equal(regimes_a, regimes_b)  # the same completions, routed otherwise
    # Drawn on the image: the privileged passes read other pixels than the deployed student.
    drawn, self_c, _, _ = _privileged_scores(vl, tmp_path, "c", "data.box_column=boxes", "data.draw_box=true")
    assert not torch.allclose(self_a, self_c)
    from dopd.types import Completions

    completions = Completions.from_lists([[3, 4]], 0)
    plain = drawn.pass_inputs(drawn.prompts.self_ids, [0], completions, privileged=False).vision["pixel_values"]
    boxed = drawn.pass_inputs(drawn.prompts.self_ids, [0], completions, privileged=True).vision["pixel_values"]
    assert plain.shape == boxed.shape and not torch.equal(plain, boxed)


def test_lora_adapts_the_language_model_only(vl, tmp_path):
    trainer = Trainer(
        make_config(
            vl,
            tmp_path / "run",
            "model.lora.enabled=true",
            "model.lora.r=2",
            "model.lora.target_modules=[q_proj,v_proj,qkv,linear_fc1]",
            "train.steps=1",
        )
    )
    adapted = [name for name, p in trainer.inner.named_parameters() if p.requires_grad]
    assert adapted and all("lora_" in name and "visual" not in name for name in adapted)
    trainer.run()


def test_an_image_that_cannot_be_opened(vl, tmp_path):
    rows = [json.loads(line) for line in open(vl["data"])]
    rows[2]["image"] = str(tmp_path / "missing.png")
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ConfigError, match=r"row 2 of data.image_column = 'image' .*missing.png.* could not be opened"):
        Trainer(make_config(vl, tmp_path / "run", f"data.path={path}"))


def test_a_box_outside_the_image(vl, tmp_path):
    rows = [json.loads(line) for line in open(vl["data"])]
    rows[1]["boxes"] = [30, 10, 60, 20]  # the image is 48 pixels wide
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(
        ConfigError,
        match=r"row 1 of data.box_column = 'boxes': box \[30.0, 10.0, 60.0, 20.0\] lies "
        r"outside its 48x40 image",
    ):
        Trainer(make_config(vl, tmp_path / "run", f"data.path={path}", "data.box_column=boxes"))
    with pytest.raises(ConfigError, match="outside"):
        check_boxes([[5, 5, 4, 9]], (48, 40), "boxes", 0)


def test_a_processor_without_an_image_processor(tmp_path):
    student, _ = tiny.write_pair(str(tmp_path))  # a text model: its directory holds a tokenizer only
    with pytest.raises(ConfigError, match="has no image processor"):
        load_processor(student, False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.kind=image_text"], "model.kind = image_text needs data.image_column"),
        (["model.kind=causal_lm", "data.image_column=image"], "needs an image-text model"),
        (["data.image_column=image", "data.draw_box=true"], "data.draw_box needs data.box_column"),
        (["data.image_column=image", "rollout.backend=vllm"], "does not carry images"),
        (["model.kind=vision"], "model.kind = 'vision' is unknown"),
    ],
)
def test_image_settings_that_cannot_work_fail_at_load(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(
            overrides=[
                "model.student=s",
                "model.teacher=t",
                "data.path=d",
                f"logging.output_dir={tmp_path}",
                *overrides,
            ]
        )


def test_boxes_are_read_and_drawn():
    from PIL import Image

    assert pixel_boxes([1, 2, 3, 4]) == [[1.0, 2.0, 3.0, 4.0]]
    assert pixel_boxes([{"bbox_2d": [1, 2, 3, 4], "label": "cat"}, [5, 6, 7, 8]]) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(ValueError, match="not four numbers"):
        pixel_boxes([1, 2, 3])
    image = Image.new("RGB", (20, 10), (255, 255, 255))
    drawn = draw_boxes(image, [[2, 2, 8, 6]])
    assert drawn.getpixel((2, 4)) == (255, 0, 0) and image.getpixel((2, 4)) == (255, 255, 255)
