"""RULER tasks: every prompt fits its target length (prompt + tokens_to_generate, and prompt +
answer), carries RULER's template and answer prefix from the wheel, holds the answers where
intended, and has the size the binary search promises (one more unit would not fit). Format
cross-checks against NVIDIA's own generator code where it loads offline (tests/eval/nvidia_ruler.py)."""
from __future__ import annotations

import random
import re

import pytest

from megatron_kd.config import ConfigError
from megatron_kd.eval import ruler
from megatron_kd.eval.ruler.config import templates, tokens_to_generate

# the shortest length each task fits under the test tokenizer, plus one long length for all
LENGTHS = {"cwe": 2048, "qa_2": 4096}


@pytest.mark.parametrize("name", ruler.task_names())
def test_prompt_fits_and_holds_answers(tokenizer, name):
    length = LENGTHS.get(name, 1024)
    samples = ruler.generate(name, tokenizer, length, 3, seed=5)
    kind = ruler.task_configs()[name]["task"]
    prefix = templates()[kind]["answer_prefix"]
    head = templates()[kind]["template"].split("{")[0][:40]
    for s in samples:
        n = len(tokenizer.encode(s.input))
        assert n + s.tokens_to_generate <= length and s.tokens_to_generate == tokens_to_generate(kind)
        assert len(tokenizer.encode(s.input + " " + " ".join(s.outputs))) <= length
        assert n > 0.6 * (length - s.tokens_to_generate), "haystack far smaller than the budget"
        assert head.replace("Some", "A") in s.input or head in s.input
        end = prefix.split("}")[-1].rstrip()  # the answer prefix after its last placeholder
        if kind == "niah" and len(s.outputs) == 1:
            end = end.replace(" are", " is")  # RULER's singular rewrite
        assert s.input.rstrip().endswith(end)
        if kind != "qa":
            assert all(a in s.input for a in s.outputs)
        if kind == "niah":
            for c, value in zip(sorted(s.needle_chars), sorted(s.outputs)):
                assert s.input[c:].startswith("One of the special magic")
            for c in s.needle_chars:  # each asked-for needle carries one of the answers
                sentence = s.input[c:s.input.index(".", c + 30) + 1]
                assert any(v in sentence for v in s.outputs), sentence
    # binary search: the fitted size is maximal (one unit more overflows the budget)
    task = ruler.make_task(name, length, 5)
    size = samples[0].meta["size"]
    text, answers = task.build(size + max(1, size // 50) + 1, random.Random("x"), 0)[:2]
    if kind not in ("qa", "variable_tracking"):  # (a vt sample also holds its ICL example)
        bigger = len(tokenizer.encode(text)) + samples[0].tokens_to_generate
        assert bigger > length - 0.1 * length


def test_niah_single_1_question_and_singular_template(tokenizer):
    s = ruler.generate("niah_single_1", tokenizer, 1024, 1, seed=1)[0]
    key = re.search(r"What is the special magic number for (.+?) mentioned", s.input).group(1)
    assert f"One of the special magic numbers for {key} is: {s.outputs[0]}." in s.input
    assert s.input.endswith(f" The special magic number for {key} mentioned in the provided text is")
    assert s.input.startswith("A special magic number is hidden within the following text.")
    assert len(s.outputs) == 1 and re.fullmatch(r"\d{7}", s.outputs[0])


def test_multi_tasks_answer_counts(tokenizer):
    assert len(ruler.generate("niah_multivalue", tokenizer, 1024, 1)[0].outputs) == 4
    assert len(ruler.generate("niah_multiquery", tokenizer, 1024, 1)[0].outputs) == 4
    mk = ruler.generate("niah_multikey_1", tokenizer, 1024, 1)[0]
    assert mk.input.count("One of the special magic numbers for") == 4  # 1 asked + 3 distractor keys
    vt = ruler.generate("vt", tokenizer, 1024, 1)[0]
    assert len(vt.outputs) == 5 and all(f"VAR {v} =" in vt.input for v in vt.outputs)
    fwe = ruler.generate("fwe", tokenizer, 1024, 1)[0]
    words = fwe.input.split("coded words.")[1].split("\nQuestion")[0].split()
    counts = {w: words.count(w) for w in set(words)}
    ranked = sorted((c, w) for w, c in counts.items() if w != "...")[::-1]
    assert [w for _, w in ranked[:3]] == fwe.outputs  # the three most frequent coded words


def test_too_short_length_is_one_line_error(tokenizer):
    with pytest.raises(ConfigError, match="too short for ruler:qa_2"):
        ruler.generate("qa_2", tokenizer, 256, 1)
    with pytest.raises(ConfigError, match="expected one of niah_single_1"):
        ruler.generate("niah_single_9", tokenizer, 1024, 1)


def _normalize(text: str) -> str:
    text = re.sub(r"VAR [A-Z]+ = (VAR [A-Z]+|\d+) *", "", text)
    text = re.sub(r"\d{5}", "N", text)
    return re.sub(r"\s+", " ", text).strip()


def test_vt_format_matches_nvidia_generator(tokenizer):
    """NVIDIA's variable_tracking.generate_input_output vs ours at the same noise count: identical
    text once variable names / values / chain statements are factored out; same chain shape."""
    from nvidia_ruler import load

    template = templates()["variable_tracking"]["template"] + templates()["variable_tracking"]["answer_prefix"]
    nv = load("variable_tracking.py", tokenizer, ["--max_seq_length", "1024", "--tokens_to_generate", "30",
                                                  "--template", template])
    ours = ruler.make_task("vt", 1024, 42)
    for n in (3, 20):
        theirs_text, theirs_vars = nv.generate_input_output(n, 1, 4)
        our_text, our_vars = ours.build_plain(n, random.Random(n))
        assert _normalize(theirs_text) == _normalize(our_text)
        assert len(theirs_vars) == len(our_vars) == 5
        assert len(re.findall(r"VAR [A-Z]{5} = ", theirs_text)) == len(re.findall(r"VAR [A-Z]{5} = ", our_text)) == 5


@pytest.mark.parametrize("name", ["niah_single_1", "niah_single_2", "niah_multikey_2", "niah_multivalue"])
def test_niah_format_matches_nvidia_generator(tokenizer, name):
    """NVIDIA's niah.generate_input_output (wonderwords / punkt stubbed, see nvidia_ruler.py) vs
    ours at the same haystack size: identical once needle sentences, keys and values are removed."""
    from nvidia_ruler import load

    cfg = ruler.task_configs()[name]["args"]
    argv = ["--max_seq_length", "1024", "--tokens_to_generate", "128",
            "--template", templates()["niah"]["template"] + templates()["niah"]["answer_prefix"]]
    argv += [x for k, v in cfg.items() for x in (f"--{k}", str(v))]
    nv = load("niah.py", tokenizer, argv)
    ours = ruler.make_task(name, 1024, 42)
    n = 40 if cfg["type_haystack"] != "essay" else 300
    theirs_text, theirs_ans = nv.generate_input_output(n)
    our_text, our_ans = ours.build(n, random.Random(3))[:2]

    def norm(t):
        t = re.sub(r"One of the special magic \w+ for [\w-]+ is: [\w-]+\.", "", t)
        t = re.sub(r"(for|is) [\w-]+ mentioned", r"\1 K mentioned", t)
        return re.sub(r"\s+", " ", t).strip()

    assert norm(theirs_text) == norm(our_text)
    assert len(theirs_ans) == len(our_ans)
    assert theirs_text.count("One of the special magic") == our_text.count("One of the special magic")
