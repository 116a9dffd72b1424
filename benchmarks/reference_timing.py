"""Benchmark: our centralized Wanda and one-shot FedPrLLM next to the reference code's
(Pengxin-Guo/FedPrLLM, ``lib/prune.py``), on the same random-weight model and windows.

Issue 9 asks for this on one GPU: the LLaMA-2-7B shape in bf16, 64 windows of 2048
tokens, 16 clients, sparsity 0.5; targets: our one-shot <= 0.5x the reference's, our
centralized <= 0.8x. The device command (one call, from the repo root, about 6 to 8
minutes on an H100; the reference checkout carried as ``.reference``, see below):

    PYTHONUNBUFFERED=1 python3 benchmarks/reference_timing.py --reference .reference/FedPrLLM --shape 7b --device cuda --out $OUT

Before the call, here: ``mkdir -p .reference/FedPrLLM && git -C
/work/.mirror/Pengxin-Guo+FedPrLLM/repo archive HEAD | tar -x -C .reference/FedPrLLM``
(``/.reference/`` is git-ignored; name ``.reference`` in the call's ``carry``). Needs
only torch, transformers and numpy there (and ``fedprune`` from this repo, found
through the script's own folder; no ``datasets``, no network). Results are written
after every run, so a run cut off by the time limit leaves the finished ones in --out
(the reference's one-shot, the longest, runs last and logs each client; it can be rerun
alone with ``--runs one-shot/reference``). The 6 to 8 minutes are an estimate from the
FLOPs (about 0.9 TFLOP per block pass of a 2048-token window; the reference's one-shot
makes 16 x 2 x 64 such passes per block), not yet a measurement.
A CPU check: ``python3 benchmarks/reference_timing.py --reference DIR --shape tiny
--nsamples 16 --seqlen 32 --clients 4 --threads 1``.

What runs, in this order (``--runs`` picks a subset), each on a freshly built model
(``LlamaConfig`` with the ``benchmarks/scale.py`` shape, built on the device, weights
drawn from one seeded generator: normal(0, 0.02), norms 1; one warm-up forward):

1. ``centralized/ours``: ``fedprune.strategies.prune(..., "centralized")``;
2. ``centralized/reference``: its ``prune_wanda`` on all windows (``main.py --method
   centralized``);
3. ``one-shot/ours``: ``prune(..., "one-shot")``, layer group, our default seeded random
   tie-break, batched statistics, no weight scaling;
4. ``one-shot/ours-refsem``: the same with the reference's semantics (``tie_break`` and
   ``stats`` "reference", batch size 1), whose final masks must equal the reference's;
5. ``one-shot/ours-streamed``, only when ``--runs`` names it: our one-shot as ``fedprune
   simulate`` runs it: the fresh model saved as safetensors under ``--work`` (not timed;
   13.5 GB for 7B, so likely still in the page cache), the skeleton loaded by
   ``load_streamed``, then timed: every block read, pruned and written out pruned;
6. ``one-shot/reference``: ``main.py --method fedprllm`` without its disk and evaluation
   steps: the int8 global masks, then per client ``prune_wanda_and_update_global_mask``
   and a weight restore, then ``prune_fedprllm_layer`` (its defaults: layer group, no
   weight scaling). Its weight restore is ``load_state_dict`` from a pinned host copy,
   cheaper than its own ``torch.save`` once and ``torch.load`` per client, and timed.

Both codes see the same windows (seeded random token ids): centralized runs all
``--nsamples`` in order, client c of the one-shot runs windows [c*n, (c+1)*n) with
n = nsamples // clients. The reference's one-shot clients, as in its code, run their
windows in a zero-padded buffer of 128 windows and loop over all ``nsamples`` slots
(the zeros stay zeros but cost forward passes): that is its cost, kept as it is.
Reported per run: wall seconds (``torch.cuda.synchronize()`` on both ends), peak GPU
memory (``max_memory_allocated``, reset before each run, the model's weights
included), and how many weights the two codes prune differently (their final masks:
the weights equal to zero after the run).

Shims, all in this script (the reference's files are only read):

- ``datasets``: ``lib/data.py`` imports it at import time; when it is not installed a
  stub module stands in (its loaders are bypassed: the windows are handed in as the
  ``(input_ids, target)`` pairs its ``get_loaders`` returns).
- ``model.seqlen`` and ``model.hf_device_map = {}``: set by ``main.py`` and by
  ``from_pretrained(device_map="auto")``, which the model here does not come from.
- rotary position embeddings: transformers 5 (here 5.24, 5.17 on the device image)
  computes them once in the model and requires them as ``position_embeddings`` in every
  decoder layer call (without: ``TypeError: cannot unpack non-iterable NoneType``); the reference
  passes only ``attention_mask`` and ``position_ids``. Each decoder layer's ``forward``
  is wrapped (on the reference's model only) to compute them from the model's
  ``rotary_emb`` when they are missing (older transformers did the same inside each
  attention call). Its decoder layers now return a tensor, not a tuple; its ``[0]``
  then takes the batch's one window, which its ``outs[j] = ...`` accepts unchanged.
- on CPU only: ``prune_fedprllm_layer`` calls ``.cuda()`` on each layer's flattened
  counts; ``Tensor.cuda`` is the identity during that call on a machine without CUDA.
- its progress prints go to /dev/null (thousands of lines); the time to format them
  is still in its figures.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.scale import SHAPES, _atomic_write  # noqa: E402

ORDER = (
    "centralized/ours",
    "centralized/reference",
    "one-shot/ours",
    "one-shot/ours-refsem",
    "one-shot/ours-streamed",  # only when --runs names it
    "one-shot/reference",
)
RUNS = tuple(r for r in ORDER if r != "one-shot/ours-streamed")  # the default
REFERENCE_BUFFER = 128  # prepare_calibration_input's default datasize: at most this many windows
LABELS = {
    "ours": "ours",
    "ours-refsem": "ours, reference tie-break + statistics, batch 1",
    "reference": "reference",
    "ours-streamed": "ours, streamed from safetensors (`fedprune simulate`'s path)",
}


class BenchmarkError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def log(message: str) -> None:
    print(f"[reference_timing {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- the reference, imported from --reference --------------------------------------------


def import_reference(directory: Path) -> types.ModuleType:
    """The reference's ``lib/prune.py`` as package ``fedprllm_reference`` (no global ``lib``)."""
    prune_py = directory / "lib" / "prune.py"
    if not prune_py.is_file():
        raise BenchmarkError(
            f"--reference {directory}: no lib/prune.py there (expected a checkout of Pengxin-Guo/FedPrLLM)"
        )
    if importlib.util.find_spec("datasets") is None:
        stub = types.ModuleType("datasets")

        def load_dataset(*_args, **_kwargs):
            raise RuntimeError("datasets is stubbed out by reference_timing.py (its loaders are bypassed)")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub
    package = types.ModuleType("fedprllm_reference")
    package.__path__ = [str(directory / "lib")]
    sys.modules["fedprllm_reference"] = package
    try:
        module = importlib.import_module("fedprllm_reference.prune")
    except Exception as exc:  # its import-time failures are the user's checkout's
        raise BenchmarkError(f"--reference {directory}: cannot import lib/prune.py: {exc}") from exc
    for name in ("prune_wanda", "prune_wanda_and_update_global_mask", "prune_fedprllm_layer", "find_layers"):
        if not hasattr(module, name):
            raise BenchmarkError(f"--reference {directory}: lib/prune.py has no {name}()")
    return module


