"""Did the model learn anything useful? `validate(model)` samples K
completions of a suite of prompts (Python function headers and plain-English
questions) and scores them:

- syntax rate (code prompts): the fraction of completions for which the
  header plus the completion, cut where the function ends, parses as Python
  (`ast.parse`);
- distinct-2: distinct word bigrams over all bigrams of the completions
  (1: no bigram repeated; near 0: the same words over and over);
- mean log-likelihood: the mean log-probability per token, in nats and at
  temperature 1, that the model gives what it wrote (end-of-text included
  when it stopped there): how sure it is of its own text;
- held-out perplexity, when text to score is given.

`crystalline validate` prints the report and saves it in the checkpoint
(`ckpt-N/validate.json`), where the dashboard shows it.
"""

from __future__ import annotations

import ast
import json
import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from crystalline.atomic import write_json_atomic
from crystalline.config import U64_END
from crystalline.errors import UserError
from crystalline.guard import read_json, read_text
from crystalline.inference import LoadedModel, Sampling

RESULT = "validate.json"  # in the checkpoint directory
KINDS = ("code", "text")


@dataclass(frozen=True)
class Prompt:
    text: str
    kind: str  # "code": a Python function header, whose completions must parse; "text": anything else


# The default suite: function headers of the kind the original design named
# (`def fibonacci(n):`), and plain-English questions.
DEFAULT_PROMPTS = [
    Prompt("def fibonacci(n):", "code"),
    Prompt("def is_prime(n):", "code"),
    Prompt("def read_lines(path):", "code"),
    Prompt("def flatten(items):", "code"),
    Prompt("What is a list comprehension?", "text"),
    Prompt("How do I read a file line by line?", "text"),
    Prompt("Why is the sky blue?", "text"),
]
DEFAULT_SAMPLING = Sampling(max_tokens=128, temperature=0.8, top_k=40, seed=0)

# A prompt that opens a function: `def` (or `async def`), after any decorators.
HEADER = re.compile(r"\s*(@[^\n]*\n\s*)*(async\s+)?def\s")


def guess_kind(prompt: str) -> str:
    return "code" if HEADER.match(prompt) else "text"


