"""sample.py end to end on the tiny official-layout checkpoint: a folder with a bad file still yields its images."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pasd_jax.sampling import cli as sample


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
    # The file the CLI wrote is exactly the pipeline called directly with the same settings: official
    # preprocessing, the per-image key from (seed, relative path), the default prompts, wavelet colour fix, resize.
    from pasd_jax import image_ops
    from pasd_jax.prompts import DEFAULT_ADDED_PROMPT, DEFAULT_NEGATIVE_PROMPT, build_prompt_fn
    from pasd_jax.sampling import PASDPipeline, SamplingOptions, load_for_sampling
    from pasd_jax.sampling.runner import image_key

    loaded = load_for_sampling(golden_dir / "tiny_pasd", base=golden_dir / "tiny_pipeline", cache=False)
    pipe = PASDPipeline(loaded.models, loaded.params, loaded.scheduler_config, loaded.tokenizer_dir)
    rgb = np.asarray(Image.open(src / "sub" / "bird.png").convert("RGB"))
    lq = image_ops.preprocess_official(rgb, 1, 64)
    prompt = build_prompt_fn("none", prompt="", added_prompt=DEFAULT_ADDED_PROMPT)(Image.fromarray(rgb), "sub/bird.png")
    direct = pipe.sample(lq[None], [prompt], [DEFAULT_NEGATIVE_PROMPT], image_key(0, "sub/bird.png")[None],
                         SamplingOptions(steps=2, dtype="float32"))[0]
    fixed = np.asarray(image_ops.wavelet_color_fix(direct, lq))
    expect = image_ops.pil_resize(fixed, (rgb.shape[1], rgb.shape[0]), Image.BICUBIC)
    diff = np.abs(result.astype(int) - expect.astype(int))
    print(f"CLI output vs the pipeline called directly: max |diff| {diff.max()} levels")
    assert diff.max() == 0  # the same program on the same inputs: bit-identical


@pytest.fixture
def one_image(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / "a.png")
    return src


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to read weights fails the test: these runs must end before."""
    def refuse(*a, **k):
        raise AssertionError("weights were loaded")
    monkeypatch.setattr("pasd_jax.sampling.loading.load_for_sampling", refuse)


@pytest.mark.parametrize("args,message", [
    (["--ckpt", "{tmp}/missing"], "does not exist"),
    (["--ckpt", "{golden}/tiny_pipeline"], "is not a PASD checkpoint"),
    (["--ckpt", "{golden}/tiny_pasd"], "--base is required"),
    (["--ckpt", "{golden}/tiny_pasd", "--base", "{tmp}/nobase"], "does not exist"),
    (["--ckpt", "{golden}/tiny_pasd", "--upscale", "0"], "--upscale"),
    (["--ckpt", "{golden}/tiny_pasd", "--steps", "0"], "steps"),
])
def test_cli_errors_before_loading(golden_dir, tmp_path, one_image, capsys, args, message):
    fmt = [a.format(tmp=tmp_path, golden=golden_dir) for a in args]
    code = sample.main(fmt + ["--input", str(one_image), "--output", str(tmp_path / "o"), "--no-cache",
                              "--no-compile-cache"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


@pytest.mark.parametrize("output,message", [
    ("file", "is a file, not a folder"),
    ("file/sub", "cannot be written"),
    ("in", "is the --input folder"),
])
def test_bad_output_found_before_loading(tmp_path, one_image, no_loading, capsys, output, message):
    (tmp_path / "file").write_text("x")
    code = sample.main(["--ckpt", "x", "--input", str(one_image), "--output", str(tmp_path / output),
                        "--no-compile-cache", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_finished_folder_ends_before_loading(tmp_path, one_image, no_loading, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"done before")
    code = sample.main(["--ckpt", "not/loaded", "--input", str(one_image), "--output", str(out),
                        "--no-compile-cache", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "0 written, 1 skipped (output exists" in err and "no weights were loaded" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == 0 and summary["skipped_existing"] == 1 and summary["status"] == "finished"
    assert (out / "a.png").read_bytes() == b"done before"


@pytest.mark.parametrize("extra,want", [
    ([], (20, "unipc")),
    (["--lcm-lora", "x"], (4, "lcm")),
    (["--lcm-lora", "x", "--steps", "6"], (6, "lcm")),
    (["--scheduler", "ddim", "--steps", "10"], (10, "ddim")),
])
def test_lcm_lora_switches_to_few_step_lcm(extra, want):
    args = sample.parse_args(["--ckpt", "c", "--input", "i", "--output", "o"] + extra)
    assert sample.resolve_steps(args) == want


def test_repeated_lora_flags_parse_with_weights():
    from pasd_jax.convert.lora import parse_lora_arg

    args = sample.parse_args(["--ckpt", "c", "--input", "i", "--output", "o", "--lora", "a.safetensors:0.3",
                              "--lora", "b.safetensors"])
    specs = [parse_lora_arg(a, default_multiplier=args.lora_multiplier) for a in args.lora]
    assert [(str(s.path), s.multiplier) for s in specs] == [("a.safetensors", 0.3), ("b.safetensors", 0.6)]


def test_compile_cache_is_used_inside_and_restored_after(tmp_path):
    import jax
    import jax.numpy as jnp

    from pasd_jax.sampling.compile_cache import persistent_cache

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    with persistent_cache(tmp_path / "xla", min_compile_s=0.0) as folder:
        assert jax.config.jax_compilation_cache_dir == str(folder)
        jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.123)(jnp.arange(7.0)).block_until_ready()
    entries = [p for p in (tmp_path / "xla").rglob("*") if p.is_file()]
    assert entries, "the program was not stored"
    assert (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs) == before
    with persistent_cache(None, enabled=False):
        assert not jax.config.jax_enable_compilation_cache


def test_distributed_launch_settings(monkeypatch):
    from pasd_jax import distributed
    from pasd_jax.errors import ConfigError

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.wanted(distributed.launch_from())  # a plain run stays one process
    assert distributed.wanted(distributed.launch_from(coordinator_address="h:1", num_processes=2, process_id=0))
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    launch = distributed.launch_from()
    assert (launch.num_processes, launch.process_id) == (4, 3) and distributed.wanted(launch)
    assert distributed.launch_from(process_id=1).process_id == 1  # flags win over the environment
    assert not distributed.wanted(distributed.launch_from("off"))
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.delenv("JAX_PROCESS_ID")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert distributed.wanted(distributed.launch_from())  # JAX detects the rest in a SLURM job
    with pytest.raises(ConfigError, match="outside"):
        distributed.launch_from(num_processes=2, process_id=2)
