"""Expert buffers of the reference scripts into astkit trajectory files.

A buffer (``replay_buffer_N.pt``, written by MTT's ``buffer.py`` and the
AST, FTD and DATM scripts after it) is ``torch.save`` of a list of
trajectories; a trajectory is a list of epochs (epoch 0 the initialisation,
then one per epoch); an epoch is the list ``[p for p in net.parameters()]``
of the reference ConvNet. Each trajectory becomes one astkit trajectory file
(``expert_NNN.safetensors``), its snapshots in astkit's parameter order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from astkit import store
from astkit.errors import FileFormatError, UserError
from astkit.functional import ParamLayout
from astkit.importing.convnet import check_model_name, first_mismatch, reference_names, resolve_convnet
from astkit.importing.torch_files import load_plain
from astkit.progress import Progress
from astkit.run_folder import RunFolder
from astkit.trajectory import ModelSpec, Trajectory, check_made_for, describe

LAYOUT = ("expected the reference layout: a list of trajectories, each a list of per-epoch lists of "
          "parameter tensors (MTT's replay_buffer_N.pt)")

Buffer = list[list[list[torch.Tensor]]]


def _kind(value: Any) -> str:
    return "tensor" if torch.is_tensor(value) else type(value).__name__


def read_buffer(path: str | Path) -> Buffer:
    """The trajectories of the buffer file at ``path``, checked: a list of
    trajectories of at least 2 epochs each, every epoch a list of finite
    floating-point tensors with the same shapes in every epoch and trajectory."""
    data = load_plain(path, kind="tensor buffer")
    if not isinstance(data, (list, tuple)):
        raise FileFormatError(f"{path}: holds a {_kind(data)}, not a list of trajectories; {LAYOUT}")
    if not data:
        raise FileFormatError(f"{path}: holds no trajectory (an empty list); {LAYOUT}")
    first: list[tuple[int, ...]] | None = None
    for t, trajectory in enumerate(data):
        where = f"{path}: trajectory {t}"
        if not isinstance(trajectory, (list, tuple)):
            raise FileFormatError(f"{where} is a {_kind(trajectory)}, not a list of epochs; {LAYOUT}")
        if trajectory and torch.is_tensor(trajectory[0]):
            raise FileFormatError(f"{where} is a list of tensors (one epoch?), not a list of epochs; {LAYOUT}")
        if len(trajectory) < 2:
            raise FileFormatError(f"{where} has {len(trajectory)} epoch(s); a trajectory needs its "
                                  "initialisation and at least one epoch")
        for e, epoch in enumerate(trajectory):
            here = f"{where}, epoch {e}"
            if not isinstance(epoch, (list, tuple)) or not epoch:
                what = "an empty list" if isinstance(epoch, (list, tuple)) else f"a {_kind(epoch)}"
                raise FileFormatError(f"{here} is {what}, not a list of parameter tensors; {LAYOUT}")
            for k, tensor in enumerate(epoch):
                if not torch.is_tensor(tensor):
                    raise FileFormatError(f"{here}, parameter {k} is a {_kind(tensor)}, not a tensor; {LAYOUT}")
                if not tensor.is_floating_point():
                    raise FileFormatError(f"{here}, parameter {k} is a {tensor.dtype} tensor; "
                                          "network parameters are floating point")
            shapes = [tuple(p.shape) for p in epoch]
            if first is None:
                first = shapes
            elif shapes != first:
                raise FileFormatError(f"{here}: {_difference(shapes, first)}; every epoch of every trajectory "
                                      "must hold the same parameters")
            bad = next((k for k, p in enumerate(epoch) if not bool(torch.isfinite(p).all())), None)
            if bad is not None:
                raise FileFormatError(f"{here}, parameter {bad} holds NaN or Inf (a diverged expert); "
                                      "save the buffer without that trajectory")
    return [[list(epoch) for epoch in trajectory] for trajectory in data]


def _difference(shapes: list, first: list) -> str:
    """Where an epoch's shapes first differ from those of trajectory 0, epoch 0."""
    for k, (a, b) in enumerate(zip(shapes, first)):
        if a != b:
            return f"parameter {k} is {a}, trajectory 0, epoch 0 has {b}"
    return f"{len(shapes)} parameters, trajectory 0, epoch 0 has {len(first)}"


@dataclass
class BufferImport:
    """What :func:`import_buffers` wrote."""

    spec: ModelSpec
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)


