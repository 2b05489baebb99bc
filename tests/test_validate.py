"""`crystalline validate`: a model trained to memorise a few Python functions
writes code that parses from their headers, and an untrained model of the
same shape writes none; the pieces (cutting a completion where its function
ends, distinct-2, prompt files) on hand-made cases; the log-likelihood
against the core's own cross-entropy; the report printed, saved and shown;
and each refusal."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from crystalline import _core, checkpoint, load
from crystalline import validate as v
from crystalline.errors import UserError
from crystalline.inference import Sampling, write_run
from commandline import cli, train

# What the model memorises: four functions whose headers share little.
FUNCTIONS = [
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "def is_prime(number):\n    if number < 2:\n        return False\n    for d in range(2, int(number ** 0.5) + 1):\n"
    "        if number % d == 0:\n            return False\n    return True\n",
    "def read_lines(path):\n    with open(path) as f:\n        return [line.rstrip(\"\\n\") for line in f]\n",
    "def flatten(items):\n    out = []\n    for item in items:\n        if isinstance(item, list):\n"
    "            out.extend(flatten(item))\n        else:\n            out.append(item)\n    return out\n",
]
HEADERS = [f.split("\n", 1)[0] for f in FUNCTIONS]
# A shape that memorises them in a few seconds.
MEMORISE = ["--vocab-size", "300", "--embed-dim", "64", "--num-layers", "2", "--num-heads", "4", "--batch-size", "8",
            "--seq-len", "128", "--learning-rate", "1e-2", "--warmup-steps", "10", "--max-steps", "300",
            "--epochs", "1000", "--val-fraction", "0", "--threads", "2", "--no-progress", "--sample-tokens", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """30 copies of each function, one file each, after 0 to 7 lines of
    filler: the training windows (cut every --seq-len tokens) then see the
    functions begin at every position, the first included, as a prompt does."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for copy in range(30):
        for i, function in enumerate(FUNCTIONS):
            filler = "".join(f"x{j} = {j}\n" for j in range(rng.randrange(8)))
            (root / f"{copy:02d}_{i}.py").write_text(filler + ("\n\n" if filler else "") + function)
    return root


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory, env) -> Path:
    return train(tmp_path_factory.mktemp("runs") / "memorised", corpus, env, *MEMORISE)


@pytest.fixture(scope="module")
def untrained(trained, tmp_path_factory) -> Path:
    """A run of the same shape and tokenizer with freshly initialised weights."""
    model = load(trained)
    fresh = _core.Model(**asdict(model.config))
    return write_run(tmp_path_factory.mktemp("runs") / "untrained", fresh.parameters(), model.config,
                     model.path / checkpoint.TOKENIZER)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "headers.txt"
    path.write_text("\n".join(HEADERS) + "\nWhat does flatten do?\n")
    return path


# -- the pieces -----------------------------------------------------------------


@pytest.mark.parametrize("header, completion, finished, source, ok", [
    # the function ends at the first line indented no deeper than the header
    ("def f(n):", "\n    return n\n\nprint(f(1))\n", True, "def f(n):\n    return n\n", True),
    # cut by the token limit: the partial last line is not judged
    ("def f(n):", "\n    x = 1\n    return (n +", False, "def f(n):\n    x = 1\n", True),
    ("def f(n):", "\n    x = 1\n    return (n +", True, "def f(n):\n    x = 1\n    return (n +\n", False),
    # the body on the header's own line
    ("def f(n):", " return n\nx = ", True, "def f(n): return n\n", True),
    ("def f(n):", " return n", False, "def f(n):\n", False),  # nothing but a partial line: no body
    # a header that ends its line: the completion's first line is the body's
    ("def f(n):\n", "    return n\nfoo(", False, "def f(n):\n    return n\n", True),
    ("def f(n):\n", "x = 1\n", True, "def f(n):\n", False),
    # a method: dedented to parse on its own; the next method ends it
    ("    def m(self):", "\n        return 1\n    def k(self):\n", True, "def m(self):\n    return 1\n", True),
    ("def f(n):", "\n    return n\x00\n", True, "def f(n):\n    return n\x00\n", False),
])
def test_a_completion_is_cut_where_its_function_ends(header, completion, finished, source, ok):
    assert v.function_source(header, completion, finished) == source
    assert v.parses(source) is ok


def test_distinct_2_counts_word_bigrams_across_completions():
    assert v.distinct_2(["a b c", "a b d"]) == 3 / 4
    assert v.distinct_2(["x x x x"]) == 1 / 3
    assert v.distinct_2(["one", ""]) is None and v.distinct_2([]) is None


