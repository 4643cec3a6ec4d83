"""Loading and saving VisionSelector scorer weights.

The scorer (:class:`~vs_vllm.scorer.VisionSelectorScorer`) is four tensors, ``q_proj.weight``
(D/2, D), ``q_proj.bias`` (D/2,), ``k_proj.weight`` (D/2, D) and ``k_proj.bias`` (D/2,), with D
the vision encoder's output width (3584 for Qwen2.5-VL-7B). They come in two layouts:

* **standalone**: a ``.safetensors`` file holding exactly those four keys, as written by
  :func:`save_scorer` (by default ``vision_selector.safetensors`` inside a directory), next to a
  JSON sidecar of the same stem (``vision_selector.json``) recording ``hidden_size``, the
  parameter count and free-form provenance.
* **merged**: a full model checkpoint (e.g. ``JulietChoo/VisionSelector-Qwen2.5-VL-7B``) in which
  the scorer is a submodule, so its keys end in ``importance_scorer.q_proj.weight`` etc. under
  whatever prefix the model uses (``model.visual.importance_scorer.``,
  ``visual.importance_scorer.``, ...). The checkpoint is either sharded, with a
  ``model.safetensors.index.json`` whose ``weight_map`` says which shard holds each key (only
  those shards are opened), or one or more ``*.safetensors`` files whose headers are scanned.

:func:`load_scorer_state` accepts a standalone file, a directory holding
``vision_selector.safetensors`` (which wins over any model files beside it), a merged model
directory, a single merged ``.safetensors`` file or a ``*.index.json`` file. It reads only the
scorer's tensors, checks their shapes and returns them under the standalone names. Every problem
with the checkpoint raises :class:`CheckpointError`, naming the file, the key and the shapes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vs_vllm.scorer import VisionSelectorScorer

SCORER_KEYS: tuple[str, ...] = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")
MERGED_SUFFIX = "importance_scorer."
STANDALONE_NAME = "vision_selector.safetensors"
INDEX_NAME = "model.safetensors.index.json"
METADATA_FORMAT = "vs-vllm-scorer"
METADATA_FORMAT_VERSION = 1

_MERGED_KEYS = tuple(MERGED_SUFFIX + key for key in SCORER_KEYS)


class CheckpointError(ValueError):
    """A scorer checkpoint is missing, unreadable, incomplete, ambiguous or the wrong shape."""


@dataclass(frozen=True)
class ScorerSource:
    """Where :func:`load_scorer_state` found the scorer.

    ``prefix`` is what precedes the standalone key names in the checkpoint (``""`` for a
    standalone file, e.g. ``"model.visual.importance_scorer."`` for a merged one); ``files`` are
    the safetensors files the tensors were read from.
    """

    path: str
    kind: Literal["standalone", "merged"]
    prefix: str
    files: tuple[str, ...]


def load_scorer_state(
    path: str | os.PathLike[str], hidden_size: int | None = None
) -> tuple[dict[str, torch.Tensor], ScorerSource]:
    """Read the scorer's four tensors from ``path`` (see the module docstring for the layouts).

    Returns the tensors under :data:`SCORER_KEYS` names, as stored (dtype unchanged, on CPU), and
    their :class:`ScorerSource`. D is inferred from ``q_proj.weight`` unless ``hidden_size`` is
    given, in which case every tensor must match it.
    """
    if hidden_size is not None:
        _validate_hidden_size(hidden_size)
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such file or directory")
    if root.is_dir():
        standalone = root / STANDALONE_NAME
        if standalone.is_file():
            return _load_file(standalone, os.fspath(path), hidden_size)
        index = root / INDEX_NAME
        if index.is_file():
            return _load_index(index, os.fspath(path), hidden_size)
        files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
        return _load_merged_files(files, root, os.fspath(path), hidden_size)
    if root.name.endswith(".index.json"):
        return _load_index(root, os.fspath(path), hidden_size)
    return _load_file(root, os.fspath(path), hidden_size)


def load_scorer(
    path: str | os.PathLike[str],
    hidden_size: int | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> VisionSelectorScorer:
    """Build a :class:`VisionSelectorScorer` and load the weights at ``path`` into it (strict)."""
    state, _ = load_scorer_state(path, hidden_size)
    scorer = VisionSelectorScorer(state["q_proj.weight"].shape[1])
    scorer.load_state_dict(state, strict=True)
    return scorer.to(device=device, dtype=dtype)


def save_scorer(
    scorer: VisionSelectorScorer,
    path: str | os.PathLike[str],
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``scorer`` as a standalone checkpoint plus its JSON sidecar; return the file path.

    A ``path`` ending in ``.safetensors`` is the file to write (sidecar: same stem, ``.json``);
    anything else is a directory, created if needed, that receives
    ``vision_selector.safetensors`` and ``vision_selector.json``. ``provenance`` must be JSON
    serialisable (``json`` raises otherwise, before anything is written).
    """
    target = Path(path)
    if target.suffix != ".safetensors":
        target = target / STANDALONE_NAME
    params = dict(scorer.named_parameters())
    tensors = {
        key: params[key].detach().to("cpu").contiguous() for key in SCORER_KEYS
    }  # ok-sync: saving a checkpoint
    metadata = {
        "format": METADATA_FORMAT,
        "format_version": METADATA_FORMAT_VERSION,
        "hidden_size": scorer.hidden_size,
        "num_parameters": sum(t.numel() for t in tensors.values()),
        "provenance": dict(provenance) if provenance is not None else {},
    }
    text = json.dumps(metadata, indent=2) + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    save_file(tensors, os.fspath(tmp), metadata={"format": "pt"})
    os.replace(tmp, target)
    sidecar = _sidecar_path(target)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, sidecar)
    return target


