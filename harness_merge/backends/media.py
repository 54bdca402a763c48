"""Audio and video inputs for backends: what lmms-eval 0.7.3 hands a model
(an audio dict ``{"array", "sampling_rate"}``, a video file path) turned into
what a processor takes.

- audio: a mono float32 waveform at the feature extractor's sampling rate
  (lmms-eval's qwen2_audio class resamples with librosa; here
  ``scipy.signal.resample_poly``, linear interpolation without scipy), split
  into chunks of the extractor's ``n_samples`` (30 s for Whisper), one audio
  item per chunk, as lmms-eval's ``split_audio`` does. A datasets ``Audio``
  cell decoded by torchcodec (an ``AudioDecoder``) is read with
  ``get_all_samples()``;
- video: ``num_frames`` RGB frames sampled uniformly over the clip (as
  lmms-eval's llava_vid / video_llava classes sample with decord / PyAV),
  decoded with PyAV.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import BackendError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif", ".flv", ".wmv")


def is_audio(v: Any) -> bool:
    """An lmms-eval audio visual: a mapping with ``array`` and ``sampling_rate``
    (or a torchcodec ``AudioDecoder``, what datasets 4+ decode an Audio cell to)."""
    return (isinstance(v, Mapping) and "array" in v and "sampling_rate" in v) or hasattr(v, "get_all_samples")


def as_audio_dict(v: Any) -> dict:
    if isinstance(v, Mapping):
        return {"array": v["array"], "sampling_rate": v["sampling_rate"]}
    s = v.get_all_samples()  # torchcodec AudioSamples: data (channels, samples), sample_rate
    return {"array": s.data.float().mean(0).numpy(), "sampling_rate": int(s.sample_rate)}


def split_audio(arr, chunk: int) -> list:
    """``arr`` in consecutive pieces of at most ``chunk`` samples."""
    return [arr[i : i + chunk] for i in range(0, len(arr), chunk)] or [arr]


def is_video(v: Any) -> bool:
    """An lmms-eval video visual: a path (str / Path) to a video file."""
    return isinstance(v, (str, Path)) and str(v).lower().endswith(VIDEO_SUFFIXES)


def audio_waveform(v: Mapping, target_sr: int):
    """``v``'s waveform as mono float32 at ``target_sr`` Hz."""
    import numpy as np

    arr = np.asarray(v["array"], dtype=np.float32)
    sr = int(v["sampling_rate"])
    if arr.ndim == 2:  # (channels, samples) or (samples, channels): average the channels
        arr = arr.mean(axis=0 if arr.shape[0] < arr.shape[1] else 1)
    if arr.ndim != 1 or arr.size == 0 or sr <= 0:
        raise BackendError(
            f"audio input: expected a non-empty 1-D waveform and a positive rate, got "
            f"shape {list(arr.shape)} at {sr} Hz"
        )
    if sr != target_sr:
        try:
            from math import gcd

            from scipy.signal import resample_poly

            g = gcd(target_sr, sr)
            arr = resample_poly(arr, target_sr // g, sr // g).astype(np.float32)
        except ImportError:
            n = max(1, round(arr.size * target_sr / sr))
            arr = np.interp(np.linspace(0, arr.size - 1, n), np.arange(arr.size), arr).astype(np.float32)
    return arr


def video_frames(video: str | Path | Sequence, num_frames: int) -> list:
    """``num_frames`` RGB PIL frames sampled uniformly (``np.linspace`` over the
    decoded frames, rounded) from a video file; a sequence of frames is
    sampled the same way."""
    import numpy as np

    if isinstance(video, (str, Path)):
        try:
            import av
        except ImportError as e:  # pragma: no cover - av is in the lock
            raise BackendError("video input needs PyAV (package 'av')") from e
        try:
            with av.open(str(video)) as c:
                frames = [f.to_image() for f in c.decode(video=0)]
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"cannot decode the video {video}: {type(e).__name__}: {e}") from e
        if not frames:
            raise BackendError(f"the video {video} has no frames")
    else:
        from PIL import Image

        frames = [f if hasattr(f, "convert") else Image.fromarray(np.asarray(f)) for f in video]
    idx = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    return [frames[i].convert("RGB") for i in idx]


__all__ = [
    "VIDEO_SUFFIXES",
    "as_audio_dict",
    "audio_waveform",
    "is_audio",
    "is_video",
    "split_audio",
    "video_frames",
]