def test_prompt_files_hold_lines_or_json_lines(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("def f(x):\n\n  Why?\nasync def g():  \ndefine it\n")
    assert v.read_prompts(plain) == [v.Prompt("def f(x):", "code"), v.Prompt("  Why?", "text"),
                                     v.Prompt("async def g():  ", "code"), v.Prompt("define it", "text")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "@cache\\ndef f(x):\\n    \\"\\"\\"Doc.\\"\\"\\"\\n"}\n'
                     '{"prompt": "x = ", "kind": "code"}\n{"prompt": "def g():", "kind": "text"}\n')
    assert v.read_prompts(jsonl) == [v.Prompt('@cache\ndef f(x):\n    """Doc."""\n', "code"),
                                     v.Prompt("x = ", "code"), v.Prompt("def g():", "text")]
    for text, says in [("", "holds no prompts"), ("\n  \n", "holds no prompts"),
                       ('{"prompt": "a"}\n{"prompt": ""}\n', "p.jsonl:2 is not a JSON object"),
                       ('{"prompt": "a"}\n[1]\n', "p.jsonl:2"), ('{"prompt": 3}\n', "p.jsonl:1"),
                       ('{"prompt": "a", "kind": "poem"}\n', "kind must be")]:
        jsonl.write_text(text)
        with pytest.raises(UserError, match=says):
            v.read_prompts(jsonl)
    with pytest.raises(UserError, match="missing"):
        v.read_prompts(tmp_path / "missing")


def test_the_log_likelihood_is_the_cores_cross_entropy_of_the_completion(trained):
    model = load(trained)
    prompt = model.tokenizer.encode("def flatten(items):")
    out = model.generate_ids([prompt], Sampling(20, temperature=1.0, top_k=0, seed=3))[0]
    for finished in (False, True):
        ids = np.array(prompt + out + ([model.tokenizer.eot_id] if finished else []))

        def nats(seq: np.ndarray) -> float:  # summed cross-entropy of each next token, by the core
            return model.model.loss(seq[None, :-1], seq[None, 1:]) * (len(seq) - 1)

        ll, n = v.score(model, prompt, out, finished)
        assert n == len(out) + finished
        assert ll == pytest.approx(-(nats(ids) - nats(ids[: len(prompt)])), rel=1e-4, abs=1e-4)


# -- what trained and untrained models write ---------------------------------------------


def test_a_memorising_model_writes_code_that_parses_and_an_untrained_one_does_not(trained, untrained, prompts,
                                                                                  corpus, env):
    r = cli(["validate", str(trained), "--prompts", str(prompts), "--samples", "8", "--json",
             "--data", str(corpus / "00_0.py")], env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    saved = checkpoint.list_checkpoints(trained)[-1] / v.RESULT
    assert f"saved {saved}" in r.stderr and json.loads(saved.read_text()) == report
    assert [p["prompt"] for p in report["prompts"]] == [*HEADERS, "What does flatten do?"]
    assert [p["kind"] for p in report["prompts"]] == ["code"] * 4 + ["text"]
    assert all(len(p["completions"]) == 8 for p in report["prompts"])
    assert report["syntax_rate"] >= 0.75, [(p["prompt"], p["syntax_rate"]) for p in report["prompts"]]
    code = [c for p in report["prompts"][:4] for c in p["completions"]]
    assert report["syntax_rate"] == sum(c["parses"] for c in code) / len(code)
    assert report["prompts"][4]["syntax_rate"] is None
    assert report["perplexity"] == pytest.approx(load(trained).evaluate([corpus / "00_0.py"]).perplexity)
    assert report["perplexity"] < 1.5  # it has seen this file 30 times

    # the same prompts, and the default suite, from the untrained model
    fresh = load(untrained)
    blank = v.validate(fresh, v.read_prompts(prompts), samples=8, held_out=[corpus / "00_0.py"])
    assert blank.syntax_rate <= 0.1
    assert v.validate(fresh, samples=4).syntax_rate <= 0.1
    # it is unsure of what it writes (about ln 300 nats a token), the trained model sure of its own
    assert blank.mean_log_likelihood < -4 < -0.5 < report["mean_log_likelihood"]
    assert blank.perplexity > 100
    assert blank.distinct_2 > 0.9 > report["distinct_2"]  # noise never repeats; a memorising model repeats itself


def test_the_table_and_the_refusals(trained, prompts, env, tmp_path):
    r = cli(["validate", str(trained), "--prompts", str(prompts), "--samples", "2", "--max-tokens", "8",
             "--no-save"], env)
    assert r.returncode == 0, r.stderr
    assert "overall" in r.stdout and "def fibonacci(n):" in r.stdout and "syntax rate" in r.stdout
    assert "saved" not in r.stderr
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("x " * 400 + "\n")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "def f():"}\n{"prompt": 1}\n')
    for args, says in [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(trained), "--prompts", str(tmp_path / "none.txt")], "none.txt"),
        ([str(trained), "--prompts", str(bad_jsonl)], "bad.jsonl:2"),
        ([str(trained), "--prompts", str(long_prompt)], "longer than the model's block size"),
        ([str(trained), "--samples", "0"], "--samples must be at least 1"),
        ([str(trained), "--temperature", "-1"], "--temperature"),
        ([str(trained), "--max-tokens", "-3"], "--max-tokens"),
        ([str(trained), "--data", str(tmp_path / "nothing")], "nothing"),
    ]:
        r = cli(["validate", *args], env, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, (args, r.stderr)
        assert says in r.stderr, (args, r.stderr)
    model = load(trained)
    full = "\u00a4" * (model.block_size // 2)  # two bytes, two tokens each: no merge learned for them
    assert len(model.encode_prompt(full)) == model.block_size
    with pytest.raises(UserError, match="leaves no room in the model's context of 128 tokens"):
        v.validate(model, [v.Prompt(full, "text")])
