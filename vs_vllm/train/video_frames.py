"""Video frames of training samples: a folder of frame images or one video file.

* **A folder**: every file in it with an image suffix (``.png``, ``.jpg``, ``.jpeg``,
  ``.webp``, ``.bmp``), in natural name order (``frame_2.png`` before ``frame_10.png``); a
  folder holds no frame rate, so the caller's ``fps`` is used.
* **A multi-frame image file** PIL decodes (animated ``.gif``, ``.webp``, ``.png`` (APNG),
  multi-page ``.tif``): every frame; the frame rate comes from the file's frame durations
  when it has them.
* **Any other file** (``.mp4``, ``.avi``, ``.mkv``, ``.mov``, ``.webm``, ...): decoded with
  OpenCV, the decoder vLLM's own video loader uses (``opencv-python-headless`` is one of
  vLLM's requirements). torchvision cannot decode video here: its video reader needs PyAV,
  which this stack does not install.

At most ``max_frames`` frames are kept, spread evenly over the video (the first and the last
included), the way vLLM samples a video's frames. :func:`read_frames` returns them as one
``(T, H, W, 3)`` uint8 RGB array with the frame rate of the kept frames' source and their
indices, which is what transformers' video processors take (``video_metadata``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

__all__ = ["FRAME_SUFFIXES", "VideoFrames", "frame_files", "read_frames", "video_problem"]

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_PIL_VIDEO_SUFFIXES = (".gif", ".webp", ".png", ".apng", ".tif", ".tiff")


@dataclass(frozen=True)
class VideoFrames:
    """Decoded frames: ``frames`` (T, H, W, 3) uint8 RGB, the source's ``fps``, its
    ``total_frames`` and the ``indices`` (in the source) of the kept frames."""

    frames: np.ndarray
    fps: float
    total_frames: int
    indices: tuple[int, ...]


def _natural_key(path: Path) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def frame_files(folder: Path) -> list[Path]:
    """The frame images of a folder, in natural name order."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
    return sorted(files, key=_natural_key)


def _spread(total: int, max_frames: int) -> list[int]:
    """``min(total, max_frames)`` indices spread evenly over ``range(total)``, ends included."""
    if total <= max_frames:
        return list(range(total))
    if max_frames == 1:
        return [0]
    return [round(i * (total - 1) / (max_frames - 1)) for i in range(max_frames)]


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _same_size(frames: list[np.ndarray], source: Path) -> np.ndarray:
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"{source}: frames of different sizes {sorted(shapes)}")
    return np.stack(frames)


def _read_folder(folder: Path, max_frames: int, fps: float) -> VideoFrames:
    files = frame_files(folder)
    if not files:
        raise ValueError(f"{folder}: no frame images ({', '.join(FRAME_SUFFIXES)})")
    keep = _spread(len(files), max_frames)
    frames = []
    for i in keep:
        with Image.open(files[i]) as img:
            frames.append(_rgb(img))
    return VideoFrames(_same_size(frames, folder), fps, len(files), tuple(keep))


def _read_pil(path: Path, max_frames: int, fps: float) -> VideoFrames | None:
    """Frames of a multi-frame image file, or ``None`` when PIL cannot open it (OpenCV may).
    A still image (one frame) raises ``ValueError``."""
    try:
        img = Image.open(path)
    except Exception:  # not an image PIL knows: leave it to OpenCV
        return None
    with img:
        total = int(getattr(img, "n_frames", 1))
        if total < 2:
            raise ValueError(
                f"{path}: a still image (one frame), not a video; use a folder of frames, a "
                'multi-frame file or put it under "image"'
            )
        keep = set(_spread(total, max_frames))
        frames, durations = [], []
        for i, frame in enumerate(ImageSequence.Iterator(img)):
            durations.append(frame.info.get("duration") or 0)
            if i in keep:
                frames.append(_rgb(frame))
    mean_ms = sum(durations) / len(durations)
    return VideoFrames(
        _same_size(frames, path),
        1000.0 / mean_ms if mean_ms > 0 else fps,
        total,
        tuple(sorted(keep)),
    )


def _cv2(path: Path):
    try:
        import cv2
    except ImportError:
        raise ValueError(
            f"{path}: decoding video files needs OpenCV (pip install opencv-python-headless); "
            "a folder of frame images needs nothing more"
        ) from None
    return cv2


def _probe_opencv(path: Path) -> None:
    """Raise ``ValueError`` unless OpenCV opens ``path`` and decodes its first frame."""
    cap = _cv2(path).VideoCapture(str(path))
    try:
        if not cap.isOpened() or not cap.read()[0]:
            raise ValueError(f"{path}: not a video OpenCV can decode")
    finally:
        cap.release()


def _read_opencv(path: Path, max_frames: int, fps: float) -> VideoFrames:
    cv2 = _cv2(path)
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError(f"{path}: not a video OpenCV can decode")
        decoded = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            decoded.append(frame)
        source_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    finally:
        cap.release()
    if not decoded:
        raise ValueError(f"{path}: no frame could be decoded")
    keep = _spread(len(decoded), max_frames)
    frames = [cv2.cvtColor(decoded[i], cv2.COLOR_BGR2RGB) for i in keep]
    return VideoFrames(
        _same_size(frames, path), source_fps if source_fps > 0 else fps, len(decoded), tuple(keep)
    )


def read_frames(path: str | Path, *, max_frames: int = 16, fps: float = 2.0) -> VideoFrames:
    """The frames of a video (folder or file, see the module docstring), at most ``max_frames``
    spread evenly; ``fps`` is the frame rate of a folder (or of a file that has none).

    Raises ``ValueError`` naming the path for anything that is not a readable video."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, max_frames, fps)
    if not path.is_file():
        raise ValueError(f"video not found: {path}")
    if path.suffix.lower() in _PIL_VIDEO_SUFFIXES:
        frames = _read_pil(path, max_frames, fps)
        if frames is not None:
            return frames
    return _read_opencv(path, max_frames, fps)


def video_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable video, or ``None`` (folders: every frame file passes
    ``PIL.Image.verify``; files: at least one frame decodes)."""
    if path.is_dir():
        files = frame_files(path)
        if not files:
            return f"no frame images ({', '.join(FRAME_SUFFIXES)}) in video folder {path}"
        for file in files:
            try:
                with Image.open(file) as img:
                    img.verify()
            except Exception as exc:  # PIL raises many types for broken files
                return f"unreadable frame {file}: {type(exc).__name__}: {exc}"
        return None
    if not path.exists():
        return f"video not found: {path}"
    try:
        if path.suffix.lower() in _PIL_VIDEO_SUFFIXES and _read_pil(path, 1, 1.0) is not None:
            return None
        _probe_opencv(path)
    except ValueError as exc:
        return str(exc)
    return None