def shim_reference_model(model, seqlen: int) -> None:
    """What the reference expects of a model that this script does not give it (see the docstring)."""
    import torch

    model.seqlen = seqlen
    model.hf_device_map = {}
    rotary = model.model.rotary_emb
    for layer in model.model.layers:

        def forward(hidden_states, *args, _forward=layer.forward, **kwargs):
            if kwargs.get("position_embeddings") is None:
                position_ids = kwargs.get("position_ids")
                if position_ids is None:
                    position_ids = torch.arange(hidden_states.shape[-2], device=hidden_states.device)[None]
                kwargs["position_embeddings"] = rotary(hidden_states, position_ids)
            return _forward(hidden_states, *args, **kwargs)

        layer.forward = forward


@contextlib.contextmanager
def cuda_is_identity(active: bool):
    """On a machine without CUDA, ``Tensor.cuda()`` returns the tensor itself."""
    import torch

    if not active:
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def reference_loader(windows) -> list:
    """``get_loaders``' structure: a list of (input_ids (1, seqlen), target) pairs."""
    pairs = []
    for window in windows:
        inp = window.unsqueeze(0).clone()
        tar = inp.clone()
        tar[:, :-1] = -100
        pairs.append((inp, tar))
    return pairs


def reference_args(args) -> argparse.Namespace:
    """The fields of main.py's parsed arguments that lib/prune.py reads."""
    return argparse.Namespace(
        nsamples=args.nsamples,
        sparsity_ratio=args.sparsity,
        sparsity_type="unstructured",
        use_variant=False,
        weight_scaling=False,
        client_num=args.clients,
        comparison_group="layer",
        seed=args.seed,
    )


