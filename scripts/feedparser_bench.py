#!/usr/bin/env python3
"""Times Python feedparser on the documents `tidings bench feeds` reads: the same list, in the
same order (the corpus' manifest.jsonl, else every file under it sorted by path), each parsed
with the same Content-Type and base URL. Every body is read from disk first; only parsing is
timed. Prints one JSON object: {documents, bytes, entries, errors, seconds, entries_per_s}.

Usage: feedparser_bench.py --corpus DIR [--limit N] [--rounds R]
"""
import argparse
import json
import os
import sys
import time

import feedparser

BASE_URL = "http://127.0.0.1:8097/"


def listed(corpus):
    manifest = os.path.join(corpus, "manifest.jsonl")
    if os.path.isfile(manifest):
        out = []
        with open(manifest, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                doc = json.loads(line)
                headers = doc.get("headers") or {}
                ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
                out.append((doc["path"], ctype))
        return out
    found = []
    for root, _, files in os.walk(corpus):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), corpus)
            found.append(rel.replace(os.sep, "/"))
    # Rust sorts the same strings bytewise; so does Python on UTF-8 encoded bytes.
    found.sort(key=lambda p: p.encode("utf-8"))
    return [(p, None) for p in found]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    docs = listed(args.corpus)
    if args.limit is not None:
        docs = docs[: args.limit]
    bodies = []
    for path, ctype in docs:
        with open(os.path.join(args.corpus, path), "rb") as f:
            headers = {"content-location": BASE_URL + path}
            if ctype:
                headers["content-type"] = ctype
            bodies.append((f.read(), headers))
    entries = errors = 0
    seconds = 0.0
    round_seconds = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        for body, headers in bodies:
            try:
                d = feedparser.parse(body, response_headers=headers)
                entries += len(d.entries)
            except Exception:  # feedparser is not meant to raise; count it if it does
                errors += 1
        took = time.perf_counter() - started
        seconds += took
        round_seconds.append(round(took, 6))
    json.dump(
        {
            "parser": "feedparser " + feedparser.__version__,
            "documents": len(bodies),
            "bytes": sum(len(b) for b, _ in bodies),
            "rounds": args.rounds,
            "entries": entries,
            "entries_per_round": entries // max(args.rounds, 1),
            "errors": errors,
            "seconds": round(seconds, 6),
            "round_seconds": round_seconds,
            "entries_per_s": round(entries / max(seconds, 1e-9)),
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
