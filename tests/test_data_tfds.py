"""A TFDS dataset prepared as ArrayRecord in the test, read back without TensorFlow (the `tfds` extra)."""
from __future__ import annotations

import sys

import pytest

from data_pipeline import sources
from test_data_sources import _check_pair, _image, _pairs, _png  # shared helpers of the source tests

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def tokenizer_path(golden_dir):
    return str(golden_dir / "tiny_pipeline" / "tokenizer")


class PasdTinyPairs(tfds.core.GeneratorBasedBuilder):
    """A toy image+caption dataset, prepared as ArrayRecord without TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"image": tfds.features.Image(encoding_format="png"), "caption": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(3):
            yield i, {"image": _png(_image(i)), "caption": f"a picture number {i}"}


def test_tfds_array_record_source(tmp_path, tokenizer_path):
    builder = PasdTinyPairs(data_dir=str(tmp_path))
    builder.download_and_prepare(file_format="array_record")
    by_name = sources.TfdsSource("pasd_tiny_pairs", split="train", data_dir=str(tmp_path))
    by_dir = sources.TfdsSource(builder_dir=builder.data_dir, split="train")
    assert len(by_name) == len(by_dir) == 3
    assert "tensorflow" not in sys.modules
    recs = [by_name[i] for i in range(3)]
    by_caption = {r["caption"]: r for r in recs}
    assert set(by_caption) == {f"a picture number {i}" for i in range(3)}
    assert isinstance(recs[0]["image"], bytes)
    assert by_dir[1]["caption"] == recs[1]["caption"]
    pairs = _pairs(by_name, tokenizer_path, 3)
    for i in range(3):
        k = int(recs[i]["caption"].rsplit(" ", 1)[1])
        _check_pair(pairs[i], _image(k), recs[i]["caption"], tokenizer_path)