def reference_run(ref, model, kind: str, windows, clients: list, args, device) -> Callable[[], dict]:
    """The reference's centralized Wanda or one-shot FedPrLLM, ready to time (returns extra timings).

    The one-shot's host copy of the weights (for its per-client restore) is made here,
    outside the timed call, as its ``torch.save`` is outside its loop.
    """
    import torch

    rargs = reference_args(args)
    shim_reference_model(model, args.seqlen)
    if kind == "centralized":
        loader = reference_loader(windows)

        def centralized() -> dict:
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                ref.prune_wanda(rargs, model, None, loader, device)
            return {}

        return centralized

    loaders = [reference_loader(client) for client in clients]
    pinned = device.type == "cuda"  # a pinned host copy: the fastest restore a GPU allows
    original = {
        k: torch.empty(v.shape, dtype=v.dtype, pin_memory=pinned).copy_(v)
        for k, v in model.state_dict().items()
    }

    def one_shot() -> dict:
        """main.py --method fedprllm: global masks, clients with a weight restore each, selection."""
        start = time.perf_counter()
        torch.manual_seed(args.seed)  # main.py seeds the global generator; its randperm draws from it
        global_masks = {}
        for i, layer in enumerate(model.model.layers):
            for name, linear in ref.find_layers(layer).items():
                global_masks[f"layer_{i}.{name}"] = torch.zeros(
                    linear.weight.shape, dtype=torch.int8, device=linear.weight.device
                )
        restore = 0.0
        with open(os.devnull, "w") as sink:
            for c, loader in enumerate(loaders):
                with contextlib.redirect_stdout(sink):
                    ref.prune_wanda_and_update_global_mask(rargs, model, global_masks, None, loader, device)
                sync(device)
                t0 = time.perf_counter()
                model.load_state_dict(original)
                sync(device)
                restore += time.perf_counter() - t0
                log(f"  reference client {c + 1}/{len(loaders)} done at {time.perf_counter() - start:.1f} s")
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sink), cuda_is_identity(device.type != "cuda"):
                ref.prune_fedprllm_layer(rargs, model, global_masks, device)
            sync(device)
        return {"selection": time.perf_counter() - t0, "restore": restore}

    return one_shot


# ---- ours --------------------------------------------------------------------------------


def ours_run(model, kind: str, variant: str, windows, clients: list, args) -> Callable[[], dict]:
    """``fedprune.strategies.prune``, ready to time (returns its stage timings)."""
    from fedprune.config import PruneConfig
    from fedprune.strategies import prune

    if variant == "ours-refsem":
        config = PruneConfig(
            args.sparsity, tie_break="reference", stats="reference", seed=args.seed, batch_size=1
        )
    else:
        config = PruneConfig(args.sparsity, seed=args.seed, batch_size=args.batch_size)
    parties = [windows] if kind == "centralized" else clients

    def run() -> dict:
        result = prune(model, parties, config, kind, progress=False, nsamples=args.nsamples, keep_masks=False)
        return {k: v for k, v in result.timings.items() if k in ("calibration", "aggregation", "selection")}

    return run


def streamed_run(model, clients: list, args, device, work: Path) -> Callable[[], dict]:
    """Our one-shot as ``fedprune simulate`` runs it: the model saved as safetensors (not
    timed), its skeleton loaded by ``load_streamed``; timed: every block read from disk,
    pruned and written out pruned (``PrunedWriter``), as simulate's ``--save-model``."""
    from benchmarks.scale import _byte_tokenizer
    from fedprune.config import PruneConfig
    from fedprune.strategies import prune
    from fedprune.streaming import PrunedWriter, load_streamed

    source, pruned = work / "source", work / "pruned"
    model.save_pretrained(source)
    _byte_tokenizer().save_pretrained(source)
    lm = load_streamed(str(source), args.dtype, str(device))
    config = PruneConfig(args.sparsity, seed=args.seed, batch_size=args.batch_size)

    def run() -> dict:
        writer = PrunedWriter(lm, pruned)
        result = prune(
            lm.model,
            clients,
            config,
            "one-shot",
            progress=False,
            nsamples=args.nsamples,
            blocks=lm.blocks(on_release=writer.write_block),
            keep_masks=False,
        )
        writer.finish()
        return {
            k: v for k, v in result.timings.items() if k in ("calibration", "selection", "load", "release")
        }

    run.pruned_dir = pruned  # type: ignore[attr-defined]  (read back for the mask comparison)
    return run


# ---- the model, the data, the masks ------------------------------------------------------


