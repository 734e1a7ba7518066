"""``qru data``: datasets (``qru data synth``)."""
from __future__ import annotations

def cmd_data_synth(args) -> int:
    """Write the synthetic fictitious-people corpus (MUSE layout) used by ``qru demo``."""
    from qru.data.synthetic import write_corpus

    info = write_corpus(args.out, people=args.people, seed=args.seed, retain=args.retain,
                        holdout=args.holdout, general=args.general, facts_per_person=args.facts_per_person,
                        docs_per_person=args.docs_per_person, qa_docs=not args.no_qa_docs, icl=args.icl,
                        overwrite=args.overwrite)
    c = info.counts
    print(f"wrote {len(info.paths)} files to {info.root}: people forget/retain/holdout/general = "
          f"{c['people_forget']}/{c['people_retain']}/{c['people_holdout']}/{c['people_general']}, "
          f"knowmem {c['knowmem_forget_qa']}/{c['knowmem_retain_qa']} QA, verbmem {c['verbmem_forget']}, "
          f"privleak {c['privleak_forget']}/{c['privleak_retain']}/{c['privleak_holdout']}")
    return 0


def add_data(sub) -> None:
    p = sub.add_parser("data", help="datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write the synthetic fictitious-people corpus in the MUSE layout")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output (it stays intact until the new one is complete)")
    s.add_argument("--people", type=int, default=20, help="forget people")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--retain", type=int, default=None, help="retain people (default 2 x people)")
    s.add_argument("--holdout", type=int, default=None, help="holdout people (default people)")
    s.add_argument("--general", type=int, default=60, help="general (base pre-training) people")
    s.add_argument("--facts-per-person", type=int, default=6)
    s.add_argument("--docs-per-person", type=int, default=4, help="prose documents per person")
    s.add_argument("--icl", type=int, default=3, help="few-shot QA pairs per *_qa_icl.json")
    s.add_argument("--no-qa-docs", action="store_true",
                   help="no 'Question/Answer' documents for forget/retain/holdout people in raw/*.txt")
    s.set_defaults(func=cmd_data_synth)
