"""Audio + video in one request (MUSIC-AVQA / AVQA, the benchmark's audio-visual
setting) on a modality merge: a composed model.

The modality models of a merge share one (merged) LLM. For a request with a
video and an audio clip, each modality model embeds its own input the way its
forward does (the video model: text embeddings with the video encoder +
connector features at its video placeholders; the audio model: the same with
the audio encoder + connector at its audio placeholders); the input sequence
given to the shared LLM is the video model's, with the audio features
inserted right after the video features. The embeddings are captured where
each model hands them to its language model (a forward pre-hook on
``get_decoder()``), so no family code is copied. The video model's LLM and
LM head then score / generate (its LLM tensors are the merged ones, equal in
every modality folder).
"""

from __future__ import annotations

from typing import Any, Sequence

from .base import BackendError, GenRequest, LLRequest, cut_at_stop


class _Captured(Exception):
    pass


def _embeds_at_llm(model, enc: dict):
    """The ``inputs_embeds`` ``model``'s forward hands its language model for ``enc``."""
    box: dict[str, Any] = {}

    def hook(_mod, args, kwargs):
        box["e"] = kwargs.get("inputs_embeds")
        raise _Captured

    h = model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**enc)
    except _Captured:
        pass
    finally:
        h.remove()
    if box.get("e") is None:
        raise BackendError(f"{type(model).__name__}: no inputs_embeds reached its language model")
    return box["e"]


class ComposedAV:
    """The ``Backend`` subset model 'merged' calls (generate / loglikelihood /
    render) for audio + video requests, over a video and an audio modality
    backend (hf)."""

    name = "hf-composed"
    supports_images = False
    supports_audio = True
    supports_video = True

    def __init__(self, video_backend, audio_backend):
        self.v, self.a = video_backend, audio_backend
        self.base = f"{video_backend.base} + {audio_backend.base}"
        self.processor = getattr(video_backend, "processor", None)
        cfg = audio_backend.model.config
        self.audio_token_id = getattr(cfg, "audio_token_id", getattr(cfg, "audio_token_index", None))
        vcfg = video_backend.model.config
        self.video_token_id = getattr(vcfg, "video_token_id", getattr(vcfg, "video_token_index", None))

    @staticmethod
    def _split(req):
        """(messages for the video model: text + video items; messages for the audio model: audio items only)."""
        vmsgs, amsgs = [], []
        for m in req.messages or ():
            c = m["content"]
            if isinstance(c, str) or m.get("role") != "user":
                vmsgs.append(m)
                continue
            vmsgs.append({**m, "content": [x for x in c if x.get("type") != "audio"]})
            amsgs.append({**m, "content": [x for x in c if x.get("type") == "audio"]})
        return tuple(vmsgs), tuple(amsgs)

    def render(self, req) -> str:
        vmsgs, _ = self._split(req)
        return (
            self.v.render(GenRequest(messages=vmsgs))
            + f" [+ {len(req.audios)} audio clip(s) after the video]"
        )

    def _embeds(self, req):
        if req.messages is None or not req.audios or not req.videos:
            raise BackendError("composed audio+video: a chat request with both audios and videos is expected")
        vmsgs, amsgs = self._split(req)
        venc = self.v._encode(
            [self.v.render(GenRequest(messages=vmsgs))], [], "right", videos=list(req.videos)
        )
        aenc = self.a._encode(
            [self.a.render(GenRequest(messages=amsgs))], [], "right", audios=list(req.audios)
        )
        ev = _embeds_at_llm(self.v.model, venc)[0]
        ea = _embeds_at_llm(self.a.model, aenc)[0]
        a_pos = (aenc["input_ids"][0] == self.audio_token_id).nonzero().flatten()
        v_pos = (venc["input_ids"][0] == self.video_token_id).nonzero().flatten()
        if not len(a_pos) or not len(v_pos):
            raise BackendError("composed audio+video: no audio or video placeholders in the rendered prompts")
        cut = int(v_pos[-1]) + 1
        import torch

        emb = torch.cat([ev[:cut], ea[a_pos].to(ev.dtype), ev[cut:]], dim=0)
        return emb, {"video_features": len(v_pos), "audio_features": len(a_pos)}

    def loglikelihood(self, requests: Sequence[LLRequest]) -> list[tuple[float, bool]]:
        import torch

        out = []
        with torch.inference_mode():
            for r in requests:
                emb, _ = self._embeds(r)
                cont = self.v._cont_ids(r.continuation)
                if not cont:
                    out.append((0.0, True))
                    continue
                ids = torch.tensor(cont, device=emb.device)
                full = torch.cat([emb, self.v.model.get_input_embeddings()(ids)], dim=0)[None]
                logits = (
                    self.v.model(
                        inputs_embeds=full,
                        attention_mask=torch.ones(full.shape[:2], dtype=torch.long, device=emb.device),
                    )
                    .logits[0]
                    .float()
                )
                lp = torch.log_softmax(logits[emb.shape[0] - 1 : -1], dim=-1)
                tok = lp.gather(1, ids[:, None]).squeeze(1)
                out.append((float(tok.sum()), bool((lp.argmax(-1) == ids).all())))
        return out

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        import torch

        out = []
        with torch.inference_mode():
            for r in requests:
                emb, _ = self._embeds(r)
                kw: dict[str, Any] = dict(
                    max_new_tokens=int(r.max_new_tokens or self.v.default_max_new_tokens),
                    pad_token_id=self.v.tokenizer.pad_token_id,
                    eos_token_id=self.v.eos_ids or None,
                )
                if r.greedy:
                    kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                else:
                    kw.update(do_sample=True, temperature=float(r.temperature), top_p=r.top_p)
                mask = torch.ones(1, emb.shape[0], dtype=torch.long, device=emb.device)
                # inputs_embeds alone: generate returns the new tokens only
                seqs = self.v.model.generate(inputs_embeds=emb[None], attention_mask=mask, **kw)
                text = self.v.tokenizer.decode(
                    seqs[0], skip_special_tokens=True, clean_up_tokenization_spaces=False
                )
                out.append(cut_at_stop(text, r.until))
        return out


__all__ = ["ComposedAV"]
