"""Offline tests of the audio/video task configs (task_configs/modality): each
task on a tiny parquet in its dataset's schema; the visuals are what lmms-eval's
own audio/video tasks hand a model (an audio dict, a video path)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from task_helpers import INT, STR

FOLDER = "modality"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    from harness_merge.demo.tiny import write_tiny_clip

    home = tmp_path / "hf_home"
    write_tiny_clip(home / "nextqa" / "NExTVideo" / "1000.mp4", ((200, 30, 30),) * 2)
    write_tiny_clip(home / "music_avqa" / "videos" / "m0.mp4", ((30, 30, 200),) * 2, tone_hz=440.0)
    write_tiny_clip(home / "avqa" / "videos" / "-HG3Omg_89c_000030.mp4", ((30, 200, 30),) * 2, tone_hz=880.0)
    monkeypatch.setenv("HF_HOME", str(home))
    return home


def _audio():
    return {"array": datasets.Sequence(datasets.Value("float32")), "sampling_rate": INT}


def test_clotho_aqa(load_local_task):
    rows = [
        {
            "file_name": "a.wav",
            "question": "What is making the sound?",
            "answer": "bird",
            "audio": {"array": np.linspace(-0.5, 0.5, 800, dtype=np.float32), "sampling_rate": 8000},
        }
    ]
    t = load_local_task(
        FOLDER, "hm_clotho_aqa", rows, {"file_name": STR, "question": STR, "answer": STR, "audio": _audio()}
    )
    d = t.docs[0]
    assert t.text(d) == "What is making the sound?\nAnswer the question using a single word only. "
    (a,) = t.visual(d)
    assert a["sampling_rate"] == 8000 and len(a["array"]) == 800
    from harness_merge.backends.media import is_audio

    assert is_audio(a)
    assert t.target(d) == "bird"
    cfg = t.task.config
    assert cfg.output_type == "generate_until" and cfg.generation_kwargs["max_new_tokens"] == 8


def test_nextqa_mc(load_local_task, hf_home):
    row = {
        "video": 1000,
        "frame_count": 2,
        "width": 32,
        "height": 32,
        "qid": 0,
        "type": "DC",
        "question": "what colour is the clip ",
        "answer": 1,
        "a0": "red",
        "a1": "blue",
        "a2": "green",
        "a3": "black",
        "a4": "white",
    }
    feats = {k: INT for k in ("video", "frame_count", "width", "height", "qid", "answer")}
    feats.update({k: STR for k in ("type", "question", "a0", "a1", "a2", "a3", "a4")})
    t = load_local_task(FOLDER, "hm_nextqa_mc", [row], feats)
    d = t.docs[0]
    assert t.text(d) == "what colour is the clip\nA. red\nB. blue\nC. green\nD. black\nE. white"
    (v,) = t.visual(d)
    assert v == str(hf_home / "nextqa" / "NExTVideo" / "1000.mp4")
    from harness_merge.backends.media import is_video

    assert is_video(v)
    assert t.target(d) == "B"
    for pred, ok in (("B", 1.0), ("(B) blue", 1.0), ("B.", 1.0), ("blue", 1.0), ("A", 0.0), ("no idea", 0.0)):
        assert t.results(d, pred)["exact_match"] == ok, pred


def test_nextqa_missing_clip_names_the_path(load_local_task, hf_home):
    row = {k: 0 for k in ("frame_count", "width", "height", "qid", "answer")}
    row.update(video=4242, type="DC", question="q", a0="a", a1="b", a2="c", a3="d", a4="e")
    feats = {k: INT for k in ("video", "frame_count", "width", "height", "qid", "answer")}
    feats.update({k: STR for k in ("type", "question", "a0", "a1", "a2", "a3", "a4")})
    t = load_local_task(FOLDER, "hm_nextqa_mc", [row], feats)
    with pytest.raises(FileNotFoundError, match=r"4242\.mp4"):
        t.visual(t.docs[0])


@pytest.mark.parametrize("task", ["hm_music_avqa", "hm_music_avqa_audio", "hm_music_avqa_av"])
def test_music_avqa(load_local_task, hf_home, task):
    row = {
        "video_id": "m0",
        "question_id": 7,
        "type": '["Audio-Visual", "Comparative"]',
        "question_content": "Is the <Object> louder than the <Object>?",
        "templ_values": '["cello", "piano"]',
        "question_deleted": 0,
        "anser": "Yes",
    }
    feats = {"video_id": STR, "question_id": INT, "type": STR, "question_content": STR, "templ_values": STR}
    feats.update({"question_deleted": INT, "anser": STR})
    t = load_local_task(FOLDER, task, [row], feats)
    d = t.docs[0]
    assert t.text(d) == "Is the cello louder than the piano?\nAnswer the question using a single word."
    if task == "hm_music_avqa_av":  # the clip, then its audio track
        v, a = t.visual(d)
        assert v == str(hf_home / "music_avqa" / "videos" / "m0.mp4") and a["sampling_rate"] == 16000
        v = a
    else:
        (v,) = t.visual(d)
    if task == "hm_music_avqa":
        assert v == str(hf_home / "music_avqa" / "videos" / "m0.mp4")
    else:  # the clip's audio track: a 440 Hz tone, 0.5 s at 16 kHz
        assert v["sampling_rate"] == 16000 and abs(len(v["array"]) - 8000) < 2048
        spec = np.abs(np.fft.rfft(v["array"]))
        assert abs(np.argmax(spec) * 16000 / len(v["array"]) - 440) < 40
    assert t.results(d, "yes.")["exact_match"] == 1.0
    assert t.results(d, "Yes, it is")["exact_match"] == 1.0
    assert t.results(d, "no")["exact_match"] == 0.0


@pytest.mark.parametrize("task", ["hm_avqa", "hm_avqa_audio", "hm_avqa_av"])
def test_avqa(load_local_task, hf_home, task):
    row = {
        "id": 183,
        "video_name": "-HG3Omg_89c_000030",
        "video_id": 341,
        "question_text": "What happened in the video?",
        "multi_choice": ["motorboat", "Yacht consignment", "Sailboat set sail", "Consignment car"],
        "answer": 2,
        "question_relation": "View",
        "question_type": "Happening",
    }
    feats = {"id": INT, "video_name": STR, "video_id": INT, "question_text": STR}
    feats.update({"multi_choice": datasets.Sequence(STR), "answer": INT, "question_relation": STR})
    feats["question_type"] = STR
    t = load_local_task(FOLDER, task, [row], feats)
    d = t.docs[0]
    assert t.text(d) == (
        "What happened in the video?\nA. motorboat\nB. Yacht consignment\nC. Sailboat set sail\n"
        "D. Consignment car\nAnswer with the option's letter from the given choices directly."
    )
    if task == "hm_avqa_av":
        v, a = t.visual(d)
        assert v == str(hf_home / "avqa" / "videos" / "-HG3Omg_89c_000030.mp4")
        v = a
    else:
        (v,) = t.visual(d)
    if task == "hm_avqa":
        assert v == str(hf_home / "avqa" / "videos" / "-HG3Omg_89c_000030.mp4")
    else:
        spec = np.abs(np.fft.rfft(v["array"]))
        assert abs(np.argmax(spec) * v["sampling_rate"] / len(v["array"]) - 880) < 40
    assert t.target(d) == "C"
    for pred, ok in (("C", 1.0), ("(C)", 1.0), ("sailboat set sail", 1.0), ("E", 0.0), ("B", 0.0)):
        assert t.results(d, pred)["exact_match"] == ok, pred


def test_group_lists_the_tasks():
    from task_helpers import CONFIGS, read_yaml

    g = read_yaml(CONFIGS / FOLDER / "_hm_modality.yaml")
    tasks = {read_yaml(p).get("task") for p in (CONFIGS / FOLDER).glob("hm_*.yaml")}
    assert set(g["task"]) == tasks
    assert tasks == {
        "hm_clotho_aqa",
        "hm_nextqa_mc",
        "hm_music_avqa",
        "hm_music_avqa_audio",
        "hm_music_avqa_av",
        "hm_avqa",
        "hm_avqa_audio",
        "hm_avqa_av",
    }


def test_task_manager_indexes_the_tasks_and_the_group():
    from lmms_eval.tasks import TaskManager
    from task_helpers import CONFIGS

    manager = TaskManager(include_path=str(CONFIGS / FOLDER), include_defaults=False)
    assert {"hm_clotho_aqa", "hm_nextqa_mc", "hm_music_avqa", "hm_avqa"} <= set(manager.all_subtasks)
    assert "hm_modality_av" in manager.all_groups
