"""PASD prompt rules (spec 4.3, official test_pasd.py) with fake model outputs; captions files; cache; errors."""
from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from pasd_jax.convert.io import WeightFileError
from pasd_jax.prompts import (DEFAULT_ADDED_PROMPT, CaptionProvider, CaptionsFileError, ClassificationProvider,
                              DetectionProvider, MissingDependencyError, NoneProvider, build_prompt_fn,
                              load_captions_file, make_prompt_fn, negative_prompt_for, rules)

ADDED = "clean, high-resolution, 8k"
CATS = ["tench", "goldfish", "tabby cat"] + [f"class {i}" for i in range(3, 20)]


def _image(value: int = 0, size=(8, 6)) -> Image.Image:
    arr = np.full((size[1], size[0], 3), value, np.uint8)
    arr[0, 0] = (255, 0, value)  # some colour, so grayscale conversion is visible
    return Image.fromarray(arr)


def _probs(index: int, score: float) -> np.ndarray:
    p = np.full(len(CATS), (1 - score) / (len(CATS) - 1), np.float32)
    p[index] = score
    assert p.argmax() == index
    return p


def _classifier(index, score):
    return ClassificationProvider(classify=lambda im: _probs(index, score), categories=CATS, identity="fake-cls")


class _Counter:
    """A fake model that records how often it ran."""

    def __init__(self, out):
        self.out, self.calls, self.images = out, 0, []

    def __call__(self, image):
        self.calls += 1
        self.images.append(image)
        return self.out


# ------------------------------------------------------------------------------------------------------ rules

def test_added_prompt_default_matches_official():
    assert DEFAULT_ADDED_PROMPT == ADDED


@pytest.mark.parametrize("prompt,expected", [("", ADDED), ("a photo", "a photo, " + ADDED)])
def test_none(prompt, expected):
    assert make_prompt_fn(NoneProvider(), prompt=prompt)(_image(), "x.png") == expected


@pytest.mark.parametrize("index,score,prompt,expected", [
    (2, 0.85, "", "tabby cat, " + ADDED),
    (2, 0.85, "my cat", "my cat, tabby cat, " + ADDED),
    (1, 0.1, "", "goldfish, " + ADDED),                # >= threshold: included at exactly 0.1
    (1, 0.099, "", ADDED),                              # below: nothing
    (1, 0.099, "my fish", ADDED),                       # below: the user prompt is dropped too (official)
])
def test_classification(index, score, prompt, expected):
    assert make_prompt_fn(_classifier(index, score), prompt=prompt)(_image(), "x.png") == expected


def test_classification_threshold_is_on_the_float32_score():
    assert rules.classification_text("x", 0.1, "") == "x, "            # `score >= 0.1`, boundary included
    # float32(0.1) = 0.10000000149 >= 0.1, as torch's `.item()` comparison sees it
    assert rules.classification_text("x", float(np.float32(0.1)), "") == "x, "
    assert rules.classification_text("x", float(np.nextafter(np.float32(0.1), 0)), "") == ""


def test_detection_counts_per_class_in_first_seen_order():
    names = {0: "person", 16: "dog", 2: "car"}
    class_ids = np.array([16.0, 0.0, 16.0, 2.0, 0.0, 16.0], np.float32)  # ultralytics gives float ids
    seen = rules.names_from_class_ids(class_ids, names)
    provider = DetectionProvider(detect=lambda im: seen, identity="fake-yolo")
    assert make_prompt_fn(provider)(_image(), "x") == "3 dog, 2 person, 1 car, " + ADDED
    assert make_prompt_fn(provider, prompt="park")(_image(), "x") == "park, 3 dog, 2 person, 1 car, " + ADDED


def test_detection_nothing_found():
    provider = DetectionProvider(detect=lambda im: [], identity="fake-yolo")
    assert make_prompt_fn(provider)(_image(), "x") == ADDED
    assert make_prompt_fn(provider, prompt="park")(_image(), "x") == "park, " + ADDED


COCA_RAW = "<start_of_text>a blurry photo of a noisy dog <end_of_text>!! blurry"


@pytest.mark.parametrize("prompt,expected", [
    ("", "a clear photo of a clean dog " + ADDED),          # cut at <end_of_text>, its space kept, glued
    ("4k", "a clear photo of a clean dog  4k" + ADDED),     # CoCa joins with a space
])
def test_caption_coca(prompt, expected):
    provider = CaptionProvider(generate=lambda im: COCA_RAW, style="coca", identity="fake-coca")
    assert make_prompt_fn(provider, prompt=prompt)(_image(), "x") == expected