def build_model(args, device):
    """A fresh random-weight LLaMA of ``--shape`` on the device, the same weights every time."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **SHAPES[args.shape], max_position_embeddings=max(2048, args.seqlen), use_cache=False
    )
    dtype = getattr(torch, args.dtype)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            else:
                param.fill_(1.0)  # norms
        model(torch.zeros((1, min(args.seqlen, 64)), dtype=torch.long, device=device))  # warm-up
    return model


def calibration(args):
    """All windows (nsamples, seqlen) and the clients' contiguous shares."""
    import torch

    vocab = SHAPES[args.shape]["vocab_size"]
    windows = torch.randint(
        0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(args.seed)
    )
    per_client = args.nsamples // args.clients
    return windows, [windows[c * per_client : (c + 1) * per_client] for c in range(args.clients)]


_BITS = None


def pruned_pattern(weights: Iterable[tuple[str, object]]) -> dict:
    """Which weights are zero, per prunable matrix ((name, weight) pairs), bit-packed on the
    host (8x smaller)."""
    import torch

    packed = {}
    for name, weight in weights:
        bits = (weight == 0).flatten()
        pad = (-bits.numel()) % 8
        if pad:
            bits = torch.cat([bits, bits.new_zeros(pad)])
        shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
        packed[name] = (bits.view(-1, 8).to(torch.uint8) << shifts).sum(1).to(torch.uint8).cpu()
    return packed


def saved_weights(directory: Path, names, device) -> Iterator[tuple[str, object]]:
    """The prunable matrices of a saved model, one at a time (on the device)."""
    from safetensors import safe_open

    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    for name in names:
        with safe_open(str(directory / index[name + ".weight"]), framework="pt", device=str(device)) as f:
            yield name, f.get_tensor(name + ".weight")


def popcount(pattern: dict) -> int:
    """Set bits in a packed pattern (the weights it marks)."""
    import torch

    global _BITS
    if _BITS is None:
        _BITS = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
    return sum(int(_BITS[packed.long()].sum()) for packed in pattern.values())


def differing(a: dict, b: dict) -> int:
    """Weights pruned by one pattern and not the other."""
    if a.keys() != b.keys():
        raise RuntimeError("the two runs pruned different sets of matrices")
    return popcount({n: a[n] ^ b[n] for n in a})


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the report --------------------------------------------------------------------------


def markdown(rows: list[dict], comparisons: list[dict], meta: dict) -> str:
    lines = [
        f"{meta['shape']} shape, {meta['dtype']}, {meta['device_name']}; {meta['nsamples']} windows x "
        f"{meta['seqlen']} tokens, {meta['clients']} clients (one-shot), sparsity {meta['sparsity']}, "
        f"seed {meta['seed']}; torch {meta['torch']}, transformers {meta['transformers']}"
        + (f"; {meta['threads']} CPU threads" if meta["device"] == "cpu" else ""),
        "",
        "| run | code | wall s | ours / reference | peak GPU GiB |",
        "|---|---|---|---|---|",
    ]
    ref_wall = {r["run"]: r["wall_s"] for r in rows if r["code"] == "reference"}
    for r in rows:
        ratio = "-"
        if r["code"] != "reference" and r["run"] in ref_wall:
            ratio = f"{r['wall_s'] / ref_wall[r['run']]:.2f}"
        gpu = f"{r['peak_gpu_bytes'] / 2**30:.2f}" if r.get("peak_gpu_bytes") else "-"
        run = r["run"] if r["run"] == "centralized" else f"one-shot, {meta['clients']} clients"
        lines.append(f"| {run} | {LABELS[r['code']]} | {r['wall_s']:.1f} | {ratio} | {gpu} |")
    if comparisons:
        lines += ["", "| final masks | weights pruned differently | of prunable weights |", "|---|---|---|"]
        for c in comparisons:
            lines.append(f"| {c['what']} | {c['differing']} | {c['total']} |")
    return "\n".join(lines) + "\n"


def write(out: Path | None, rows: list[dict], comparisons: list[dict], meta: dict) -> str:
    table = markdown(rows, comparisons, meta)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "runs": rows, "mask_comparisons": comparisons}
        _atomic_write(out / "reference_timing.json", json.dumps(payload, indent=2))
        _atomic_write(out / "reference_timing.md", table)
    return table