def read_scorer_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON sidecar of a standalone scorer file (or of a directory's
    ``vision_selector.safetensors``); ``None`` if there is none."""
    target = Path(path)
    if not target.exists():
        raise CheckpointError(f"{target}: no such file or directory")
    if target.is_dir():
        target = target / STANDALONE_NAME
    return _read_sidecar(_sidecar_path(target))


# --- internals -------------------------------------------------------------------------------


def _validate_hidden_size(hidden_size: int) -> None:
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int):
        raise TypeError(f"hidden_size must be an int, got {hidden_size!r}")
    if hidden_size < 2 or hidden_size % 2:
        raise ValueError(f"hidden_size must be an even number >= 2, got {hidden_size}")


def _sidecar_path(file: Path) -> Path:
    return file.with_suffix(".json")


def _read_sidecar(sidecar: Path) -> dict[str, Any] | None:
    if not sidecar.is_file():
        return None
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{sidecar}: cannot read scorer metadata: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != METADATA_FORMAT:
        raise CheckpointError(
            f"{sidecar}: not a scorer metadata file (expected a JSON object with "
            f"format={METADATA_FORMAT!r})"
        )
    version = data.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= METADATA_FORMAT_VERSION:
        raise CheckpointError(
            f"{sidecar}: unsupported format_version {version!r} "
            f"(this version reads up to {METADATA_FORMAT_VERSION})"
        )
    return data


def _open(file: Path) -> Any:
    try:
        return safe_open(os.fspath(file), framework="pt", device="cpu")
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{file}: cannot read safetensors file: {exc}") from exc


def _file_keys(file: Path) -> list[str]:
    with _open(file) as handle:
        return list(handle.keys())


def _merged_prefix(key: str) -> tuple[str, str] | None:
    """``(prefix, standalone_key)`` if ``key`` is a merged scorer key, else ``None``."""
    for merged, name in zip(_MERGED_KEYS, SCORER_KEYS, strict=True):
        if key == merged or key.endswith("." + merged):
            return key[: -len(name)], name
    return None


def _keys_str(keys: Iterable[str]) -> str:
    return ", ".join(repr(k) for k in keys)


def _files_str(files: Iterable[Path]) -> str:
    return ", ".join(str(f) for f in files) or "(no *.safetensors files)"


def _load_file(
    file: Path, given: str, hidden_size: int | None
) -> tuple[dict[str, torch.Tensor], ScorerSource]:
    keys = _file_keys(file)
    bare = [k for k in keys if k in SCORER_KEYS]
    if not bare:
        return _load_merged_files([file], file, given, hidden_size, keys={file: keys})
    missing = [k for k in SCORER_KEYS if k not in keys]
    if missing:
        raise CheckpointError(
            f"{file}: standalone scorer checkpoint is missing key(s) {_keys_str(missing)} "
            f"(searched {file})"
        )
    unexpected = [k for k in keys if k not in SCORER_KEYS]
    if unexpected:
        raise CheckpointError(
            f"{file}: standalone scorer checkpoint has unexpected key(s) "
            f"{_keys_str(unexpected)}; expected exactly {_keys_str(SCORER_KEYS)}"
        )
    locations = {name: (file, name) for name in SCORER_KEYS}
    state = _read_tensors(locations)
    dim = _check_shapes(state, locations, hidden_size)
    sidecar = _sidecar_path(file)
    metadata = _read_sidecar(sidecar)
    if metadata is not None and metadata.get("hidden_size") != dim:
        raise CheckpointError(
            f"{sidecar}: hidden_size={metadata.get('hidden_size')!r} disagrees with {file}, "
            f"whose key 'q_proj.weight' has shape {tuple(state['q_proj.weight'].shape)} "
            f"(hidden_size={dim})"
        )
    return state, ScorerSource(path=given, kind="standalone", prefix="", files=(str(file),))


def _load_merged_files(
    files: list[Path],
    where: Path,
    given: str,
    hidden_size: int | None,
    keys: Mapping[Path, list[str]] | None = None,
) -> tuple[dict[str, torch.Tensor], ScorerSource]:
    """Scan the headers of ``files`` for ``...importance_scorer.*`` keys and load them."""
    weight_map: dict[str, Path] = {}
    for file in files:
        for key in keys[file] if keys is not None else _file_keys(file):
            if _merged_prefix(key) is None:
                continue
            if key in weight_map:
                raise CheckpointError(
                    f"{where}: key {key!r} appears in more than one file: {weight_map[key]}, {file}"
                )
            weight_map[key] = file
    return _load_merged(weight_map, where, given, hidden_size, files)


def _load_index(
    index: Path, given: str, hidden_size: int | None
) -> tuple[dict[str, torch.Tensor], ScorerSource]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index}: cannot read safetensors index: {exc}") from exc
    raw = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise CheckpointError(f"{index}: expected a 'weight_map' object mapping keys to shards")
    weight_map = {k: index.parent / v for k, v in raw.items() if _merged_prefix(k) is not None}
    for key, shard in weight_map.items():
        if not shard.is_file():
            raise CheckpointError(f"{index}: shard {shard} holding key {key!r} does not exist")
    return _load_merged(weight_map, index, given, hidden_size, [index])


def _load_merged(
    weight_map: Mapping[str, Path],
    where: Path,
    given: str,
    hidden_size: int | None,
    searched: list[Path],
) -> tuple[dict[str, torch.Tensor], ScorerSource]:
    prefix, keys = _merged_keys(weight_map, where, _files_str(searched))
    locations = {name: (weight_map[key], key) for name, key in keys.items()}
    state = _read_tensors(locations)
    _check_shapes(state, locations, hidden_size)
    files = tuple(dict.fromkeys(str(locations[name][0]) for name in SCORER_KEYS))
    return state, ScorerSource(path=given, kind="merged", prefix=prefix, files=files)


def _merged_keys(keys: Iterable[str], where: object, searched: str) -> tuple[str, dict[str, str]]:
    """The one prefix of the merged scorer keys among ``keys`` and, per standalone name, its
    full key. ``CheckpointError`` when there is none, more than one prefix, or a key missing:
    the one place merged keys are matched (files, indexes and the engine's weight stream)."""
    by_prefix: dict[str, dict[str, str]] = {}
    for key in keys:
        found = _merged_prefix(key)
        if found is not None:
            by_prefix.setdefault(found[0], {})[found[1]] = key
    if not by_prefix:
        raise CheckpointError(
            "no VisionSelector scorer weights (keys ending in "
            f"{', '.join(_MERGED_KEYS)}) and no {STANDALONE_NAME} in {where} "
            f"(searched {searched})"
        )
    if len(by_prefix) > 1:
        raise CheckpointError(
            f"{where}: VisionSelector scorer keys found under more than one prefix: "
            f"{_keys_str(sorted(by_prefix))}"
        )
    prefix, names = next(iter(by_prefix.items()))
    missing = [prefix + name for name in SCORER_KEYS if name not in names]
    if missing:
        raise CheckpointError(
            f"{where}: scorer key(s) {_keys_str(missing)} not found (searched {searched})"
        )
    return prefix, names


def is_merged_scorer_key(key: str) -> bool:
    """Whether ``key`` is a scorer weight of a merged checkpoint (``...importance_scorer.*``)."""
    return _merged_prefix(key) is not None


def merged_state_from_tensors(
    tensors: Mapping[str, torch.Tensor], where: str, hidden_size: int | None = None
) -> dict[str, torch.Tensor]:
    """The scorer state (standalone names) from a merged checkpoint's scorer tensors as the
    engine streams them (full key -> tensor), with the checks of :func:`load_scorer_state`:
    one prefix, every key, the right shapes."""
    _, keys = _merged_keys(tensors, where, "the weights vLLM loaded")
    state = {name: tensors[keys[name]] for name in SCORER_KEYS}
    _check_shapes(state, {name: (Path(where), keys[name]) for name in SCORER_KEYS}, hidden_size)
    return state


def _read_tensors(locations: Mapping[str, tuple[Path, str]]) -> dict[str, torch.Tensor]:
    """Read each standalone-named tensor from its ``(file, key)``, opening each file once."""
    per_file: dict[Path, list[str]] = {}
    for name, (file, _) in locations.items():
        per_file.setdefault(file, []).append(name)
    state: dict[str, torch.Tensor] = {}
    for file, names in per_file.items():
        with _open(file) as handle:
            for name in names:
                key = locations[name][1]
                try:
                    state[name] = handle.get_tensor(key)
                except (OSError, SafetensorError) as exc:
                    raise CheckpointError(f"{file}: cannot read key {key!r}: {exc}") from exc
    return {name: state[name] for name in SCORER_KEYS}


def _check_shapes(
    state: Mapping[str, torch.Tensor],
    locations: Mapping[str, tuple[Path, str]],
    hidden_size: int | None,
) -> int:
    """Check every tensor against (D/2, D) / (D/2,); return D."""
    for name in SCORER_KEYS:
        if not state[name].is_floating_point():
            file, key = locations[name]
            raise CheckpointError(
                f"{file}: key {key!r} has dtype {state[name].dtype}, expected a floating type"
            )
    if hidden_size is None:
        file, key = locations["q_proj.weight"]
        shape = tuple(state["q_proj.weight"].shape)
        if len(shape) != 2 or shape[1] < 2 or shape[1] % 2:
            raise CheckpointError(
                f"{file}: key {key!r} has shape {shape}, expected (D/2, D) with D an even "
                "number >= 2"
            )
        dim = shape[1]
        why = f"hidden_size={dim} (inferred from {key!r})"
    else:
        dim = hidden_size
        why = f"hidden_size={dim}"
    for name in SCORER_KEYS:
        expected = (dim // 2, dim) if name.endswith(".weight") else (dim // 2,)
        found = tuple(state[name].shape)
        if found != expected:
            file, key = locations[name]
            raise CheckpointError(
                f"{file}: key {key!r} has shape {found}, expected {expected} for {why}"
            )
    return dim


def scorer_digest(path: str | os.PathLike[str], hidden_size: int | None = None) -> str:
    """sha256 of the scorer's tensors at ``path`` (names, dtypes, shapes and bytes, in key
    order): the same weights give the same digest whatever the file layout or location. Read
    once per process for a file left unchanged (cached on its path, size and mtime)."""
    root = Path(path)
    stamps = tuple(
        (str(f), f.stat().st_size, f.stat().st_mtime_ns)
        for f in ([root] if root.is_file() else sorted(root.glob("*")))
        if f.is_file()
    )
    return _scorer_digest(os.fspath(path), hidden_size, stamps)


@functools.lru_cache(maxsize=16)
def _scorer_digest(path: str, hidden_size: int | None, stamps: tuple) -> str:
    state, _ = load_scorer_state(path, hidden_size)
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
