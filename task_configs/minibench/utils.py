"""The minibench tasks (harness_merge.minibench.data): prompt and exact-match score 0-100."""

from harness_merge.minibench.data import prompt, score


def mb_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def mb_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return prompt(doc)


def mb_process_results(doc, results):
    return {"score": score(results[0] if results else "", doc["answer"])}
