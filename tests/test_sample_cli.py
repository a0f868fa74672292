"""sample.py end to end on the tiny official-layout checkpoint: a folder with a bad file still yields its images."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

import sample


def test_cli_end_to_end_with_a_bad_file(golden_dir, shared_dir, tmp_path, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    shutil.copy(shared_dir / "examples" / "Set5" / "bird.png", src / "sub" / "bird.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    code = sample.main(["--ckpt", str(golden_dir / "tiny_pasd"), "--base", str(golden_dir / "tiny_pipeline"),
                        "--input", str(src), "--output", str(out), "--process-size", "64", "--steps", "2",
                        "--dtype", "float32", "--no-cache", "--no-progress", "--upscale", "1"])
    err = capsys.readouterr().err
    print(err)
    assert code == 1
    assert "1 written" in err and "FAILED broken.png" in err
    result = np.asarray(Image.open(out / "sub" / "bird.png"))
    assert result.shape == (72, 72, 3) and result.std() > 1.0
    assert not (out / "broken.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--ckpt", "{tmp}/missing"], "does not exist"),
    (["--ckpt", "{golden}/tiny_pipeline"], "is not a PASD checkpoint"),
    (["--ckpt", "{golden}/tiny_pasd"], "--base is required"),
    (["--ckpt", "{golden}/tiny_pasd", "--base", "{tmp}/nobase"], "does not exist"),
    (["--ckpt", "{golden}/tiny_pasd", "--upscale", "0"], "--upscale"),
    (["--ckpt", "{golden}/tiny_pasd", "--steps", "0"], "steps"),
])
def test_cli_errors_before_loading(golden_dir, tmp_path, capsys, args, message):
    fmt = [a.format(tmp=tmp_path, golden=golden_dir) for a in args]
    code = sample.main(fmt + ["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
