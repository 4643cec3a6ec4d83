"""Training data for the scorer: LLaVA / Qwen-VL fine-tuning JSONL, validated and encoded.

File format, one JSON object per line (blank lines are ignored)::

    {"image": "a.jpg" or ["a.jpg", "b.png"],      # optional: text-only samples have none
     "video": "clip.mp4" or "clip_frames/" or [...], # optional, as in LLaVA-Video / Qwen-VL
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                       {"from": "gpt", "value": "..."},
                       ...]}                        # more human/gpt turns may follow

* Image and video paths are relative to ``image_root`` (an absolute path stays as it is).
* A video is a folder of frame images or a video file (:mod:`vs_vllm.train.video_frames`:
  PIL's multi-frame formats, OpenCV for the rest); at most ``max_frames`` frames are used.
* Turns alternate ``human`` / ``gpt``, start with ``human`` and end with ``gpt``.
* Each image has one ``<image>`` marker and each video one ``<video>`` marker, in a human turn,
  in the order of the ``image`` / ``video`` list. **A sample with images (videos) but no
  ``<image>`` (``<video>``) marker at all gets them at the start of the first human turn**
  (the usual convention of single-image and single-video datasets; videos before images).
  Any other mismatch between markers and media is an error.
* A newline right after a marker (``"<image>\\nQuestion"``), or right before a marker that ends
  the turn (``"Question\\n<image>"``), is dropped: the model's chat template lays out the media
  block and any separator around it itself.

:func:`read_samples` validates every line before training starts (JSON, turn structure, marker
count, that each image exists and passes ``PIL.Image.verify``, that each video's frames do)
and raises :class:`DataError`
``"<file>:<line>: <problem>"``; with ``skip_bad=True`` it logs ``"skipping <file>:<line>: ..."``
per bad sample and keeps the rest.

:class:`SampleEncoder` turns a :class:`Sample` into model inputs with the model's processor:
``input_ids``, ``attention_mask``, the image and video fields of the family (its adapter's
``image_fields`` / ``video_fields``, e.g. pixels and patch grids), ``mm_token_type_ids`` (when
the processor returns it) and ``labels``, which are ``-100`` except on the tokens of each
assistant answer and the end-of-turn text that closes it (the adapter's ``end_of_turn``).
:func:`collate` pads a batch.

**Image size at call time (transformers 5.19).** The adapter says how the image processor takes
pixel bounds (``hf_images_kwargs``). For example ``Qwen2VLImageProcessor`` keeps them in
``size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}`` (areas in pixels, not edge
lengths) and ``smart_resize`` scales each image so that its area is within them, both
sides multiples of ``patch_size * merge_size`` (28). The default ``hf_images_kwargs`` passes
``images_kwargs={"size": {"shortest_edge": ..., "longest_edge": ...}}`` to the processor call;
the dict must hold both keys (``resize`` raises otherwise), so a ``min_pixels`` of ``None``
takes the processor's own ``shortest_edge`` (capped at ``max_pixels``). Passing
``max_pixels=`` / ``min_pixels=`` to the call still works in 5.19 but warns that it is
deprecated (removed in 5.23). ``max_pixels = 50176 = 28 * 28 * 64`` (the reference's training
setting) gives at most 64 merged visual tokens per image.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from vs_vllm.models import ModelAdapter, adapter_for_processor
from vs_vllm.train.video_frames import read_frames, video_problem

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_MARKER",
    "VIDEO_MARKER",
    "DataError",
    "JsonlDataset",
    "Sample",
    "SampleEncoder",
    "collate",
    "data_hash",
    "read_samples",
]

IGNORE_INDEX = -100  # label of tokens without loss (torch cross_entropy's ignore_index)
IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
_MARKERS = {IMAGE_MARKER: "image", VIDEO_MARKER: "video"}
_MARKER_PATTERN = "(" + "|".join(re.escape(m) for m in _MARKERS) + ")"
DEFAULT_MAX_PIXELS = 28 * 28 * 64  # 50176: at most 64 merged tokens per image (patch 14, merge 2)
_ROLES = ("human", "gpt")
_CHAT_ROLES = {"human": "user", "gpt": "assistant"}
_MAX_LISTED_ERRORS = 20


class DataError(ValueError):
    """A bad training file or sample; the message is ``"<file>:<line>: <problem>"``.

    ``file``, ``line`` and ``problem`` hold the parts (``line`` is ``None`` for a problem of the
    whole file); ``errors`` lists every ``(line, problem)`` found in the file.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        problem: str | None = None,
        errors: Sequence[tuple[int, str]] = (),
    ) -> None:
        super().__init__(message)
        self.file = file
        self.line = line
        self.problem = problem
        self.errors = list(errors)


