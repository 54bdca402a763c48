"""The demo's synthetic tasks (harness_merge.demo.data): prompt and exact match."""

from harness_merge.demo.data import prompt, score


def demo_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def demo_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return prompt(doc)


def demo_process_results(doc, results):
    return {"exact_match": score(results[0] if results else "", doc["answer"])}