@pytest.mark.parametrize("prompt,expected", [
    ("", "a clearish clean-looking cat" + ADDED),            # plain substring replacement, glued
    ("4k", "a clearish clean-looking cat, 4k" + ADDED),     # BLIP joins with ", "
])
def test_caption_blip(prompt, expected):
    provider = CaptionProvider(generate=lambda im: "a blurryish noisy-looking cat", style="blip", identity="b")
    assert make_prompt_fn(provider, prompt=prompt)(_image(), "x") == expected


def test_blip_keeps_special_token_text_and_coca_strips_it():
    assert rules.clean_caption("<start_of_text>x<end_of_text>y", "blip") == "<start_of_text>x<end_of_text>y"
    assert rules.clean_caption("<start_of_text>x<end_of_text>y", "coca") == "x"
    with pytest.raises(ValueError, match="caption style"):
        CaptionProvider(generate=str, style="git")


@pytest.mark.parametrize("text,expected", [
    ("tabby cat, ", "tabby cat, " + ADDED),
    ("a dog on grass", "a dog on grass, " + ADDED),
    ("a dog ", "a dog, " + ADDED),
    ("", ADDED),
])
def test_added_prompt_separator_option(text, expected):
    assert rules.join_added_prompt(text, ADDED, separator=False) == text + ADDED
    assert rules.join_added_prompt(text, ADDED, separator=True) == expected
    assert rules.join_added_prompt(text, "", separator=True) == text


def test_separator_through_prompt_fn():
    provider = CaptionProvider(generate=lambda im: "a dog", style="blip", identity="b")
    assert make_prompt_fn(provider)(_image(), "x") == "a dog" + ADDED
    assert make_prompt_fn(provider, separator=True)(_image(), "x") == "a dog, " + ADDED


def test_grayscale_mode():
    model = _Counter("<start_of_text>a black and white photo of a man<end_of_text>")
    fn = make_prompt_fn(CaptionProvider(generate=model, style="coca", identity="c"), control_type="grayscale")
    assert fn(_image(), "x") == "a color photo of a man"         # no added prompt in grayscale mode
    seen = np.asarray(model.images[0])
    assert seen.shape[-1] == 3 and (seen[..., 0] == seen[..., 1]).all() and (seen[..., 1] == seen[..., 2]).all()
    assert negative_prompt_for("grayscale", "blurry") == "b&w, color bleeding"
    assert negative_prompt_for("realisr", "blurry") == "blurry"
    with pytest.raises(ValueError, match="control_type"):
        make_prompt_fn(NoneProvider(), control_type="sketch")


# ------------------------------------------------------------------------------------------------ captions files

def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_captions_json_object_and_list(tmp_path):
    obj = _write(tmp_path / "c.json", json.dumps({"./sub/a.png": "a red car", "b.png": "a tree"}))
    lst = _write(tmp_path / "l.json", json.dumps([{"path": "sub/a.png", "prompt": "a red car"},
                                                  {"image": "b.png", "caption": "a tree"}]))
    for f in (obj, lst):
        assert load_captions_file(f) == {"sub/a.png": "a red car", "b.png": "a tree"}
        fn = build_prompt_fn("caption", captions_file=f, prompt="sharp")
        assert fn(_image(), "sub/a.png") == "a red car, sharp" + ADDED
        assert fn(_image(), "./b.png") == "a tree, sharp" + ADDED
        assert fn(_image(), "other/b.png") == "a tree, sharp" + ADDED     # by unique file name
        # verbatim: no word replacement for captions the user supplied
        assert build_prompt_fn("caption", captions_file=f)(_image(), "b.png") == "a tree" + ADDED


def test_captions_csv_with_and_without_header(tmp_path):
    with_header = _write(tmp_path / "h.csv", "\ufeffimage,caption\nsub/a.png,\"a red car, parked\"\nb.png,a tree\n")
    no_header = _write(tmp_path / "n.csv", "sub/a.png,\"a red car, parked\"\n\nb.png,a tree\n")
    for f in (with_header, no_header):
        assert load_captions_file(f) == {"sub/a.png": "a red car, parked", "b.png": "a tree"}
    fn = build_prompt_fn("caption", captions_file=with_header, separator=True)
    assert fn(_image(), "sub/a.png") == "a red car, parked, " + ADDED


