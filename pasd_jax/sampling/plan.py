"""Before any weight is loaded: is the output usable, which files are this process's, which are already done.

Output checks: the output folder must be a folder (or creatable) and writable, and no output may land on an
input file (with `--overwrite` it would be destroyed; without, it could never be produced). `--output` equal to
`--input` is refused (PNG inputs would be their own outputs, other outputs would become inputs of the next run);
an output folder inside the input folder is fine, and its files are never taken as inputs.

Several processes (`jax.distributed`) split the sorted file list by position, before anything is skipped, so the
split depends only on the input listing and every process agrees on it without talking to the others.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

from PIL import Image

from pasd_jax import image_ops
from pasd_jax.errors import ImageReadError, OutputPathError
from pasd_jax.image_io import find_images, output_name
from pasd_jax.safe_write import unique_tag
from pasd_jax.sampling import tasks
from pasd_jax.sampling.summary import Summary


@dataclasses.dataclass
class Item:
    path: pathlib.Path
    rel: str
    out: pathlib.Path
    size: tuple[int, int] | None = None  # original (w, h)


@dataclasses.dataclass
class Plan:
    """This process's work: items grouped by processed size (one compiled program each), and what was settled
    before sampling (outputs already there, unreadable files) in `summary`."""
    inputs: pathlib.Path
    output: pathlib.Path
    groups: dict[tuple[int, int], list[Item]]
    summary: Summary
    process: tuple[int, int] = (0, 1)

    @property
    def pending(self) -> int:
        return sum(len(g) for g in self.groups.values())


def _real(p: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(os.path.realpath(p.expanduser()))


def check_output(output: str | os.PathLike, inputs: str | os.PathLike | None = None) -> pathlib.Path:
    """Create the output folder if needed and prove it writable (a probe file): a bad --output fails in
    milliseconds, not after every image was sampled."""
    output = pathlib.Path(output)
    if inputs is not None and pathlib.Path(inputs).is_dir() and _real(output) == _real(pathlib.Path(inputs)):
        raise OutputPathError(f"--output {output} is the --input folder: PNG inputs would be their own outputs and "
                              "the results would become inputs of the next run; choose another folder (a "
                              "subfolder of the input is fine)")
    if output.exists() and not output.is_dir():
        raise OutputPathError(f"--output {output} is a file, not a folder; give a folder for the results")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".pasd-write-test-{unique_tag()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputPathError(f"--output {output} cannot be written ({e.strerror or e}); choose a folder you can "
                              "write to") from None
    return output


def share(files: list, index: int, count: int) -> list:
    """Process `index` of `count`: every count-th file of the sorted listing."""
    return files[index::count]


def _listing(inputs: pathlib.Path, output: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    files = find_images(inputs)
    if inputs.is_dir():
        real_in, real_out = _real(inputs), _real(output)
        if real_out != real_in and real_out.is_relative_to(real_in):  # results kept inside the input folder
            inner = real_out.relative_to(real_in).as_posix() + "/"
            files = [(p, rel) for p, rel in files if not rel.startswith(inner)]
            if not files:
                raise FileNotFoundError(f"no images under {inputs} outside the output folder {output}")
    return files


def _refuse_outputs_on_inputs(files: list[tuple[pathlib.Path, str]], output: pathlib.Path,
                              inputs: pathlib.Path) -> None:
    real_in, real_out = _real(inputs), _real(output)
    if not (real_in == real_out or real_in.is_relative_to(real_out) or real_out.is_relative_to(real_in)
            or inputs.is_file()):
        return  # disjoint trees: no output can be an input
    sources = {_real(p) for p, _ in files}
    for _, rel in files:
        out = output / output_name(rel)
        if _real(out) in sources:
            raise OutputPathError(f"--output {output}: the result of {rel} would be written over the input "
                                  f"{out}; choose an output folder where no result lands on an input")


def make_plan(inputs: str | os.PathLike, output: str | os.PathLike, settings, *,
              process: tuple[int, int] = (0, 1)) -> Plan:
    """This process's items (headers read, sizes grouped), outputs already present counted as skipped."""
    inputs, output = pathlib.Path(inputs), pathlib.Path(output)
    files = _listing(inputs, output)
    _refuse_outputs_on_inputs(files, output, inputs)
    summary = Summary(processes=process[1])
    claimed: dict[pathlib.Path, str] = {}
    for _, rel in files:  # collisions are found on the whole listing, so every process agrees on the loser
        claimed.setdefault(output / output_name(rel), rel)
    groups: dict[tuple[int, int], list[Item]] = {}
    for path, rel in share(files, *process):
        out = output / output_name(rel)
        if claimed[out] != rel:
            summary.failed.append((rel, f"its output {out} is also the output of {claimed[out]}; rename one"))
            continue
        if out.exists() and not settings.overwrite:
            summary.existing.append(rel)
            continue
        try:
            with Image.open(path) as img:
                size = img.size
            w, h = image_ops.processed_size(*size, settings.upscale, settings.process_size,
                                            tasks.control_type(settings.task))
        except ValueError as e:
            summary.failed.append((rel, f"{path}: {e}"))
            continue
        except Exception as e:  # noqa: BLE001 - any header failure is reported per file
            summary.failed.append((rel, str(ImageReadError(f"not an image file or unreadable ({e})"))))
            continue
        groups.setdefault((w, h), []).append(Item(path, rel, out, size))
    return Plan(inputs, output, groups, summary, process)