@dataclass(frozen=True)
class Sample:
    """One validated sample: its 1-based line, image paths, ``(role, text)`` turns and video
    paths (folders of frames or files).

    Roles are ``"human"`` and ``"gpt"``; texts are as in the file (``<image>`` / ``<video>``
    markers kept, inserted at the start of the first human turn when the file had none).
    """

    line: int
    images: tuple[Path, ...]
    conversations: tuple[tuple[str, str], ...]
    videos: tuple[Path, ...] = ()


class _BadSample(Exception):
    """Internal: why one line is not a usable sample."""


def _media_names(record: dict, key: str) -> list[str]:
    """The paths under ``record[key]`` (a string or a list of strings; absent: none)."""
    value = record.get(key)
    if value is None:
        names: list[str] = []
    elif isinstance(value, str):
        names = [value]
    elif isinstance(value, list) and all(isinstance(n, str) for n in value):
        names = list(value)
    else:
        raise _BadSample(f'"{key}" must be a string or a list of strings')
    if any(not n.strip() for n in names):
        raise _BadSample(f'"{key}" holds an empty path')
    return names


def _parse_line(text: str) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """The image names, video names and turns of one JSONL line; raises :class:`_BadSample`."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadSample(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(record, dict):
        raise _BadSample(f"expected a JSON object, got {type(record).__name__}")

    if "videos" in record or "images" in record:
        # Refused, not skipped silently: media under an unknown key would train on a prompt
        # without them.
        key = "videos" if "videos" in record else "images"
        raise _BadSample(f'unknown key "{key}": use "{key[:-1]}" (a string or a list)')
    names = _media_names(record, "image")
    video_names = _media_names(record, "video")

    turns = record.get("conversations")
    if turns is None:
        raise _BadSample('missing "conversations"')
    if not isinstance(turns, list):
        raise _BadSample('"conversations" must be a list')
    if not turns:
        raise _BadSample('empty "conversations"')
    conversations: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _BadSample(f"turn {i}: expected an object with 'from' and 'value'")
        role, value = turn.get("from"), turn.get("value")
        if role not in _ROLES:
            raise _BadSample(f"turn {i}: role {role!r} is not 'human' or 'gpt'")
        expected = _ROLES[i % 2]
        if role != expected:
            where = "the first turn" if i == 0 else f"turn {i}"
            raise _BadSample(
                f"roles must alternate human/gpt starting with human; {where} is {role!r}"
            )
        if not isinstance(value, str):
            raise _BadSample(f"turn {i}: 'value' must be a string")
        for marker in _MARKERS:
            if role == "gpt" and marker in value:
                raise _BadSample(f"turn {i}: {marker} marker in a gpt turn")
        conversations.append((role, value))
    if conversations[-1][0] != "gpt":
        raise _BadSample("the last turn must be from gpt (an answer to learn)")

    # videos first: the marker inserted last ends up first in the turn
    for marker, media in ((IMAGE_MARKER, names), (VIDEO_MARKER, video_names)):
        markers = sum(text.count(marker) for _, text in conversations)
        if markers == 0 and media:
            conversations[0] = ("human", marker * len(media) + "\n" + conversations[0][1])
        elif markers != len(media):
            what = _MARKERS[marker]
            raise _BadSample(f"{markers} {marker} markers but {len(media)} {what}s")
    return names, video_names, conversations


def _image_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable image, or ``None``."""
    if not path.is_file():
        return f"image not found: {path}"
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # PIL raises many types for broken files
        return f"unreadable image {path}: {type(exc).__name__}: {exc}"
    return None


