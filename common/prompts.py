"""Prompt sets: the built-in smoke lists, and loaders for the papers' prompt files from local paths.

load_prompts(spec) accepts
  builtin            the backend's own list (Backend.prompts)
  path.txt           one prompt per line (HPDv2 / PickScore exports, VBench's prompts/*.txt)
  path.json          a list of strings, or a list of objects with a prompt field (HPDv2's benchmark json,
                     VBench's VBench_full_info.json with "prompt_en")
  path.jsonl         one object per line with "prompt" (GenEval's evaluation_metadata.jsonl)
  path.csv / .tsv    a column named Prompts / prompt / caption (DrawBench's csv, PickScore exports)
  path.parquet       a caption column (Pick-a-Pic); needs pandas + pyarrow, which are not pinned here
A missing or malformed file raises PromptError with one line naming the file and what was expected.
"""
from __future__ import annotations

import csv
import json
import os

PROMPT_KEYS = ("prompt", "prompt_en", "Prompts", "Prompt", "caption", "text")


class PromptError(ValueError):
    """A user-facing prompt-file problem (missing file, unknown layout): one clear line."""


def _from_obj(obj, path: str) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        for k in PROMPT_KEYS:
            if isinstance(obj.get(k), str):
                return obj[k]
    raise PromptError(f"{path}: entry {str(obj)[:60]!r} has no prompt field (expected one of {', '.join(PROMPT_KEYS)})")


def load_prompts(path: str, limit: int | None = None) -> list[str]:
    """Prompts from a local file (see the module docstring for layouts); at most `limit` of them."""
    if not os.path.isfile(path):
        raise PromptError(f"prompts file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".txt":
            with open(path, encoding="utf-8") as f:
                out = [ln.strip() for ln in f if ln.strip()]
        elif ext == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict):      # e.g. {"category": [prompts...]} (HPDv2 benchmark per style)
                data = [p for v in data.values() for p in (v if isinstance(v, list) else [v])]
            out = [_from_obj(o, path) for o in data]
        elif ext == ".jsonl":
            with open(path, encoding="utf-8") as f:
                out = [_from_obj(json.loads(ln), path) for ln in f if ln.strip()]
        elif ext in (".csv", ".tsv"):
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
            key = next((k for k in PROMPT_KEYS if rows and k in rows[0]), None)
            if key is None:
                raise PromptError(f"{path}: no prompt column (expected one of {', '.join(PROMPT_KEYS)})")
            out = [r[key] for r in rows if r[key]]
        elif ext == ".parquet":
            try:
                import pandas as pd
            except ImportError:
                raise PromptError(f"{path}: reading parquet needs pandas and pyarrow "
                                  "(pip install pandas pyarrow)") from None
            df = pd.read_parquet(path)
            key = next((k for k in PROMPT_KEYS if k in df.columns), None)
            if key is None:
                raise PromptError(f"{path}: no prompt column (expected one of {', '.join(PROMPT_KEYS)})")
            out = [str(x) for x in df[key].tolist()]
        else:
            raise PromptError(f"{path}: unknown prompt file type {ext!r} "
                              "(use .txt, .json, .jsonl, .csv, .tsv or .parquet)")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise PromptError(f"{path}: malformed {ext[1:]} file ({type(e).__name__}: {str(e)[:80]})") from None
    if not out:
        raise PromptError(f"{path}: no prompts found")
    return out[:limit] if limit else out