def import_buffers(paths: Sequence[str | Path], dataset: Any, out: str | Path, *, model: str = "convnet",
                   given: Mapping[str, Any] | None = None, registry: Mapping | None = None,
                   data_config: Mapping[str, Any] | None = None, progress: Progress | None = None) -> BufferImport:
    """Write every trajectory of the buffers at ``paths`` to ``out`` as astkit
    trajectory files, for astkit's ConvNet on ``dataset``.

    ``given`` are the ``model.*`` options the user set (the others are read
    from the shapes). With ``data_config`` (a config's ``data`` section) the
    files record a config of that data section and the resolved network's
    ``model`` section. Files are numbered from the first free
    ``expert_NNN`` in ``out``; files already there must be experts of the
    same model and data. On any error, the files written so far are removed.
    """
    check_model_name(model)
    out = Path(out)
    progress = progress or Progress()
    paths = check_paths(paths, out)
    folder = RunFolder(out, experts_dir=out)
    created = not out.exists()
    result: BufferImport | None = None
    next_index = 0
    try:
        for path in paths:
            buffer = read_buffer(path)
            shapes = [tuple(p.shape) for p in buffer[0][0]]
            if result is None:
                spec, notes = resolve_convnet(shapes, channels=dataset.channels, num_classes=dataset.num_classes,
                                              image_size=tuple(dataset.image_size), given=given or {},
                                              registry=registry, source=str(path))
                _check_existing(folder, spec, dataset)
                result = BufferImport(spec, notes=notes)
                for note in notes:
                    progress.log(f"note: {note}")
                network = spec.build(registry)
                layout, names = ParamLayout.of(network), reference_names(network)
            problem = first_mismatch(shapes, network, f"{paths[0]} (astkit's {describe(result.spec)})")
            if problem is not None:
                raise FileFormatError(f"{path}: {problem}; import buffers of one network together")
            for t, trajectory in enumerate(buffer):
                snapshots = torch.stack([
                    layout.flatten({n: p.detach().to(torch.float32) for n, p in zip(names, epoch)})
                    for epoch in trajectory
                ])
                index = next_index = _free_index(folder, next_index)
                meta = {
                    "index": index,
                    "dataset": dataset.metadata(),
                    "origin": f"imported from {path.name}, trajectory {t}",
                    "source": {"file": str(path.resolve()), "trajectory": t,
                               "layout": "reference buffer (MTT/AST/FTD/DATM replay_buffer)"},
                }
                if data_config is not None:
                    meta["config"] = {"data": dict(data_config), "model": {"name": spec.name, **spec.options}}
                Trajectory(snapshots, layout, result.spec, [], [], meta).save(folder.expert(index))
                result.files.append(folder.expert(index))
                result.epochs.append(len(trajectory) - 1)
                next_index += 1
            progress.log(f"{path}: {len(buffer)} trajectories of {len(buffer[0]) - 1} epochs imported")
            del buffer
    except BaseException:
        for written in result.files if result is not None else []:
            written.unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return result


def check_paths(paths: Sequence[str | Path], out: str | Path) -> list[Path]:
    """The buffer paths, each an existing file, and ``out`` not a file; the
    checks :func:`import_buffers` makes first (the CLI makes them before it
    loads the data)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass the folder the expert files go to")
    return [store.require_file(p, "an expert buffer (.pt)", fix="pass the replay_buffer_N.pt files") for p in paths]


def _free_index(folder: RunFolder, start: int) -> int:
    """The first expert number from ``start`` with no file yet."""
    index = start
    while folder.expert(index).exists():
        index += 1
    return index


def _check_existing(folder: RunFolder, spec: ModelSpec, dataset: Any) -> None:
    """Every file already in the experts folder is an expert of ``spec`` on ``dataset``."""
    for path in folder.expert_files():
        meta = store.read_metadata(path)
        if meta.get("kind") != "trajectory":
            raise FileFormatError(f"{path}: an astkit {meta.get('kind')} file in --out; "
                                  "import into a folder of expert files only")
        recorded = meta.get("model")
        try:
            same = ModelSpec.from_json(recorded) == spec
        except (KeyError, TypeError, ValueError):
            same = True  # check_made_for words it
        if not same:
            raise FileFormatError(f"{path}: an expert of {describe(ModelSpec.from_json(recorded))} is already in "
                                  f"--out, the buffers hold {describe(spec)}; import into another folder "
                                  "(an experts folder holds one network)")
        check_made_for(meta, path, spec, dataset)