def read_prompts(path: Path) -> list[Prompt]:
    """Prompts from a file: JSON Lines when its first non-blank line starts
    with `{` (each line `{"prompt": TEXT, "kind": "code" | "text"}`, kind
    optional), else one prompt per line. Without a kind, a `def` header is
    code and anything else text."""
    where = f"--prompts {path}"
    lines = [(n, line) for n, line in enumerate(read_text(Path(path), where).splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"{where} holds no prompts; put one per line, or one JSON object per line")
    if not lines[0][1].lstrip().startswith("{"):
        return [Prompt(line, guess_kind(line)) for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            item = None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise UserError(f"{where}:{n} is not a JSON object with a non-empty \"prompt\" string")
        kind = item.get("kind", guess_kind(item["prompt"]))
        if kind not in KINDS:
            raise UserError(f"{where}:{n}: kind must be \"code\" or \"text\", got {kind!r}")
        prompts.append(Prompt(item["prompt"], kind))
    return prompts


def function_source(header: str, completion: str, finished: bool) -> str:
    """The header and the completion up to where the function ends: before
    the first non-blank line after the header that is indented no deeper
    than the header's first line; dedented, so that a method's header parses
    on its own. A completion cut short by the token limit (not `finished`)
    is judged without its last, partial line."""
    if not finished:
        completion = completion[: completion.rfind("\n") + 1]
    lines = (header + completion).split("\n")
    first_body = len(header.rstrip("\n").split("\n"))  # the completion's first line, unless it goes on the header's
    depth = indentation(next((line for line in lines if line.strip()), ""))
    for i in range(first_body, len(lines)):
        if lines[i].strip() and indentation(lines[i]) <= depth:
            lines = lines[:i]
            break
    return textwrap.dedent("\n".join(lines).rstrip() + "\n")


def indentation(line: str) -> int:
    return len(line) - len(line.lstrip())


def parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
        return False
    return True


def bigrams(text: str) -> list[tuple[str, str]]:
    words = text.split()
    return list(zip(words, words[1:]))


def distinct_2(texts: Sequence[str]) -> float | None:
    """Distinct word bigrams over all word bigrams of `texts` (None: no bigram)."""
    grams = [g for text in texts for g in bigrams(text)]
    return len(set(grams)) / len(grams) if grams else None


@dataclass
class Completion:
    text: str
    finished: bool  # stopped at end-of-text, not at the token limit
    log_likelihood: float  # summed log-probability of its tokens (end-of-text included when finished)
    tokens: int  # tokens scored
    parses: bool | None = None  # code prompts: whether the function parses


@dataclass
class PromptResult:
    prompt: str
    kind: str
    completions: list[Completion]
    syntax_rate: float | None  # code prompts only
    distinct_2: float | None
    mean_log_likelihood: float | None  # nats per token


@dataclass
class Report:
    checkpoint: str
    step: int
    samples: int  # completions per prompt
    max_tokens: int  # asked for; each prompt's are at most what the context leaves after it
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    prompts: list[PromptResult] = field(default_factory=list)
    syntax_rate: float | None = None  # over every code completion
    distinct_2: float | None = None  # over every completion
    mean_log_likelihood: float | None = None  # over every token scored
    perplexity: float | None = None  # of the held-out text, when given
    held_out: list[str] | None = None  # the paths scored for it

    def to_json(self) -> dict:
        return asdict(self)


def syntax_rate(completions: Sequence[Completion]) -> float | None:
    """The fraction of the code completions among `completions` that parse (None: none is code)."""
    code = [c for c in completions if c.parses is not None]
    return sum(c.parses for c in code) / len(code) if code else None


def mean_log_likelihood(completions: Sequence[Completion]) -> float | None:
    """Nats per token over all the tokens scored (None: none)."""
    tokens = sum(c.tokens for c in completions)
    return sum(c.log_likelihood for c in completions) / tokens if tokens else None


def score(model: LoadedModel, prompt_ids: list[int], out: list[int], finished: bool) -> tuple[float, int]:
    """(summed log-probability, tokens) that the model, at temperature 1,
    gives the tokens `out` after `prompt_ids`, and end-of-text after them
    when it stopped there."""
    target = out + ([model.tokenizer.eot_id] if finished else [])
    if not target:
        return 0.0, 0
    ids = prompt_ids + target
    rows = model.logits(ids[:-1])[len(prompt_ids) - 1 :].astype(np.float64)
    top = rows.max(axis=1, keepdims=True)
    logprobs = rows - (top + np.log(np.exp(rows - top).sum(axis=1, keepdims=True)))
    return float(logprobs[np.arange(len(target)), target].sum()), len(target)


def validate(model: LoadedModel, prompts: Sequence[Prompt] = DEFAULT_PROMPTS, samples: int = 4,
             sampling: Sampling = DEFAULT_SAMPLING, held_out: Sequence[Path | str] | None = None) -> Report:
    """Sample `samples` completions of each prompt (one batch per prompt, the
    seed counting up from prompt to prompt) and score them; a completion is
    at most what the context leaves after its prompt, so it is scored in one
    window. `held_out` text files or directories add their perplexity."""
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    if not prompts:
        raise UserError("no prompts to validate with")
    sampling.validate()
    ids = [model.encode_prompt(p.text) for p in prompts]
    for prompt, p_ids in zip(prompts, ids):
        if len(p_ids) >= model.block_size:
            raise UserError(f"the prompt {prompt.text[:40]!r} is {len(p_ids)} tokens and leaves no room in the "
                            f"model's context of {model.block_size} tokens; shorten it")
    report = Report(checkpoint=str(model.path), step=model.state.step, samples=samples,
                    max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                    top_p=sampling.top_p, seed=sampling.seed)
    for i, (prompt, p_ids) in enumerate(zip(prompts, ids)):
        limit = min(sampling.max_tokens, model.block_size - len(p_ids))
        seed = None if sampling.seed is None else (sampling.seed + i) % U64_END
        done = []
        for out in model.generate_ids([p_ids] * samples, replace(sampling, max_tokens=limit, seed=seed)):
            finished = len(out) < limit
            ll, n = score(model, p_ids, out, finished)
            text = model.tokenizer.decode(out)
            ok = parses(function_source(prompt.text, text, finished)) if prompt.kind == "code" else None
            done.append(Completion(text, finished, ll, n, ok))
        report.prompts.append(PromptResult(prompt.text, prompt.kind, done, syntax_rate(done),
                                           distinct_2([c.text for c in done]), mean_log_likelihood(done)))
    everything = [c for r in report.prompts for c in r.completions]
    report.syntax_rate = syntax_rate(everything)
    report.distinct_2 = distinct_2([c.text for c in everything])
    report.mean_log_likelihood = mean_log_likelihood(everything)
    if held_out:
        report.perplexity = model.evaluate(held_out).perplexity
        report.held_out = [str(p) for p in held_out]
    return report


def save(report: Report, checkpoint_dir: Path) -> Path:
    """Write the report as CHECKPOINT/validate.json (atomically); returns its path."""
    path = Path(checkpoint_dir) / RESULT
    write_json_atomic(path, report.to_json())
    return path


def saved_summary(checkpoint_dir: Path) -> dict | None:
    """The overall figures of a checkpoint's saved report (None: none saved,
    or not readable as one)."""
    path = Path(checkpoint_dir) / RESULT
    if not path.is_file():
        return None
    try:
        data = read_json(path, f"validation report {path}")
    except UserError:
        return None
    if not isinstance(data, dict):
        return None
    keys = ("syntax_rate", "distinct_2", "mean_log_likelihood", "perplexity", "samples")
    figures = {k: data.get(k) for k in keys}
    if not all(v is None or (isinstance(v, (int, float)) and math.isfinite(v)) for v in figures.values()):
        return None
    return figures