def read_samples(
    path: str | Path,
    image_root: str | Path,
    *,
    skip_bad: bool = False,
    log: Callable[[str], Any] = print,
) -> list[Sample]:
    """Read and validate every line of the JSONL file ``path``.

    A bad line (invalid JSON, missing or empty ``conversations``, roles that do not alternate
    human/gpt from human to gpt, a number of ``<image>`` (``<video>``) markers different from
    the number of images (videos), an image that does not exist under ``image_root`` or fails
    ``PIL.Image.verify``, a video that is not a folder of such frames or a decodable file)
    raises :class:`DataError` ``"<file>:<line>: <problem>"`` for the first bad line, after every
    line was checked (the message counts, and lists the first few of, the others). With
    ``skip_bad=True`` each bad line is logged as ``"skipping <file>:<line>: <problem>"`` and left
    out. A file with no usable sample raises :class:`DataError` either way.
    """
    path = Path(path)
    root = Path(image_root)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}", file=str(path), problem=str(exc)) from None

    media_checks: dict[tuple[str, Path], str | None] = {}  # (check, path) -> problem
    samples: list[Sample] = []
    errors: list[tuple[int, str]] = []
    for number, line_bytes in enumerate(raw.splitlines(), start=1):
        try:
            text = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8: {exc.reason} at byte {exc.start}"
        else:
            if not text.strip():
                continue
            try:
                names, video_names, conversations = _parse_line(text)
                images = tuple(root / name for name in names)
                videos = tuple(root / name for name in video_names)
                for media, check in [(i, _image_problem) for i in images] + [
                    (v, video_problem) for v in videos
                ]:
                    key = (check.__name__, media)
                    if key not in media_checks:
                        media_checks[key] = check(media)
                    if media_checks[key] is not None:
                        raise _BadSample(media_checks[key])
            except _BadSample as exc:
                problem = str(exc)
            else:
                samples.append(Sample(number, images, tuple(conversations), videos))
                continue
        errors.append((number, problem))
        if skip_bad:
            log(f"skipping {path}:{number}: {problem}")

    if errors and not skip_bad:
        line, problem = errors[0]
        message = f"{path}:{line}: {problem}"
        if len(errors) > 1:
            message += f"\n({len(errors) - 1} more bad lines; skip_bad=True skips them)"
            message += "".join(f"\n{path}:{n}: {p}" for n, p in errors[1 : 1 + _MAX_LISTED_ERRORS])
        raise DataError(message, file=str(path), line=line, problem=problem, errors=errors)
    if not samples:
        what = f"all {len(errors)} samples are bad" if errors else "no samples"
        raise DataError(f"{path}: {what}", file=str(path), problem=what, errors=errors)
    return samples


