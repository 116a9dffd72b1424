"""What the server leaves behind: final mask, manifest, pruned model, report.

Every file is written atomically (temp then rename, see nodes.files), and
only once the last round is done: an aborted federation writes nothing here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from fedprune.models import Layout, LoadedModel

from .files import atomic_write_bytes, atomic_write_dir, atomic_write_text


def packed_mask(final: np.ndarray) -> bytes:
    """The final mask as it is stored and hashed: 1 bit per weight, little-endian bit order."""
    return np.packbits(final, bitorder="little").tobytes()


def mask_summary(final: np.ndarray, packed: bytes, layout: Layout) -> dict:
    """The report's view of the final mask (``packed``: the same, from :func:`packed_mask`)."""
    return {
        "final_mask_sha256": hashlib.sha256(packed).hexdigest(),
        "sparsity": float(final.mean()),
        "sparsity_per_layer": {name: float(m.mean()) for name, m in layout.unflatten(final).items()},
    }


def perplexities(lm: LoadedModel, sources: list[str], seqlen: int, windows: int) -> dict[str, float]:
    """Perplexity of the model as it is now, on each evaluation source."""
    from fedprune.data import eval_windows, load_text, source_label, tokenize
    from fedprune.evaluation import perplexity

    out = {}
    for src in sources:
        ids = tokenize(lm.tokenizer, load_text(src, "evaluation"))
        out[source_label(src)] = perplexity(lm.model, eval_windows(ids, seqlen, windows))
    return out


def write_outputs(
    out_dir: str | Path,
    packed: bytes,
    layout: Layout,
    fingerprint: bytes,
    report: dict,
    lm: LoadedModel | None = None,
) -> None:
    """final-mask.bin (``packed``), manifest.json, pruned-model/ (when ``lm`` is given), report.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "final-mask.bin", packed)
    atomic_write_text(
        out / "manifest.json",
        json.dumps(
            {
                "fingerprint": fingerprint.hex(),
                "bit_order": "little",
                "total": layout.total,
                "layout": layout.to_json(),
                "final_mask_sha256": report["final_mask_sha256"],
            },
            indent=2,
        ),
    )
    if lm is not None:

        def fill(tmp: Path) -> None:
            lm.model.save_pretrained(tmp, safe_serialization=True)
            lm.tokenizer.save_pretrained(tmp)

        atomic_write_dir(out / "pruned-model", fill)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