# ---- main --------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, type=Path, help="a checkout of Pengxin-Guo/FedPrLLM")
    p.add_argument("--shape", default="7b", choices=list(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows in all")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="our windows per forward pass")
    p.add_argument("--runs", default=",".join(RUNS), help=f"a subset of {','.join(ORDER)}")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU checks)")
    p.add_argument("--work", default=None, help="scratch folder for the streamed run's safetensors")
    p.add_argument("--out", type=Path, default=None, help="folder for reference_timing.md / .json")
    return p.parse_args(argv)


def check_args(args) -> list[str]:
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in ORDER]
    if unknown or not runs:
        raise BenchmarkError(
            f"--runs: unknown run {unknown[0] if unknown else '(none)'}; choose from {', '.join(RUNS)}"
        )
    if args.clients < 1 or args.nsamples < args.clients:
        raise BenchmarkError(f"--nsamples {args.nsamples} cannot be split across --clients {args.clients}")
    if args.nsamples > REFERENCE_BUFFER:
        raise BenchmarkError(
            f"--nsamples {args.nsamples}: the reference's buffers hold {REFERENCE_BUFFER} windows"
        )
    if not 0.0 < args.sparsity < 1.0:
        raise BenchmarkError(f"--sparsity must be in (0, 1), got {args.sparsity}")
    return [r for r in ORDER if r in runs]  # always in the documented order


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        runs = check_args(args)
        ref = (
            import_reference(args.reference.resolve())
            if any(r.endswith("/reference") for r in runs)
            else None
        )
        import torch
        import transformers

        if args.device == "cuda" and not torch.cuda.is_available():
            raise BenchmarkError("--device cuda: torch sees no CUDA device")
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import fedprune
    from fedprune.models import prunable_weights

    prune_py = args.reference / "lib" / "prune.py"
    meta = {
        "shape": args.shape,
        "dtype": args.dtype,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "clients": args.clients,
        "sparsity": args.sparsity,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fedprune": str(Path(fedprune.__file__).parent),
        "reference_prune_py_sha256": hashlib.sha256(prune_py.read_bytes()).hexdigest()
        if prune_py.is_file()
        else None,
    }
    log(
        f"{args.shape} {args.dtype} on {meta['device_name']}; runs: {', '.join(runs)}; fedprune from {meta['fedprune']}"
    )
    windows, clients = calibration(args)
    rows: list[dict] = []
    comparisons: list[dict] = []
    patterns: dict[str, dict] = {}
    total = None
    for name in runs:
        kind, code = name.split("/")
        log(f"{name}: building the model")
        model = build_model(args, device)
        if total is None:
            names = list(prunable_weights(model))
            total = sum(w.numel() for w in prunable_weights(model).values())
        with tempfile.TemporaryDirectory(prefix="reference-timing-", dir=args.work) as work:
            if code == "reference":
                timed = reference_run(ref, model, kind, windows, clients, args, device)
            elif code == "ours-streamed":
                log(f"{name}: saving the model as safetensors (not timed)")
                timed = streamed_run(model, clients, args, device, Path(work))
                del model  # the timed run holds only the streamed skeleton and one block
                model = None
                free(device)
            else:
                timed = ours_run(model, kind, code, windows, clients, args)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            log(f"{name}: running")
            sync(device)
            start = time.perf_counter()
            extra = timed()
            sync(device)
            wall = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            if model is None:
                patterns[name] = pruned_pattern(saved_weights(timed.pruned_dir, names, device))
            else:
                patterns[name] = pruned_pattern(prunable_weights(model).items())
            del model, timed
            free(device)
        pruned = popcount(patterns[name])
        rows.append(
            {
                "run": kind,
                "code": code,
                "wall_s": wall,
                "peak_gpu_bytes": peak,
                "sparsity": pruned / total,
                "stages_s": extra,
            }
        )
        log(
            f"{name}: {wall:.1f} s, sparsity {pruned / total:.4f}"
            + (f", peak GPU {peak / 2**30:.2f} GiB" if peak else "")
        )
        comparisons += compare(patterns, kind, total)
        table = write(args.out, rows, comparisons, {**meta, "finished": len(rows) == len(runs)})
    print(table, end="")
    return 0


def free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compare(patterns: dict, kind: str, total: int) -> list[dict]:
    """Mask differences against the reference once both sides of ``kind`` exist (then freed)."""
    reference = patterns.get(f"{kind}/reference")
    if reference is None:
        return []
    found = []
    for name in [n for n in patterns if n.startswith(f"{kind}/") and n != f"{kind}/reference"]:
        code = name.split("/")[1]
        found.append(
            {
                "what": f"{kind}: {LABELS[code]} vs reference",
                "differing": differing(patterns[name], reference),
                "total": total,
            }
        )
        del patterns[name]
    del patterns[f"{kind}/reference"]
    return found


if __name__ == "__main__":
    sys.exit(main())
