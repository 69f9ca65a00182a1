"""Video files -> ``(T, H, W, 3)`` uint8 frames: mp4 / webm / mkv / avi / mov via PyAV, GIFs and frame folders via Pillow.

Frames are first clipped to ``[start, end)`` seconds (when given), then sampled at ``fps`` (when given),
then to ``num_frames`` uniformly spaced frames (when given; index ``floor(i * T / n)``, HF's rule).
Times come from the container (PyAV presentation timestamps, GIF frame durations); a folder of frame
images has no clock, so it is read at ``folder_fps`` frames per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import UInt8

__all__ = ["VideoDecodeError", "DecodedVideo", "CONTAINER_SUFFIXES", "read_video", "write_mp4", "sample_times"]

CONTAINER_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
ANIMATED_SUFFIXES = (".gif", ".webp", ".apng", ".png")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class VideoDecodeError(ValueError):
    """A video is missing, cannot be decoded, or has no frames in the requested window."""


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled frames, the time (s) of each, and how many frames the source held in the window."""

    frames: UInt8[np.ndarray, "time height width 3"]
    times: tuple[float, ...]
    source_frames: int
    fps: float

    @property
    def effective_fps(self) -> float:
        """Frames per second of the sampled frames (the model's clock for temporal positions)."""
        if len(self.times) < 2:
            return self.fps
        span = self.times[-1] - self.times[0]
        return (len(self.times) - 1) / span if span > 0 else self.fps


def _decode_container(path: Path) -> tuple[list[np.ndarray], list[float], float]:
    try:
        import av
    except ImportError as err:  # the optional extra
        raise VideoDecodeError(
            f"{path}: decoding {path.suffix} files needs PyAV; install it with `pip install \"hooked-vlm[video]\"`, "
            "or pass a folder of frames or a GIF instead."
        ) from err
    frames, times = [], []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path} holds no video stream; pass a video file, a GIF or a folder of frames.")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            for k, frame in enumerate(container.decode(stream)):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.time) if frame.time is not None else k / rate)
    except VideoDecodeError:
        raise
    except Exception as err:  # av.error.InvalidDataError and friends
        raise VideoDecodeError(f"{path} cannot be decoded ({type(err).__name__}: {err}); check the file, or re-encode it "
                               "(e.g. `ffmpeg -i in -c:v libx264 out.mp4`).") from err
    if not frames:
        raise VideoDecodeError(f"{path} decoded to no frames; check the file.")
    t0 = times[0]
    return frames, [t - t0 for t in times], rate


def _decode_animated(path: Path) -> tuple[list[np.ndarray], list[float], float]:
    from PIL import Image, ImageSequence, UnidentifiedImageError

    frames, times, clock = [], [], 0.0
    try:
        with Image.open(path) as image:
            for frame in ImageSequence.Iterator(image):
                frames.append(np.asarray(frame.convert("RGB")))
                times.append(clock)
                clock += float(frame.info.get("duration", 100) or 100) / 1000.0
    except (UnidentifiedImageError, OSError) as err:
        raise VideoDecodeError(f"{path} cannot be decoded as an animated image ({err}); check the file.") from err
    rate = (len(times) - 1) / times[-1] if len(times) > 1 and times[-1] > 0 else 10.0
    return frames, times, rate


def _decode_folder(path: Path, folder_fps: float) -> tuple[list[np.ndarray], list[float], float]:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise VideoDecodeError(f"{path} is a folder without frame images ({', '.join(FRAME_SUFFIXES)}); add frames or fix --video_root.")
    frames = []
    for f in files:
        try:
            with Image.open(f) as image:
                frames.append(np.asarray(image.convert("RGB")))
        except (UnidentifiedImageError, OSError) as err:
            raise VideoDecodeError(f"frame {f} cannot be decoded ({err}); replace or remove it.") from err
    return frames, [k / folder_fps for k in range(len(frames))], folder_fps


def sample_times(times: list[float], fps: float) -> list[int]:
    """Indices of the frames nearest to ``t0, t0 + 1/fps, ...`` (each source frame at most once)."""
    if not times:
        return []
    t0, t1 = times[0], times[-1]
    wanted = [t0 + k / fps for k in range(int(math.floor((t1 - t0) * fps + 1e-9)) + 1)]
    arr = np.asarray(times)
    picked: list[int] = []
    for t in wanted:
        i = int(np.abs(arr - t).argmin())
        if not picked or i != picked[-1]:
            picked.append(i)
    return picked


def read_video(
    path: str | Path, num_frames: int | None = None, fps: float | None = None, start: float | None = None,
    end: float | None = None, folder_fps: float = 2.0,
) -> DecodedVideo:
    """Decode ``path`` and sample it (see the module docstring); raises :class:`VideoDecodeError` naming the problem."""
    path = Path(path)
    if not path.exists():
        raise VideoDecodeError(f"video {path} does not exist; check video_name and --video_root.")
    if path.is_dir():
        frames, times, rate = _decode_folder(path, folder_fps)
    elif path.suffix.lower() in ANIMATED_SUFFIXES:
        frames, times, rate = _decode_animated(path)
    else:
        frames, times, rate = _decode_container(path)
    if len({f.shape for f in frames}) != 1:
        raise VideoDecodeError(f"{path}: frames differ in size {sorted({f.shape for f in frames})}; resize them to one size.")
    keep = list(range(len(frames)))
    if start is not None or end is not None:
        lo = -math.inf if start is None else float(start)
        hi = math.inf if end is None else float(end)
        if hi <= lo:
            raise VideoDecodeError(f"{path}: start {start} is not before end {end}; fix the annotation.")
        keep = [k for k in keep if lo - 1e-6 <= times[k] < hi - 1e-6]
        if not keep:
            raise VideoDecodeError(
                f"{path}: no frame between start={start} s and end={end} s (the video lasts {times[-1] + 1 / rate:.2f} s); fix the annotation."
            )
    if fps is not None:
        keep = [keep[i] for i in sample_times([times[k] for k in keep], fps)]
    window = len(keep)
    if num_frames is not None:
        if num_frames > window:
            raise VideoDecodeError(f"{path}: asked for {num_frames} frames but the clip has {window} in its window; "
                                   f"lower --num_frames (at most {window}) or --fps.")
        keep = [keep[int(i * window / num_frames)] for i in range(num_frames)]
    return DecodedVideo(np.stack([frames[k] for k in keep]), tuple(times[k] for k in keep), window,
                        fps if fps is not None else rate)


def write_mp4(frames: UInt8[np.ndarray, "time height width 3"], path: str | Path, fps: float = 2.0) -> Path:
    """Write frames as an H.264 mp4 (yuv444p, lossless qp 0 where libx264 exists; else MPEG-4 at top quality)."""
    import av

    path = Path(path)
    frames = np.asarray(frames, dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        try:
            stream = container.add_stream("libx264", rate=int(round(fps)) if float(fps).is_integer() else fps)
            stream.pix_fmt, stream.options = "yuv444p", {"qp": "0", "preset": "veryfast"}
        except Exception:  # noqa: BLE001 - an FFmpeg build without libx264
            stream = container.add_stream("mpeg4", rate=int(round(fps)))
            stream.pix_fmt, stream.options = "yuv420p", {"qscale": "1"}
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
