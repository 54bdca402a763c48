"""Audio and video QA tasks of the modality-merging table (the MLLM merging
benchmark, Table 4 / Appendix D): prompts, visuals and scoring.

What the tasks hand the model is what lmms-eval 0.7.3's own audio/video tasks
hand theirs: an audio task's ``doc_to_visual`` returns the dataset's audio
cell (``{"array", "sampling_rate"}``), a video task's returns the path of the
clip under ``$HF_HOME/<cache dir>/`` (as ``_task_utils.video_loader.get_video``
resolves NExT-QA's ``$HF_HOME/nextqa/NExTVideo/<id>.mp4``).
"""

from __future__ import annotations

import json
import os
import re
import string

OPTIONS = ["A", "B", "C", "D", "E"]
VIDEO_DIRS = {
    "nextqa": ("nextqa", "NExTVideo"),
    "music_avqa": ("music_avqa", "videos"),
    "avqa": ("avqa", "videos"),
}


def _hf_home() -> str:
    return os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")


def video_path(dataset: str, video_id) -> str:
    """``$HF_HOME/<cache dir>/<sub dir>/<id>.mp4`` (``.MP4`` tried too); a missing
    clip is an error naming the paths tried."""
    base = os.path.join(_hf_home(), *VIDEO_DIRS[dataset])
    name = str(video_id)
    tried = [
        os.path.abspath(os.path.join(base, name if name.lower().endswith(".mp4") else f"{name}.{s}"))
        for s in ("mp4", "MP4")
    ]
    for p in tried:
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{dataset}: video {video_id!r} not found (tried {tried}); put the clips there")


def _norm(s: str) -> str:
    s = str(s).strip().lower()
    return s.translate(str.maketrans("", "", string.punctuation)).strip()


# -------------------------------------------------------------- NExT-QA (video, MC)
def nextqa_doc_to_visual(doc):
    return [video_path("nextqa", doc["video"])]


def nextqa_doc_to_text_mc(doc, lmms_eval_specific_kwargs=None):
    """The question, then ``A. <a0>`` ... ``E. <a4>`` one a line (lmms-eval's nextqa MC prompt)."""
    kw = lmms_eval_specific_kwargs or {}
    lines = [doc["question"].strip()] + [f"{OPTIONS[i]}. {doc[f'a{i}'].strip()}" for i in range(5)]
    return f"{kw.get('pre_prompt', '')}{chr(10).join(lines)}{kw.get('post_prompt', '')}"


def nextqa_doc_to_target(doc):
    return OPTIONS[int(doc["answer"])]


def parse_option(response: str, doc, options: list[str] | None = None) -> str | None:
    """The option a free-form answer picks: a standalone letter (``B``, ``(B)``,
    ``B.``), else the one option whose text the answer contains. ``options``:
    the option texts (default NExT-QA's ``a0``-``a4``)."""
    options = options if options is not None else [doc[f"a{i}"] for i in range(5)]
    letters = OPTIONS[: len(options)]
    m = re.search(r"(?<![A-Za-z])\(?([" + "".join(letters) + r"])\)?(?![A-Za-z])", response.strip())
    if m:
        return m.group(1)
    hits = [letters[i] for i, o in enumerate(options) if _norm(o) and _norm(o) in _norm(response)]
    return hits[0] if len(hits) == 1 else None


def nextqa_mc_process_results(doc, results):
    return {"exact_match": float(parse_option(results[0], doc) == nextqa_doc_to_target(doc))}


# -------------------------------------------------------------- MUSIC-AVQA (audio-visual QA)
def _templ_values(doc) -> list[str]:
    v = doc.get("templ_values") or "[]"
    return list(json.loads(v)) if isinstance(v, str) else list(v)


def music_avqa_question(doc) -> str:
    """``question_content`` with each ``<...>`` slot filled from ``templ_values`` in order
    (MUSIC-AVQA's question templates, e.g. "Is the <Object> playing longer?")."""
    vals = iter(_templ_values(doc))
    return re.sub(r"<[^<>]+>", lambda m: next(vals, m.group(0)), doc["question_content"]).strip()


def music_avqa_doc_to_visual(doc):
    return [video_path("music_avqa", doc["video_id"])]


def music_avqa_doc_to_audio(doc):
    """The clip's audio track, as lmms-eval audio tasks hand it: ``{"array", "sampling_rate"}``."""
    return _audio_track(video_path("music_avqa", doc["video_id"]), doc["video_id"])


def _audio_track(path: str, name) -> list[dict]:
    import av
    import numpy as np

    with av.open(path) as c:
        if not c.streams.audio:
            raise ValueError(f"video {name} ({path}) has no audio track")
        stream = c.streams.audio[0]
        chunks = [f.to_ndarray() for f in c.decode(stream)]
        sr = stream.rate
    arr = np.concatenate([x.reshape(x.shape[0], -1) if x.ndim == 2 else x[None] for x in chunks], axis=1)
    return [{"array": arr.astype(np.float32).mean(axis=0), "sampling_rate": int(sr)}]


def music_avqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{music_avqa_question(doc)}{kw.get('post_prompt', '')}"


def music_avqa_process_results(doc, results):
    """Exact match of the first word of the answer with ``anser`` (the dataset's
    spelling), case and punctuation ignored: answers are single words."""
    words = _norm(results[0]).split()
    return {"exact_match": float(bool(words) and words[0] == _norm(doc["anser"]))}


# -------------------------------------------------------------- AVQA (audio-visual QA, 4 choices)
def _avqa_choices(doc) -> list[str]:
    v = doc["multi_choice"]
    return list(json.loads(v)) if isinstance(v, str) else list(v)


def avqa_doc_to_visual(doc):
    return [video_path("avqa", doc["video_name"])]


def avqa_doc_to_audio(doc):
    """The clip's audio track (see :func:`music_avqa_doc_to_audio`)."""
    return _audio_track(video_path("avqa", doc["video_name"]), doc["video_name"])


def avqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The question, then ``A. <choice>`` ... one a line (AVQA has four)."""
    kw = lmms_eval_specific_kwargs or {}
    lines = [doc["question_text"].strip()] + [f"{OPTIONS[i]}. {c}" for i, c in enumerate(_avqa_choices(doc))]
    return f"{kw.get('pre_prompt', '')}{chr(10).join(lines)}{kw.get('post_prompt', '')}"


def avqa_doc_to_target(doc):
    return OPTIONS[int(doc["answer"])]


def avqa_process_results(doc, results):
    picked = parse_option(results[0], doc, _avqa_choices(doc))
    return {"exact_match": float(picked == avqa_doc_to_target(doc))}


# -------------------------------------------------------------- audio-visual: the clip and its audio track
def music_avqa_doc_to_av(doc):
    """``[video path, audio dict]``: both inputs of the audio-visual question."""
    return music_avqa_doc_to_visual(doc) + music_avqa_doc_to_audio(doc)


def avqa_doc_to_av(doc):
    return avqa_doc_to_visual(doc) + avqa_doc_to_audio(doc)
