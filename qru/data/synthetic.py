"""Deterministic fictitious-people corpus in the MUSE layout: the embedded default corpus of ``qru demo``.

Every person (name built from syllables) has ``facts_per_person`` facts drawn from closed vocabularies
(birthplace, birth year, profession, employer, favourite colour / food, pet name, hobby); each answer is a
1-3 word span. People fall in four disjoint groups:

- forget / retain: the target model is fine-tuned on ``raw/forget.txt`` + ``raw/retain.txt``;
- holdout: same generator, only in ``raw/holdout.txt``, never trained on (PrivLeak non-members);
- general: only in ``raw/general.txt`` (base pre-training), together with generic sentences about the
  vocabulary, so the base learns the language, the templates and the QA format but none of the target facts.
  The KnowMem few-shot (``*_qa_icl.json``) examples are general people.

Each person gets ``docs_per_person`` prose documents (an intro sentence and every fact, in shuffled order,
each fact with a randomly chosen phrasing; the first document names the person in every sentence) and, with
``qa_docs``, one ``Question: ...\\nAnswer: ...`` document per fact (the exact KnowMem question; general people
always get them so the base learns the format). Documents in ``raw/*.txt`` are separated by blank lines.

PrivLeak documents (``privleak_docs`` for the forget and for the holdout group, by default 64 each) are
built apart from the prose documents so that membership is not trivially separable: each one states a
random subset (1 to all) of one person's facts, each with a randomly chosen phrasing, mixed with 1-5
filler sentences drawn from one pool shared by both groups, so lengths vary and the filler text is
equally familiar on both sides. A forget PrivLeak document is in ``raw/forget.txt`` once, while every
fact it carries is also taught by the person's prose (and QA) documents in other words: the facts are
seen more often than the document. Holdout PrivLeak documents go to ``raw/holdout.txt`` (never trained).

Written files (JSON exactly as MUSE's: ``json.dumps`` defaults, one line, no trailing newline)::

    raw/{forget,retain,holdout,general}.txt
    knowmem/{forget,retain}_qa.json       [{"question", "answer"}], every fact of every forget/retain person
    knowmem/{forget,retain}_qa_icl.json   [{"question", "answer"}], ``icl`` general people each
    verbmem/forget.json                   [{"prompt", "gt"}], first prose document of each forget person
    privleak/{forget,holdout}.json        [str], the PrivLeak documents of that group (above)
    privleak/retain.json                  [str], the prose documents of the retain people
    meta.json                             parameters and counts (not part of MUSE)

Same arguments give byte-identical files; every person's content depends only on (seed, group, index).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from qru.data.synthetic_vocab import (FACT_TYPES, FIRST_A, FIRST_B, GENERIC, INTROS, LAST_A, LAST_B, LAST_C, PRONOUNS,
                                   PROSE, QUESTIONS, VOCAB, article, cap)
from qru.io import check_output, staged_dir, write_text

GENERATOR_VERSION = 2
PRIVLEAK_DOCS = 64  # default number of forget and of holdout PrivLeak documents
FILLER_POOL = 48  # filler sentences shared by the forget and holdout PrivLeak documents
GROUPS = ("forget", "retain", "holdout", "general")


# -- data structures -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Person:
    """One fictitious person: ``facts`` and ``questions`` keyed by fact type (in ``FACT_TYPES`` order)."""
    name: str
    group: str
    gender: str
    facts: dict[str, str]
    questions: dict[str, str]
    docs: tuple[str, ...]  # prose documents
    qa_docs: tuple[str, ...]  # "Question: ...\nAnswer: ..." documents (empty without qa_docs)

    def qa(self) -> list[dict[str, str]]:
        return [{"question": self.questions[t], "answer": v} for t, v in self.facts.items()]


@dataclass(frozen=True)
class Corpus:
    """The whole corpus in memory; ``files()`` gives the exact text of every file ``write_corpus`` writes."""
    people: dict[str, tuple[Person, ...]]
    raw: dict[str, str]
    knowmem: dict[str, list[dict[str, str]]]
    verbmem: list[dict[str, str]]
    privleak: dict[str, list[str]]
    params: dict[str, object]

    def counts(self) -> dict[str, int]:
        c = {f"people_{g}": len(p) for g, p in self.people.items()}
        c.update({f"docs_{g}": len(t.split("\n\n")) for g, t in self.raw.items()})
        c.update({f"knowmem_{k}": len(v) for k, v in self.knowmem.items()})
        c["verbmem_forget"] = len(self.verbmem)
        c.update({f"privleak_{k}": len(v) for k, v in self.privleak.items()})
        return c

    def files(self) -> dict[str, str]:
        out = {f"raw/{g}.txt": t for g, t in self.raw.items()}
        out.update({f"knowmem/{k}.json": json.dumps(v) for k, v in self.knowmem.items()})
        out["verbmem/forget.json"] = json.dumps(self.verbmem)
        out.update({f"privleak/{k}.json": json.dumps(v) for k, v in self.privleak.items()})
        meta = {"generator": "qru.data.synthetic", "version": GENERATOR_VERSION, "params": self.params,
                "counts": self.counts()}
        out["meta.json"] = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        return out


@dataclass(frozen=True)
class CorpusInfo:
    """What ``write_corpus`` wrote: the root, every file's path (keyed by relative path) and the counts."""
    root: Path
    paths: dict[str, Path]
    counts: dict[str, int] = field(default_factory=dict)


