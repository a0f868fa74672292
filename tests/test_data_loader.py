"""The Grain loader: batch contract, worker-count determinism, per-host streams, exact resume in a new process."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data_pipeline.config import get_data_config
from data_pipeline.loader import build_dataset, make_train_iterator
from data_pipeline.presets import REALESRGAN_X4PLUS
from data_pipeline.sources import ProceduralSource

REPO = pathlib.Path(__file__).resolve().parents[1]
CFG = {"crop_size": 128}  # small crops keep these runs cheap; test_batch_contract uses 512
KW = dict(seed=7, process_index=0, process_count=1, batch_size=2, tokenizer_path=None)


def _src():
    return ProceduralSource(64, 160, seed=5)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_contract_at_512(golden_dir):
    tok = str(golden_dir / "tiny_pipeline" / "tokenizer")
    with make_train_iterator(None, seed=0, process_index=0, process_count=1, batch_size=2, tokenizer_path=tok,
                             source=ProceduralSource(16, 384, seed=0)) as it:
        b = next(it)
    assert set(b) == {"hq", "lq", "input_ids", "skip_counts", "convert_counts"}
    assert b["hq"].shape == b["lq"].shape == (2, 512, 512, 3)
    assert b["hq"].dtype == b["lq"].dtype == np.uint8
    assert b["input_ids"].shape == (2, 77) and b["input_ids"].dtype == np.int32
    assert (b["input_ids"][:, 0] == 49406).all()  # CLIP BOS; padded to 77
    assert not np.array_equal(b["hq"], b["lq"])
    for hq, lq in zip(b["hq"].astype(float), b["lq"].astype(float), strict=True):  # lq comes from the flipped-or-not hq
        assert np.abs(lq - hq).mean() < np.abs(lq - hq[:, ::-1]).mean()


def test_zero_and_two_workers_identical_and_resumable():
    """Also runs mp_prefetch outside absl.app (pytest): without the loader's absl workaround grain 0.2.18
    raises UnparsedFlagAccessError here."""
    with make_train_iterator(CFG, **KW, num_workers=0, source=_src()) as it:
        ref = _take(it, 4)
    with make_train_iterator(CFG, **KW, num_workers=2, source=_src()) as it:
        got = _take(it, 2)
        state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as in a checkpoint
    assert all(_same(a, b) for a, b in zip(ref[:2], got, strict=True))
    assert state["settings"]["num_workers"] == 2
    with make_train_iterator(CFG, **KW, num_workers=2, source=_src()) as it:
        it.set_state(state)
        resumed = _take(it, 2)
    assert all(_same(a, b) for a, b in zip(ref[2:], resumed, strict=True))


def test_state_is_tied_to_settings():
    with make_train_iterator(CFG, **KW, num_workers=0, source=_src()) as it:
        next(it)
        state = it.get_state()
    with make_train_iterator(CFG, **(KW | {"batch_size": 3}), num_workers=0, source=_src()) as it:
        with pytest.raises(ValueError, match="batch_size"):
            it.set_state(state)
    state["settings"]["num_workers"] = 2
    with make_train_iterator(CFG, **KW, num_workers=0, source=_src()) as it:
        with pytest.raises(ValueError, match="num_workers"):
            it.set_state(state)


_RESUME = textwrap.dedent("""
    import json, sys
    import numpy as np
    from data_pipeline.loader import make_train_iterator
    from data_pipeline.sources import ProceduralSource
    mode, path = sys.argv[1], sys.argv[2]
    it = make_train_iterator({"crop_size": 128}, seed=7, process_index=0, process_count=1, batch_size=2,
                             tokenizer_path=None, num_workers=0, source=ProceduralSource(64, 160, seed=5))
    if mode == "save":
        next(it); next(it)
        open(path, "w").write(json.dumps(it.get_state()))
    else:
        it.set_state(json.loads(open(path).read()))
        b = [next(it) for _ in range(2)]
        np.savez(path + ".npz", **{f"{i}_{k}": v for i, x in enumerate(b) for k, v in x.items()})
    it.close()
""")


def test_resume_in_a_new_process(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(_RESUME)
    state = tmp_path / "state.json"
    env = {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    for mode in ("save", "load"):
        subprocess.run([sys.executable, str(script), mode, str(state)], check=True, env=env, cwd=tmp_path,
                       timeout=300, capture_output=True)
    with make_train_iterator(CFG, **KW, num_workers=0, source=_src()) as it:
        ref = _take(it, 4)
    got = np.load(str(state) + ".npz")
    for i, b in enumerate(ref[2:]):
        for k, v in b.items():
            np.testing.assert_array_equal(got[f"{i}_{k}"], v)


class _SameImage:
    """Every record is the same 128x128 image: any difference between hosts comes from the random streams."""

    def __init__(self, n):
        self.n, self.img = n, ProceduralSource(1, 128, seed=9)[0]["image"]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": self.img, "caption": "", "key": str(i)}


def _ids(hq_batch, images):
    """Record id of each 128x128 hq (the crop is the whole image, maybe flipped)."""
    out = []
    for hq in hq_batch:
        hits = [i for i, im in enumerate(images) if np.array_equal(hq, im) or np.array_equal(hq, im[:, ::-1])]
        assert len(hits) == 1
        out.append(hits[0])
    return out


def test_hosts_get_different_samples_and_degradations():
    src = ProceduralSource(8, 128, seed=3)
    images = [src[i]["image"] for i in range(8)]
    kw = KW | {"process_count": 2}
    batches = {}
    for host in (0, 1):
        with make_train_iterator(CFG, **(kw | {"process_index": host}), source=src) as it:
            batches[host] = _take(it, 2)
    ids = {h: sum((_ids(b["hq"], images) for b in batches[h]), []) for h in (0, 1)}
    assert sorted(ids[0] + ids[1]) == list(range(8))  # one epoch split between the hosts, no overlap
    # hosts take alternate elements of the single global stream (slice after the random map)
    glob = [build_dataset(CFG, **(KW | {"batch_size": 1}), source=src)[i] for i in range(4)]
    for j in range(2):
        np.testing.assert_array_equal(batches[1][0]["lq"][j], glob[2 * j + 1]["lq"][0])
        np.testing.assert_array_equal(batches[0][0]["lq"][j], glob[2 * j]["lq"][0])
    # with identical images, hosts still degrade differently at the same step
    same = {}
    for host in (0, 1):
        with make_train_iterator(CFG, **(kw | {"process_index": host}), source=_SameImage(16)) as it:
            same[host] = next(it)["lq"]
    assert all(not np.array_equal(same[0][j], same[1][j]) for j in range(2))


def test_seed_changes_everything_and_epochs_differ():
    ds = build_dataset(CFG, **(KW | {"batch_size": 1}), source=_src())
    other = build_dataset(CFG, **(KW | {"batch_size": 1, "seed": 8}), source=_src())
    assert not np.array_equal(ds[0]["lq"], other[0]["lq"])
    assert np.array_equal(ds[5]["lq"], build_dataset(CFG, **(KW | {"batch_size": 1}), source=_src())[5]["lq"])


def test_degradation_preset_from_config():
    cfg = get_data_config()
    cfg.crop_size = 128
    cfg.degradation = REALESRGAN_X4PLUS.to_dict()
    a = build_dataset(cfg, **KW, source=_src())[0]
    b = build_dataset(CFG, **KW, source=_src())[0]
    assert np.array_equal(a["hq"], b["hq"]) and not np.array_equal(a["lq"], b["lq"])
    with pytest.raises(KeyError):
        build_dataset({"no_such_key": 1}, **KW, source=_src())
