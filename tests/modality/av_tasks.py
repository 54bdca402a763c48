"""Tiny offline copies of the audio/video task configs (task_configs/modality):
parquet files in the real datasets' schemas, clips under ``$HF_HOME`` where the
tasks look for them, and two multiple-choice mini tasks (log-likelihoods, so a
test can compare the scores of two models). Used by the modality tests."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "task_configs" / "modality"

TONES = (440.0, None)  # ClothoAQA rows: a 440 Hz tone, silence
CLIP_TONES = (440.0, 2000.0)  # MUSIC-AVQA clips' audio tracks
COLORS = (((200, 30, 30), (200, 30, 30)), ((30, 30, 200), (30, 200, 30)))


def _waveform(tone):
    import numpy as np

    t = np.arange(16000) / 16000
    return (0.5 * np.sin(2 * np.pi * tone * t) if tone else np.zeros_like(t)).astype("float32")


def _rewrite(yaml_path: Path, parquet: Path) -> None:
    """Point a task YAML at ``parquet`` (text edit: dataset_path / dataset_name / dataset_kwargs)."""
    text = yaml_path.read_text()
    split = re.search(r"^test_split: (\S+)$", text, re.M).group(1)
    text = re.sub(r"^dataset_path: .*$", "dataset_path: parquet", text, flags=re.M)
    text = re.sub(r"^dataset_name: .*\n", "", text, flags=re.M)
    text = re.sub(
        r"^dataset_kwargs:\n(?:  .*\n)*",
        f"dataset_kwargs:\n  data_files:\n    {split}: {parquet}\n",
        text,
        flags=re.M,
    )
    yaml_path.write_text(text)


def _parquet(rows, feats, path: Path) -> Path:
    import datasets

    datasets.Dataset.from_list(rows, features=datasets.Features(feats)).to_parquet(str(path))
    return path


def audio_feature():
    """The audio column: ``{"array", "sampling_rate"}`` as a struct (what an
    Audio cell decodes to; the Audio feature itself needs torchcodec)."""
    import datasets

    return {"array": datasets.Sequence(datasets.Value("float32")), "sampling_rate": datasets.Value("int64")}


def clotho_rows():
    return [
        {
            "file_name": f"c{i}.wav",
            "question": q,
            "answer": a,
            "audio": {"array": _waveform(t), "sampling_rate": 16000},
        }
        for i, (q, a, t) in enumerate(
            (("Is there a tone?", "yes", TONES[0]), ("Is there a tone?", "no", TONES[1]))
        )
    ]


def nextqa_rows():
    return [
        {
            "video": 1000 + i,
            "frame_count": 2,
            "width": 32,
            "height": 32,
            "qid": i,
            "type": "DC",
            "question": "what colour is the clip",
            "answer": i,
            "a0": "red",
            "a1": "blue",
            "a2": "green",
            "a3": "black",
            "a4": "white",
        }
        for i in range(2)
    ]


def music_avqa_rows():
    return [
        {
            "video_id": f"m{i}",
            "question_id": i,
            "type": '["Audio-Visual", "Existential"]',
            "question_content": "Is the <Object> in the video always playing?",
            "templ_values": '["cello"]',
            "question_deleted": 0,
            "anser": "yes" if i == 0 else "no",
        }
        for i in range(2)
    ]


_MC_AUDIO = """
task: hm_music_avqa_audio_mc_mini
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.music_avqa_doc_to_audio
doc_to_text: !function utils.music_avqa_doc_to_text
doc_to_choice: ["yes", "no"]
doc_to_target: "{{{{0 if anser == 'yes' else 1}}}}"
metric_list:
  - metric: acc
metadata:
  version: 0.0
"""

_MC_VIDEO = _MC_AUDIO.replace("hm_music_avqa_audio_mc_mini", "hm_music_avqa_mc_mini").replace(
    "music_avqa_doc_to_audio", "music_avqa_doc_to_visual"
)


def build_av_tasks(root: Path, hf_home: Path) -> Path:
    """An lmms-eval include folder with the modality task configs on tiny parquet
    (``hm_clotho_aqa``, ``hm_nextqa_mc``, ``hm_music_avqa``, ``hm_music_avqa_audio``,
    ``hm_music_avqa_av``)
    and the MC minis ``hm_music_avqa_audio_mc_mini`` (MUSIC-AVQA clips' audio) and
    ``hm_music_avqa_mc_mini`` (their video); the clips go under ``hf_home``."""
    import datasets

    from harness_merge.demo.tiny import write_tiny_clip

    root, hf_home = Path(root), Path(hf_home)
    d = root / "modality"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(CONFIGS, d, ignore=shutil.ignore_patterns("__pycache__", "*.md"))
    for i, cols in enumerate(COLORS):
        write_tiny_clip(hf_home / "nextqa" / "NExTVideo" / f"{1000 + i}.mp4", cols)
        write_tiny_clip(hf_home / "music_avqa" / "videos" / f"m{i}.mp4", cols, tone_hz=CLIP_TONES[i])
    S, N = datasets.Value("string"), datasets.Value("int64")
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    clotho = _parquet(
        clotho_rows(),
        {"file_name": S, "question": S, "answer": S, "audio": audio_feature()},
        data / "clotho.parquet",
    )
    nq_feats = {k: N for k in ("video", "frame_count", "width", "height", "qid", "answer")}
    nq_feats.update({k: S for k in ("type", "question", "a0", "a1", "a2", "a3", "a4")})
    nextqa = _parquet(nextqa_rows(), nq_feats, data / "nextqa.parquet")
    ma_feats = {"video_id": S, "question_id": N, "type": S, "question_content": S, "templ_values": S}
    ma_feats.update({"question_deleted": N, "anser": S})
    mavqa = _parquet(music_avqa_rows(), ma_feats, data / "music_avqa.parquet")
    _rewrite(d / "hm_clotho_aqa.yaml", clotho)
    _rewrite(d / "hm_nextqa_mc.yaml", nextqa)
    _rewrite(d / "hm_music_avqa.yaml", mavqa)
    _rewrite(d / "hm_music_avqa_audio.yaml", mavqa)
    _rewrite(d / "hm_music_avqa_av.yaml", mavqa)
    (d / "hm_music_avqa_audio_mc_mini.yaml").write_text(_MC_AUDIO.format(data=mavqa))
    (d / "hm_music_avqa_mc_mini.yaml").write_text(_MC_VIDEO.format(data=mavqa))
    return root