def test_captions_file_errors(tmp_path):
    f = _write(tmp_path / "c.json", json.dumps({"x/a.png": "one", "y/a.png": "two"}))
    fn = build_prompt_fn("caption", captions_file=f)
    with pytest.raises(CaptionsFileError, match="has no caption for 'z.png'"):
        fn(_image(), "z.png")
    with pytest.raises(CaptionsFileError, match="matches several entries"):
        fn(_image(), "a.png")
    with pytest.raises(CaptionsFileError, match="listed twice"):
        load_captions_file(_write(tmp_path / "d.csv", "a.png,x\n./a.png,y\n"))
    with pytest.raises(CaptionsFileError, match="has no text column"):
        load_captions_file(_write(tmp_path / "e.csv", "path,score\na.png,1\n"))
    with pytest.raises(CaptionsFileError, match="expected a .json or .csv"):
        load_captions_file(_write(tmp_path / "c.txt", "a.png x"))
    with pytest.raises(CaptionsFileError, match="not found"):
        load_captions_file(tmp_path / "absent.json")
    with pytest.raises(ValueError, match="needs high_level_info='caption'"):
        build_prompt_fn("classification", captions_file=f)


# ---------------------------------------------------------------------------------------------------- caching

def test_cache_runs_each_model_once_per_image_across_passes(tmp_path):
    model = _Counter("<start_of_text>a blurry dog<end_of_text>")

    def provider():
        return CaptionProvider(generate=model, style="coca", identity="coca-v1")

    first = make_prompt_fn(provider(), cache_dir=tmp_path)
    assert first(_image(1), "a.png") == "a clear dog" + ADDED
    assert first(_image(2), "b.png") == "a clear dog" + ADDED
    assert first(_image(1), "copy_of_a.png") == "a clear dog" + ADDED   # same pixels, other name: hit
    assert (model.calls, first.cache.hits, first.cache.misses) == (2, 1, 2)

    # second pass, new process-like state (fresh memory), other settings: everything from disk
    second = make_prompt_fn(provider(), cache_dir=tmp_path, prompt="4k", added_prompt="sharp")
    assert second(_image(1), "a.png") == "a clear dog 4ksharp"
    assert second(_image(2), "b.png") == "a clear dog 4ksharp"
    assert (model.calls, second.cache.hits, second.cache.misses) == (2, 2, 0)

    # another model identity does not reuse the entries; grayscale sees other pixels, so it misses too
    other = make_prompt_fn(dataclasses.replace(provider(), identity="coca-v2"), cache_dir=tmp_path)
    other(_image(1), "a.png")
    gray = make_prompt_fn(provider(), cache_dir=tmp_path, control_type="grayscale")
    gray(_image(1), "a.png")
    assert model.calls == 4


def test_cache_recovers_from_a_corrupt_entry_and_memory_only_cache(tmp_path):
    model = _Counter(_probs(2, 0.9))
    fn = make_prompt_fn(ClassificationProvider(classify=model, categories=CATS, identity="r"), cache_dir=tmp_path)
    fn(_image(), "a.png")
    (entry,) = tmp_path.rglob("*.json")
    entry.write_text("{trunc")
    fn2 = make_prompt_fn(ClassificationProvider(classify=model, categories=CATS, identity="r"), cache_dir=tmp_path)
    assert fn2(_image(), "a.png") == "tabby cat, " + ADDED
    assert model.calls == 2 and json.loads(entry.read_text())["value"]["index"] == 2

    mem = make_prompt_fn(ClassificationProvider(classify=model, categories=CATS, identity="r"))
    mem(_image(), "a.png")
    mem(_image(), "a.png")
    assert (model.calls, mem.cache.hits, mem.cache.misses) == (3, 1, 1)
    assert not list(tmp_path.rglob("*.tmp"))


def test_threshold_change_reuses_cached_classification(tmp_path):
    model = _Counter(_probs(0, 0.06))
    p = ClassificationProvider(classify=model, categories=CATS, identity="r")
    assert make_prompt_fn(p, cache_dir=tmp_path)(_image(), "a") == ADDED
    low = make_prompt_fn(dataclasses.replace(p, threshold=0.01), cache_dir=tmp_path)
    assert low(_image(), "a") == "tench, " + ADDED
    assert model.calls == 1


