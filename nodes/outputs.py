"""What the server leaves behind: final mask, manifest, pruned model, report.

Every file is written atomically (temp then rename, see nodes.files), and
only once the last round is done: an aborted federation writes nothing here.
The pruned model is written block by block during the rounds into a hidden
staging directory (``StagedDir``), renamed to pruned-model/ at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedprune.models import Layout
from fedprune.streaming import BlockSource

from .files import StagedDir, atomic_write_bytes, atomic_write_text
from .masks import PackedMask
from .model import NodeModel


def mask_summary(final: PackedMask, layout: Layout) -> dict:
    """The report's view of the final mask: its digest (of final-mask.bin), its sparsity."""
    return {
        "final_mask_sha256": final.sha256(),
        "sparsity": final.count() / final.length,
        "sparsity_per_layer": {s.name: final.count(s.offset, s.numel) / s.numel for s in layout.slots},
    }


def perplexities(
    lm: NodeModel, sources: list[str], seqlen: int, windows: int, blocks: BlockSource
) -> dict[str, float]:
    """Perplexity of the model whose blocks ``blocks`` loads, on each evaluation source
    (block by block: every window goes through block 0, then block 1, ...)."""
    from fedprune.data import eval_windows, load_text, source_label, tokenize
    from fedprune.evaluation import perplexity

    out = {}
    for src in sources:
        ids = tokenize(lm.tokenizer, load_text(src, "evaluation"))
        out[source_label(src)] = perplexity(lm.model, eval_windows(ids, seqlen, windows), blocks=blocks)
    return out


def write_outputs(
    out_dir: str | Path,
    final: PackedMask,
    layout: Layout,
    fingerprint: bytes,
    report: dict,
    pruned: StagedDir | None = None,
) -> None:
    """final-mask.bin, manifest.json, pruned-model/ (``pruned``, written block by block and
    swapped in here), report.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "final-mask.bin", final.bytes)
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
    if pruned is not None:
        pruned.commit()
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