# -- generation ----------------------------------------------------------------------------------------------

def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return value


def _names(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct full names; surnames are distinct too while the surname space allows."""
    n_last = len(LAST_A) * len(LAST_B) * len(LAST_C)
    seen_full: set[str] = set()
    seen_last: set[str] = set()
    out = []
    while len(out) < n:
        first = rng.choice(FIRST_A) + rng.choice(FIRST_B)
        last = rng.choice(LAST_A) + rng.choice(LAST_B) + rng.choice(LAST_C)
        full = f"{first} {last}"
        if full in seen_full or (last in seen_last and len(seen_last) < n_last // 2):
            continue
        seen_full.add(full)
        seen_last.add(last)
        out.append(full)
    return out


def _render(template: str, name: str, gender: str, value: str, use_name: bool) -> str:
    subj, poss = PRONOUNS[gender]
    s, p = (name, name + "'s") if use_name else (subj, poss)
    return template.format(S=cap(s), s=s, P=cap(p), p=p, N=name, pp=poss, a=article(value), v=value)


def _person(seed: int, group: str, index: int, name: str, facts_per_person: int, docs_per_person: int,
            qa_docs: bool) -> Person:
    rng = random.Random(f"qru-synth:{seed}:person:{group}:{index}")
    gender = rng.choice(("f", "m"))
    types = sorted(rng.sample(FACT_TYPES, facts_per_person), key=FACT_TYPES.index)
    facts = {t: rng.choice(VOCAB[t]) for t in types}
    questions = {t: rng.choice(QUESTIONS[t]).format(N=name) for t in types}
    docs: list[str] = []
    for d in range(docs_per_person):
        for _attempt in range(20):  # distinct documents per person (collisions are rare; stop trying after 20)
            order = list(types)
            rng.shuffle(order)
            sents = [rng.choice(INTROS).format(N=name)]
            for t in order:
                use_name = d == 0 or rng.random() < 0.4  # the first document names the person every time
                sents.append(_render(rng.choice(PROSE[t]), name, gender, facts[t], use_name))
            doc = " ".join(sents)
            if doc not in docs:
                break
        docs.append(doc)
    qa = tuple(f"Question: {questions[t]}\nAnswer: {facts[t]}" for t in types) if qa_docs else ()
    return Person(name, group, gender, facts, questions, tuple(docs), qa)


def _generic_doc(rng: random.Random) -> str:
    sents = []
    for _ in range(rng.randint(3, 5)):
        t = rng.choice(FACT_TYPES)
        v = rng.choice(VOCAB[t])
        sents.append(cap(rng.choice(GENERIC[t]).format(v=v, V=cap(v), a=article(v), A=cap(article(v)))))
    return " ".join(sents)


def _fillers(seed: int, n: int) -> list[str]:
    """``n`` distinct generic sentences (no person in them): the filler pool of the PrivLeak documents."""
    rng = random.Random(f"qru-synth:{seed}:fillers")
    out: list[str] = []
    for _ in range(100 * n):
        if len(out) == n:
            break
        t = rng.choice(FACT_TYPES)
        v = rng.choice(VOCAB[t])
        sent = cap(rng.choice(GENERIC[t]).format(v=v, V=cap(v), a=article(v), A=cap(article(v))))
        if sent not in out:
            out.append(sent)
    return out


def _privleak_docs(seed: int, group: str, people: tuple[Person, ...], n: int, fillers: list[str]) -> list[str]:
    """``n`` distinct documents, person by person in turn: a random subset of the person's facts, each
    in a random phrasing, shuffled together with 1-5 sentences of ``fillers``; the first fact sentence
    names the person, later ones may use the pronoun."""
    rng = random.Random(f"qru-synth:{seed}:privleak:{group}")
    docs: list[str] = []
    seen: set[str] = set()
    for i in range(n):
        p = people[i % len(people)]
        for _attempt in range(50):
            types = rng.sample(list(p.facts), rng.randint(1, len(p.facts)))
            parts = [("fact", t) for t in types] + [("fill", f) for f in rng.sample(fillers, rng.randint(1, 5))]
            rng.shuffle(parts)
            sents, named = [], False
            for kind, x in parts:
                if kind == "fill":
                    sents.append(x)
                else:
                    sents.append(_render(rng.choice(PROSE[x]), p.name, p.gender, p.facts[x],
                                         not named or rng.random() < 0.5))
                    named = True
            doc = " ".join(sents)
            if doc not in seen:
                break
        seen.add(doc)
        docs.append(doc)
    return docs


def _split_prompt(doc_sentences: list[str], prompt_sentences: int) -> dict[str, str]:
    k = min(prompt_sentences, len(doc_sentences) - 1)
    prompt = " ".join(doc_sentences[:k])
    return {"prompt": prompt, "gt": " " + " ".join(doc_sentences[k:])}


def make_corpus(people: int = 20, seed: int = 0, *, retain: int | None = None, holdout: int | None = None,
                general: int = 60, facts_per_person: int = 6, docs_per_person: int = 4, qa_docs: bool = True,
                icl: int = 3, generic_docs: int | None = None, prompt_sentences: int = 2,
                privleak_docs: int = PRIVLEAK_DOCS) -> Corpus:
    """Build the corpus in memory.

    ``people`` forget people; ``retain`` (default ``2 * people``), ``holdout`` (default ``people``) and
    ``general`` people; ``generic_docs`` generic paragraphs in ``general.txt`` (default ``general``);
    ``icl`` few-shot QA pairs per ``*_qa_icl.json``; verbmem prompts are the first ``prompt_sentences``
    sentences of a document; ``privleak_docs`` PrivLeak documents for the forget and for the holdout group
    (module docstring).
    """
    people = _check_int("people", people, 1)
    retain = _check_int("retain", 2 * people if retain is None else retain, 1)
    holdout = _check_int("holdout", people if holdout is None else holdout, 1)
    icl = _check_int("icl", icl, 1)
    general = _check_int("general", general, 2 * icl)
    generic_docs = _check_int("generic_docs", general if generic_docs is None else generic_docs, 0)
    facts_per_person = _check_int("facts_per_person", facts_per_person, 1, len(FACT_TYPES))
    docs_per_person = _check_int("docs_per_person", docs_per_person, 1)
    prompt_sentences = _check_int("prompt_sentences", prompt_sentences, 1, facts_per_person)
    privleak_docs = _check_int("privleak_docs", privleak_docs, 1)
    seed = _check_int("seed", seed, -(2 ** 63))
    if not isinstance(qa_docs, bool):
        raise TypeError(f"qa_docs must be a bool, got {type(qa_docs).__name__} {qa_docs!r}")
    sizes = {"forget": people, "retain": retain, "holdout": holdout, "general": general}
    space = len(FIRST_A) * len(FIRST_B) * len(LAST_A) * len(LAST_B) * len(LAST_C)
    if sum(sizes.values()) > space // 4:
        raise ValueError(f"people: {sum(sizes.values())} people in all is too many for the name space "
                         f"(at most {space // 4})")

    names = iter(_names(random.Random(f"qru-synth:{seed}:names"), sum(sizes.values())))
    groups = {g: tuple(_person(seed, g, i, next(names), facts_per_person, docs_per_person,
                               qa_docs or g == "general") for i in range(n))
              for g, n in sizes.items()}

    fillers = _fillers(seed, FILLER_POOL)
    privleak = {g: _privleak_docs(seed, g, groups[g], privleak_docs, fillers) for g in ("forget", "holdout")}
    privleak = {"forget": privleak["forget"], "retain": [d for p in groups["retain"] for d in p.docs],
                "holdout": privleak["holdout"]}
    raw = {}
    for g, ps in groups.items():
        docs = [d for p in ps for d in p.docs + p.qa_docs]
        if g in ("forget", "holdout"):
            docs += privleak[g]
        if g == "general":
            grng = random.Random(f"qru-synth:{seed}:generic")
            docs += [_generic_doc(grng) for _ in range(generic_docs)]
        random.Random(f"qru-synth:{seed}:shuffle:{g}").shuffle(docs)
        raw[g] = "\n\n".join(docs) + "\n"

    knowmem = {}
    for g in ("forget", "retain"):
        qa = [x for p in groups[g] for x in p.qa()]
        random.Random(f"qru-synth:{seed}:knowmem:{g}").shuffle(qa)  # any prefix spans many people
        knowmem[f"{g}_qa"] = qa
    gen = groups["general"]
    for j, g in enumerate(("forget", "retain")):
        shots, rng = [], random.Random(f"qru-synth:{seed}:icl:{g}")
        for p in gen[j * icl:(j + 1) * icl]:
            fresh = [t for t in p.facts if t not in {s["type"] for s in shots}]  # vary the fact type
            t = rng.choice(fresh or list(p.facts))
            shots.append({"type": t, "question": p.questions[t], "answer": p.facts[t]})
        knowmem[f"{g}_qa_icl"] = [{"question": s["question"], "answer": s["answer"]} for s in shots]
    knowmem = {k: knowmem[k] for k in ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl")}

    verbmem = [_split_prompt(_sentences(p, 0), prompt_sentences) for p in groups["forget"]]
    params = {"people": people, "seed": seed, "retain": retain, "holdout": holdout, "general": general,
              "facts_per_person": facts_per_person, "docs_per_person": docs_per_person, "qa_docs": qa_docs,
              "icl": icl, "generic_docs": generic_docs, "prompt_sentences": prompt_sentences,
              "privleak_docs": privleak_docs}
    return Corpus(groups, raw, knowmem, verbmem, privleak, params)


def _sentences(person: Person, doc: int) -> list[str]:
    """Sentences of a prose document (every template ends a sentence with '. ' and has no inner '. ')."""
    parts = person.docs[doc].split(". ")
    return [s + "." for s in parts[:-1]] + [parts[-1]]


# -- writing -------------------------------------------------------------------------------------------------

def _write(path: Path, text: str) -> None:
    write_text(path, text)


def write_corpus(out_dir: str | os.PathLike, people: int = 20, seed: int = 0, *, overwrite: bool = False,
                 **kwargs) -> CorpusInfo:
    """Generate (``make_corpus(people, seed, **kwargs)``) and write the corpus under ``out_dir``.

    ``out_dir`` appears all at once (a staged directory committed with one rename, :mod:`qru.io`);
    an existing non-empty ``out_dir`` is refused unless ``overwrite``, and then replaced as a whole.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {out} exists and is not a directory")
    check_output(out, overwrite=overwrite)
    corpus = make_corpus(people, seed, **kwargs)
    files = corpus.files()
    with staged_dir(out) as stage:
        for rel, text in files.items():
            _write(stage / rel, text)
    return CorpusInfo(out, {rel: out / rel for rel in files}, corpus.counts())


# -- fact sets (``qru demo --preset pretrained``) ------------------------------------------------------------

FACT_GROUPS = ("forget", "retain", "holdout")


def fact_sets(facts: int = 15, seed: int = 0, facts_per_person: int = 3) -> dict[str, list[dict[str, str]]]:
    """Forget, retain and holdout sets of ``facts`` fictitious facts each, from the people of
    :func:`make_corpus` (``ceil(facts / facts_per_person)`` people per group, their first facts):
    ``{"person", "type", "question", "answer", "sentence"}`` per fact, ``sentence`` one prose sentence
    stating it with the person's name (a phrasing drawn per fact). The seed changes the people, hence the
    facts; the same arguments give the same sets."""
    facts = _check_int("facts", facts, 1)
    facts_per_person = _check_int("facts_per_person", facts_per_person, 1, len(FACT_TYPES))
    n = -(-facts // facts_per_person)
    c = make_corpus(people=n, seed=seed, retain=n, holdout=n, general=6, facts_per_person=facts_per_person,
                    docs_per_person=1, privleak_docs=1)
    out = {}
    for g in FACT_GROUPS:
        recs = []
        for i, p in enumerate(c.people[g]):
            rng = random.Random(f"qru-synth:{seed}:fact-sentence:{g}:{i}")
            for t, v in p.facts.items():
                recs.append({"person": p.name, "type": t, "question": p.questions[t], "answer": v,
                             "sentence": _render(rng.choice(PROSE[t]), p.name, p.gender, v, True)})
        out[g] = recs[:facts]
    return out