def data_hash(path: str | Path) -> str:
    """SHA-256 (hex) of the file's bytes, to record which data a scorer was trained on."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _size_get(size: Any, key: str) -> int | None:
    """``size[key]`` of an image processor's ``size`` (a dict or transformers' ``SizeDict``)."""
    if isinstance(size, Mapping):
        return size.get(key)
    return getattr(size, key, None)


def _user_content(text: str) -> list[dict[str, str]]:
    """Chat-message content parts of a human turn: text split at ``<image>`` / ``<video>``
    markers, each marker an ``{"type": "image"}`` / ``{"type": "video"}`` part."""
    pieces = re.split(_MARKER_PATTERN, text)  # text, marker, text, marker, ..., text
    texts, markers = pieces[0::2], pieces[1::2]
    parts: list[dict[str, str]] = []
    for i, piece in enumerate(texts):
        if i > 0 and piece.startswith("\n"):
            piece = piece[1:]  # "<image>\nQuestion"
        if i == len(texts) - 2 and texts[-1] == "" and piece.endswith("\n"):
            piece = piece[:-1]  # "Question\n<image>" at the end of the turn
        if piece:
            parts.append({"type": "text", "text": piece})
        if i < len(markers):
            parts.append({"type": _MARKERS[markers[i]]})
    return parts


class SampleEncoder:
    """Turns a :class:`Sample` into training inputs (the model's chat template) with its processor.

    ``processor`` is the model's ``AutoProcessor`` (e.g. ``Qwen2_5_VLProcessor``). Each image is
    resized into ``[min_pixels, max_pixels]`` pixels of area (see the module docstring for how
    that reaches the processor); ``min_pixels=None`` keeps the processor's own lower bound.
    ``max_length`` truncates the token sequence on the right; a sample whose visual tokens do not
    fit raises ``ValueError``. After truncation a sample may have no labelled token left.

    Videos: at most ``max_frames`` frames of each (spread evenly, see
    :func:`~vs_vllm.train.video_frames.read_frames`), ``video_fps`` for folders of frames;
    the processor gets them as they are (``do_sample_frames=False``) with their metadata, and
    ``video_max_pixels`` (when given) as its ``size["longest_edge"]`` (what that bounds, one
    frame or the whole clip, is the video processor's rule).

    The conversation is rendered with the processor's chat template (images and videos as
    ``{"type": "image"}`` / ``{"type": "video"}`` parts where the markers were, plus whatever the
    template adds, e.g. a default system turn). The rendered text is cut into pieces at each
    answer (answer text plus the adapter's ``end_of_turn``), each piece is run
    through the processor with its own images, and the token ids are concatenated; so the
    labelled tokens decode to exactly the answers, and the prompt tokens are the ones inference
    sees before the model answers.

    Returns, for one sample: ``input_ids``, ``attention_mask``, ``labels`` (``(L,)``, long),
    ``mm_token_type_ids`` (``(L,)``, when the processor returns it) and, when the sample has
    images, ``pixel_values`` (``(sum of grid products, C)``) and ``image_grid_thw``
    (``(n_images, 3)``); when it has videos, ``pixel_values_videos``, ``video_grid_thw``
    (``(n_videos, 3)``) and, when the processor gives it, ``second_per_grid_ts``.
    """

    def __init__(
        self,
        processor: Any,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_pixels: int | None = None,
        max_length: int | None = None,
        max_frames: int = 16,
        video_fps: float = 2.0,
        video_max_pixels: int | None = None,
    ) -> None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}")
        if video_fps <= 0:
            raise ValueError(f"video_fps must be positive, got {video_fps}")
        if video_max_pixels is not None and video_max_pixels <= 0:
            raise ValueError(f"video_max_pixels must be positive, got {video_max_pixels}")
        if max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")
        if min_pixels is None:
            size = getattr(getattr(processor, "image_processor", None), "size", None)
            own_min = _size_get(size, "shortest_edge") if size is not None else None
            min_pixels = min(own_min or 56 * 56, max_pixels)
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(
                f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}"
            )
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.processor = processor
        self.adapter = adapter_for_processor(processor)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_pixels = max_pixels
        self.min_pixels = min_pixels
        self.max_length = max_length
        self.max_frames = max_frames
        self.video_fps = video_fps
        self.video_max_pixels = video_max_pixels
        self.image_token: str = getattr(processor, "image_token", "<|image_pad|>")
        self.image_token_id: int = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token: str = getattr(processor, "video_token", "<|video_pad|>")
        self.video_token_id: int = self.tokenizer.convert_tokens_to_ids(self.video_token)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        self.pad_token_id: int = int(pad) if pad is not None else 0

    def messages(self, sample: Sample) -> list[dict[str, Any]]:
        """The sample as chat messages (``user`` / ``assistant``) for the chat template."""
        return [
            {
                "role": _CHAT_ROLES[role],
                # An answer is plain text: every template renders a string as it is (some
                # write a list of parts as its Python repr).
                "content": _user_content(text) if role == "human" else text,
            }
            for role, text in sample.conversations
        ]

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def pieces(self, sample: Sample) -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, is_answer)`` pieces, in order."""
        messages = self.messages(sample)
        full = self._render(messages, False)
        pieces: list[tuple[str, bool]] = []
        pos = 0
        for j, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self._render(messages[:j], True)
            answer = message["content"] + self.adapter.end_of_turn
            if not full.startswith(prefix) or not full.startswith(answer, len(prefix)):
                raise ValueError(
                    f"sample at line {sample.line}: the chat template does not render answer "
                    f"{j // 2} verbatim after the generation prompt, closed by "
                    f"{self.adapter.end_of_turn!r}"
                )
            if len(prefix) > pos:
                pieces.append((full[pos : len(prefix)], False))
            pieces.append((answer, True))
            pos = len(prefix) + len(answer)
        if pos < len(full):
            pieces.append((full[pos:], False))
        return pieces

    def _videos_kwargs(self, videos: Sequence[Any]) -> dict[str, Any]:
        from transformers.video_utils import VideoMetadata

        kwargs: dict[str, Any] = {
            "video_metadata": [
                VideoMetadata(
                    total_num_frames=v.total_frames, fps=v.fps, frames_indices=list(v.indices)
                )
                for v in videos
            ],
            "do_sample_frames": False,
        }
        if self.video_max_pixels is not None:
            own = getattr(getattr(self.processor, "video_processor", None), "size", None)
            low = _size_get(own, "shortest_edge") if own is not None else None
            kwargs["size"] = {
                "shortest_edge": min(low or 1, self.video_max_pixels),
                "longest_edge": self.video_max_pixels,
            }
        return kwargs

    def __call__(self, sample: Sample) -> dict[str, Tensor]:
        images = []
        for path in sample.images:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        videos = [
            read_frames(p, max_frames=self.max_frames, fps=self.video_fps) for p in sample.videos
        ]

        ids: list[Tensor] = []
        labels: list[Tensor] = []
        type_ids: list[Tensor] = []
        media: dict[str, list[Tensor]] = {}
        used = used_videos = 0
        for text, is_answer in self.pieces(sample):
            count = text.count(self.image_token)
            piece_images = images[used : used + count]
            used += count
            video_count = text.count(self.video_token)
            piece_videos = videos[used_videos : used_videos + video_count]
            used_videos += video_count
            if len(piece_images) != count or len(piece_videos) != video_count:
                raise ValueError(
                    f"sample at line {sample.line}: the chat template has more image or video "
                    f"placeholders than the sample's {len(images)} images and "
                    f"{len(videos)} videos"
                )
            kwargs: dict[str, Any] = {}
            if piece_videos:
                kwargs["videos"] = [v.frames for v in piece_videos]
                kwargs["videos_kwargs"] = self._videos_kwargs(piece_videos)
            out = self.processor(
                text=[text],
                images=piece_images or None,
                return_tensors="pt",
                add_special_tokens=False,
                images_kwargs=self.adapter.hf_images_kwargs(self.min_pixels, self.max_pixels),
                **kwargs,
            )
            out = {**out, **self.adapter.hf_item_fields(self.processor, out)}
            piece_ids = out["input_ids"][0].long()
            ids.append(piece_ids)
            labels.append(piece_ids.clone() if is_answer else torch.full_like(piece_ids, -100))
            if "mm_token_type_ids" in out:
                type_ids.append(out["mm_token_type_ids"][0].long())
            for modality, present in (("image", piece_images), ("video", piece_videos)):
                fields = self.adapter.fields(modality)  # type: ignore[arg-type]
                for key in () if fields is None or not present else fields.names:
                    if key in out:
                        value = out[key]
                        media.setdefault(key, []).append(
                            value.long() if key == fields.grid else value
                        )
        if used != len(images) or used_videos != len(videos):
            raise ValueError(
                f"sample at line {sample.line}: {len(images)} images and {len(videos)} videos "
                f"but the chat template rendered {used} image and {used_videos} video "
                "placeholders"
            )

        input_ids = torch.cat(ids)
        result: dict[str, Tensor] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": torch.cat(labels),
        }
        if type_ids and len(type_ids) == len(ids):
            result["mm_token_type_ids"] = torch.cat(type_ids)
        result.update({key: torch.cat(parts) for key, parts in media.items()})

        if self.max_length is not None and input_ids.numel() > self.max_length:
            visual = (input_ids == self.image_token_id) | (input_ids == self.video_token_id)
            visual_at = visual.nonzero()  # ok-sync: data preparation (CPU)
            if (
                visual_at.numel() and int(visual_at[-1]) + 2 > self.max_length
            ):  # ok-sync: CPU data loading; + the media end token
                raise ValueError(
                    f"sample at line {sample.line}: {input_ids.numel()} tokens; its visual "
                    f"tokens do not fit in max_length={self.max_length}"
                )
            for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
                if key in result:
                    result[key] = result[key][: self.max_length]
        return result

    def collate(self, batch: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """:func:`collate` with this processor's pad token id and fields."""
        return collate(batch, pad_token_id=self.pad_token_id, adapter=self.adapter)


def collate(
    batch: Sequence[Mapping[str, Tensor]],
    pad_token_id: int = 0,
    *,
    adapter: ModelAdapter,
) -> dict[str, Tensor]:
    """Batch encoded samples (from :class:`SampleEncoder`) for the model.

    ``input_ids`` are right-padded with ``pad_token_id``, ``attention_mask`` with 0, ``labels``
    with -100 and ``mm_token_type_ids`` (when every sample has it) with 0, all to ``(B, L_max)``.
    ``pixel_values`` and ``image_grid_thw`` of the samples are concatenated in batch order
    (left out when no sample has an image) and ``num_images`` ``(B,)`` says how many
    ``image_grid_thw`` rows belong to each sample, so samples may have 0, 1 or several images;
    likewise ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts`` and
    ``num_videos`` for videos.
    """
    if not batch:
        raise ValueError("collate needs at least one sample")
    lengths = [int(item["input_ids"].numel()) for item in batch]
    width = max(lengths)
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    if all("mm_token_type_ids" in item for item in batch):
        fills["mm_token_type_ids"] = 0
    out: dict[str, Tensor] = {}
    for key, fill in fills.items():
        padded = torch.full((len(batch), width), fill, dtype=batch[0][key].dtype)
        for row, (item, length) in enumerate(zip(batch, lengths, strict=True)):
            padded[row, :length] = item[key]
        out[key] = padded
    for modality, count_key in (("image", "num_images"), ("video", "num_videos")):
        fields = adapter.fields(modality)  # type: ignore[arg-type]
        if fields is None:
            continue
        grid_key = fields.grid
        with_media = [item for item in batch if grid_key in item]
        for key in fields.names:
            if with_media and all(key in item for item in with_media):
                out[key] = torch.cat([item[key] for item in with_media])
        out[count_key] = torch.tensor(
            [item[grid_key].shape[0] if grid_key in item else 0 for item in batch],
            dtype=torch.long,
        )
    return out


class JsonlDataset(torch.utils.data.Dataset):
    """Validated samples plus a :class:`SampleEncoder`; item ``i`` is always the same tensors.

    Nothing is random here (shuffling is the sampler's job), so an index gives the same inputs
    in every epoch and every worker. Use :meth:`collate` as the ``DataLoader``'s ``collate_fn``.
    """

    def __init__(self, samples: Sequence[Sample], encoder: SampleEncoder) -> None:
        if not samples:
            raise ValueError("JsonlDataset needs at least one sample")
        self.samples = list(samples)
        self.encoder = encoder

    @classmethod
    def from_jsonl(
        cls,
        path: str | Path,
        image_root: str | Path,
        processor: Any,
        *,
        skip_bad: bool = False,
        log: Callable[[str], Any] = print,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_pixels: int | None = None,
        max_length: int | None = None,
        **video_options: Any,
    ) -> JsonlDataset:
        """Read ``path`` with :func:`read_samples` and encode with a new :class:`SampleEncoder`
        (``video_options``: its ``max_frames``, ``video_fps``, ``video_max_pixels``)."""
        samples = read_samples(path, image_root, skip_bad=skip_bad, log=log)
        encoder = SampleEncoder(
            processor,
            max_pixels=max_pixels,
            min_pixels=min_pixels,
            max_length=max_length,
            **video_options,
        )
        return cls(samples, encoder)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.encoder(self.samples[index])

    def collate(self, batch: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """:func:`collate` with the processor's pad token id."""
        return self.encoder.collate(batch)
