"""Cut the shipped sample (sample/*.jsonl) out of the real corpora described in sample/README.md.

Development tool, run once by a maintainer; finelake never reads the source folder at run time.
    python tools/make_sample.py SOURCE_DIR
SOURCE_DIR holds the JSONL extracts listed in sample/README.md (rebuildable from the packages named
there). Selection is seeded and deterministic.
"""
import json
import random
import sys
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    # Split on "\n" only: some strings hold U+2028, which str.splitlines() would break on.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def pick(rows, n, seed, lo, hi, field):
    rows = [r for r in rows if lo <= len(r.get(field) or "") <= hi]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def main(src: str, out: str = "sample") -> None:
    s, o = Path(src), Path(out)
    o.mkdir(exist_ok=True)
    queries = (pick(read_jsonl(s / "a_sharegpt_first_turns.jsonl"), 1750, 1, 12, 600, "query")
               + pick(read_jsonl(s / "a_faq_questions.jsonl"), 250, 2, 12, 600, "query"))
    docs = (pick(read_jsonl(s / "b_wikipedia_vital_leads.jsonl"), 450, 3, 400, 4000, "text")
            + pick(read_jsonl(s / "b_bigbench_passages.jsonl"), 400, 4, 400, 4000, "text")
            + pick(read_jsonl(s / "b_lee_news.jsonl"), 150, 5, 400, 4000, "text"))
    random.Random(6).shuffle(docs)
    with open(o / "queries.jsonl", "w", encoding="utf-8") as f:
        for r in queries:
            f.write(json.dumps({k: r[k] for k in ("query", "source", "id") if k in r}, ensure_ascii=False) + "\n")
    with open(o / "documents.jsonl", "w", encoding="utf-8") as f:
        for r in docs:
            meta = {k: r[k] for k in ("title", "topic") if k in r}
            f.write(json.dumps({"text": r["text"], "source": r["source"], "metadata": meta}, ensure_ascii=False) + "\n")
    for name, fields in (("c_ifeval_541.jsonl", ("key", "prompt", "instruction_id_list", "kwargs")),
                         ("c_alpacaeval_805.jsonl", ("dataset", "instruction", "output", "generator")),
                         ("c_mt_bench_80.jsonl", ("question_id", "category", "turns"))):
        rows = read_jsonl(s / name)
        short = name.split("_", 1)[1].rsplit("_", 1)[0]
        with open(o / f"eval_{short}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({k: r[k] for k in fields if k in r}, ensure_ascii=False) + "\n")
    print(f"{len(queries)} queries, {len(docs)} documents -> {o}")


if __name__ == "__main__":
    main(*sys.argv[1:])