# ------------------------------------------------------------------------------------- missing packages / weights

@pytest.fixture
def no_optional_packages(monkeypatch):
    real = importlib.util.find_spec
    absent = {"ultralytics", "open_clip", "torch", "torchvision"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in absent else real(name, *a))


@pytest.fixture
def fake_installed(monkeypatch):
    real = importlib.util.find_spec
    present = {"ultralytics", "open_clip", "torch"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in present else real(name, *a))


@pytest.mark.parametrize("kwargs,pip", [
    (dict(high_level_info="detection", detector_weights="yolov8n.pt"), "pip install ultralytics"),
    (dict(high_level_info="caption", captioner="coca.bin"), "pip install open_clip_torch"),
    (dict(high_level_info="caption", caption_model="blip", captioner="blip"), "pip install torch"),
])
def test_missing_package_messages(no_optional_packages, kwargs, pip):
    with pytest.raises(MissingDependencyError) as e:
        build_prompt_fn(**kwargs)
    print(e.value)
    assert pip in str(e.value) and "--high-level-info none" in str(e.value)


@pytest.mark.parametrize("kwargs,option", [
    (dict(high_level_info="detection"), "--detector-weights"),
    (dict(high_level_info="caption"), "--captioner"),
    (dict(high_level_info="caption", caption_model="blip"), "--captioner"),
    (dict(high_level_info="classification"), "--classifier-weights"),
])
def test_missing_weight_messages(fake_installed, tmp_path, kwargs, option):
    with pytest.raises(WeightFileError, match=f"pass its local path with .*{option}.*nothing is downloaded"):
        build_prompt_fn(**kwargs)
    key = {"detection": "detector_weights", "classification": "classifier_weights"}.get(
        kwargs["high_level_info"], "captioner")
    absent = tmp_path / "absent.file"
    with pytest.raises(WeightFileError, match=f"missing .*{absent}.*{option}"):
        build_prompt_fn(**kwargs, **{key: absent})


def test_missing_category_names(no_optional_packages, tmp_path, golden_dir):
    weights = tmp_path / "resnet50.safetensors"
    weights.symlink_to(golden_dir / "resnet50" / "resnet50.safetensors")
    with pytest.raises(WeightFileError, match=f"no ImageNet category names: put .*{tmp_path}/imagenet_categories"):
        build_prompt_fn("classification", classifier_weights=weights)
    with pytest.raises(WeightFileError, match="missing category names file .*absent.json"):
        build_prompt_fn("classification", classifier_weights=weights, categories_file=tmp_path / "absent.json")
    bad = _write(tmp_path / "cats.json", json.dumps(["a", "b"]))
    with pytest.raises(WeightFileError, match="JSON list of 1000 strings"):
        build_prompt_fn("classification", classifier_weights=weights, categories_file=bad)


def test_none_needs_nothing(no_optional_packages):
    assert build_prompt_fn("none", prompt="p", added_prompt="q")(_image(), "x") == "p, q"
    assert build_prompt_fn(None)(_image(), "x") == ADDED
    with pytest.raises(ValueError, match="high_level_info must be one of"):
        build_prompt_fn("segmentation")


# ------------------------------------------------------------------------------- real JAX classifier, golden net

def test_classification_with_golden_resnet(golden_dir, shared_dir, tmp_path):
    """The JAX ResNet-50 + preprocessing + names end to end: baby.png's top-1 is 764 'rifle' at p = 0.011558."""
    weights = golden_dir / "resnet50" / "resnet50.safetensors"
    fn = build_prompt_fn("classification", classifier_weights=weights, cache_dir=tmp_path)
    image = Image.open(shared_dir / "examples" / "Set5" / "baby.png")
    assert fn(image, "baby.png") == ADDED                    # a random net is unsure: 0.0116 < 0.1
    low = make_prompt_fn(dataclasses.replace(fn.provider, threshold=0.01), cache_dir=tmp_path)
    assert low(image, "baby.png") == "rifle, " + ADDED
    assert (low.cache.hits, low.cache.misses) == (1, 0)
    (entry,) = tmp_path.rglob("*.json")
    value = json.loads(entry.read_text())["value"]
    print(f"golden baby.png top-1 {value}")
    assert value["index"] == 764 and abs(value["score"] - 0.011558) < 1e-6
